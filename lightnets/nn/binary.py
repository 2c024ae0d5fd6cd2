"""Binary layers: sign quantizers with straight-through gradients, `BinaryConv2d`, `BinaryLinear`.

Quantizers map a tensor to exactly +1/-1 in its own dtype (sign(0) = +1, eq. 1 of paper 004).
The sign has a zero gradient almost everywhere, so each quantizer's backward is an estimator:

- ``ste_sign(x, clip_value=1.0)``: the straight-through estimator of eq. 4, gradient passed
  where |x| <= clip_value and zero elsewhere (``clip_value=None``: passed everywhere). The
  bound is inclusive, as in Larq (the original code's layers): a +1/-1 weight, |w| = 1, gets
  its full gradient.
- ``approx_sign(x)``: Bi-Real Net's piecewise-polynomial estimator, d/dx = 2 - 2|x| for
  |x| < 1 and 0 elsewhere.
- ``stochastic_sign(x, training=True, generator=None)``: +1 with probability hard_sigmoid(x)
  (eq. 2-3), -1 otherwise; deterministic ``ste_sign`` when ``training=False``. Gradient: the
  straight-through estimator with clip 1.
- ``swish_sign(x, beta=5.0)``: BNN+'s (Darabi et al. 2018) smooth estimator, the derivative
  of 2 sigmoid(beta x)(1 + beta x (1 - sigmoid(beta x))) - 1: beta (2 - beta x tanh(beta x /
  2)) / (1 + cosh(beta x)), as larq's ``SwishSign``.
- ``magnitude_aware_sign(w, clip_value=1.0)``: Bi-Real Net's scaled sign for weights,
  mean(|w|) * sign(w) with the mean per output channel (every axis but the first: torch's
  (out, in, kh, kw)) and held constant in the backward pass (the straight-through gradient
  times that mean), as larq's ``MagnitudeAwareSign``. A kernel quantizer only (as in larq):
  the layers refuse it as an input quantizer. Its weights are +-mean(|w|), not +-1, so layers
  that use it keep a per-channel scale when packed or exported.

`get_quantizer(spec)` resolves a name, a callable (used as is) or None (full precision).

`BinaryConv2d` / `BinaryLinear` are `nn.Conv2d` / `nn.Linear` subclasses (same `weight` /
`bias` state_dict keys, same arguments) that quantize their input with `input_quantizer` and
their weight with `kernel_quantizer` before the convolution / matmul. ``input_quantizer=None``
lets the first layer take real input; a quantizer that accepts a ``training`` keyword (such as
stochastic_sign) gets the layer's ``self.training``. Zero padding is applied after the input
is quantized, so padded positions hold 0 (as Larq's default). Two training modes:

- ``mode="latent"``: ``weight`` is real and the forward pass uses kernel_quantizer(weight);
  any real-valued optimizer trains it. ``clip_weights=True`` marks the layer for
  `clip_latent_weights_`, which clamps the weight to [-1, 1] after each step (the paper's
  MNIST model); nothing clips on its own, because layers know nothing about the trainer.
- ``mode="bop"``: ``weight`` holds exactly +1/-1 (the sign of a He-normal draw, sign(0) = +1)
  and is used as is; Bop (lightnets.optim.Bop) flips it. The kernel quantizer must be
  ``"ste_sign"`` or None: with |w| = 1 the clipped STE passes every gradient, so skipping it
  changes nothing, and any other quantizer would not be the identity on +1/-1.

How binary weights are found (the optimizer split, never by parameter name): a weight is
binary when it is, at the time of asking, the ``weight`` of a binary layer in bop mode. The
module is the mark: `lightnets.optim.binary_parameters(model)` walks the model's modules and
takes each bop layer's `binary_parameters()`, and `is_binary_parameter(p)` looks p up among the
live bop layers (a weak set, filled at construction and when a layer is copied or unpickled).
Nothing is stored on the Parameter itself, because `copy.deepcopy`, ``load_state_dict(...,
assign=True)`` and `Module.to` with swapped parameters all make new Parameter objects that
would lose such a mark; the layer's type and mode survive all of them.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightnets.errors import UserError, did_you_mean
from lightnets.registry import Registry

__all__ = [
    "MODES",
    "QUANTIZERS",
    "SIGN_QUANTIZERS",
    "BinaryConv2d",
    "BinaryLinear",
    "KERNEL_ONLY_QUANTIZERS",
    "approx_sign",
    "binary_sign",
    "clip_latent_weights_",
    "get_quantizer",
    "hard_sigmoid",
    "is_binary_parameter",
    "is_binary_layer",
    "magnitude_aware_sign",
    "sign_scale",
    "ste_sign",
    "stochastic_sign",
    "swish_sign",
    "takes_training",
]

MODES = ("latent", "bop")

Quantizer = Callable[..., Tensor]
QuantizerSpec = str | Quantizer | None


# ----------------------------------------------------------------------------- quantizers


def binary_sign(x: Tensor) -> Tensor:
    """+1 where x >= 0, -1 elsewhere, in x's dtype (sign(0) = +1)."""
    one = x.new_ones(())
    return torch.where(x < 0, -one, one)


def hard_sigmoid(x: Tensor) -> Tensor:
    """clip((x + 1) / 2, 0, 1), eq. 3 of paper 004."""
    return ((x + 1) / 2).clamp(0, 1)


class _StraightThroughSign(torch.autograd.Function):
    """Forward: sign(x), or a stochastic sign given uniform noise u (+1 where u < hard_sigmoid(x)).
    Backward: the gradient where |x| <= clip (everywhere when clip is None), zero elsewhere.

    Saves a 1-byte mask, not x, and only when x needs a gradient.
    """

    @staticmethod
    def forward(ctx, x: Tensor, clip: float | None, noise: Tensor | None):  # type: ignore[override]
        ctx.clip = clip
        if clip is not None and ctx.needs_input_grad[0]:
            ctx.save_for_backward(x.abs() <= clip)
        if noise is None:
            return binary_sign(x)
        one = x.new_ones(())
        return torch.where(noise < hard_sigmoid(x.to(noise.dtype)), one, -one)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        if ctx.clip is None:
            return grad, None, None
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None


class _ApproxSign(torch.autograd.Function):
    """Forward sign(x); backward Bi-Real's d/dx = max(2 - 2|x|, 0)."""

    @staticmethod
    def forward(ctx, x: Tensor):  # type: ignore[override]
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(x)
        return binary_sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * (2 - 2 * x.abs()).clamp_min_(0)


def _check_clip(clip_value: Any) -> float | None:
    if clip_value is None:
        return None
    if isinstance(clip_value, bool) or not isinstance(clip_value, (int, float)):
        raise UserError(f"ste_sign clip_value={clip_value!r}: expected a positive number or None")
    if not (clip_value > 0 and math.isfinite(clip_value)):
        raise UserError(
            f"ste_sign clip_value={clip_value}: expected a positive finite number "
            "(or None to pass the gradient everywhere)"
        )
    return float(clip_value)


def ste_sign(x: Tensor, clip_value: float | None = 1.0) -> Tensor:
    """sign(x) in {-1, +1} (sign(0) = +1) with the straight-through gradient 1_{|x| <= clip}.

    ``clip_value=None`` passes the gradient everywhere.
    """
    return _StraightThroughSign.apply(x, _check_clip(clip_value), None)


def approx_sign(x: Tensor) -> Tensor:
    """sign(x) in {-1, +1} (sign(0) = +1) with Bi-Real's gradient 2 - 2|x| on |x| < 1, else 0."""
    return _ApproxSign.apply(x)


def stochastic_sign(
    x: Tensor, training: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """+1 with probability hard_sigmoid(x), else -1 (eq. 2-3); `ste_sign(x)` when not training.

    The straight-through gradient is clipped at 1. The noise is drawn in float32 for 16-bit
    inputs (their own uniform draws are too coarse); `generator` must live on x's device.
    """
    if not training:
        return _StraightThroughSign.apply(x, 1.0, None)
    noise_dtype = x.dtype if x.dtype == torch.float64 else torch.float32
    noise = torch.rand(x.shape, generator=generator, dtype=noise_dtype, device=x.device)
    return _StraightThroughSign.apply(x, 1.0, noise)


class _SwishSign(torch.autograd.Function):
    """Forward sign(x); backward BNN+'s beta (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x))."""

    @staticmethod
    def forward(ctx, x: Tensor, beta: float):  # type: ignore[override]
        ctx.beta = beta
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(x)
        return binary_sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        bx = ctx.beta * x
        # cosh overflows to inf for |beta x| > ~89 in float32, where the derivative is 0 anyway
        return grad * (ctx.beta * (2 - bx * torch.tanh(bx / 2)) / (1 + torch.cosh(bx))), None


def swish_sign(x: Tensor, beta: float = 5.0) -> Tensor:
    """sign(x) in {-1, +1} (sign(0) = +1) with BNN+'s swish gradient (larq's SwishSign)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
        raise UserError(f"swish_sign beta={beta!r}: expected a number > 0 (BNN+ uses 5)")
    return _SwishSign.apply(x, float(beta))


def sign_scale(w: Tensor) -> Tensor:
    """mean(|w|) per output channel (over every axis but the first), shape (out,)."""
    return w.detach().abs().flatten(1).mean(1) if w.dim() > 1 else w.detach().abs().mean()[None]


def magnitude_aware_sign(w: Tensor, clip_value: float | None = 1.0) -> Tensor:
    """Bi-Real's mean(|w|) * sign(w), the mean per output channel and constant in backward
    (larq's MagnitudeAwareSign); the gradient is ste_sign's (clipped at clip_value) times it."""
    scale = sign_scale(w).to(w.dtype)
    return ste_sign(w, clip_value) * scale.reshape(-1, *([1] * (w.dim() - 1)))


#: The quantizers layers accept by name.
QUANTIZERS: Registry[Quantizer] = Registry("quantizer")
for _fn in (ste_sign, approx_sign, stochastic_sign, swish_sign, magnitude_aware_sign):
    QUANTIZERS.add(_fn.__name__, _fn)
#: Quantizers for weights only: a per-output-channel scale has no meaning for activations.
KERNEL_ONLY_QUANTIZERS = frozenset({"magnitude_aware_sign"})
#: Quantizers whose eval forward is the plain sign (sign(0) = +1): +1/-1 values.
SIGN_QUANTIZERS = frozenset(set(QUANTIZERS) - KERNEL_ONLY_QUANTIZERS)


def _identity(x: Tensor) -> Tensor:
    return x


def get_quantizer(spec: QuantizerSpec) -> Quantizer:
    """The quantizer `spec` names: a name in QUANTIZERS, a callable (returned as is), or None
    (full precision: the identity)."""
    if spec is None:
        return _identity
    if isinstance(spec, str):
        return QUANTIZERS.lookup(spec, also="a callable, or None")
    if callable(spec):
        return spec
    raise UserError(
        f"quantizer {spec!r} of type {type(spec).__name__}: expected one of "
        f"{', '.join(QUANTIZERS)}, a callable, or None"
    )


def takes_training(fn: Quantizer) -> bool:
    """Whether `fn` accepts a ``training`` keyword (then layers pass their mode)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # some builtins have no signature
        return False
    param = parameters.get("training")
    return param is not None and param.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


def _spec_name(spec: QuantizerSpec) -> str:
    if spec is None or isinstance(spec, str):
        return repr(spec)
    return getattr(spec, "__name__", None) or repr(spec)


# ----------------------------------------------------------------------------- layers

# Live binary layers in bop mode; see the module docstring ("How binary weights are found").
_BOP_LAYERS: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class _BinaryLayer:
    """What BinaryConv2d and BinaryLinear share; mixed in before the torch layer class."""

    weight: nn.Parameter

    def _setup(
        self,
        input_quantizer: QuantizerSpec,
        kernel_quantizer: QuantizerSpec,
        mode: str,
        clip_weights: bool,
    ) -> None:
        name = type(self).__name__
        if mode not in MODES:
            raise UserError(
                f"{name} mode={mode!r}{did_you_mean(str(mode), MODES)}: expected one of "
                f"{', '.join(MODES)}"
            )
        if not isinstance(clip_weights, bool):
            raise UserError(f"{name} clip_weights={clip_weights!r}: expected True or False")
        if clip_weights and mode == "bop":
            raise UserError(
                f"{name} clip_weights=True with mode='bop': bop weights are already +1/-1; "
                "expected clip_weights=False (clipping is for latent weights)"
            )
        specs = {"input_quantizer": input_quantizer, "kernel_quantizer": kernel_quantizer}
        for what, spec in specs.items():
            if isinstance(spec, nn.Module):
                raise UserError(
                    f"{name} {what}={type(spec).__name__}(...) is a module: expected a quantizer "
                    f"name ({', '.join(QUANTIZERS)}), a function, or None"
                )
        self._mode = mode
        self.clip_weights = clip_weights
        self.input_quantizer = input_quantizer
        self.kernel_quantizer = kernel_quantizer
        if mode == "bop":
            _BOP_LAYERS.add(self)  # type: ignore[arg-type]

    # The quantizers are resolved once, when set, so forward does no name lookups.
    @property
    def input_quantizer(self) -> QuantizerSpec:
        """A quantizer name, a callable, or None (full precision input)."""
        return self._input_spec

    @input_quantizer.setter
    def input_quantizer(self, spec: QuantizerSpec) -> None:
        fn = get_quantizer(spec)
        if fn is magnitude_aware_sign:
            raise UserError(
                f"{type(self).__name__} input_quantizer={_spec_name(spec)}: it scales by a "
                "per-output-channel mean, so it is a kernel quantizer (as in larq); expected a "
                "sign for activations, e.g. 'ste_sign'"
            )
        self._input_spec = spec
        self._input_fn = None if spec is None else fn
        self._input_training = takes_training(fn)

    @property
    def kernel_quantizer(self) -> QuantizerSpec:
        """A quantizer name, a callable, or None (full precision weight); unused in bop mode."""
        return self._kernel_spec

    @kernel_quantizer.setter
    def kernel_quantizer(self, spec: QuantizerSpec) -> None:
        fn = get_quantizer(spec)
        if self._mode == "bop" and spec not in ("ste_sign", None):
            raise UserError(
                f"{type(self).__name__} kernel_quantizer={_spec_name(spec)} with mode='bop': "
                "bop weights are +1/-1 and used as they are; expected 'ste_sign' or None"
            )
        self._kernel_spec = spec
        self._kernel_fn = None if spec is None or self._mode == "bop" else fn
        self._kernel_training = takes_training(fn)

    @property
    def mode(self) -> str:
        """ "latent" (real weight, quantized in forward) or "bop" (+1/-1 weight); fixed."""
        return self._mode

    def binary_parameters(self) -> Iterator[nn.Parameter]:
        """The weight in bop mode (for Bop); nothing in latent mode."""
        if self._mode == "bop":
            yield self.weight

    @torch.no_grad()
    def clip_latent_weights_(self) -> bool:
        """Clamp the latent weight to [-1, 1] if this layer has clip_weights=True; True if so."""
        if not self.clip_weights:
            return False
        self.weight.clamp_(-1, 1)
        return True

    def _quantize_input(self, x: Tensor) -> Tensor:
        fn = self._input_fn
        if fn is None:
            return x
        return fn(x, training=self.training) if self._input_training else fn(x)  # type: ignore[attr-defined]

    def _quantized_weight(self) -> Tensor:
        fn = self._kernel_fn
        if fn is None:
            return self.weight
        if self._kernel_training:
            return fn(self.weight, training=self.training)  # type: ignore[attr-defined]
        return fn(self.weight)

    def _init_weight(self, torch_reset: Callable[[], None]) -> None:
        """latent: the torch layer's own initialization; bop: sign of a He-normal draw."""
        if not hasattr(self, "_mode"):
            return  # called by the torch layer's __init__ before the mode is known; see _setup
        if self._mode == "latent":
            torch_reset()
            return
        with torch.no_grad():
            nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="relu")
            self.weight.copy_(binary_sign(self.weight))
            if self.bias is not None:  # type: ignore[attr-defined]
                fan_in = self.weight[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                nn.init.uniform_(self.bias, -bound, bound)  # type: ignore[attr-defined]

    def _binary_repr(self) -> str:
        s = (
            f", input_quantizer={_spec_name(self._input_spec)}, "
            f"kernel_quantizer={_spec_name(self._kernel_spec)}, mode={self._mode!r}"
        )
        if self.clip_weights:
            s += ", clip_weights=True"
        return s

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        if self._mode == "bop":  # a deepcopy or an unpickled layer
            _BOP_LAYERS.add(self)  # type: ignore[arg-type]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        weight = state_dict.get(prefix + "weight")
        if self._mode == "bop" and isinstance(weight, Tensor) and weight.is_floating_point():
            if not bool(((weight == 1) | (weight == -1)).all()):
                raise UserError(
                    f"{prefix}weight in the state_dict has values other than +1/-1, but "
                    f"{type(self).__name__} is in mode='bop': expected a bop checkpoint "
                    "(binarize latent weights with their sign first)"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]


class BinaryConv2d(_BinaryLayer, nn.Conv2d):
    """`nn.Conv2d` on quantized input and weight; see the module docstring.

    conv2d(input_quantizer(x), kernel_quantizer(weight)) + bias in latent mode,
    conv2d(input_quantizer(x), weight) + bias with a +1/-1 weight in bop mode. No bias by
    default (BatchNorm follows a binary conv).
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
        input_quantizer: QuantizerSpec = None,
        kernel_quantizer: QuantizerSpec = "ste_sign",
        mode: str = "latent",
        clip_weights: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self._setup(input_quantizer, kernel_quantizer, mode, clip_weights)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._init_weight(super().reset_parameters)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._binary_repr()

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self._quantize_input(x), self._quantized_weight(), self.bias)


class BinaryLinear(_BinaryLayer, nn.Linear):
    """`nn.Linear` on quantized input and weight; see the module docstring. No bias by default."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        input_quantizer: QuantizerSpec = None,
        kernel_quantizer: QuantizerSpec = "ste_sign",
        mode: str = "latent",
        clip_weights: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(input_quantizer, kernel_quantizer, mode, clip_weights)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._init_weight(super().reset_parameters)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._binary_repr()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self._quantize_input(x), self._quantized_weight(), self.bias)


def is_binary_layer(module: nn.Module) -> bool:
    """A BinaryConv2d or BinaryLinear (either mode)."""
    return isinstance(module, _BinaryLayer)


def is_binary_parameter(p: Tensor) -> bool:
    """True when `p` is now the weight of a live binary layer in bop mode (what Bop trains)."""
    return any(layer.weight is p for layer in list(_BOP_LAYERS))


def clip_latent_weights_(model: nn.Module) -> int:
    """Clamp to [-1, 1] the latent weight of every binary layer with clip_weights=True.

    Call it after each optimizer step (the paper's MNIST model); returns how many layers it
    clipped. Layers in bop mode and layers without clip_weights are left alone.
    """
    return sum(
        1 for m in model.modules() if isinstance(m, _BinaryLayer) and m.clip_latent_weights_()
    )
