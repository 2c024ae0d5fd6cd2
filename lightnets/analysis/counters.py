"""FBN convs for the common third-party counters, thop and ptflops.

Both find the layers they count by their exact type (``type(module) in their table``), so an
`FBNConv2d` is counted as nothing: an FBN model shows only its plain convs and linears there
(finet_large with G=4: about 41M of its 303M MACs). Two ways to get the right number:

- count the fused model: ``thop.profile(lightnets.fuse(model), ...)``: every FBN conv is an
  `nn.Conv2d` there, which is also what runs at inference;
- or pass the hooks below: ``thop.profile(model, inputs, custom_ops=THOP_CUSTOM_OPS)`` or
  ``ptflops.get_model_complexity_info(model, ..., custom_modules_hooks=PTFLOPS_CUSTOM_HOOKS)``.

The hooks count an FBN conv as the one convolution it is at inference (C_in x k x k
multiply-accumulates per output value, lightnets.profile's convention), each as its counter
counts that `nn.Conv2d` with its bias: ptflops adds one per output value for the bias, thop
(0.1.1, `count_convNd`) counts no bias. fvcore traces the eval forward, where an FBN conv is
one `conv2d` call, so it needs nothing. Nothing here imports a counter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightnets.nn.fbn import FBNConv2d

__all__ = ["PTFLOPS_CUSTOM_HOOKS", "THOP_CUSTOM_OPS", "fbn_conv_ops"]


def fbn_conv_ops(module: nn.Module, output: torch.Tensor, bias: bool = True) -> int:
    """Multiply-accumulates of an FBN conv at inference, plus its bias adds (one per output)
    unless bias=False."""
    per_output = module.weight[0].numel()  # C_in x kh x kw (FBN convs have groups = 1)
    return int(output.numel()) * (per_output + int(bias))


def _thop_fbn(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    # thop 0.1.1 counts a conv as N x C_out x H x W x C_in/groups x kh x kw, without its bias
    module.total_ops += torch.DoubleTensor([fbn_conv_ops(module, output, bias=False)])


def _ptflops_fbn(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    module.__flops__ += fbn_conv_ops(module, output)


#: thop.profile(model, inputs, custom_ops=THOP_CUSTOM_OPS)
THOP_CUSTOM_OPS = {FBNConv2d: _thop_fbn}
#: ptflops.get_model_complexity_info(..., custom_modules_hooks=PTFLOPS_CUSTOM_HOOKS)
PTFLOPS_CUSTOM_HOOKS = {FBNConv2d: _ptflops_fbn}
