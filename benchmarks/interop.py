"""lightnets on models nobody here wrote: timm and torchvision, random init (`make interop`).

For each model: BN statistics primed by a few train-mode passes, then in eval

- `fuse`: norm layers before / after (any torch BatchNorm, subclasses such as timm's
  BatchNormAct2d included), the largest output difference relative to the output's range;
- `convert_norm(m, "fbn", fbn_groups=4)` on a copy: FBN convs made, the pairs it left (those it
  should have converted, and the grouped ones FBNConv2d does not support), the eval difference
  at conversion, one SGD step, and whether the trained model fuses back to the original's
  fused parameter count;
- `convert_norm(m, "gn", num_groups="auto")` on a copy: one training step with a finite loss;
- `convert_norm(m, "frozen_bn")` on a copy: the eval difference (it must be ~0) and the conv
  count after `fuse` (the same as the original's: a model's own hooks still merge branches);
- `profile`: parameters, fused parameters and MACs; the conv count after `fuse` beside timm's
  own `reparameterize_model` where timm has one;
- `export` to ONNX (fused, checked in onnxruntime by lightnets itself).

Prints a markdown table and writes it (with the versions and the command) to
`<out>/README.md` and every number to `<out>/interop.json`. Needs torchvision and timm, which
the CPU build of torch here cannot load: run it in the separate environment `make interop`
builds. Nothing is downloaded: every model is built from its definition.

    python benchmarks/interop.py --out docs/results/interop [--size 128] [--models a,b]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import lightnets as ln

#: (source, name): the light-weight families users bring first, plus a few classics
MODELS = [
    ("timm", "mobilenetv2_100"),
    ("timm", "mobilenetv3_large_100"),
    ("timm", "efficientnet_b0"),
    ("timm", "regnety_004"),
    ("timm", "mobileone_s0"),
    ("timm", "repvgg_a0"),
    ("timm", "fastvit_t8"),
    ("timm", "ghostnet_100"),
    ("timm", "convnext_atto"),
    ("timm", "resnet18"),
    ("torchvision", "resnet18"),
    ("torchvision", "mobilenet_v3_large"),
    ("torchvision", "shufflenet_v2_x1_0"),
    ("torchvision", "densenet121"),
    ("torchvision", "efficientnet_b0"),
    ("torchvision", "regnet_y_400mf"),
]
HEAD = [
    "model",
    "norms before",
    "norms after fuse",
    "fuse max diff",
    "fbn convs",
    "fbn missed",
    "fbn grouped kept",
    "fbn diff",
    "fbn train + fuse",
    "gn auto step",
    "frozen_bn diff",
    "frozen_bn convs fused",
    "params",
    "fused params",
    "MACs",
    "convs fused (timm's)",
    "export",
]


def build(source: str, name: str) -> nn.Module:
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False)
    import torchvision

    return torchvision.models.get_model(name, weights=None)


def norms(model: nn.Module) -> int:
    return sum(isinstance(m, (_BatchNorm, nn.GroupNorm)) for m in model.modules())


def batch_norms(model: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def primed(model: nn.Module, size: int) -> nn.Module:
    """BN statistics from three train-mode passes (random init has mean 0, var 1)."""
    gen = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, size, size, generator=gen) * 1.5 + 0.3)
    return model.eval()


def train_step(model: nn.Module, size: int) -> float:
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    out = model(x)
    out = out if isinstance(out, torch.Tensor) else out[0]
    loss = nn.functional.cross_entropy(out, torch.arange(4) % out.shape[1])
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.eval()
    return float(loss)


def missed_pairs(model: nn.Module, grouped: bool = False) -> list[tuple[str, str]]:
    """Conv2d -> BatchNorm2d pairs still there that FBN applies to (not depthwise, at least 4
    input channels): with groups == 1, or with grouped=True the grouped ones of several input
    channels a group, which FBNConv2d does not support (convert_norm warns naming them)."""
    from lightnets.deploy.folding import find_pairs, is_foldable_linear

    def conv(m: nn.Module) -> bool:
        if not (isinstance(m, nn.Conv2d) and is_foldable_linear(m)):
            return False
        return 1 < m.groups < m.in_channels if grouped else m.groups == 1

    def bn(m: nn.Module) -> bool:
        return isinstance(m, nn.BatchNorm2d)

    return [
        (c, b) for c, b in find_pairs(model, conv, bn) if model.get_submodule(c).in_channels >= 4
    ]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def check(source: str, name: str, size: int) -> dict:
    torch.manual_seed(0)
    model = primed(build(source, name), size)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    row: dict = {"model": f"{source}/{name}", "norms before": norms(model)}
    with torch.no_grad():
        ref = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = ln.fuse(model)
        with torch.no_grad():
            row["fuse max diff"] = rel_diff(fused(x), ref)
        row["norms after fuse"] = norms(fused)
        row["batch norms after fuse"] = batch_norms(fused)
        row["convs fused"] = convs(fused)
        fused_params = count_params(fused)
        if source == "timm":
            from timm.models import reparameterize_model

            row["convs timm reparameterized"] = convs(reparameterize_model(model))

        fbn = copy.deepcopy(model)
        ln.convert_norm(fbn, "fbn", fbn_groups=4)
        row["fbn convs"] = sum(isinstance(m, ln.nn.FBNConv2d) for m in fbn.modules())
        row["fbn missed"] = len(missed_pairs(fbn))
        row["fbn grouped kept"] = len(missed_pairs(fbn, grouped=True))
        with torch.no_grad():
            row["fbn diff"] = rel_diff(fbn.eval()(x), ref)
        loss = train_step(fbn, size)
        row["fbn train + fuse"] = math.isfinite(loss) and count_params(ln.fuse(fbn)) == fused_params

        gn = copy.deepcopy(model)
        ln.convert_norm(gn, "gn", num_groups="auto")
        row["gn auto step"] = math.isfinite(train_step(gn, size)) and batch_norms(gn) == 0

        frozen = copy.deepcopy(model)
        ln.convert_norm(frozen, "frozen_bn")
        with torch.no_grad():
            row["frozen_bn diff"] = rel_diff(frozen.eval()(x), ref)
        row["frozen_bn convs fused"] = convs(ln.fuse(frozen))

        prof = ln.profile(model, (1, 3, size, size))
        row.update(params=prof.params, **{"fused params": prof.fused_params, "MACs": prof.macs})
        with tempfile.TemporaryDirectory() as tmp:
            ln.export(model, Path(tmp) / "m.onnx", input_size=(1, 3, size, size))
        row["export"] = True
    row["warnings"] = sorted({str(w.message)[:300] for w in caught})
    return row


def cell(row: dict, key: str) -> str:
    if key == "convs fused (timm's)":
        timm_count = row.get("convs timm reparameterized")
        return f"{row['convs fused']}" + ("" if timm_count is None else f" ({timm_count})")
    value = row.get(key)
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.1e}"
    if isinstance(value, int) and key in ("params", "fused params", "MACs"):
        return ln.analysis.format_count(value)
    return "—" if value is None else str(value)


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for row in rows:
        if "error" in row:
            lines.append(
                f"| {row['model']} | **failed**: {row['error']} |" + " |" * (len(HEAD) - 2)
            )
            continue
        lines.append("| " + " | ".join(cell(row, key) for key in HEAD) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="folder for README.md and interop.json")
    p.add_argument("--size", type=int, default=128, help="input height and width (default 128)")
    p.add_argument("--models", help="comma-separated source/name (default: the built-in list)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    chosen = MODELS
    if args.models:
        chosen = [tuple(item.split("/", 1)) for item in args.models.split(",")]
    rows, start = [], time.perf_counter()
    for source, name in chosen:
        t0 = time.perf_counter()
        try:
            row = check(source, name, args.size)
        except Exception as err:  # a row that says what broke, and the run goes on
            row = {"model": f"{source}/{name}", "error": f"{type(err).__name__}: {err}"[:300]}
            traceback.print_exc()
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(f"{row['model']}: {row['seconds']} s", file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    failed = [r["model"] for r in rows if "error" in r]
    if args.out:
        import timm
        import torchvision

        args.out.mkdir(parents=True, exist_ok=True)
        versions = (
            f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm "
            f"{timm.__version__}, Python {platform.python_version()}, {platform.machine()} CPU"
        )
        (args.out / "interop.json").write_text(
            json.dumps({"versions": versions, "size": args.size, "rows": rows}, indent=1) + "\n"
        )
        (args.out / "README.md").write_text(
            "# lightnets on timm and torchvision models\n\n"
            f"`make interop` ({versions}; random init, input 1x3x{args.size}x{args.size}, "
            f"{time.perf_counter() - start:.0f} s). What each column checks is in "
            "`benchmarks/interop.py`; every number and every warning is in `interop.json`.\n\n"
            + text
            + "\n\nnorms: BatchNorm (timm's BatchNormAct2d included) and GroupNorm layers; after "
            "fuse only GroupNorm layers (they depend on each sample) and BNs that no conv feeds "
            "may remain (DenseNet's pre-activation BNs follow a concatenation: fuse keeps them and "
            "names them in a warning; convnext_atto has LayerNorms only). "
            "Diffs are max |difference| / max |reference| of the logits. fbn convs: the "
            "Conv2d+BN pairs convert_norm('fbn', fbn_groups=4) made FBN (not the depthwise and "
            "C_in < 4 ones); fbn missed: such pairs it left (must be 0); fbn grouped kept: "
            "grouped (not depthwise) conv+BN pairs it left as they were, because FBNConv2d has "
            "no conv groups (convert_norm warns naming them); fbn train + fuse: one "
            "SGD step, then fuse gives the original's fused parameter count. frozen_bn convs "
            "fused: Conv2d count after convert_norm('frozen_bn') then fuse (the model's own "
            "reparameterization hooks still merge its branches: as convs fused). convs fused "
            "(timm's): Conv2d count after lightnets.fuse, and after timm's own "
            "reparameterize_model in parentheses.\n"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
