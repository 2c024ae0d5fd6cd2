"""Packed binary layers: a binary layer's +1/-1 weight stored as bits, for inference.

`PackedBinaryConv2d` / `PackedBinaryLinear` are the packed twins of `BinaryConv2d` /
`BinaryLinear` (lightnets.nn.binary): they hold a uint8 buffer ``weight_bits``, one bit per
weight, and optionally a per-channel ``scale`` and ``shift`` (a BatchNorm folded in by
lightnets.deploy.pack, which turns a model's binary layers into these and writes them to
files). They hold no parameters and never train.

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
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightnets.errors import UserError
from lightnets.nn.binary import (
    QUANTIZERS,
    SIGN_QUANTIZERS,
    binary_sign,
    get_quantizer,
    takes_training,
)

__all__ = [
    "PACKED_TYPES",
    "PackedBinaryConv2d",
    "PackedBinaryLinear",
    "is_packed_layer",
    "iter_packed",
    "pack_signs",
    "packed_weight_count",
    "unpack_signs",
]

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


class _PackedBinary(nn.Module):
    """What PackedBinaryConv2d and PackedBinaryLinear share: bits, optional bias/scale/shift."""

    #: Constructor arguments the binary layer and its packed twin both have, by the same name
    #: (the others: bias, affine, input_quantizer, cache_weights, device, dtype)
    SHAPE_ARGUMENTS: tuple[str, ...] = ()

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
        self._input_training = takes_training(fn)

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
            return binary_sign(x)
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
        config = {k: getattr(layer, k) for k in cls.SHAPE_ARGUMENTS}
        packed = cls(
            **config,
            bias=layer.bias is not None,
            affine=scale is not None,
            input_quantizer=layer.input_quantizer,
            cache_weights=cache_weights,
            device=layer.weight.device,
            dtype=layer.weight.dtype,
        )
        _fill(packed, layer, scale, shift)
        return packed

    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments, JSON-serializable (see save_packed)."""
        shape = {k: _json_value(getattr(self, k)) for k in self.SHAPE_ARGUMENTS}
        return {
            **shape,
            "bias": self.bias is not None,
            "affine": self.affine,
            "input_quantizer": _quantizer_name(self._input_spec),
        }


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

    SHAPE_ARGUMENTS = (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    )

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

    SHAPE_ARGUMENTS = ("in_features", "out_features")

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


PACKED_TYPES: dict[str, type[_PackedBinary]] = {
    "PackedBinaryConv2d": PackedBinaryConv2d,
    "PackedBinaryLinear": PackedBinaryLinear,
}


def _json_value(value: Any) -> Any:
    """A constructor argument as JSON holds it (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value


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


def iter_packed(model: nn.Module) -> Iterator[tuple[str, _PackedBinary]]:
    """(name, layer) of every packed layer of `model`."""
    for name, m in model.named_modules():
        if isinstance(m, _PackedBinary):
            yield name, m
