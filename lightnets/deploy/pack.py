"""1-bit packing of a model's binary weights, BatchNorm folded into them, and packed files.

`pack_binary(model)` returns an eval-mode copy of `model` in which every `BinaryConv2d` /
`BinaryLinear` (lightnets.nn.binary, either mode) is its packed twin, `PackedBinaryConv2d` /
`PackedBinaryLinear`: the +1/-1 weight is stored as bits, one bit per weight, in a uint8
buffer ``weight_bits``. Real layers are left as they are (`lightnets.fuse` on the packed model
folds their BatchNorms; it leaves packed layers alone).

The packed layers, their bit order and their forward pass: lightnets.nn.packed.

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
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightnets.deploy.folding import find_pairs, is_eval_affine_norm, set_module
from lightnets.errors import UserError
from lightnets.files import atomic_torch_save, load_model_state, read_weights_only
from lightnets.models.registry import create_model, model_spec
from lightnets.nn.binary import (
    QUANTIZERS,
    BinaryConv2d,
    BinaryLinear,
    is_binary_layer,
    magnitude_aware_sign,
    sign_scale,
)
from lightnets.nn.packed import (
    PACKED_TYPES,
    PackedBinaryConv2d,
    PackedBinaryLinear,
    is_packed_layer,
    iter_packed,
    pack_signs,
    packed_weight_count,
    unpack_signs,
)
from lightnets.version import __version__

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


# ----------------------------------------------------------------------------- files


def _model_spec(
    model: nn.Module, model_name: str | None, model_args: dict[str, Any] | None
) -> dict[str, Any] | None:

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
    root_packed = is_packed_layer(model)
    spec_model = None if root_packed else _model_spec(model, model_name, model_args)
    if spec_model is None and not root_packed:
        raise UserError(
            f"save_packed: cannot tell which registry model {type(model).__name__} is: expected "
            "a model built with lightnets.create_model, or pass model_name= and model_args="
        )
    modules: dict[str, Any] = {}
    for name, m in model.named_modules():
        if is_packed_layer(m):
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
    cls = PACKED_TYPES.get(entry["type"])
    config = entry.get("config")
    if cls is None or not isinstance(config, dict):
        raise UserError(
            f"packed model {path}: module {name!r} has unknown type {entry['type']!r}: expected "
            f"one of {', '.join(PACKED_TYPES)} or Identity"
        )
    try:
        return cls(**config)
    except (TypeError, ValueError) as err:
        raise UserError(f"packed model {path} is damaged: module {name!r}: {err}") from None


def _rebuild(spec_model: Any, modules: dict[str, Any], path: Path | str) -> nn.Module:
    """The packed model's structure (initial weights): the registry model plus replacements."""

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

    path = Path(path)
    read = _read(path)
    model = _rebuild(read["spec"].get("model"), read["modules"], path)
    load_model_state(model, read["state"], str(path))
    for _, m in iter_packed(model):
        m.cache_weights = cache_weights
    return model.eval()
