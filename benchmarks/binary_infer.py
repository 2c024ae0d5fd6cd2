"""Batch-1 CPU inference of binarynet_cifar: packed (1-bit weights) vs float, and file sizes.

Models, all at 1x3x32x32, timed interleaved in one process (lightnets.analysis.latency):
- `float` (the baseline): binarynet_cifar (mode "bop", the paper's text) in eval mode as
  trained: float32 +1/-1 weights, BatchNorm after every layer;
- `packed`: lightnets.pack_binary(model): weights stored as bits, BatchNorm folded into a
  per-channel scale and shift, the unpacked weights cached (the default);
- `packed_uncached`: the same with cache_weights=False: the bits are unpacked on every call
  (what a memory-bound deployment would do);
- `packed_bn_kept`: pack_binary(model, fold_bn=False) (bit-identical to `float`).
The packed layers run torch's float conv / matmul on the unpacked weights (no bit-serial
kernel), so `packed` should cost about what `float` costs minus the BatchNorms.

Files: the float32 state_dict (torch.save(model.state_dict())) against the packed file
(lightnets.save_packed), in a temporary directory; the ratio is float / packed. Prints one
JSON line.

    OMP_NUM_THREADS=1 python benchmarks/binary_infer.py --iters 50 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import torch

from lightnets.analysis.latency import compare_latency
from lightnets.deploy.pack import pack_binary, packed_weight_count, save_packed
from lightnets.models.registry import create_model


def _train_statistics(model: torch.nn.Module, steps: int = 2) -> None:
    """A few train-mode forwards so the running statistics are not the initial 0 / 1."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(8, 3, 32, 32))
    model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=50, help="timed forwards per model")
    p.add_argument("--warmup", type=int, default=5, help="untimed forwards per model")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--original", action="store_true", help="binarynet_cifar original=True")
    args = p.parse_args()

    torch.manual_seed(0)
    model = create_model("binarynet_cifar", mode="bop", original=args.original)
    _train_statistics(model)
    packed = pack_binary(model)
    models = {
        "float": model,
        "packed": packed,
        "packed_uncached": pack_binary(model, cache_weights=False),
        "packed_bn_kept": pack_binary(model, fold_bn=False),
    }
    size = (1, 3, 32, 32)
    rows = compare_latency(
        models, size, baseline="float", warmup=args.warmup, iters=args.iters, threads=args.threads
    )
    by_name = {r["name"]: r for r in rows}

    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        same_bn_kept = torch.equal(models["packed_bn_kept"](x), ref)
        max_diff = float((packed(x) - ref).abs().max())
        same_argmax = torch.equal(packed(x).argmax(1), ref.argmax(1))

    with tempfile.TemporaryDirectory() as tmp:
        float_path, packed_path = Path(tmp) / "float32.pt", Path(tmp) / "packed.pt"
        torch.save(model.state_dict(), float_path)
        save_packed(packed, packed_path)
        float_bytes, packed_bytes = float_path.stat().st_size, packed_path.stat().st_size

    n_binary = packed_weight_count(packed)
    result = {
        "benchmark": "binary_infer",
        "model": "binarynet_cifar",
        "original": args.original,
        "binary_weights": n_binary,
        "input_size": list(size),
        "threads": rows[0]["threads"],
        "iters": args.iters,
        "median_ms": {n: round(r["median_ms"], 3) for n, r in by_name.items()},
        "p90_ms": {n: round(r["p90_ms"], 3) for n, r in by_name.items()},
        "ratio_to_float": {n: round(r["ratio"], 3) for n, r in by_name.items()},
        "packed_over_float": round(by_name["packed"]["ratio"], 3),
        "float32_checkpoint_bytes": float_bytes,
        "packed_file_bytes": packed_bytes,
        "file_ratio_float_over_packed": round(float_bytes / packed_bytes, 2),
        "packed_file_le_1_20th": packed_bytes * 20 <= float_bytes,
        "bn_kept_bit_identical": same_bn_kept,
        "folded_max_abs_diff": max_diff,
        "folded_same_argmax": same_argmax,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
