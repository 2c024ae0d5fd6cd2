"""The GPU lane in one command: the `cuda` tests and three benchmarks on CUDA, one JSON summary.

    make gpu-check                                    # this script, after `make install`
    .venv/bin/python benchmarks/gpu_check.py [--out gpu-check.json] [--budget 450]

Parts, in this order, each in its own process group with a time limit:
1. tests: ``pytest -m cuda tests/cuda`` with LIGHTNETS_TEST_DEVICE=cuda and a JUnit XML
   report, read back for the counts (passed / failed / skipped / xfailed) and the failing ids;
2. ``benchmarks/fbn_cost.py --device cuda``, 3. ``benchmarks/norm_cost.py --device cuda``,
4. ``benchmarks/bop_step.py --device cuda``: each must print its one JSON line, kept whole.

The total budget (default 450 s, for a ~8 minute slot on one H200; typically about half of it
is used) is shared out 40 / 25 / 25 / 10 %; time a part leaves unused goes to the parts after
it. A part over its limit is killed (with its children) and counts as failed. The time each
part took is printed and stored.

Writes ONE JSON file (``--out``, default gpu-check.json): ok, the machine (torch, CUDA, cuDNN,
GPU name and count, driver), the test counts with failing test ids and skip reasons, and each
benchmark's JSON line. Installs nothing and hides nothing: the exit status is 0 only when no
test failed or errored, at least one test ran, and every benchmark printed its line within its
limit; 1 otherwise; 2 when there is no CUDA device (one line on stderr, and the summary says
so). ``--device cpu`` is a dry run of this orchestration on the CPU (the tests with
LIGHTNETS_TEST_DEVICE=cpu, the benchmarks at toy sizes): it checks the script, not the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARES = {"tests": 0.40, "fbn_cost": 0.25, "norm_cost": 0.25, "bop_step": 0.10}
BENCHMARK_ARGS = {
    "cuda": {
        "fbn_cost": ["--steps", "20", "--warmup", "5", "--batch", "128"],
        "norm_cost": ["--steps", "20", "--warmup", "5", "--iters", "30"]
        + ["--latency-warmup", "10", "--batch", "128"],
        "bop_step": ["--iters", "50", "--warmup", "5"],
    },
    "cpu": {  # the dry run: toy sizes, only to exercise the orchestration
        "fbn_cost": ["--steps", "1", "--warmup", "0", "--batch", "4", "--models", "finet_large"],
        "norm_cost": ["--steps", "1", "--warmup", "0", "--iters", "1"]
        + ["--latency-warmup", "0", "--batch", "4"],
        "bop_step": ["--iters", "1", "--warmup", "0"],
    },
}
# benchmark JSON keys whose null means a measuring subprocess failed
_MEASURED = ("peak_MB", "memory_ratio")

_PROBE = r"""
import json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__,
        "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if info["cuda_available"]:
    props = torch.cuda.get_device_properties(0)
    info |= {"gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
             "capability": list(torch.cuda.get_device_capability(0)),
             "gpu_memory_GiB": round(props.total_memory / 2**30, 1),
             "cudnn": torch.backends.cudnn.version(),
             "tf32_conv_by_default": torch.backends.cudnn.allow_tf32,
             "nccl_available": torch.distributed.is_nccl_available()}
print(json.dumps(info))
"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def probe_machine() -> dict[str, Any]:
    """Versions and the GPU, asked in a separate process: this one never creates a CUDA
    context (a GPU in exclusive-process mode would then refuse the parts)."""
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"python_executable": sys.executable, "error": f"cannot import torch: {last}"}
    info = json.loads(lines[-1])
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if smi.returncode == 0 and smi.stdout.strip():
            info["driver"] = smi.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _pump(stream, sink: list[str], echo) -> None:
    for line in stream:
        sink.append(line)
        echo.write(line)
        echo.flush()


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_part(name: str, cmd: list[str], limit: float, env: dict[str, str]) -> dict[str, Any]:
    """Run `cmd` in its own process group, echoing its output; kill the group at `limit` s."""
    print(f"== {name}: {' '.join(cmd)}  (limit {limit:.0f} s)", flush=True)
    start = time.monotonic()
    out: list[str] = []
    err: list[str] = []
    timed_out = False
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
        start_new_session=True,
    )
    pumps = [
        threading.Thread(target=_pump, args=(proc.stdout, out, sys.stdout), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, err, sys.stderr), daemon=True),
    ]
    for t in pumps:
        t.start()
    try:
        proc.wait(timeout=max(limit, 1.0))
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
    except BaseException:  # Ctrl-C: leave nothing running behind
        _kill_group(proc)
        raise
    for t in pumps:
        t.join(timeout=10)
    seconds = time.monotonic() - start
    status = f"TIMED OUT at {limit:.0f} s (killed)" if timed_out else f"exit {proc.returncode}"
    print(f"== {name}: {status} after {seconds:.1f} s", flush=True)
    return {
        "command": cmd,
        "exit_code": proc.returncode,
        "timed_out": timed_out,
        "limit_s": round(limit, 1),
        "seconds": round(seconds, 1),
        "stdout": out,
        "stderr": err,
    }


def _tail(lines: list[str], n: int = 40) -> str:
    return "".join(lines[-n:])[-6000:]


def _test_id(classname: str, name: str) -> str:
    """pytest's node id from a JUnit (classname, name): tests.cuda.test_x -> tests/cuda/test_x.py"""
    parts = classname.split(".")
    for cut in range(len(parts), 0, -1):
        path = Path(*parts[:cut]).with_suffix(".py")
        if (REPO / path).is_file():
            return "::".join([path.as_posix(), *parts[cut:], name])
    return f"{classname}::{name}"


def read_junit(path: Path) -> dict[str, Any]:
    """Counts, failing ids (with the first line of their message) and skip reasons."""
    root = ET.parse(path).getroot()
    counts = Counter()
    failing: list[dict[str, str]] = []
    skip_reasons: Counter = Counter()
    xfailed: list[str] = []
    for case in root.iter("testcase"):
        test_id = _test_id(case.get("classname", ""), case.get("name", ""))
        bad = [c for c in case if c.tag in ("failure", "error")]
        skipped = [c for c in case if c.tag == "skipped"]
        if bad:
            kind = "failed" if any(c.tag == "failure" for c in bad) else "errors"
            counts[kind] += 1
            message = (bad[0].get("message") or bad[0].text or "").strip().splitlines()
            failing.append({"id": test_id, "kind": kind, "message": (message or [""])[0][:500]})
        elif skipped and skipped[0].get("type") == "pytest.xfail":
            counts["xfailed"] += 1
            xfailed.append(test_id)
        elif skipped:
            counts["skipped"] += 1
            skip_reasons[(skipped[0].get("message") or "").strip()[:300]] += 1
        else:
            counts["passed"] += 1
    total = sum(counts.values())
    return {
        "total": total,
        **{k: counts.get(k, 0) for k in ("passed", "failed", "errors", "skipped", "xfailed")},
        "failing": failing,
        "xfailed_ids": xfailed,
        "skip_reasons": dict(skip_reasons.most_common()),
    }


def run_tests(limit: float, lane: str, junit: Path) -> dict[str, Any]:
    env = dict(os.environ, LIGHTNETS_TEST_DEVICE=lane, PYTHONPATH=str(REPO))
    if junit.exists():
        junit.unlink()
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/cuda", "-q", "-rfEsxX"]
    cmd += ["-p", "no:cacheprovider", f"--junitxml={junit}", "-o", "junit_family=xunit2"]
    part = run_part("tests", cmd, limit, env)
    result: dict[str, Any] = {
        k: part[k] for k in ("command", "exit_code", "timed_out", "limit_s", "seconds")
    }
    result["junit"] = str(junit)
    problems = []
    if junit.is_file():
        try:
            result |= read_junit(junit)
        except ET.ParseError as err:
            problems.append(f"the JUnit report {junit} is unreadable: {err}")
    else:
        problems.append("pytest wrote no JUnit report (it crashed or was killed)")
    if part["timed_out"]:
        problems.append(f"killed at its limit of {limit:.0f} s (the counts are incomplete)")
    elif part["exit_code"] != 0:
        problems.append(f"pytest exited with {part['exit_code']}")
    if result.get("failed") or result.get("errors"):
        problems.append(f"{result.get('failed', 0)} failed, {result.get('errors', 0)} errors")
    if junit.is_file() and not result.get("passed"):
        problems.append("no test passed (all skipped?): the lane checked nothing")
    result["ok"] = not problems
    result["problems"] = problems
    if problems:
        result["output_tail"] = _tail(part["stdout"] + part["stderr"])
    return result


def _nulls(value: Any, path: str = "") -> list[str]:
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in _nulls(v, f"{path}.{k}" if path else k)]
    if value is None and any(key in path for key in _MEASURED):
        return [path]
    return []


def run_benchmark(name: str, limit: float, lane: str) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--device", lane]
    part = run_part(name, cmd + BENCHMARK_ARGS[lane][name], limit, env)
    result: dict[str, Any] = {
        k: part[k] for k in ("command", "exit_code", "timed_out", "limit_s", "seconds")
    }
    problems = []
    lines = [line for line in part["stdout"] if line.lstrip().startswith("{")]
    parsed = None
    if lines:
        try:
            parsed = json.loads(lines[-1])
        except json.JSONDecodeError as err:
            problems.append(f"its last JSON line does not parse: {err}")
    if part["timed_out"]:
        problems.append(f"killed at its limit of {limit:.0f} s")
    elif part["exit_code"] != 0:
        problems.append(f"exited with {part['exit_code']}")
    if parsed is None and not problems:
        problems.append("printed no JSON line")
    if parsed is not None:
        missing = _nulls(parsed)
        if missing:
            problems.append(f"measurements missing (a worker failed): {', '.join(missing)}")
    result["result"] = parsed
    result["ok"] = not problems
    result["problems"] = problems
    if problems:
        result["output_tail"] = _tail(part["stdout"] + part["stderr"])
    return result


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu-check.json", help="the JSON summary to write")
    p.add_argument("--budget", type=float, default=450.0, help="total seconds for all parts")
    p.add_argument("--junit", default=None, help="JUnit XML of the tests (default: next to --out)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help=argparse.SUPPRESS)
    p.add_argument(
        "--skip-benchmarks", action="store_true", help="run the tests only (the summary says so)"
    )
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error(f"--budget {args.budget}: expected a positive number of seconds")
    out = Path(args.out).resolve()  # the parts run in the repository root
    junit = Path(args.junit).resolve() if args.junit else out.with_name(f"{out.stem}-junit.xml")
    started, t0 = _now(), time.monotonic()
    summary: dict[str, Any] = {
        "ok": False,
        "lane": args.device if args.device == "cuda" else "cpu dry run (not a GPU check)",
        "started": started,
        "budget_s": args.budget,
    }
    machine = probe_machine()
    summary["machine"] = machine
    if args.device == "cuda" and not machine.get("cuda_available"):
        if "error" in machine:
            why = f"{machine['error']} (python: {sys.executable})"
        elif not machine.get("cuda_build"):
            why = f"torch {machine['torch']} is a CPU-only build"
        else:
            why = f"torch {machine['torch']} (CUDA {machine['cuda_build']}) sees no CUDA device"
        message = (
            f"gpu-check: no CUDA device: {why}; run it on a machine with an NVIDIA GPU and a CUDA "
            "build of torch in the venv (nothing was run)"
        )
        summary["error"] = message
        write_summary(out, summary)
        print(message, file=sys.stderr)
        return 2

    parts: dict[str, Any] = {}
    names = ["tests"] if args.skip_benchmarks else list(SHARES)
    for i, name in enumerate(names):
        left = args.budget - (time.monotonic() - t0)
        reserved = sum(SHARES[n] for n in names[i + 1 :]) * args.budget
        limit = max(left - reserved, min(30.0, left))
        if left <= 1:
            parts[name] = {"ok": False, "problems": ["not run: the budget was spent"]}
            continue
        if name == "tests":
            parts[name] = run_tests(limit, args.device, junit)
        else:
            parts[name] = run_benchmark(name, limit, args.device)
    summary["tests"] = parts["tests"]
    summary["benchmarks"] = {n: parts[n] for n in names if n != "tests"}
    if args.skip_benchmarks:
        summary["benchmarks_skipped"] = True
    summary["seconds"] = {n: parts[n].get("seconds") for n in names}
    summary["wall_s"] = round(time.monotonic() - t0, 1)
    failed = [n for n in names if not parts[n]["ok"]]
    summary["failed_parts"] = failed
    summary["ok"] = not failed
    write_summary(out, summary)

    print("\n== gpu-check summary", flush=True)
    for n in names:
        part = parts[n]
        status = "ok" if part["ok"] else "FAILED: " + "; ".join(part.get("problems", []))
        print(f"  {n:<10} {part.get('seconds', 0) or 0:7.1f} s  {status}")
    tests = parts["tests"]
    if "total" in tests:
        print(
            f"  tests: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} "
            f"errors, {tests['skipped']} skipped, {tests['xfailed']} xfailed"
        )
        for f in tests["failing"]:
            print(f"    {f['kind']}: {f['id']}: {f['message'][:200]}")
    print(f"  total {summary['wall_s']:.1f} s of {args.budget:.0f} s; summary: {out}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
