"""Batch-1 CPU inference latency of Finet-large-SE with FBN, fused vs unfused, vs fused BN.

Models, all at 1x3x224x224, measured interleaved in one process (lightnets.analysis.latency):
- `fbn_fused`: finet_large_se with fbn_groups=4, its FBN / BN folded (lightnets.deploy.folding);
- `fbn_unfused`: the same model as trained, in eval mode;
- `bn_fused` (the baseline): finet_large_se with fbn_groups=1 (plain BN), folded.
Folded FBN and folded BN are the same network (one conv with a bias per layer), so
fbn_fused / bn_fused should be about 1.0, and fbn_fused must beat fbn_unfused. Where
torchvision is importable, ShuffleNetV2 1.5x, MobileNetV2, MobileNetV3-Large and MnasNet 1.0
(weights=None, BN folded the same way) join the table; otherwise the output says why not.
Prints one JSON line.

    python benchmarks/fused_latency.py --iters 50 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import warnings

import torch

from lightnets.analysis.latency import compare_latency
from lightnets.deploy.folding import fuse
from lightnets.models.registry import create_model

TORCHVISION_MODELS = ("shufflenet_v2_x1_5", "mobilenet_v2", "mobilenet_v3_large", "mnasnet1_0")


def _train_statistics(model: torch.nn.Module, steps: int = 2) -> None:
    """A few train-mode forwards so the running statistics are not the initial 0 / 1."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(2, 3, 224, 224))
    model.eval()


def torchvision_models() -> tuple[dict[str, torch.nn.Module], str | None]:
    """Fused torchvision baselines, or ({}, why they were skipped)."""
    try:
        import torchvision  # noqa: F401  (lazy: optional, absent in the CPU-only env)
        from torchvision import models as tvm
    except Exception as err:  # ImportError, or a torchvision built for another torch
        return {}, f"torchvision is not importable ({type(err).__name__}: {str(err)[:120]})"
    out = {}
    for name in TORCHVISION_MODELS:
        model = getattr(tvm, name)(weights=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[f"tv_{name}_fused"] = fuse(model.eval())
    return out, None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=50, help="timed forwards per model")
    p.add_argument("--warmup", type=int, default=10, help="untimed forwards per model")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--groups", type=int, default=4, help="FBN groups of the FBN model")
    p.add_argument("--size", type=int, default=224, help="input height and width")
    args = p.parse_args()

    torch.manual_seed(0)
    fbn = create_model("finet_large_se", fbn_groups=args.groups)
    bn = create_model("finet_large_se", fbn_groups=1)
    _train_statistics(fbn)
    _train_statistics(bn)
    models = {"bn_fused": fuse(bn), "fbn_fused": fuse(fbn), "fbn_unfused": fbn.eval()}
    extra, skipped = torchvision_models()
    models.update(extra)

    size = (1, 3, args.size, args.size)
    rows = compare_latency(
        models,
        size,
        baseline="bn_fused",
        warmup=args.warmup,
        iters=args.iters,
        threads=args.threads,
    )
    by_name = {r["name"]: r for r in rows}
    median = {name: round(r["median_ms"], 3) for name, r in by_name.items()}
    result = {
        "benchmark": "fused_latency",
        "model": "finet_large_se",
        "fbn_groups": args.groups,
        "input_size": list(size),
        "threads": rows[0]["threads"],
        "iters": args.iters,
        "median_ms": median,
        "p90_ms": {name: round(r["p90_ms"], 3) for name, r in by_name.items()},
        "ratio_to_bn_fused": {name: round(r["ratio"], 3) for name, r in by_name.items()},
        "fbn_fused_over_bn_fused": round(median["fbn_fused"] / median["bn_fused"], 3),
        "fbn_fused_over_fbn_unfused": round(median["fbn_fused"] / median["fbn_unfused"], 3),
        "fbn_fused_faster_than_unfused": median["fbn_fused"] < median["fbn_unfused"],
        "torchvision": "skipped: " + skipped if skipped else "included",
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
