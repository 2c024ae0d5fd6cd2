"""Fold normalization into the preceding linear layer, for any model.

`fuse(model)` returns an eval-mode copy in which every `FBNConv2d` is the one `nn.Conv2d` it
equals at inference, every Conv1d/2d/3d (any groups, depthwise included) whose output goes only
into a BatchNorm is that conv with the BN folded into its weight and bias, and every Linear
followed by BatchNorm1d likewise. A `FrozenBatchNorm` or `BatchRenorm` (lightnets.nn.norm) is
folded the same way: in eval both are BN's per-channel affine map on fixed statistics; so are
frozen BNs written elsewhere (torchvision's FrozenBatchNorm2d, timm's), through
`lightnets.deploy.normact`.
GroupNorm (gn/ln/in) depends on each sample and is left in place. The outputs equal
``model.eval()(x)``.

Which conv feeds which norm is read from the data flow, never guessed from attribute order:
`find_pairs` traces the model with torch.fx (modules that hold no candidates are leaves, so
exotic layers do not break the trace); where a module does not trace (data-dependent control
flow) it recurses into its children, and inside an `nn.Sequential` it takes a conv directly
followed by a norm, which is data flow by construction. `convert_norm` uses the same search.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightnets.deploy.normact import NormAct, name_a_few, split_norm_act
from lightnets.errors import UserError
from lightnets.nn.binary import is_binary_layer
from lightnets.nn.fbn import FBNConv2d, FBNNormSlot
from lightnets.nn.norm import BatchRenorm, FrozenBatchNorm
from lightnets.nn.packed import is_packed_layer

__all__ = [
    "REPARAMETERIZE_HOOKS",
    "find_pairs",
    "fold_bn",
    "fuse",
    "is_eval_affine_norm",
    "is_foldable_linear",
    "is_foldable_norm",
    "reparameterize_",
    "set_module",
]

_CONV_NORM = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}
_BN_FORWARDS = {_BatchNorm.forward, nn.SyncBatchNorm.forward}
# lightnets' per-channel affine norms in eval: a frozen BN (always), a BatchRenorm (eval uses
# the running statistics exactly as BN). They take any (N, C, ...) input.
_AFFINE_FORWARDS = {FrozenBatchNorm.forward, BatchRenorm.forward}


def _is_eval_affine(module: nn.Module) -> bool:
    return (
        isinstance(module, (FrozenBatchNorm, BatchRenorm))
        and type(module).forward in _AFFINE_FORWARDS
    )


def is_foldable_linear(module: nn.Module) -> bool:
    """A Conv1d/2d/3d or Linear whose forward is torch's own (not a quantized/custom subclass)."""
    for base in (*_CONV_NORM, nn.Linear):
        if isinstance(module, base):
            return type(module).forward is base.forward
    return False


def is_foldable_norm(module: nn.Module) -> bool:
    """A torch BatchNorm (or SyncBatchNorm) layer; whether its statistics allow folding aside."""
    return isinstance(module, _BatchNorm) and type(module).forward in _BN_FORWARDS


def is_eval_affine_norm(module: nn.Module) -> bool:
    """A norm that is a fixed per-channel affine map in eval: a torch BatchNorm with running
    statistics, a FrozenBatchNorm or a BatchRenorm."""
    return (is_foldable_norm(module) and module.running_mean is not None) or _is_eval_affine(module)


def _matches(linear: nn.Module, norm: nn.Module) -> bool:
    """Same number of channels, and the norm of the matching dimensionality."""
    if isinstance(norm, nn.SyncBatchNorm) or _is_eval_affine(norm):
        kinds_ok = True
    elif isinstance(linear, nn.Linear):
        kinds_ok = isinstance(norm, nn.BatchNorm1d)
    else:
        kinds_ok = any(isinstance(linear, c) and isinstance(norm, n) for c, n in _CONV_NORM.items())
    out = linear.out_features if isinstance(linear, nn.Linear) else linear.out_channels
    return kinds_ok and norm.num_features == out


class _Tracer(torch.fx.Tracer):
    """Leaves: torch's modules, the candidates, and any module that contains no candidate."""

    def __init__(self, is_candidate: Callable[[nn.Module], bool]) -> None:
        super().__init__()
        self.is_candidate = is_candidate

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self.is_candidate(m):
            return True
        if not any(self.is_candidate(sub) for sub in m.modules()):
            return True
        return super().is_leaf_module(m, qualname)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _pairs_fx(
    module: nn.Module,
    prefix: str,
    is_first: Callable[[nn.Module], bool],
    is_second: Callable[[nn.Module], bool],
) -> list[tuple[str, str]]:
    tracer = _Tracer(lambda m: is_first(m) or is_second(m))
    graph = tracer.trace(module)
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not is_second(module.get_submodule(node.target)):
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], torch.fx.Node):
            continue
        src = node.args[0]
        if src.op != "call_module" or not is_first(module.get_submodule(src.target)):
            continue
        if len(src.users) != 1 or calls[src.target] != 1 or calls[node.target] != 1:
            continue  # the conv's output is used elsewhere too, or a module is called twice
        pairs.append((_join(prefix, src.target), _join(prefix, node.target)))
    return pairs


def _pairs_fallback(
    module: nn.Module,
    prefix: str,
    is_first: Callable[[nn.Module], bool],
    is_second: Callable[[nn.Module], bool],
) -> Iterator[tuple[str, str]]:
    if isinstance(module, nn.Sequential):
        children = list(module.named_children())
        for (a_name, a), (b_name, b) in zip(children, children[1:]):
            if is_first(a) and is_second(b):
                yield _join(prefix, a_name), _join(prefix, b_name)
    for name, child in module.named_children():
        yield from _find(child, _join(prefix, name), is_first, is_second)


def _find(module, prefix, is_first, is_second) -> list[tuple[str, str]]:
    if not any(is_second(m) for m in module.modules()):
        return []
    try:
        return _pairs_fx(module, prefix, is_first, is_second)
    except Exception:  # not traceable (control flow on values, ...): look inside
        return list(_pairs_fallback(module, prefix, is_first, is_second))


#: Why find_pairs may miss a norm layer, for the warnings of fuse and convert_norm.
UNPAIRED_REASONS = (
    "no running statistics, not fed only by a conv/linear, or inside a module whose forward "
    "torch.fx cannot trace and whose layers are not in an nn.Sequential: make that forward "
    "traceable or put each conv and its norm in an nn.Sequential"
)


def find_pairs(
    model: nn.Module,
    is_first: Callable[[nn.Module], bool] = is_foldable_linear,
    is_second: Callable[[nn.Module], bool] = is_foldable_norm,
) -> list[tuple[str, str]]:
    """(first, second) qualified names where first's output feeds only second.

    torch.fx where the model traces, its children where it does not, and direct succession in
    `nn.Sequential` containers. Modules that occur more than once in the model are never
    paired (folding into a shared module would change its other uses).
    """
    occurrences = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    shared = {key for key, count in occurrences.items() if count > 1}
    seen: set[str] = set()
    result = []
    for first, second in _find(model, "", is_first, is_second):
        a, b = model.get_submodule(first), model.get_submodule(second)
        if id(a) in shared or id(b) in shared or first in seen or second in seen:
            continue
        seen.update((first, second))
        result.append((first, second))
    return result


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at the qualified `name` ("layer1.0.conv1") by `new`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@torch.no_grad()
def fold_bn(linear: nn.Module, bn: _BatchNorm) -> None:
    """Fold an eval-mode BatchNorm into the preceding conv/linear in place (adds a bias).

    a = gamma / sqrt(running_var + eps); W' = a W (per output channel); b' = a (b - mean) + beta.
    Computed in float64 and cast back.
    """
    w = linear.weight
    a = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight.double()
    bias = linear.bias.double() if linear.bias is not None else torch.zeros_like(a)
    bias = (bias - bn.running_mean.double()) * a
    if bn.bias is not None:
        bias = bias + bn.bias.double()
    w.copy_((w.double() * a.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
    if linear.bias is None:
        linear.bias = nn.Parameter(bias.to(w.dtype))
    else:
        linear.bias.copy_(bias.to(w.dtype))


#: A module's own structural reparameterization hooks, in the order they are tried (the
#: conventions of timm's reparameterize_model and of the RepVGG / MobileOne / DBB code):
#: `fuse()` returns the module that replaces it; the others change it in place.
REPARAMETERIZE_HOOKS = ("fuse", "reparameterize", "switch_to_deploy")


def _hook(module: nn.Module) -> tuple[str, Callable] | None:
    """The module's first hook that is a method callable without arguments (an attribute that
    is a submodule, such as a U-Net stage's `fuse` layer, is no hook)."""
    for name in REPARAMETERIZE_HOOKS:
        method = getattr(type(module), name, None)
        if method is None or isinstance(method, nn.Module) or not callable(method):
            continue
        try:
            sig = inspect.signature(method)
        except (TypeError, ValueError):
            continue
        required = [
            p
            for p in list(sig.parameters.values())[1:]
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if not required:
            return name, getattr(module, name)
    return None


def reparameterize_(model: nn.Module) -> list[str]:
    """Call every submodule's own reparameterization hook, in place, top-down as timm's
    `reparameterize_model` does (a child's hook first, then its children's); returns
    "name.hook" for each call that succeeded.

    A hook runs on a copy of its module: when it fails (e.g. a hook written for BN branches
    meeting branches whose norms `convert_norm` changed), the module is kept as it was, with a
    warning naming it, and folding then does what it can inside it: the output is unchanged,
    only the branches stay unmerged.
    """
    called: list[str] = []
    failed: list[str] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for child_name, child in list(module.named_children()):
            name = _join(prefix, child_name)
            found = _hook(child)
            if found is not None:
                hook = found[0]
                trial = copy.deepcopy(child)
                try:
                    result = getattr(trial, hook)()
                    # fuse() returns the replacement, or None when it works in place
                    # (ultralytics' RepVGGDW.fuse); anything else is no module to use
                    if hook == "fuse" and not (result is None or isinstance(result, nn.Module)):
                        raise TypeError(
                            f"returned {type(result).__name__}, not an nn.Module or None"
                        )
                except Exception as err:
                    failed.append(f"{name}.{hook}() ({type(err).__name__}: {str(err)[:120]})")
                else:
                    child = result if hook == "fuse" and result is not None else trial
                    setattr(module, child_name, child)
                    called.append(f"{name}.{hook}")
            walk(child, name)

    walk(model, "")
    if failed:
        warnings.warn(
            f"fuse: {len(failed)} reparameterization hook(s) failed and their modules were kept "
            f"as they were: {name_a_few(failed, 3)}; their norms are folded where they follow "
            "a conv, so the output is unchanged, but their branches are not merged",
            stacklevel=3,
        )
    return called


@torch.no_grad()
def _show_hooks_conv_bn(model: nn.Module) -> None:
    """Each FBN conv + its FBNNormSlot -> a plain conv (no bias) + a BatchNorm2d whose eval map
    adds the bias: the conv + BN a reparameterization hook (RepVGG / MobileOne) expects."""
    pairs = find_pairs(
        model, lambda m: isinstance(m, FBNConv2d), lambda m: isinstance(m, FBNNormSlot)
    )
    for conv_name, slot_name in pairs:
        conv = model.get_submodule(conv_name).to_conv().eval()  # torch's fuse_conv_bn_eval
        bias = conv.bias.detach().clone()
        conv.bias = None
        bn = nn.BatchNorm2d(bias.numel(), eps=1e-5, device=bias.device, dtype=bias.dtype).eval()
        bn.running_mean.copy_(-bias)  # (x - (-b)) / sqrt(var + eps) * 1 + 0 = x + b
        bn.running_var.fill_(1.0 - bn.eps)
        set_module(model, conv_name, conv)
        set_module(model, slot_name, bn)


_BN_CLASSES = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _as_batch_norm(module: nn.Module) -> nn.Module | None:
    """The eval-mode torch BatchNorm that computes what `module` computes in eval, for a
    module that is a fixed per-channel affine map there (a FrozenBatchNorm, a BatchRenorm, a
    SyncBatchNorm with running statistics, or a NormAct of one whose other children are all
    nn.Identity: a converted timm norm layer without activation); None for anything else."""
    norm = module
    if isinstance(module, NormAct):
        others = [child for name, child in module.named_children() if name != "norm"]
        if not all(isinstance(child, nn.Identity) for child in others):
            return None
        norm = module.norm
    if isinstance(norm, tuple(_BN_CLASSES.values())) and is_foldable_norm(norm):
        return norm if norm is not module else None  # a BN already: unwrapped from its NormAct
    if not is_eval_affine_norm(norm):
        return None
    mean = norm.running_mean
    cls = _BN_CLASSES.get(getattr(norm, "dims", None) or 2)
    bn = cls(norm.num_features, eps=norm.eps, device=mean.device, dtype=mean.dtype).eval()
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(norm.running_var)
    if norm.weight is not None:
        bn.weight.copy_(norm.weight)
    if norm.bias is not None:
        bn.bias.copy_(norm.bias)
    return bn


@torch.no_grad()
def _show_hooks_batch_norms(model: nn.Module) -> None:
    """Inside each module with a reparameterization hook, every norm `_as_batch_norm` can
    express becomes that plain eval-mode BatchNorm: the branch a RepVGG / MobileOne hook
    expects after `convert_norm` to bn, frozen_bn, brn or sync_bn (timm's `_fuse_bn_tensor`
    asserts ``isinstance(branch, nn.BatchNorm2d)``). Eval outputs are unchanged."""
    replacements: dict[str, nn.Module] = {}
    for prefix, hooked in model.named_modules():
        if not prefix or _hook(hooked) is None:
            continue  # the model's own hook is not called (reparameterize_ walks children)
        for name, module in hooked.named_modules(prefix=prefix):
            done = name == prefix or name in replacements
            if done or any(name.startswith(outer + ".") for outer in replacements):
                continue  # the hooked module itself, or inside a NormAct replaced whole
            bn = _as_batch_norm(module)
            if bn is not None:
                replacements[name] = bn
    for name, bn in replacements.items():
        set_module(model, name, bn)


def fuse(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with every foldable normalization folded away.

    First the model's own structural reparameterization hooks run (`reparameterize_`: timm's
    and the RepVGG / MobileOne / DBB family's `fuse()`, `reparameterize()`,
    `switch_to_deploy()`), which merge multi-branch blocks into one conv; inside their modules
    the norms `convert_norm` made are shown as what the hooks expect first (an FBN conv as a
    conv + BatchNorm2d, a frozen / renormalized / synced BN as a BatchNorm, in eval mode, as
    torch's `fuse_conv_bn_eval` requires). Then norm layers with a built-in activation are
    split (`lightnets.deploy.normact`), and then:
    FBNConv2d -> nn.Conv2d with bias; Conv(1d/2d/3d)/Linear -> BatchNorm -> the conv/linear with
    folded weight and bias, the BN replaced by nn.Identity. The result is in eval mode, every
    module of it (what the hooks and the folding made too); `model` itself is not modified (its
    training flag included). BatchNorms that cannot be folded (no running statistics, or no conv
    feeding only them) are left in place and reported with a warning. A BN after a binary layer
    (lightnets.nn.BinaryConv2d / BinaryLinear, or a packed one) is never folded into it: its
    weights would stop being +1/-1; the warning says so, and `lightnets.pack_binary` folds such
    a BN into the packed layer as a per-channel scale and shift instead.
    """
    fused = _copy_of(model).eval()
    if any(_hook(m) is not None for m in fused.modules()):
        _show_hooks_conv_bn(fused)  # converted to FBN: the hooks see their conv + BN again
        _show_hooks_batch_norms(fused)  # converted norms: the hooks see a BatchNorm again
        reparameterize_(fused)  # RepVGG / MobileOne / DBB branches first: one conv each
    fused, norm_act = split_norm_act(fused)
    fused.eval()  # what the hooks made (new convs) too
    for name, module in list(fused.named_modules()):
        if isinstance(module, FBNConv2d):
            if name:
                set_module(fused, name, module.to_conv().eval())
            else:
                fused = module.to_conv().eval()

    for first, second in find_pairs(fused, is_foldable_linear, is_eval_affine_norm):
        linear, bn = fused.get_submodule(first), fused.get_submodule(second)
        if not _matches(linear, bn):
            continue
        fold_bn(linear, bn)
        if second:
            set_module(fused, second, nn.Identity())

    if norm_act.unsplit:
        names = list(norm_act.unsplit)
        warnings.warn(
            f"fuse: left {len(names)} norm layer(s) with a forward of their own unfolded: "
            f"{name_a_few(names)} ({norm_act.unsplit[names[0]]}; they compute what they did)",
            stacklevel=2,
        )
    left = [name or type(m).__name__ for name, m in fused.named_modules() if is_foldable_norm(m)]
    if left:
        after_binary = _norms_after_binary(fused)
        binary = [name for name in left if name in after_binary]
        other = [name for name in left if name not in after_binary]
        if binary:
            warnings.warn(
                f"fuse: kept {len(binary)} BatchNorm layer(s) that follow a binary layer: "
                f"{name_a_few(binary)} (folding a BN into +1/-1 weights would make them real; "
                "lightnets.pack_binary folds it into the packed layer as a per-channel scale "
                "and shift instead, except through a max-pool where a scale is <= 0)",
                stacklevel=2,
            )
        if other:
            warnings.warn(
                f"fuse: left {len(other)} BatchNorm layer(s) unfolded: {name_a_few(other)} "
                f"({UNPAIRED_REASONS})",
                stacklevel=2,
            )
    return fused.eval()


def _copy_of(model: nn.Module) -> nn.Module:
    """copy.deepcopy(model), or one UserError saying why fuse needs it."""
    if not isinstance(model, nn.Module):
        raise UserError(f"fuse expects a torch.nn.Module, got {type(model).__name__}")
    try:
        return copy.deepcopy(model)
    except Exception as err:
        raise UserError(
            f"fuse: cannot copy {type(model).__name__} ({type(err).__name__}: "
            f"{str(err)[:200]}): fuse works on a copy and never changes the model it is given, "
            "so it needs a model copy.deepcopy can copy (no locks, open files or generators as "
            "attributes)"
        ) from None


def _norms_after_binary(model: nn.Module) -> set[str]:
    """Names of the BatchNorms fed by a binary or packed layer, directly or through a max-pool."""

    def is_binary(m: nn.Module) -> bool:
        return is_binary_layer(m) or is_packed_layer(m)

    def is_pool(m: nn.Module) -> bool:
        return isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d))

    if not any(is_binary(m) for m in model.modules()):
        return set()
    names = {second for _, second in find_pairs(model, is_binary, is_foldable_norm)}
    pools = {pool for _, pool in find_pairs(model, is_binary, is_pool)}
    if pools:
        names.update(
            second for pool, second in find_pairs(model, is_pool, is_foldable_norm) if pool in pools
        )
    return names
