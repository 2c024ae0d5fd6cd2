"""Cost of one FBNConv2d training step as a ratio to Conv2d + BatchNorm2d of the same shape.

For each impl (naive, cov for 1x1 / recompute for kxk): forward + backward time, bytes autograd
keeps for backward (distinct storages), and on CUDA the peak memory, each divided by the same
quantity for Conv2d(bias=False) + BatchNorm2d measured in this process. Prints one JSON line.

    python benchmarks/fbn_layer.py --channels 128 --groups 4 --size 16 --batch 64 --kernel 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from lightnets.nn import FBNConv2d


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


def step_time(module: nn.Module, x: torch.Tensor, repeats: int) -> float:
    def step():
        module(x).square().mean().backward()

    for _ in range(2):
        step()
    if x.is_cuda:
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        if x.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def peak_memory(module: nn.Module, x: torch.Tensor) -> int | None:
    if not x.is_cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    module(x).square().mean().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--kernel", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    c, k = args.channels, args.kernel
    kw = {"padding": k // 2, "device": args.device, "dtype": dtype}
    x = torch.randn(args.batch, c, args.size, args.size, device=args.device, dtype=dtype)
    x.requires_grad_()
    baseline = nn.Sequential(
        nn.Conv2d(c, c, k, bias=False, **kw),
        nn.BatchNorm2d(c, device=args.device, dtype=dtype),
    )
    impls = ["naive", "cov" if k == 1 else "recompute"]
    modules = {i: FBNConv2d(c, c, k, fbn_groups=args.groups, impl=i, **kw) for i in impls}

    base = {
        "time_s": step_time(baseline, x, args.repeats),
        "saved_bytes": saved_bytes(baseline, x),
        "peak_bytes": peak_memory(baseline, x),
    }
    result = {
        "benchmark": "fbn_layer",
        **{key: value for key, value in vars(args).items() if key != "repeats"},
        "conv_bn": base,
    }
    for impl, module in modules.items():
        row = {
            "time_s": step_time(module, x, args.repeats),
            "saved_bytes": saved_bytes(module, x),
            "peak_bytes": peak_memory(module, x),
        }
        for key in ("time_s", "saved_bytes", "peak_bytes"):
            if row[key] is not None and base[key]:
                row[key.split("_")[0] + "_ratio"] = round(row[key] / base[key], 3)
        result[impl] = row
    print(json.dumps(result))


if __name__ == "__main__":
    main()
