"""Binary networks to Larq Compute Engine (LCE): real 1-bit convolutions on phones and x86.

PyTorch has no binary kernels: our packed models unpack to float and run torch's float
convolutions. LCE (Larq's inference engine, a TensorFlow Lite build with binary ops) does,
but larq trains only in TensorFlow. `to_larq(model, input_size)` closes that gap without
writing flatbuffers by hand: it reads the model's data flow (torch.fx) and builds the same
function as a larq / Keras model with our weights; `convert(model, input_size)` hands that to
LCE's own converter (`larq_compute_engine.convert_keras_model`), which writes the TFLite
flatbuffer with `LceBconv2d` for every binary convolution, folds BatchNorm into its output
transform (thresholds when the next layer binarizes) and runs max-pools on bits. The usual
entry is `lightnets.export(model, "m.tflite", input_size, format="lce")`, which also checks the
file in LCE's interpreter (see lightnets.deploy.export).

What is translated, and how the function is kept (torch is NCHW, Keras NHWC):
- `BinaryConv2d` with a sign input quantizer -> larq `QuantConv2D` (input and kernel
  ``ste_sign``; in eval every sign quantizer is sign with sign(0) = +1, as larq's). Our zero
  padding is applied after the input is binarized (padded positions hold 0), which is larq's
  ``pad_values=0``; LCE pads binary convolutions only as TensorFlow's "same", so a padding
  that differs from "same" at the layer's input size (e.g. stride 2 with symmetric padding on
  an even size) is refused, naming the layer. Bop weights are +1/-1; latent weights go in as
  they are with larq's quantizer (``ste_sign``, or ``MagnitudeAwareSign`` for our
  magnitude_aware_sign). The first layer (real input, no input quantizer) becomes a float
  convolution with the binarized weights, as in every BNN.
- `BinaryLinear` -> a 1x1 binary convolution (LCE has no binary fully-connected op): the
  features are kept as an N x 1 x 1 x F map, and a flatten of an H x W x C map permutes the
  linear weight's columns from torch's (C, H, W) order to Keras' (H, W, C) order instead of
  transposing the activations.
- `nn.Conv2d` / `nn.Linear` (real) -> Conv2D (depthwise: DepthwiseConv2D) / 1x1 Conv2D;
  `BatchNorm1d/2d` (eval statistics) -> BatchNormalization, in the model's order (BN before or
  after a max-pool as the model has it); `MaxPool2d`, `AvgPool2d` (no padding),
  `AdaptiveAvg/MaxPool2d(1)`, `Flatten` / `torch.flatten(x, 1)`, ReLU, ReLU6, LeakyReLU,
  Hardtanh, Sigmoid, Tanh, Softmax, Identity and Dropout (eval), `+` and `torch.cat(dim=1)`.
  Anything else is refused with the node and what is supported.

Near-ties. A binary network takes signs, so a value within a rounding error of 0 can come out
with either sign: after a layer with real input (TFLite's float convolution sums in another
order than torch's), or where a BatchNorm's threshold lands exactly on an integer that the
binary sum attains (LCE's fused threshold and torch's BN arithmetic then disagree at the tie;
trained running means are moving averages and practically never integers). A threshold
between integers is exact in both. `tie_margins(model, x)` measures, per sample, the smallest
|value| that gets binarized relative to the largest in its layer; the export check draws
inputs until it has a batch whose margins are all above NEAR_TIE, and compares those.

TensorFlow is optional (``pip install "lightnets[lce]"``); it is imported only here, with
``TF_USE_LEGACY_KERAS=1`` set first (larq 0.14 needs Keras 2, TensorFlow 2.16 defaults to 3).
"""

from __future__ import annotations

import math
import platform
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lightnets.deploy.larq_model import (
    LCE_INSTALL,
    flatten_order,
    lce_available,
    lce_stack,
    quiet_tensorflow,
    sign_kind,
    to_larq,
)
from lightnets.nn.binary import is_binary_layer

__all__ = [
    "LCE_INSTALL",
    "NEAR_TIE",
    "LceModel",
    "binary_op_names",
    "convert",
    "flatten_order",
    "lce_available",
    "op_counts",
    "tie_margins",
    "to_larq",
]

#: A binarized value this close to 0, relative to the largest in its layer (4 float32 ulps of
#: it), is a near-tie: where the two engines' roundings could give it different signs.
NEAR_TIE = 2.0**-22
#: LCE's binary ops in a flatbuffer.
BINARY_OPS = ("LceBconv2d", "LceBMaxPool2d", "LceQuantize", "LceDequantize")


def convert(model: nn.Module, input_size: Sequence[int]) -> bytes:
    """The LCE flatbuffer (TFLite with LCE's binary ops) of `model`, by LCE's converter."""
    keras_model = to_larq(model, input_size)
    with quiet_tensorflow():
        return bytes(lce_stack().lce.convert_keras_model(keras_model))


def op_counts(flatbuffer: bytes) -> dict[str, int]:
    """How many times each operator occurs in the flatbuffer's main graph, by name (TFLite
    builtins such as CONV_2D, LCE's custom ops such as LceBconv2d)."""
    lce_stack()
    from tensorflow.lite.python import schema_py_generated as schema  # noqa: PLC0415 (lce)

    builtin = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytearray(flatbuffer), 0))
    names = []
    for code in model.operatorCodes:
        if code.customCode:
            names.append(code.customCode.decode())
        else:
            names.append(builtin.get(max(code.builtinCode, code.deprecatedBuiltinCode), "?"))
    return dict(Counter(names[op.opcodeIndex] for op in model.subgraphs[0].operators))


def binary_op_names() -> tuple[str, ...]:
    """LCE's binary operators (what `op_counts` reports for binary work)."""
    return BINARY_OPS


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


class LceModel(nn.Module):
    """A flatbuffer in LCE's interpreter as a module: NCHW in, torch's layout out (maps come
    back as NCHW), on the CPU, so it sits beside torch models in lightnets.analysis.latency.

    num_threads, use_indirect_bgemm, use_xnnpack: the interpreter's options. LCE's default
    binary kernels are written for ARM; on x86 they fall back to generic code slower than its
    reference kernel, so use_indirect_bgemm=None (the default) picks LCE's indirect-BGEMM
    kernel on x86 and the default kernels elsewhere (benchmarks/binary_infer.py times both).
    """

    def __init__(
        self,
        flatbuffer: bytes,
        num_threads: int = 1,
        use_indirect_bgemm: bool | None = None,
        use_xnnpack: bool = False,
    ) -> None:
        super().__init__()
        stack = lce_stack()
        if use_indirect_bgemm is None:
            use_indirect_bgemm = _is_x86()
        self.use_indirect_bgemm = use_indirect_bgemm
        self.interpreter = stack.Interpreter(
            bytes(flatbuffer),
            num_threads=num_threads,
            use_indirect_bgemm=use_indirect_bgemm,
            use_xnnpack=use_xnnpack,
        )

    def forward(self, x: Tensor) -> Tensor:
        array = x.detach().to("cpu", torch.float32).numpy()
        if array.ndim == 4:
            array = np.ascontiguousarray(array.transpose(0, 2, 3, 1))
        out = np.asarray(self.interpreter.predict(array))
        if out.ndim == 4:
            out = out.transpose(0, 3, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(out))


def tie_margins(model: nn.Module, x: Tensor) -> Tensor:
    """Per sample, the smallest |value| a binary layer binarizes, relative to the largest
    |value| of that layer's input for that sample (min over layers); +inf without binary
    inputs. Below NEAR_TIE, float rounding may decide a sign (see the module docstring)."""
    margins = torch.full((x.shape[0],), math.inf, dtype=torch.float64)
    hooks = []

    def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        v = args[0].detach().abs().flatten(1).double()
        scale = v.max(1).values.clamp_min(1e-30)
        margins.copy_(torch.minimum(margins, v.min(1).values / scale))

    for m in model.modules():
        if is_binary_layer(m) and sign_kind(m.input_quantizer) == "sign":
            hooks.append(m.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return margins
