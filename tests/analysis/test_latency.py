"""measure_latency / compare_latency: shape of the result, flags restored (no timing asserts)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightnets.analysis.latency import compare_latency, measure_latency, summarize_times
from lightnets.errors import UserError

KEYS = {"median_ms", "mean_ms", "p90_ms", "min_ms", "max_ms"}


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())


def test_measure_latency_positive_and_restores_state():
    model = _tiny().train()
    threads = torch.get_num_threads()
    out = measure_latency(model, (1, 3, 8, 8), warmup=1, iters=3, threads=1)
    assert KEYS <= set(out)
    assert all(out[k] > 0 for k in KEYS)
    assert out["min_ms"] <= out["median_ms"] <= out["max_ms"]
    assert out["iters"] == 3 and out["threads"] == 1 and out["input_size"] == [1, 3, 8, 8]
    assert model.training and all(m.training for m in model.modules())
    assert torch.get_num_threads() == threads
    assert int(model[1].num_batches_tracked) == 0  # ran in eval mode: statistics untouched


def test_measure_latency_int_size():
    out = measure_latency(_tiny(), 8, warmup=0, iters=2)
    assert out["input_size"] == [1, 3, 8, 8] and out["median_ms"] > 0


def test_compare_latency_rows_and_ratios():
    models = {"a": _tiny(), "b": nn.Sequential(_tiny(), nn.ReLU())}
    rows = compare_latency(models, (1, 3, 8, 8), baseline="b", warmup=1, iters=4)
    assert [r["name"] for r in rows] == ["a", "b"]
    assert rows[1]["ratio"] == 1.0
    assert rows[0]["ratio"] == pytest.approx(rows[0]["median_ms"] / rows[1]["median_ms"])
    assert all(r["median_ms"] > 0 and r["iters"] == 4 for r in rows)


def test_compare_latency_errors():
    with pytest.raises(UserError, match="baseline 'c'"):
        compare_latency({"a": _tiny()}, (1, 3, 8, 8), baseline="c", iters=1)
    with pytest.raises(UserError, match="iters=0"):
        measure_latency(_tiny(), (1, 3, 8, 8), iters=0)
    with pytest.raises(UserError, match="input_size"):
        measure_latency(_tiny(), (1, 3, 0, 8), iters=1)
    with pytest.raises(UserError, match="at least one model"):
        compare_latency({}, (1, 3, 8, 8))


def test_summarize_times():
    s = summarize_times([float(i) for i in range(1, 11)])
    assert s["median_ms"] == 5.5 and s["mean_ms"] == 5.5 and s["p90_ms"] == 9.0
    assert s["min_ms"] == 1.0 and s["max_ms"] == 10.0
