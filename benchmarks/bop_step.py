"""Bop's optimizer step on binarynet_cifar's binary weights, as a ratio to Adam's on the same.

The tensors: the 14.0M +1/-1 weights of `binarynet_cifar(mode="bop")` (9 binary layers), each
with a fixed random gradient. Three optimizers step over copies of them, interleaved round by
round in one process (the order rotates every round, so drift in machine load hits all
alike):
- `adam` (the baseline): torch.optim.Adam with torch's defaults (lr 1e-3, its default
  implementation for the device: a for-loop on CPU tensors, foreach on CUDA);
- `adam_foreach`: the same with foreach=True (torch's multi-tensor kernels);
- `bop`: lightnets.optim.Bop (gamma 1e-4, threshold 1e-8; the moving average, the flip test
  and the flip count).
Goal: bop / adam <= 1.0. Also reported: the bytes of optimizer state each keeps (Bop: one
average per weight; Adam: two moments, plus a step counter per tensor). Prints one JSON line.

    OMP_NUM_THREADS=1 python benchmarks/bop_step.py --iters 20 --threads 1
    python benchmarks/bop_step.py --device cuda --iters 50 --warmup 5

On CUDA every timed step is bracketed by torch.cuda.synchronize(), so the time is the step's
kernels, not only their launch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from lightnets.models.registry import create_model
from lightnets.optim import Bop, binary_parameters


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in the optimizer's state (each storage once)."""
    seen: dict[int, int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                s = value.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=20, help="timed steps per optimizer")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per optimizer")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    torch.manual_seed(0)
    model = create_model("binarynet_cifar", mode="bop")
    weights = [w.detach().to(device) for w in binary_parameters(model)]
    gen = torch.Generator().manual_seed(1)
    grads = [(1e-3 * torch.randn(w.shape, generator=gen)).to(device) for w in weights]
    del model

    def params() -> list[torch.nn.Parameter]:
        out = []
        for w, g in zip(weights, grads):
            q = torch.nn.Parameter(w.clone())
            q.grad = g.clone()
            out.append(q)
        return out

    optimizers = {
        "adam": torch.optim.Adam(params()),
        "adam_foreach": torch.optim.Adam(params(), foreach=True),
        "bop": Bop(params(), threshold=1e-8, gamma=1e-4),
    }
    names = list(optimizers)
    for _ in range(args.warmup):
        for opt in optimizers.values():
            opt.step()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(args.iters):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            sync()
            start = time.perf_counter()
            optimizers[name].step()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    flips = optimizers["bop"].last_flips

    median = {n: statistics.median(t) for n, t in times.items()}
    state = {n: state_bytes(o) for n, o in optimizers.items()}
    n_weights = sum(w.numel() for w in weights)
    result = {
        "benchmark": "bop_step",
        "model": "binarynet_cifar",
        "binary_weights": n_weights,
        "tensors": len(weights),
        "threads": torch.get_num_threads(),
        "iters": args.iters,
        "median_ms": {n: round(v, 3) for n, v in median.items()},
        "min_ms": {n: round(min(t), 3) for n, t in times.items()},
        "ratio_to_adam": {n: round(v / median["adam"], 3) for n, v in median.items()},
        "bop_over_adam": round(median["bop"] / median["adam"], 3),
        "bop_over_adam_foreach": round(median["bop"] / median["adam_foreach"], 3),
        "goal_bop_over_adam_le_1": median["bop"] <= median["adam"],
        "state_bytes": state,
        "state_bytes_per_weight": {n: round(b / n_weights, 3) for n, b in state.items()},
        "bop_state_over_adam_state": round(state["bop"] / state["adam"], 3),
        "bop_last_flips": flips,
        "torch": torch.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "cpu": platform.processor() or platform.machine(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
