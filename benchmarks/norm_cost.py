"""Cost of each normalization kind on ResNet-18: train step, peak memory, fused eval latency.

Model: ``resnet18`` with the CIFAR stem, 10 classes, 32x32 inputs, ``norm`` = each of bn, gn
(G=32), ln, in, brn, frozen_bn, none, and sync_bn (`lightnets.nn.make_norm`). This is one
process: torch's SyncBatchNorm then computes what BN does, without its all-reduce, so its row
shows only the wrapper's overhead; the all-reduce, its real cost, needs a process group (and
CUDA, for torch's kernel). A train step is forward +
cross-entropy + backward + SGD (momentum 0.9) step, gradients set to None after it.

- Train-step time: all kinds live in one process and are stepped round-robin (one step each, in
  turn) so load from other processes hits them alike; after ``--warmup`` steps each, the median
  of ``--steps`` steps, and its ratio to BN's.
- Peak memory: each kind in a fresh subprocess, one warm-up step then one measured step, with
  the method of benchmarks/_measure.py (CPU: torch.profiler allocation events; CUDA:
  max_memory_allocated); ratio to BN's.
- Eval after `lightnets.fuse`: the trained models get random (seeded) statistics and affine
  parameters, so folding is not trivially exact; then `fuse` (BN, frozen BN and BRN, which in
  eval is BN on running statistics, fold into the conv; GN/LN/IN cannot and stay). Reported per
  kind: the norm layers left after fusing, max |fused - unfused| on a batch of 64 (float32),
  and the median latency at batch 1 and batch 64 (lightnets.analysis.latency, models
  interleaved) with ratios to fused BN.

Prints ONE JSON line; never asserts, exits 0.

    python benchmarks/norm_cost.py [--steps 3] [--warmup 1] [--iters 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _measure, when run as a script

KINDS = ("bn", "sync_bn", "gn", "ln", "in", "brn", "frozen_bn", "none")


def build(kind: str, device: str):
    """resnet18 (CIFAR stem) with `kind` norms and its SGD optimizer, seeded."""
    import torch

    import lightnets

    torch.manual_seed(0)
    model = lightnets.create_model("resnet18", num_classes=10, cifar_stem=True, norm=kind)
    model = model.to(device).train()
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def make_step(model, opt, batch: int, device: str):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    target = torch.randint(0, 10, (batch,), generator=g).to(device)

    def step() -> None:
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, (x, target)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_steps(args) -> tuple[dict[str, float], dict]:
    """Median train-step ms per kind (round-robin), and the trained models."""
    runs, models = {}, {}
    for kind in KINDS:
        model, opt = build(kind, args.device)
        runs[kind] = make_step(model, opt, args.batch, args.device)[0]
        models[kind] = model
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    for i in range(args.warmup + args.steps):
        for kind, step in runs.items():
            _sync(args.device)
            t = time.perf_counter()
            step()
            _sync(args.device)
            if i >= args.warmup:
                times[kind].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}, models


def peak_worker(kind: str, args) -> int:
    from _measure import alive_tensors, peak_step_bytes

    model, opt = build(kind, args.device)
    step, batch = make_step(model, opt, args.batch, args.device)
    step()  # creates the optimizer state
    return peak_step_bytes(step, alive_tensors(model, opt, batch), args.device)


def peak_memory(kind: str, args) -> int | None:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        kind,
        "--batch",
        str(args.batch),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
    ]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(proc.stderr[-2000:], file=sys.stderr)
        return None
    return int(json.loads(lines[-1])["peak_bytes"])


def _randomize_norms(model) -> None:
    """Seeded random statistics and affine for every norm layer (frozen BN buffers included)."""
    import torch

    from lightnets.optim import is_norm_layer

    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if not is_norm_layer(m):
                continue
            for name, low, high in (("running_var", 0.5, 2.0), ("weight", 0.5, 1.5)):
                t = getattr(m, name, None)
                if t is not None:
                    t.copy_(torch.rand(t.shape, generator=g) * (high - low) + low)
            for name in ("running_mean", "bias"):
                t = getattr(m, name, None)
                if t is not None:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.2)


def fused_eval(models: dict, args) -> dict:
    import torch

    import lightnets
    from lightnets.analysis.latency import compare_latency
    from lightnets.optim import is_norm_layer

    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(3)).to(args.device)
    fused, rows = {}, {}
    for kind, model in models.items():
        _randomize_norms(model)
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused[kind] = lightnets.fuse(model)
        with torch.no_grad():
            diff = (fused[kind](x) - model(x)).abs().max().item()
        left = sum(is_norm_layer(m) for m in fused[kind].modules())
        rows[kind] = {"norm_layers_left": left, "max_abs_diff": diff}
    for batch in (1, args.batch):
        table = compare_latency(
            fused,
            (batch, 3, 32, 32),
            baseline="bn",
            warmup=args.latency_warmup,
            iters=args.iters if batch > 1 else args.iters * 10,
            device=args.device,
        )
        for row in table:
            rows[row["name"]][f"b{batch}_ms"] = round(row["median_ms"], 3)
            rows[row["name"]][f"b{batch}_ratio"] = round(row["ratio"], 3)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="timed train steps per kind")
    p.add_argument("--warmup", type=int, default=1, help="untimed train steps per kind first")
    p.add_argument("--iters", type=int, default=5, help="timed eval forwards per kind at batch 64")
    p.add_argument("--latency-warmup", type=int, default=1, dest="latency_warmup")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (0: torch's)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps({"peak_bytes": peak_worker(args.worker, args)}))
        return

    ms, models = time_steps(args)
    peaks = {k: peak_memory(k, args) for k in KINDS}
    evals = fused_eval(models, args)
    result: dict = {
        "benchmark": "norm_cost",
        "model": "resnet18_cifar_stem",
        "device": args.device,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "torch": torch.__version__,
    }
    for kind in KINDS:
        row = {
            "step_ms": round(ms[kind], 1),
            "time_ratio": round(ms[kind] / ms["bn"], 3),
            "peak_MB": None if peaks[kind] is None else round(peaks[kind] / 2**20, 1),
            "memory_ratio": (
                round(peaks[kind] / peaks["bn"], 3) if peaks[kind] and peaks["bn"] else None
            ),
        }
        row["fused"] = evals[kind]
        result[kind] = row
    print(json.dumps(result))


if __name__ == "__main__":
    main()
