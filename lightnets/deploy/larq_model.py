"""A PyTorch model as the larq / Keras model that computes the same function (for LCE).

`to_larq(model, input_size)` reads the model's data flow (torch.fx) and builds, layer by
layer, the larq / Keras (NHWC) model with our weights; lightnets.deploy.lce hands it to Larq
Compute Engine's converter. What is translated and how the function is kept (layouts, binary
linear layers as 1x1 binary convolutions, padding values, BN and pooling order) is described
in lightnets.deploy.lce. TensorFlow, tf-keras, larq and larq-compute-engine are the `lce`
extra, imported here (`lce_stack`), with TF_USE_LEGACY_KERAS=1 set first.
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightnets.errors import UserError
from lightnets.nn.binary import (
    QUANTIZERS,
    SIGN_QUANTIZERS,
    BinaryConv2d,
    BinaryLinear,
    is_binary_layer,
    magnitude_aware_sign,
)
from lightnets.nn.packed import is_packed_layer

__all__ = [
    "LCE_INSTALL",
    "flatten_order",
    "lce_available",
    "lce_stack",
    "pads_like_tf_same",
    "quiet_tensorflow",
    "sign_kind",
    "to_larq",
]

LCE_INSTALL = (
    'pip install "lightnets[lce]" (from a clone: pip install -e ".[lce]"; TensorFlow-CPU 2.16, '
    "tf-keras, larq 0.14, LCE 0.16)"
)


def lce_available() -> bool:
    """Whether TensorFlow, larq and larq-compute-engine can be imported."""
    try:
        lce_stack()
    except UserError:
        return False
    return True


@dataclass(frozen=True)
class _Stack:
    tf: Any
    keras: Any
    lq: Any
    lce: Any
    Interpreter: Any


_STACK: _Stack | None = None


def lce_stack() -> _Stack:
    """TensorFlow, Keras 2, larq, LCE and its interpreter; a UserError naming the extra."""
    global _STACK
    if _STACK is not None:
        return _STACK
    if "tensorflow" not in sys.modules:
        os.environ["TF_USE_LEGACY_KERAS"] = "1"  # larq needs Keras 2 (tf-keras)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TF's C++ info and CUDA-probe lines
    try:
        # the optional LCE stack (pip install "lightnets[lce]"), imported on first use
        import larq  # noqa: PLC0415
        import larq_compute_engine  # noqa: PLC0415
        import tensorflow as tf  # noqa: PLC0415
        from larq_compute_engine.tflite.python.interpreter import Interpreter  # noqa: PLC0415
    except ImportError as err:
        raise UserError(
            f"format 'lce' needs TensorFlow, larq and larq-compute-engine ({err.name} is "
            f"missing): expected them installed: {LCE_INSTALL}"
        ) from None
    keras = tf.keras
    if not keras.layers.Layer.__module__.startswith("tf_keras"):  # Keras 3 (keras.src...)
        version = getattr(keras, "__version__", "3")
        raise UserError(
            f"TensorFlow was imported with Keras {version} before lightnets could set "
            "TF_USE_LEGACY_KERAS=1: larq needs Keras 2; expected TF_USE_LEGACY_KERAS=1 in the "
            "environment before TensorFlow is imported (and tf-keras installed)"
        )
    _STACK = _Stack(tf, keras, larq, larq_compute_engine, Interpreter)
    return _STACK


# ----------------------------------------------------------------------------- tracing


_LEAVES = (
    BinaryConv2d,
    BinaryLinear,
    nn.Conv2d,
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Flatten,
    nn.Identity,
    nn.Dropout,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softmax,
)


class _Tracer(torch.fx.Tracer):
    """Leaves: the layers we translate (binary layers too, whose forward fx cannot enter)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or is_packed_layer(m) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> torch.fx.Graph:
    try:
        return _Tracer().trace(model)
    except Exception as err:  # fx's reasons are many; the model's forward is what to change
        raise UserError(
            f"cannot read the data flow of {type(model).__name__} with torch.fx "
            f"({type(err).__name__}: {str(err).strip().splitlines()[0][:200]}): expected a "
            "forward without data-dependent Python control flow"
        ) from None


# ----------------------------------------------------------------------------- translation


@dataclass
class _T:
    """A Keras tensor and what it stands for: a map (torch N,C,H,W as Keras N,H,W,C) or a
    feature vector (torch N,F as Keras N,1,1,F; Keras feature j is torch feature perm[j])."""

    k: Any
    kind: str  # "map" or "vec"
    shape: tuple[int, ...]  # torch's shape without the batch: (C, H, W) or (F,)
    perm: np.ndarray | None = None  # vec only; None is the identity


def _np(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def sign_kind(spec: Any) -> str | None:
    """'sign' for a sign quantizer, 'magnitude' for the magnitude-aware one, None for None;
    anything else (a custom function) is refused by the caller."""
    if spec is None:
        return None
    if spec in SIGN_QUANTIZERS or any(spec is QUANTIZERS[n] for n in SIGN_QUANTIZERS):
        return "sign"
    if spec == "magnitude_aware_sign" or spec is magnitude_aware_sign:
        return "magnitude"
    return "custom"


def pads_like_tf_same(size: int, k: int, s: int, d: int, pad: int) -> bool:
    """Whether symmetric padding `pad` equals TensorFlow's "same" at this input size."""
    out = math.ceil(size / s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    ours = (size + 2 * pad - d * (k - 1) - 1) // s + 1
    return ours == out and total // 2 == pad and total - total // 2 == pad


class _Translator:
    """One pass over the fx graph, building the Keras graph node by node."""

    def __init__(self, model: nn.Module, input_size: tuple[int, ...], stack: _Stack) -> None:
        self.model, self.size, self.s = model, input_size, stack
        self.keras, self.lq = stack.keras, stack.lq
        self.shapes = self._torch_shapes()

    def _torch_shapes(self) -> dict[str, tuple[int, ...]]:
        """Output shape (without batch) of every module call, from one eval forward."""
        shapes: dict[str, tuple[int, ...]] = {}
        hooks = []
        for name, m in self.model.named_modules():
            if isinstance(m, _LEAVES):
                hooks.append(
                    m.register_forward_hook(
                        lambda mod, i, o, name=name: shapes.__setitem__(
                            name, (tuple(i[0].shape[1:]), tuple(o.shape[1:]))
                        )
                    )
                )
        try:
            with torch.no_grad():
                self.model(torch.zeros(1, *self.size[1:]))
        finally:
            for h in hooks:
                h.remove()
        return shapes

    def build(self) -> Any:
        keras = self.keras
        graph = _trace(self.model)
        env: dict[torch.fx.Node, _T] = {}
        inputs = []
        for node in graph.nodes:
            if node.op == "placeholder":
                if inputs:
                    raise UserError("format 'lce' exports models with one input")
                shape = tuple(self.size[1:])
                if len(shape) == 3:
                    k = keras.Input((shape[1], shape[2], shape[0]), name="input")
                    env[node] = _T(k, "map", shape)
                elif len(shape) == 1:
                    k = keras.Input(shape, name="input")
                    env[node] = _T(keras.layers.Reshape((1, 1, shape[0]))(k), "vec", shape)
                else:
                    raise UserError(
                        f"input_size {self.size}: format 'lce' expects (N, C, H, W) or (N, F)"
                    )
                inputs.append(k)
            elif node.op == "output":
                out = env[node.args[0]] if isinstance(node.args[0], torch.fx.Node) else None
                if out is None:
                    raise UserError("format 'lce' exports models that return one tensor")
                return keras.Model(inputs, self._output(out))
            elif node.op == "get_attr":
                raise UserError(
                    f"{node.target}: a tensor the model reads directly (not through a layer); "
                    "format 'lce' translates layers and +, torch.cat, torch.flatten, F.relu"
                )
            else:
                args = [env[a] if isinstance(a, torch.fx.Node) else a for a in node.args]
                env[node] = self._node(node, args)
        raise UserError("the traced model has no output")

    def _output(self, t: _T) -> Any:
        if t.kind == "map":
            return t.k
        flat = self.keras.layers.Reshape((t.shape[0],))(t.k)
        if t.perm is None:
            return flat
        # a flattened map is the output: put its features back in torch's order (a Gather)
        order = np.argsort(t.perm).astype(np.int32)
        tf = self.s.tf
        return self.keras.layers.Lambda(lambda v: tf.gather(v, order, axis=1))(flat)

    # ------------------------------------------------------------------ dispatch

    def _node(self, node: torch.fx.Node, args: list[Any]) -> _T:
        if node.op == "call_module":
            module = self.model.get_submodule(node.target)
            return self._module(str(node.target), module, args[0])
        fn = node.target
        if node.op == "call_function" and fn in (operator.add, torch.add):
            if not all(isinstance(a, _T) for a in args[:2]) or node.kwargs:
                raise UserError(f"{node.name}: format 'lce' adds two tensors, not a constant")
            a, b = args[0], args[1]
            if a.kind != b.kind or a.shape != b.shape or not _same_perm(a.perm, b.perm):
                raise UserError(f"{node.name}: adds tensors of different layouts or shapes")
            return _T(self.keras.layers.Add()([a.k, b.k]), a.kind, a.shape, a.perm)
        if node.op == "call_function" and fn is torch.cat:
            tensors, dim = args[0], node.kwargs.get("dim", args[1] if len(args) > 1 else 0)
            tensors = [t if isinstance(t, _T) else None for t in tensors]
            if dim != 1 or any(t is None or t.kind != "map" for t in tensors):
                raise UserError(f"{node.name}: format 'lce' concatenates maps along channels")
            c = sum(t.shape[0] for t in tensors)
            k = self.keras.layers.Concatenate(axis=-1)([t.k for t in tensors])
            return _T(k, "map", (c, *tensors[0].shape[1:]))
        if (node.op == "call_function" and fn is torch.flatten) or (
            node.op == "call_method" and fn == "flatten"
        ):
            start = node.kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
            if start != 1:
                raise UserError(f"{node.name}: format 'lce' flattens from dim 1 (start_dim=1)")
            return self._flatten(args[0])
        if node.op == "call_function" and fn in (F.relu, torch.relu):
            t = args[0]
            return _T(self.keras.layers.ReLU()(t.k), t.kind, t.shape, t.perm)
        what = fn if isinstance(fn, str) else getattr(fn, "__name__", repr(fn))
        raise UserError(
            f"{node.name}: {node.op} {what!r} has no LCE translation: expected layers "
            "(BinaryConv2d, BinaryLinear, Conv2d, Linear, BatchNorm, pooling, Flatten, "
            "activations) and +, torch.cat(dim=1), torch.flatten(x, 1), F.relu"
        )

    def _module(self, name: str, m: nn.Module, x: _T) -> _T:
        keras = self.keras
        if is_packed_layer(m):
            raise UserError(
                f"{name}: a packed layer ({type(m).__name__}): export the model before "
                "pack_binary (LCE packs the weights itself)"
            )
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return x
        if isinstance(m, (BinaryConv2d, nn.Conv2d)):
            return self._conv(name, m, x)
        if isinstance(m, (BinaryLinear, nn.Linear)):
            return self._linear(name, m, x)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return self._batch_norm(name, m, x)
        if isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise UserError(f"{name}: format 'lce' flattens from dim 1 to the end")
            return self._flatten(x)
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            return self._pool(name, m, x)
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size,) * 2
            if tuple(size) != (1, 1) or x.kind != "map":
                raise UserError(f"{name}: format 'lce' pools adaptively to 1x1 only")
            layer = (
                keras.layers.GlobalAveragePooling2D(keepdims=True)
                if isinstance(m, nn.AdaptiveAvgPool2d)
                else keras.layers.GlobalMaxPooling2D(keepdims=True)
            )
            return _T(layer(x.k), "map", (x.shape[0], 1, 1))
        act = self._activation(name, m)
        return _T(act(x.k), x.kind, x.shape, x.perm)

    def _activation(self, name: str, m: nn.Module) -> Callable[[Any], Any]:
        keras, tf = self.keras, self.s.tf
        if isinstance(m, nn.ReLU6):
            return keras.layers.ReLU(max_value=6.0)
        if isinstance(m, nn.ReLU):
            return keras.layers.ReLU()
        if isinstance(m, nn.LeakyReLU):
            return keras.layers.LeakyReLU(alpha=float(m.negative_slope))
        if isinstance(m, nn.Hardtanh):
            low, high = float(m.min_val), float(m.max_val)
            return keras.layers.Lambda(lambda v: tf.clip_by_value(v, low, high))
        if isinstance(m, nn.Sigmoid):
            return keras.layers.Activation("sigmoid")
        if isinstance(m, nn.Tanh):
            return keras.layers.Activation("tanh")
        if isinstance(m, nn.Softmax) and m.dim in (1, -1):
            return keras.layers.Softmax(axis=-1)
        raise UserError(
            f"{name}: {type(m).__name__} has no LCE translation: expected BinaryConv2d, "
            "BinaryLinear, Conv2d, Linear, BatchNorm1d/2d, MaxPool2d, AvgPool2d, "
            "AdaptiveAvg/MaxPool2d(1), Flatten, ReLU, ReLU6, LeakyReLU, Hardtanh, Sigmoid, "
            "Tanh, Softmax(dim=1), Identity or Dropout"
        )

    # ------------------------------------------------------------------ layers

    def _quantizers(self, name: str, m: nn.Module) -> tuple[str | None, str | None]:
        """(input, kernel) as None / 'sign' / 'magnitude'; custom functions are refused."""
        if not is_binary_layer(m):
            return None, None
        inp = sign_kind(m.input_quantizer)
        kern = "sign" if m.mode == "bop" else sign_kind(m.kernel_quantizer)
        for what, kind, spec in (
            ("input", inp, m.input_quantizer),
            ("kernel", kern, m.kernel_quantizer),
        ):
            if kind == "custom":
                raise UserError(
                    f"{name}: its {what} quantizer {getattr(spec, '__name__', spec)!r} is a "
                    "custom function: format 'lce' knows the built-in sign quantizers "
                    f"({', '.join(QUANTIZERS)})"
                )
        return inp, kern

    def _kernel_quantizer(self, kern: str | None) -> Any:
        if kern is None:
            return None
        return self.lq.quantizers.MagnitudeAwareSign() if kern == "magnitude" else "ste_sign"

    def _conv(self, name: str, m: nn.Conv2d, x: _T) -> _T:
        keras = self.keras
        if x.kind != "map":
            raise UserError(f"{name}: a convolution of a feature vector (expected a map)")
        if m.padding_mode != "zeros":
            raise UserError(
                f"{name}: padding_mode={m.padding_mode!r}: format 'lce' pads with zeros only"
            )
        inp, kern = self._quantizers(name, m)
        (_, h, w), out_shape = x.shape, self.shapes[name][1]
        (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
        ph, pw = _padding(m, (h, w))
        weight = m.weight
        if is_binary_layer(m) and m.mode == "bop":
            weight = torch.where(weight < 0, -1.0, 1.0)
        depthwise = m.groups == m.in_channels and m.groups > 1 and inp is None and kern is None
        same = pads_like_tf_same(h, kh, sh, dh, ph) and pads_like_tf_same(w, kw, sw, dw, pw)
        k = x.k
        if (ph, pw) == (0, 0):
            padding = "valid"
        elif same:
            padding = "same"
        elif inp is None:  # real input: zeros padded before the conv are exact
            k = keras.layers.ZeroPadding2D(((ph, ph), (pw, pw)))(k)
            padding = "valid"
        else:
            raise UserError(
                f"{name}: padding {(ph, pw)} of a binary convolution with stride {(sh, sw)} on "
                f"a {h}x{w} input is not TensorFlow's 'same' padding, the only padding LCE "
                "applies to binary convolutions: expected padding 0 ('valid') or (k - 1) / 2 "
                "with stride 1 (or an input size where 'same' pads symmetrically)"
            )
        common = {
            "strides": (sh, sw),
            "padding": padding,
            "dilation_rate": (dh, dw),
            "use_bias": m.bias is not None,
        }
        if depthwise:
            layer = keras.layers.DepthwiseConv2D(
                (kh, kw), depth_multiplier=m.out_channels // m.in_channels, **common
            )
            kernel = _np(weight).reshape(m.in_channels, -1, kh, kw).transpose(2, 3, 0, 1)
        else:
            kernel = _np(weight).transpose(2, 3, 1, 0)  # (out, in/g, kh, kw) -> (kh, kw, in/g, out)
            extra = {"pad_values": 0.0} if inp is not None and padding == "same" else {}
            layer = self.lq.layers.QuantConv2D(
                m.out_channels,
                (kh, kw),
                groups=m.groups,
                input_quantizer="ste_sign" if inp is not None else None,
                kernel_quantizer=self._kernel_quantizer(kern),
                **extra,
                **common,
            )
        y = layer(k)
        layer.set_weights([kernel] + ([_np(m.bias)] if m.bias is not None else []))
        return _T(y, "map", tuple(out_shape))

    def _linear(self, name: str, m: nn.Linear, x: _T) -> _T:
        if x.kind != "vec":
            raise UserError(
                f"{name}: a linear layer on a {len(x.shape)}-d map: expected a flatten (or 1x1 "
                "pooling and flatten) before it"
            )
        inp, kern = self._quantizers(name, m)
        weight = m.weight
        if is_binary_layer(m) and m.mode == "bop":
            weight = torch.where(weight < 0, -1.0, 1.0)
        w = _np(weight)  # (out, in)
        if x.perm is not None:
            w = w[:, x.perm]
        layer = self.lq.layers.QuantConv2D(
            m.out_features,
            (1, 1),
            input_quantizer="ste_sign" if inp is not None else None,
            kernel_quantizer=self._kernel_quantizer(kern),
            use_bias=m.bias is not None,
        )
        y = layer(x.k)
        kernel = w.T.reshape(1, 1, w.shape[1], w.shape[0])
        layer.set_weights([kernel] + ([_np(m.bias)] if m.bias is not None else []))
        return _T(y, "vec", (m.out_features,))

    def _batch_norm(self, name: str, m: nn.Module, x: _T) -> _T:
        if m.running_mean is None or m.running_var is None:
            raise UserError(
                f"{name}: {type(m).__name__} without running statistics "
                "(track_running_stats=False): expected eval statistics to fold"
            )
        c = m.num_features
        gamma = _np(m.weight) if m.weight is not None else np.ones(c, np.float32)
        beta = _np(m.bias) if m.bias is not None else np.zeros(c, np.float32)
        mean, var = _np(m.running_mean), _np(m.running_var)
        if x.kind == "vec" and x.perm is not None:
            gamma, beta, mean, var = (v[x.perm] for v in (gamma, beta, mean, var))
        layer = self.keras.layers.BatchNormalization(axis=-1, epsilon=float(m.eps))
        y = layer(x.k)
        layer.set_weights([gamma, beta, mean, var])
        return _T(y, x.kind, x.shape, x.perm)

    def _flatten(self, x: _T) -> _T:
        if x.kind == "vec":
            return x
        c, h, w = x.shape
        n = c * h * w
        return _T(self.keras.layers.Reshape((1, 1, n))(x.k), "vec", (n,), flatten_order(c, h, w))

    def _pool(self, name: str, m: nn.Module, x: _T) -> _T:
        if x.kind != "map":
            raise UserError(f"{name}: pooling of a feature vector (expected a map)")
        k, s = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size)
        pads = _pair(m.padding)
        dilation = _pair(getattr(m, "dilation", 1))
        if pads != (0, 0) or m.ceil_mode or dilation != (1, 1):
            raise UserError(
                f"{name}: {type(m).__name__} with padding {pads}, ceil_mode={m.ceil_mode}, "
                f"dilation {dilation}: format 'lce' pools without padding, dilation or ceil_mode"
            )
        if isinstance(m, nn.MaxPool2d) and m.return_indices:
            raise UserError(f"{name}: MaxPool2d(return_indices=True) has no LCE translation")
        cls = (
            self.keras.layers.MaxPooling2D
            if isinstance(m, nn.MaxPool2d)
            else self.keras.layers.AveragePooling2D
        )
        y = cls(pool_size=k, strides=s, padding="valid")(x.k)
        return _T(y, "map", tuple(self.shapes[name][1]))


def flatten_order(c: int, h: int, w: int) -> np.ndarray | None:
    """perm with NHWC-flattened feature j == NCHW-flattened feature perm[j] (torch's flatten is
    (C, H, W) order, Keras' (H, W, C)); None when they agree (a 1x1 map)."""
    if (h, w) == (1, 1):
        return None
    hh, ww, cc = np.meshgrid(np.arange(h), np.arange(w), np.arange(c), indexing="ij")
    return (cc * h * w + hh * w + ww).reshape(-1)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _padding(m: nn.Conv2d, size: tuple[int, int]) -> tuple[int, int]:
    """Symmetric padding (ph, pw) of `m`; torch's 'same' with an odd total is refused."""
    if m.padding == "valid":
        return (0, 0)
    if m.padding == "same":
        pads = []
        for k, d in zip(m.kernel_size, m.dilation):
            total = d * (k - 1)
            if total % 2:
                raise UserError(
                    "padding='same' with an even kernel pads unevenly: format 'lce' expects "
                    "symmetric padding"
                )
            pads.append(total // 2)
        return (pads[0], pads[1])
    return _pair(m.padding)


def _same_perm(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.array_equal(a, b))


# ----------------------------------------------------------------------------- public API


def _check_model(model: nn.Module, input_size: Sequence[int]) -> tuple[int, ...]:
    if not isinstance(model, nn.Module):
        raise UserError(f"format 'lce' exports a torch.nn.Module, got {type(model).__name__}")
    size = tuple(int(s) for s in input_size)
    if len(size) not in (2, 4):
        raise UserError(f"input_size {size}: format 'lce' expects (N, C, H, W) or (N, F)")
    return size


@contextlib.contextmanager
def quiet_tensorflow() -> Iterator[None]:
    """larq's advice for training ("set kernel_constraint") and TensorFlow's notes while it
    saves the model for the converter are about training, not export: hide them here."""
    loggers = [logging.getLogger(n) for n in ("larq", "tensorflow")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def to_larq(model: nn.Module, input_size: Sequence[int]) -> Any:
    """The larq / Keras (NHWC) model that computes what `model` computes in eval.

    `model` is read in eval mode (its flags are restored); input_size is (N, C, H, W) or (N, F)
    (N is free in the Keras model). See the module docstring for what is translated.
    """
    size = _check_model(model, input_size)
    stack = lce_stack()
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with quiet_tensorflow():
            return _Translator(model, size, stack).build()
    finally:
        for m, flag in flags:
            m.training = flag
