"""1-bit packing of binary weights and packed inference.

`pack_binary(model)` returns an eval-mode copy of `model` in which every `BinaryConv2d` /
`BinaryLinear` (lightnets.nn.binary, either mode) is its packed twin, `PackedBinaryConv2d` /
`PackedBinaryLinear`: the +1/-1 weight is stored as bits, one bit per weight, in a uint8
buffer ``weight_bits``. Real layers are left as they are (`lightnets.fuse` on the packed model
folds their BatchNorms; it leaves packed layers alone).

Bit order. The weight (out, in, kh, kw) (Linear: (out, in)) is packed along the input-channel
axis: ``weight_bits`` has shape (out, kh, kw, ceil(in / 8)) (Linear: (out, ceil(in / 8))) and
bit i of byte j (i = 0 the least significant bit) holds input channel 8 j + i of that (out, kh,
kw): 1 for +1, 0 for -1. Padding bits past the last channel are 0 and never read. The weight a
layer packs is the one its forward pass uses: in bop mode the stored +1/-1 weight (checked);
in latent mode kernel_quantizer(latent weight) in eval, which for the sign quantizers
(ste_sign, approx_sign, stochastic_sign, swish_sign; in eval all are sign with sign(0) = +1)
is sign(weight). The magnitude-aware sign (Bi-Real) is mean(|w|) * sign(w) per output
channel: its signs are packed and the means become the packed layer's per-channel scale (times
a folded BN's). Any other kernel quantizer, None included (real weights), is refused.

Forward. The bits are unpacked to +1/-1 in the input's dtype (a gather from a 256 x 8 table)
and the same F.conv2d / F.linear runs on input_quantizer(x) (a built-in quantizer is its eval
forward, sign(x); None passes x through). The unpacked weight is cached per device, dtype and
buffer version (``cache_weights=True``, the default: unpacking binarynet_cifar's 14.0M weights
takes tens of milliseconds, several times its batch-1 forward; the cache holds as much memory
as the float weights, ``cache_weights=False`` unpacks on every call instead). Packed layers
are for inference: they hold no parameters, only buffers, and never train.

BatchNorm folding ("BN folded where it can be"). A BN after a binary layer cannot be folded
into the weights (they would stop being +1/-1), but in eval it is a per-channel affine map,
y = a z + b with a = gamma / sqrt(running_var + eps) and b = beta + a (bias - running_mean),
so the packed layer stores a (``scale``) and b (``shift``) as real per-output-channel vectors
(computed in float64, stored in the BN's dtype) and applies them after the binary matmul; the
BN becomes nn.Identity. The pairs are read from the data flow as `lightnets.fuse` reads them
(torch.fx, or direct succession in nn.Sequential): a BN fed only by the binary layer, or fed
only by a MaxPool fed only by the binary layer (binarynet_cifar's ``original=True``: conv -
pool - BN). Through a max-pool the fold is valid only when every scale is > 0 (max(a z + b) =
a max(z) + b needs a increasing); otherwise that BN is kept as it is. BNs without running
statistics are kept too. ``fold_bn=False`` keeps every BN.

Exactness. Unfolded, a packed layer computes exactly what the binary layer computes in eval:
the same kernel on the same +1/-1 weights (same memory layout) and the same sign of the
input, so ``pack_binary(model, fold_bn=False)`` gives bit-identical outputs (except for
magnitude-aware kernels: alpha * conv(x, sign w) rounds differently from conv(x, alpha sign w),
by float32 ulps). Folded, the binary
matmul of +1/-1 inputs is integer-valued and exact in float32 (|sum| <= fan_in < 2^24), and
one rounding of a z + b replaces torch's eval-BN arithmetic: the two differ by a few float32
ulps of the larger of |a z| and |b| (the tests assert rtol 1e-5, atol 1e-5 max|logit|, and
identical predictions). Those ulps matter only where the next layer takes the sign of a
value within an ulp of 0: after a layer with real input (the first conv) by chance, and
where a running mean equals an integer the matmul attains, so that the exact value is 0
(torch's eval BN rounds it to +-1 ulp too, with a sign of its own); running means that are
moving averages practically never are integers. Through a max-pool, rounding is monotone,
so pooling commutes with the fold exactly.

Files. `save_packed(model, path)` writes, atomically, a torch.save file of plain containers
(no pickled classes): {"format": "lightnets-packed", "version", "spec": JSON text, "state":
the packed model's state_dict}, read back by `load_packed(path)` with
``torch.load(weights_only=True)``. The spec names the registry model and its keyword
arguments (recorded by `lightnets.create_model`, or given to save_packed) and lists the
modules that packing replaced (packed layers with their shapes, folded BNs as Identity); the
model is rebuilt from the registry and the state loaded strictly. (safetensors is not a
dependency of lightnets, and is not a pure-Python wheel; torch's weights-only loader reads
tensors and plain containers only.) binarynet_cifar's file is about 1/31 of its float32
state_dict (1.8 MB vs 56 MB); see benchmarks/binary_infer.py.

Export. `lightnets.export` packs binary layers (folding BN when fuse=True) and exports the
packed model: the graph holds the uint8 bits as initializers and the ops that unpack them
(Cast, Gather from a 256 x 8 table of +1/-1, Reshape, Slice, Transpose) in front of each Conv
/ Gemm, so the file is about as small as the packed file (the exporter's constant folding is
turned off for packed models, and its per-node debug metadata dropped, since folding would
write the float32 weights); onnxruntime folds those constant subgraphs into float weights
when it creates the session (once, a fraction of a second for binarynet_cifar). The
trade-off: a runtime that does not fold constants unpacks on every run. While tracing or
exporting, the weight cache is not used (it would land in the file as float32 weights).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightnets.deploy.fuse import find_pairs, is_eval_affine_norm, set_module
from lightnets.errors import UserError
from lightnets.nn.binary import (
    QUANTIZERS,
    SIGN_QUANTIZERS,
    BinaryConv2d,
    BinaryLinear,
    _sign,
    _takes_training,
    get_quantizer,
    is_binary_layer,
    magnitude_aware_sign,
    sign_scale,
)

__all__ = [
    "FORMAT",
    "VERSION",
    "PackedBinaryConv2d",
    "PackedBinaryLinear",
    "is_packed_layer",
    "load_packed",
    "pack_binary",
    "pack_signs",
    "packed_weight_count",
    "save_packed",
    "unpack_signs",
]

FORMAT = "lightnets-packed"
VERSION = 1

#: The functions of the quantizers whose eval forward is the plain sign.
_SIGN_QUANTIZERS = frozenset(QUANTIZERS[name] for name in SIGN_QUANTIZERS)


# ----------------------------------------------------------------------------- bits


def pack_signs(weight: Tensor) -> Tensor:
    """uint8 sign bits of `weight` (out, in, *k), packed along the input-channel axis.

    Returns (out, *k, ceil(in / 8)); bit i of byte j is channel 8 j + i: 1 where weight >= 0
    (or NaN; the +1 of `lightnets.nn.binary`'s sign), 0 where weight < 0; padding bits are 0.
    """
    if weight.dim() < 2:
        raise ValueError(f"pack_signs needs a weight of shape (out, in, ...), got {weight.shape}")
    cin = weight.shape[1]
    nbytes = (cin + 7) // 8
    bits = (~(weight.detach() < 0)).to(torch.uint8).movedim(1, -1)
    bits = F.pad(bits, (0, 8 * nbytes - cin)).reshape(*bits.shape[:-1], nbytes, 8)
    shifts = torch.arange(8, device=weight.device, dtype=torch.uint8)
    return torch.bitwise_left_shift(bits, shifts).sum(-1, dtype=torch.uint8)


def _sign_table(device: torch.device, dtype: torch.dtype) -> Tensor:
    """(256, 8): row v is the +1/-1 of bits 0..7 of v (exact float arithmetic, exportable)."""
    v = torch.arange(256, device=device, dtype=torch.float32).unsqueeze(1)
    q = torch.floor(v / torch.pow(2.0, torch.arange(8, device=device, dtype=torch.float32)))
    bit = q - 2 * torch.floor(q * 0.5)
    return (bit * 2 - 1).to(dtype)


def unpack_signs(bits: Tensor, in_channels: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The +1/-1 weight (out, in_channels, *k), contiguous, that `pack_signs` packed into `bits`."""
    if bits.dtype != torch.uint8:
        raise ValueError(f"unpack_signs needs uint8 bits, got {bits.dtype}")
    if bits.shape[-1] != (in_channels + 7) // 8:
        raise ValueError(
            f"bits of shape {tuple(bits.shape)} cannot hold {in_channels} input channels"
        )
    table = _sign_table(bits.device, dtype)
    signs = F.embedding(bits.long(), table)  # (out, *k, nbytes, 8)
    signs = signs.flatten(-2)[..., :in_channels]
    if signs.dim() > 2:  # (out, *k, in) -> (out, in, *k); explicit dims for ONNX's Transpose
        last = signs.dim() - 1
        signs = signs.permute(0, last, *range(1, last))
    return signs.contiguous()


def _is_tracing() -> bool:
    return bool(
        torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or torch.onnx.is_in_onnx_export()
        or torch.jit.is_scripting()
    )


# ----------------------------------------------------------------------------- layers


def _quantizer_name(spec: Any) -> str | None:
    """The built-in name of a quantizer spec, None for None; a custom callable raises."""
    if spec is None or isinstance(spec, str):
        return spec
    for name, fn in QUANTIZERS.items():
        if spec is fn:
            return name
    raise UserError(
        f"input quantizer {getattr(spec, '__name__', spec)!r} is a custom function: a packed "
        f"file can only name built-in quantizers ({', '.join(QUANTIZERS)}) or None"
    )


def _check_kernel_quantizer(name: str, layer: nn.Module) -> None:
    spec = layer.kernel_quantizer
    if layer.mode == "bop":
        w = layer.weight.detach()
        if not bool(((w == 1) | (w == -1)).all()):
            raise UserError(
                f"cannot pack {name or type(layer).__name__}: it is in mode='bop' but its "
                "weight holds values other than +1/-1; expected +1/-1 weights"
            )
        return
    if spec in QUANTIZERS or spec in QUANTIZERS.values():
        return
    what = (
        "None (full-precision weights)" if spec is None else repr(getattr(spec, "__name__", spec))
    )
    raise UserError(
        f"cannot pack {name or type(layer).__name__}: its kernel_quantizer is {what}, not a "
        f"sign; expected one of {', '.join(QUANTIZERS)} (packed weights are +1/-1 bits)"
    )


class _PackedBinary(nn.Module):
    """What PackedBinaryConv2d and PackedBinaryLinear share: bits, optional bias/scale/shift."""

    weight_bits: Tensor
    bias: Tensor | None
    scale: Tensor | None
    shift: Tensor | None

    def _setup(
        self,
        weight_shape: tuple[int, ...],
        bias: bool,
        affine: bool,
        input_quantizer: Any,
        cache_weights: bool,
        device: Any,
        dtype: torch.dtype | None,
    ) -> None:
        out, cin, *kernel = weight_shape
        self.in_features_per_group = cin
        self.weight_shape = tuple(weight_shape)
        dtype = dtype or torch.get_default_dtype()
        nbytes = (cin + 7) // 8
        bits = torch.zeros((out, *kernel, nbytes), dtype=torch.uint8, device=device)
        self.register_buffer("weight_bits", bits)
        vec = {"device": device, "dtype": dtype}
        self.register_buffer("bias", torch.zeros(out, **vec) if bias else None)
        self.register_buffer("scale", torch.ones(out, **vec) if affine else None)
        self.register_buffer("shift", torch.zeros(out, **vec) if affine else None)
        self.input_quantizer = input_quantizer
        self.cache_weights = bool(cache_weights)
        self._cache: tuple[tuple, Tensor] | None = None

    # input quantizer: built-ins are their eval forward (sign); a custom callable is called
    @property
    def input_quantizer(self) -> Any:
        """A quantizer name, a callable, or None (real input), as the binary layer had it."""
        return self._input_spec

    @input_quantizer.setter
    def input_quantizer(self, spec: Any) -> None:
        fn = get_quantizer(spec)
        self._input_spec = spec
        self._input_builtin = spec is None or spec in SIGN_QUANTIZERS or spec in _SIGN_QUANTIZERS
        self._input_fn = fn
        self._input_training = _takes_training(fn)

    @property
    def affine(self) -> bool:
        """Whether a folded BatchNorm's per-channel scale and shift follow the binary matmul."""
        return self.scale is not None

    def num_weights(self) -> int:
        """The number of binary weights the bits stand for."""
        n = 1
        for s in self.weight_shape:
            n *= s
        return n

    def _quantize_input(self, x: Tensor) -> Tensor:
        if self._input_spec is None:
            return x
        if self._input_builtin:
            return _sign(x)
        if self._input_training:
            return self._input_fn(x, training=False)
        return self._input_fn(x)

    def unpacked_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The +1/-1 weight, shaped as the binary layer's, in `dtype` (never cached)."""
        return unpack_signs(self.weight_bits, self.in_features_per_group, dtype)

    def _weight(self, dtype: torch.dtype) -> Tensor:
        if not self.cache_weights or _is_tracing():
            return self.unpacked_weight(dtype)
        bits = self.weight_bits
        key = (bits.device, dtype, bits.data_ptr(), bits._version)
        if self._cache is None or self._cache[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                self._cache = (key, self.unpacked_weight(dtype))
        return self._cache[1]

    def _affine(self, y: Tensor, channel_dim: int) -> Tensor:
        if self.scale is None:
            return y
        shape = [1] * y.dim()
        shape[channel_dim] = -1
        scale = self.scale.to(y.dtype).reshape(shape)
        shift = self.shift.to(y.dtype).reshape(shape)
        return torch.addcmul(shift, y, scale)

    def clear_cache(self) -> None:
        """Drop the cached unpacked weight (it is rebuilt on the next forward)."""
        self._cache = None

    def __getstate__(self) -> dict[str, Any]:  # deepcopy / pickle: no cached float weights
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        bits = state_dict.get(prefix + "weight_bits")
        if isinstance(bits, Tensor) and bits.dtype != torch.uint8:
            raise UserError(
                f"{prefix}weight_bits in the state_dict is {bits.dtype}: expected uint8 sign "
                "bits written by lightnets.pack_binary"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._cache = None

    def _packed_repr(self) -> str:
        s = f", input_quantizer={_spec_text(self._input_spec)}"
        s += f", bits={tuple(self.weight_bits.shape)}"
        if self.affine:
            s += ", affine=True"
        return s

    @classmethod
    @torch.no_grad()
    def from_binary(
        cls,
        layer: nn.Module,
        scale: Tensor | None = None,
        shift: Tensor | None = None,
        *,
        cache_weights: bool = True,
    ) -> _PackedBinary:
        """The packed twin of `layer` (its eval forward), with a folded BN's scale / shift."""
        config = cls._config_of(layer, affine=scale is not None)
        packed = cls(**config, cache_weights=cache_weights)
        _fill(packed, layer, scale, shift)
        return packed

    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments, JSON-serializable (see save_packed); each packed
        layer class (PackedBinaryConv2d, PackedBinaryLinear) says its own."""
        raise NotImplementedError(f"{type(self).__name__} must define config()")


def _spec_text(spec: Any) -> str:
    if spec is None or isinstance(spec, str):
        return repr(spec)
    return getattr(spec, "__name__", None) or repr(spec)


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[1]))
    return (int(v), int(v))


def _reversed_padding(
    padding: Any, kernel_size: tuple[int, int], dilation: tuple[int, int]
) -> list[int]:
    """torch's _ConvNd._reversed_padding_repeated_twice (for padding modes other than zeros)."""
    if isinstance(padding, str):
        out = [0, 0] * len(kernel_size)
        if padding == "same":
            for d, k, i in zip(dilation, kernel_size, range(len(kernel_size) - 1, -1, -1)):
                total = d * (k - 1)
                left = total // 2
                out[2 * i], out[2 * i + 1] = left, total - left
        return out
    return [p for p in reversed(padding) for _ in range(2)]


class PackedBinaryConv2d(_PackedBinary):
    """A BinaryConv2d with its +1/-1 weight stored as bits; see the module docstring.

    y = conv2d(input_quantizer(x), W) [+ bias], then scale * y + shift when a BatchNorm was
    folded in (affine=True). Buffers: weight_bits (out, kh, kw, ceil(in / groups / 8)) uint8,
    bias, scale, shift (out,) or None.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        *,
        affine: bool = False,
        input_quantizer: Any = None,
        cache_weights: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _pair(kernel_size)
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.groups, self.padding_mode = int(groups), padding_mode
        if self.in_channels % self.groups:
            raise UserError(f"in_channels={in_channels} is not divisible by groups={groups}")
        self._reversed_padding_repeated_twice = _reversed_padding(
            self.padding, self.kernel_size, self.dilation
        )
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        self._setup(shape, bias, affine, input_quantizer, cache_weights, device, dtype)

    @staticmethod
    def _config_of(layer: nn.Module, affine: bool) -> dict[str, Any]:
        return _conv_config(layer, affine)

    def config(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
            "bias": self.bias is not None,
            "padding_mode": self.padding_mode,
            "affine": self.affine,
            "input_quantizer": _quantizer_name(self._input_spec),
        }

    def forward(self, x: Tensor) -> Tensor:
        x = self._quantize_input(x)
        w = self._weight(x.dtype)
        b = None if self.bias is None or self.affine else self.bias.to(x.dtype)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            y = F.conv2d(x, w, b, self.stride, (0, 0), self.dilation, self.groups)
        else:
            y = F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)
        return self._affine(y, 1)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        s += f", stride={self.stride}"
        if self.padding not in ((0, 0), "valid"):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is not None:
            s += ", bias=True"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s + self._packed_repr()


class PackedBinaryLinear(_PackedBinary):
    """A BinaryLinear with its +1/-1 weight stored as bits; see the module docstring.

    y = linear(input_quantizer(x), W) [+ bias], then scale * y + shift when a BatchNorm was
    folded in. Buffers: weight_bits (out, ceil(in / 8)) uint8, bias, scale, shift (out,) or None.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        affine: bool = False,
        input_quantizer: Any = None,
        cache_weights: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        shape = (self.out_features, self.in_features)
        self._setup(shape, bias, affine, input_quantizer, cache_weights, device, dtype)

    @staticmethod
    def _config_of(layer: nn.Module, affine: bool) -> dict[str, Any]:
        return _linear_config(layer, affine)

    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "affine": self.affine,
            "input_quantizer": _quantizer_name(self._input_spec),
        }

    def forward(self, x: Tensor) -> Tensor:
        x = self._quantize_input(x)
        w = self._weight(x.dtype)
        b = None if self.bias is None or self.affine else self.bias.to(x.dtype)
        return self._affine(F.linear(x, w, b), -1)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}"
        if self.bias is not None:
            s += ", bias=True"
        return s + self._packed_repr()


_PACKED_TYPES: dict[str, type[_PackedBinary]] = {
    "PackedBinaryConv2d": PackedBinaryConv2d,
    "PackedBinaryLinear": PackedBinaryLinear,
}


def _conv_config(layer: BinaryConv2d, affine: bool) -> dict[str, Any]:
    return {
        "in_channels": layer.in_channels,
        "out_channels": layer.out_channels,
        "kernel_size": layer.kernel_size,
        "stride": layer.stride,
        "padding": layer.padding,
        "dilation": layer.dilation,
        "groups": layer.groups,
        "bias": layer.bias is not None,
        "padding_mode": layer.padding_mode,
        "affine": affine,
        "input_quantizer": layer.input_quantizer,
        "device": layer.weight.device,
        "dtype": layer.weight.dtype,
    }


def _linear_config(layer: BinaryLinear, affine: bool) -> dict[str, Any]:
    return {
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "bias": layer.bias is not None,
        "affine": affine,
        "input_quantizer": layer.input_quantizer,
        "device": layer.weight.device,
        "dtype": layer.weight.dtype,
    }


def _fill(
    packed: _PackedBinary, layer: nn.Module, scale: Tensor | None, shift: Tensor | None
) -> None:
    """Bits from the binary layer's eval weight; bias, or the folded scale/shift."""
    packed.weight_bits.copy_(pack_signs(layer.weight))
    if scale is not None:
        packed.scale.copy_(scale)
        packed.shift.copy_(shift)
    if layer.bias is not None:
        packed.bias.copy_(layer.bias.detach())
    packed.train(False)


def is_packed_layer(module: nn.Module) -> bool:
    """A PackedBinaryConv2d or PackedBinaryLinear."""
    return isinstance(module, _PackedBinary)


def packed_weight_count(model: nn.Module) -> int:
    """How many binary weights the packed layers of `model` hold as bits."""
    return sum(m.num_weights() for m in model.modules() if isinstance(m, _PackedBinary))


# ----------------------------------------------------------------------------- pack_binary


def _norm_with_stats(m: nn.Module) -> bool:
    return is_eval_affine_norm(m)


def _is_maxpool(m: nn.Module) -> bool:
    return (
        isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d))
        and not m.return_indices
        and type(m).forward in (nn.MaxPool1d.forward, nn.MaxPool2d.forward, nn.MaxPool3d.forward)
    )


def _bn_affine(bn: nn.Module, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """(a, b) in float64 with bn(z + bias) = a z + b per channel, in eval."""
    a = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    weight = getattr(bn, "weight", None)
    if weight is not None:
        a = a * weight.detach().double()
    b = -bn.running_mean.detach().double()
    if bias is not None:
        b = b + bias.detach().double()
    b = b * a
    beta = getattr(bn, "bias", None)
    if beta is not None:
        b = b + beta.detach().double()
    return a, b


def _magnitude_scale(layer: nn.Module) -> Tensor | None:
    """mean(|w|) per output channel when the layer's kernel quantizer is the magnitude-aware
    sign (its weight is alpha * sign(w)), else None."""
    spec = layer.kernel_quantizer
    if layer.mode == "bop" or not (spec == "magnitude_aware_sign" or spec is magnitude_aware_sign):
        return None
    return sign_scale(layer.weight).to(layer.weight.dtype)


def _fold_pairs(model: nn.Module) -> dict[str, tuple[str, bool]]:
    """binary layer name -> (norm name, whether a max-pool sits between them)."""
    out = {
        first: (second, False)
        for first, second in find_pairs(model, is_binary_layer, _norm_with_stats)
    }
    pools = dict(find_pairs(model, is_binary_layer, _is_maxpool))
    if pools:
        pool_norms = dict(find_pairs(model, _is_maxpool, _norm_with_stats))
        for first, pool in pools.items():
            if first not in out and pool in pool_norms:
                out[first] = (pool_norms[pool], True)
    return out


def pack_binary(model: nn.Module, *, fold_bn: bool = True, cache_weights: bool = True) -> nn.Module:
    """An eval-mode copy of `model` with every binary layer replaced by its packed twin.

    See the module docstring for the bit order, the folding of BatchNorm (fold_bn) and its
    exactness. Real layers are untouched; `model` itself is not modified. A model without
    binary (or already packed) layers is refused with a UserError: packing would not change
    it, so it is most likely not the model meant (use lightnets.fuse for real models). A
    binary layer whose kernel quantizer is not a sign (or whose bop weight is not +1/-1) is
    refused too.
    """
    if not isinstance(model, nn.Module):
        raise UserError(f"pack_binary expects a torch.nn.Module, got {type(model).__name__}")
    binaries = [(n, m) for n, m in model.named_modules() if is_binary_layer(m)]
    if not binaries and not any(is_packed_layer(m) for m in model.modules()):
        raise UserError(
            f"pack_binary: {type(model).__name__} has no binary layers: expected a model with "
            "BinaryConv2d / BinaryLinear layers (lightnets.nn); use lightnets.fuse for real models"
        )
    for name, layer in binaries:
        if not isinstance(layer, (BinaryConv2d, BinaryLinear)):
            raise UserError(f"cannot pack {name}: {type(layer).__name__} has no packed twin")
        _check_kernel_quantizer(name, layer)

    packed_model = copy.deepcopy(model).eval()
    pairs = _fold_pairs(packed_model) if fold_bn else {}
    with torch.no_grad():
        for name, layer in [(n, m) for n, m in packed_model.named_modules() if is_binary_layer(m)]:
            scale = shift = None
            norm_name, through_pool = pairs.get(name, (None, False))
            if norm_name is not None:
                bn = packed_model.get_submodule(norm_name)
                a, b = _bn_affine(bn, layer.bias)
                dtype = bn.running_mean.dtype
                scale, shift = a.to(dtype), b.to(dtype)
                if through_pool and not bool((scale > 0).all()):
                    scale = shift = None  # max(a z + b) != a max(z) + b for a <= 0: keep the BN
                    norm_name = None
            magnitude = _magnitude_scale(layer)
            if magnitude is not None:  # y = alpha z + bias: alpha joins the scale
                if scale is None:
                    scale = magnitude
                    shift = torch.zeros_like(magnitude) if layer.bias is None else layer.bias
                else:
                    scale = (scale.double() * magnitude.double()).to(scale.dtype)
            cls = PackedBinaryConv2d if isinstance(layer, BinaryConv2d) else PackedBinaryLinear
            packed = cls.from_binary(layer, scale, shift, cache_weights=cache_weights)
            if name:
                set_module(packed_model, name, packed)
            else:
                packed_model = packed
            if norm_name is not None:
                set_module(packed_model, norm_name, nn.Identity())
    return packed_model.eval()


def _iter_packed(model: nn.Module) -> Iterator[tuple[str, _PackedBinary]]:
    for name, m in model.named_modules():
        if isinstance(m, _PackedBinary):
            yield name, m


# ----------------------------------------------------------------------------- files


def _model_spec(
    model: nn.Module, model_name: str | None, model_args: dict[str, Any] | None
) -> dict[str, Any] | None:
    from lightnets.models.registry import model_spec

    recorded = model_spec(model)
    if model_name is None and recorded is not None:
        model_name, recorded_args = recorded
        model_args = recorded_args if model_args is None else model_args
    if model_name is None:
        return None
    args = dict(model_args or {})
    try:
        json.dumps(args, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise UserError(
            f"model_args of {model_name!r} are not JSON-serializable ({err}): expected numbers, "
            "strings, booleans, lists and dicts"
        ) from None
    return {"name": model_name, "args": args}


def save_packed(
    model: nn.Module,
    path: str | Path,
    *,
    model_name: str | None = None,
    model_args: dict[str, Any] | None = None,
) -> Path:
    """Write the packed `model` (packed here first if it has binary layers) to `path`.

    The file (see the module docstring) is enough to rebuild the model with `load_packed`: it
    names the registry model, which `lightnets.create_model` records on the models it builds;
    for a model built otherwise pass model_name / model_args (the keyword arguments
    create_model needs). A model whose state no longer fits what its name builds (changed
    after create_model) is refused before anything is written; a change that keeps every
    state_dict key and shape (swapping a pooling layer) cannot be seen and is not saved.
    Written atomically; an existing file is replaced. Returns the path.
    """
    from lightnets import __version__
    from lightnets.engine.checkpoint import atomic_torch_save

    if Path(path).suffix.lower() == ".safetensors":  # torch.load would then refuse to read it
        raise UserError(
            f"save_packed: {path} names a safetensors file, but a packed model is a "
            "weights-only torch file (tensors plus the config that rebuilds it): expected a "
            "path ending in .pt"
        )
    if any(is_binary_layer(m) for m in model.modules()):
        model = pack_binary(model)
    elif not any(is_packed_layer(m) for m in model.modules()):
        raise UserError(
            f"save_packed: {type(model).__name__} has no binary or packed layers: expected a "
            "binary model (BinaryConv2d / BinaryLinear) or the result of pack_binary"
        )
    root_packed = isinstance(model, _PackedBinary)
    spec_model = None if root_packed else _model_spec(model, model_name, model_args)
    if spec_model is None and not root_packed:
        raise UserError(
            f"save_packed: cannot tell which registry model {type(model).__name__} is: expected "
            "a model built with lightnets.create_model, or pass model_name= and model_args="
        )
    modules: dict[str, Any] = {}
    for name, m in model.named_modules():
        if isinstance(m, _PackedBinary):
            modules[name] = {"type": type(m).__name__, "config": m.config()}
        elif isinstance(m, nn.Identity) and name:
            modules[name] = {"type": "Identity"}
    spec = {"model": spec_model, "modules": modules, "lightnets_version": __version__}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _check_rebuilds(spec_model, modules, state)
    payload = {"format": FORMAT, "version": VERSION, "spec": json.dumps(spec), "state": state}
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory: expected a file path for the packed model")
    atomic_torch_save(payload, path)
    return path


def _check_rebuilds(spec_model: Any, modules: dict[str, Any], state: dict[str, Tensor]) -> None:
    """Refuse to write a file that load_packed could not load (a model changed after
    create_model, e.g. by convert_norm, no longer is what its name and arguments build)."""
    where = "the model to save"
    rebuilt = _rebuild(spec_model, modules, where).state_dict()
    wrong = [k for k in state if k not in rebuilt] + [k for k in rebuilt if k not in state]
    wrong += [k for k in state if k in rebuilt and state[k].shape != rebuilt[k].shape]
    if wrong:
        name = spec_model["name"] if isinstance(spec_model, dict) else "?"
        raise UserError(
            f"save_packed: the model differs from what create_model({name!r}, ...) builds "
            f"(state keys {', '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}): expected "
            "an unmodified registry model, or pass the model_name= / model_args= that build it"
        )


def _read(path: Path) -> dict[str, Any]:
    from lightnets.engine.checkpoint import read_weights_only

    if not path.is_file():
        raise UserError(f"packed model {path} does not exist: expected a file from save_packed")
    payload = read_weights_only(path, "packed model")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(
            f"{path} is not a packed lightnets model: expected a file written by save_packed"
        )
    version = payload.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise UserError(
            f"packed model {path} has format version {version!r}: this lightnets reads versions "
            f"<= {VERSION}; upgrade lightnets"
        )
    try:
        spec = json.loads(payload["spec"])
        state = payload["state"]
        modules = spec["modules"]
        if not isinstance(state, dict) or not isinstance(modules, dict):
            raise TypeError("state / modules are not dicts")
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(
            f"packed model {path} is damaged: its description is invalid ({err})"
        ) from None
    return {"spec": spec, "state": state, "modules": modules}


def _build_module(entry: Any, name: str, path: Path) -> nn.Module:
    if not isinstance(entry, dict) or "type" not in entry:
        raise UserError(f"packed model {path} is damaged: module {name!r} has no type")
    if entry["type"] == "Identity":
        return nn.Identity()
    cls = _PACKED_TYPES.get(entry["type"])
    config = entry.get("config")
    if cls is None or not isinstance(config, dict):
        raise UserError(
            f"packed model {path}: module {name!r} has unknown type {entry['type']!r}: expected "
            f"one of {', '.join(_PACKED_TYPES)} or Identity"
        )
    try:
        return cls(**config)
    except (TypeError, ValueError) as err:
        raise UserError(f"packed model {path} is damaged: module {name!r}: {err}") from None


def _rebuild(spec_model: Any, modules: dict[str, Any], path: Path | str) -> nn.Module:
    """The packed model's structure (initial weights): the registry model plus replacements."""
    from lightnets.models.registry import create_model

    root = modules.get("")
    if root is not None:
        return _build_module(root, "", Path(path))
    if not isinstance(spec_model, dict) or not isinstance(spec_model.get("name"), str):
        raise UserError(f"packed model {path} is damaged: it names no registry model")
    name, args = spec_model["name"], spec_model.get("args") or {}
    if not isinstance(args, dict):
        raise UserError(f"packed model {path} is damaged: model arguments are not a table")
    model = create_model(name, **args)
    for module_name, entry in modules.items():
        try:
            model.get_submodule(module_name)
        except AttributeError:
            raise UserError(
                f"packed model {path} does not fit model {name!r}: it has no module {module_name!r}"
            ) from None
        set_module(model, module_name, _build_module(entry, module_name, Path(path)))
    return model


def load_packed(path: str | Path, *, cache_weights: bool = True) -> nn.Module:
    """The packed model `save_packed` wrote to `path`, in eval mode on the CPU.

    Rebuilt from the registry (never unpickled) and loaded strictly; a missing, corrupt or
    foreign file is a UserError naming it.
    """
    from lightnets.engine.checkpoint import load_model_state

    path = Path(path)
    read = _read(path)
    model = _rebuild(read["spec"].get("model"), read["modules"], path)
    load_model_state(model, read["state"], str(path))
    for _, m in _iter_packed(model):
        m.cache_weights = cache_weights
    return model.eval()
