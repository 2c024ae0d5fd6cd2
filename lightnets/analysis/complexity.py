"""Parameters and multiply-accumulates (MACs) of a model, per layer, before and after folding
its normalization layers into the convolutions.

What is counted:
- `params`: every parameter of the model as given (training-time), once even when shared.
  BN's weight and bias count; an FBN conv's per-group norm_weight / norm_bias (G x C_out
  each) count, which is what Table 2 of the Finet paper does. Buffers (running statistics)
  do not count.
- `macs`: multiply-accumulates of one forward pass on a zero input of `input_size` (the whole
  batch), in eval mode, measured with `torch.utils.flop_counter.FlopCounterMode` and halved
  (it counts 2 FLOPs per MAC). It counts convolutions, linear layers and matmuls (bias adds
  are not counted); it does not count normalization, activations, pooling, the SE gate's
  multiply or residual adds. This is the convention of the light-weight network literature
  (ShuffleNet, MobileNet, Finet "FLOPs" are MACs).
- An FBN conv (`FBNConv2d`) counts as exactly one convolution of its weight, whatever its
  forward does: at inference it is one conv (with folded weights and a bias). During
  training its naive form is a grouped conv with G*C_out outputs of C_in/G inputs each,
  which has the same MACs as one conv (G * C_out * C_in/G = C_out * C_in per output pixel);
  the per-group statistics and the sum over groups are normalization work and are not
  counted, like BN.
- `fused_params` / `fused_macs`: of the model after folding BN and FBN into the preceding
  convs, by `lightnets.deploy.folding.fuse` when it is importable, else computed here: a BN whose
  input is the output of a conv or linear layer is removed and that layer gains a bias (if it
  had none); an FBN conv loses its norm parameters and gains a bias of C_out. Folding changes
  no MACs under this convention. `fused_by` says which way was used.
"""

from __future__ import annotations

import copy
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightnets.deploy.folding import fuse
from lightnets.deploy.pack import pack_binary
from lightnets.errors import UserError
from lightnets.nn.binary import is_binary_layer
from lightnets.nn.fbn import FBNConv2d
from lightnets.nn.packed import is_packed_layer, packed_weight_count

__all__ = ["LayerRow", "Profile", "format_count", "profile"]


@dataclass(frozen=True)
class LayerRow:
    """One layer of the profile: a leaf module, an FBN conv, or a module with its own work."""

    name: str
    type: str
    output_shape: tuple[int, ...] | None
    params: int
    macs: int


@dataclass
class Profile:
    """Result of `profile`: totals and the per-layer table."""

    params: int
    macs: int
    fused_params: int
    fused_macs: int
    table: list[LayerRow] = field(default_factory=list)
    input_size: tuple[int, ...] = ()
    fused_by: str = "analytic"
    binary_weights: int = 0  # weights the packed model stores as bits (binary models)

    def format(self, max_rows: int | None = None) -> str:
        """An aligned text table of the layers followed by the totals."""
        rows = self.table if max_rows is None else self.table[:max_rows]
        head = ("layer", "type", "output", "params", "MACs")
        body = [
            (
                r.name,
                r.type,
                "x".join(map(str, r.output_shape)) if r.output_shape is not None else "-",
                f"{r.params:,}",
                f"{r.macs:,}",
            )
            for r in rows
        ]
        widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
        align = ("<", "<", "<", ">", ">")

        def line(cells: Sequence[str]) -> str:
            return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, align, widths)).rstrip()

        out = [line(head), "  ".join("-" * w for w in widths)]
        out += [line(b) for b in body]
        if max_rows is not None and len(self.table) > max_rows:
            out.append(f"... {len(self.table) - max_rows} more layers")
        size = "x".join(map(str, self.input_size))
        out += [
            "",
            f"input           {size}",
            f"params          {self.params:,} ({format_count(self.params)})",
            f"MACs            {self.macs:,} ({format_count(self.macs)})",
            f"fused params    {self.fused_params:,} ({format_count(self.fused_params)})",
            f"fused MACs      {self.fused_macs:,} ({format_count(self.fused_macs)})"
            f"  [{self.fused_by}]",
        ]
        if self.binary_weights:
            out.append(f"binary weights  {self.binary_weights:,} of the fused params (1 bit each)")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.format()


def format_count(n: float) -> str:
    """A count with a K/M/G/T suffix, at most two decimals: 1234567 -> '1.23M', 4.5e9 -> '4.5G'."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    units = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"))
    for i, (scale, suffix) in enumerate(units):
        if n >= scale:
            text = f"{n / scale:.2f}"
            if text == "1000.00" and i > 0:  # 999_999 -> '1M', not '1000K'
                return f"{sign}1{units[i - 1][1]}"
            return f"{sign}{text.rstrip('0').rstrip('.')}{suffix}"
    if n == int(n):
        return f"{sign}{int(n)}"
    return f"{sign}{f'{n:.2f}'.rstrip('0').rstrip('.')}"


def profile(
    model: nn.Module,
    input_size: int | Sequence[int] = (1, 3, 224, 224),
    device: str | torch.device = "cpu",
) -> Profile:
    """Parameters and MACs of `model` for an input of `input_size` (see the module docstring).

    input_size: a full shape, or one int S for (1, 3, S, S). The model is run once in eval
    mode under no_grad (its train/eval flags are restored afterwards; it is copied first only
    if it is not on `device`), and its deployable copy once: fused (lightnets.fuse), or for a
    binary model packed (lightnets.pack_binary: weights as bits, BN folded into them).
    """
    size = _check_size(input_size)
    device = torch.device(device)
    run_model = model if _is_on(model, device) else copy.deepcopy(model).to(device)
    m = _measure(run_model, size, device)

    fused_by = "analytic"
    fused_params, fused_macs = m.params - m.fold_removed + m.fold_added, m.macs
    binary_weights = 0
    deploy, deploy_name = _find_deploy(run_model)
    if deploy is not None:
        try:
            with warnings.catch_warnings():
                # fuse's note on BN it keeps after binary layers: packing folds them instead
                warnings.simplefilter("ignore", UserWarning)
                fused_model = deploy(run_model)
            f = _measure(fused_model, size, device)
        except Exception as exc:  # a broken fuse must not break profiling
            warnings.warn(
                f"{deploy_name} failed ({type(exc).__name__}: {exc}); fused counts are "
                "computed analytically",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            fused_params, fused_macs, fused_by = f.params, f.macs, deploy_name
            binary_weights, packed_floats = _packed_values(fused_model)
            # a packed layer keeps its weights (as bits) and folded BN (scale, shift) in
            # buffers: they are the model's parameters all the same
            fused_params += binary_weights + packed_floats
    return Profile(
        params=m.params,
        macs=m.macs,
        fused_params=fused_params,
        fused_macs=fused_macs,
        table=m.rows,
        input_size=size,
        fused_by=fused_by,
        binary_weights=binary_weights,
    )


# --- internals ---------------------------------------------------------------------------


@dataclass
class _Measured:
    params: int
    macs: int
    rows: list[LayerRow]
    fold_removed: int  # norm parameters that folding removes
    fold_added: int  # bias parameters that folding adds


def _check_size(input_size: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(input_size, int) and not isinstance(input_size, bool) and input_size >= 1:
        return (1, 3, input_size, input_size)  # as the CLI's --input 224
    ok = isinstance(input_size, Sequence) and len(input_size) > 0
    ok = ok and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in input_size)
    if not ok:
        raise UserError(
            f"input_size must be positive ints like (1, 3, 224, 224), or one int S for "
            f"(1, 3, S, S), got {input_size!r}"
        )
    return tuple(input_size)


def _is_on(model: nn.Module, device: torch.device) -> bool:
    tensors = list(model.parameters()) + list(model.buffers())
    return all(_same_device(t.device, device) for t in tensors)


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index


def _find_deploy(model: nn.Module):
    """(function, its name) that makes the inference form of `model`, or (None, "")."""
    if not any(is_binary_layer(m) for m in model.modules()):
        return fuse, "lightnets.deploy.folding"

    def pack_then_fuse(m: nn.Module) -> nn.Module:
        # binary layers packed (BN after them folded in), then the real conv+BN pairs fused
        return fuse(pack_binary(m))

    try:
        pack_binary(model)
    except UserError:  # e.g. a kernel quantizer that is not a sign: deploy it unpacked
        return fuse, "lightnets.deploy.folding"
    return pack_then_fuse, "lightnets.pack_binary + fuse"


def _packed_values(model: nn.Module) -> tuple[int, int]:
    """(weights stored as bits, real numbers kept in buffers) of the packed layers."""
    floats = sum(
        b.numel()
        for m in model.modules()
        if is_packed_layer(m)
        for b in m.buffers(recurse=False)
        if b.is_floating_point()
    )
    return packed_weight_count(model), floats


def _is_fbn(module: nn.Module) -> bool:
    return isinstance(module, FBNConv2d)


def _input_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _measure(model: nn.Module, size: tuple[int, ...], device: torch.device) -> _Measured:
    named = list(model.named_modules())
    fbn_names = [n for n, mod in named if _is_fbn(mod)]

    def under_fbn(name: str) -> bool:
        return any(name != f and (f == "" or name.startswith(f + ".")) for f in fbn_names)

    visible = [(n, mod) for n, mod in named if not under_fbn(n)]
    fbn_set = {id(mod) for n, mod in visible if n in fbn_names}

    out_shapes: dict[int, tuple[int, ...]] = {}
    fbn_macs: dict[int, int] = defaultdict(int)
    last_linear: list = [None, None]  # (module, output) of the latest conv / linear leaf
    fold_removed = 0
    fold_added = 0
    folded: set[int] = set()

    def hook(mod: nn.Module, inputs: tuple, output: object) -> None:
        nonlocal fold_removed, fold_added
        if isinstance(output, torch.Tensor):
            out_shapes[id(mod)] = tuple(output.shape)
        if id(mod) in fbn_set and isinstance(output, torch.Tensor):
            # one conv: every output element is a dot product over C_in/groups * k * k
            fbn_macs[id(mod)] += output.numel() * mod.weight[0].numel()
            if id(mod) not in folded:
                folded.add(id(mod))
                fold_removed += sum(p.numel() for n, p in mod.named_parameters() if n != "weight")
                fold_added += mod.weight.shape[0] if getattr(mod, "bias", None) is None else 0
            last_linear[:] = [None, None]
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            last_linear[:] = [mod, output]
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            prev, prev_out = last_linear
            if prev is not None and inputs and inputs[0] is prev_out and id(mod) not in folded:
                folded.add(id(mod))
                fold_removed += sum(p.numel() for p in mod.parameters())
                if prev.bias is None:
                    fold_added += prev.weight.shape[0]
            last_linear[:] = [None, None]

    handles = [mod.register_forward_hook(hook) for _, mod in visible]
    flags = [(mod, mod.training) for mod in model.modules()]
    x = torch.zeros(size, dtype=_input_dtype(model), device=device)
    try:
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            try:
                model(x)
            except (RuntimeError, ValueError, TypeError) as err:  # torch layers raise all three
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise UserError(
                    f"input_size {'x'.join(map(str, size))} does not fit {type(model).__name__} "
                    f"({first[:200]}): expected the input the model takes, e.g. (1, in_chans, "
                    "H, W)"
                ) from None
    finally:
        for h in handles:
            h.remove()
        for mod, flag in flags:
            mod.training = flag
        last_linear[:] = [None, None]

    counts = counter.get_flop_counts()
    root = type(model).__name__

    def key(name: str) -> str:
        return f"{root}.{name}" if name else root

    def flops(name: str) -> int:
        return int(sum(counts.get(key(name), {}).values()))

    def attributed(name: str, mod: nn.Module) -> int:
        # FLOPs counted under `name`; for a container that is never called itself (an
        # nn.ModuleList / ModuleDict, so it has no entry), the sum over its descendants, so
        # that its parent does not count their work a second time as its own
        counted = key(name) in counts
        if counted or not list(mod.children()):
            return flops(name)
        return sum(attributed(f"{name}.{c}", child) for c, child in mod.named_children())

    rows: list[LayerRow] = []
    total = 0
    for name, mod in visible:
        children = list(mod.named_children())
        if id(mod) in fbn_set:
            macs = fbn_macs.get(id(mod), 0)
            params = sum(p.numel() for p in mod.parameters())
            leaf = True
        else:
            child_flops = sum(attributed(f"{name}.{c}" if name else c, m) for c, m in children)
            macs = max(flops(name) - child_flops, 0) // 2
            params = sum(p.numel() for p in mod.parameters(recurse=False))
            leaf = not children
        total += macs
        if leaf or params or macs:
            rows.append(
                LayerRow(
                    name=name or "(model)",
                    type=type(mod).__name__,
                    output_shape=out_shapes.get(id(mod)),
                    params=params,
                    macs=macs,
                )
            )
    n_params = sum(p.numel() for p in model.parameters())
    return _Measured(n_params, total, rows, fold_removed, fold_added)
