"""FBNConv2d on the device: every implementation against the naive form (the paper's Fig. 3a).

The reference is `impl="naive"` in float64 on the CPU, from the same state on the same inputs
(its own float64 rounding is ~1e-15 here). On the device every implementation, naive included,
takes two training steps and one eval step; what is compared: both outputs, the input gradients,
the weight / norm_weight / norm_bias gradients, the running statistics, num_batches_tracked and
the eval output. Errors are max |got - ref| relative to the reference's largest magnitude.

Tolerances, and why:
- float64: every impl within 1e-9; only rounding differs (measured on the CPU: 2e-15).
- float32, TF32 off (cuDNN's default TF32 keeps ~10 mantissa bits, far beyond any float32
  bound): naive within 1e-4, every impl within max(1e-4, 4 x naive's error). The impls sum in
  different orders, so they agree with naive to rounding, not bit for bit (CPU: <= 6e-7).
- torch.autocast bfloat16 / float16: naive within the floor, every impl within max(floor,
  3 x naive's error under the same autocast); floor 5e-2 for bfloat16 (~13 unit roundoffs of its
  8-bit significand), 1e-2 for float16 (~20 of its 11 bits). Autocast runs the convolutions on
  rounded inputs and the impls round at different places (cov takes its statistics from the
  float32 input, naive and recompute from the rounded conv output), so they cannot agree to
  float32 precision; a wrong formula is off by O(1). CPU: bfloat16 <= 8e-3, float16 <= 1e-3.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from lightnets.nn import FBNConv2d
from tests.cuda.support import ieee_float32, no_host_sync, rel_err

pytestmark = pytest.mark.cuda

CONVS = {
    "1x1": {"kernel_size": 1},
    "3x3s2": {"kernel_size": 3, "stride": 2, "padding": 1},
}
# (C_in, G): 30 channels in 4 groups are 8, 8, 7, 7 (Finet-small's 1x1 convs)
CHANNELS = [(16, 1), (16, 2), (16, 4), (30, 4)]
C_OUT, BATCH, SIZE = 12, 8, 12
# precision -> (parameter dtype, autocast dtype, floor, factor on naive's error)
PRECISIONS = {
    "float64": (torch.float64, None, 1e-9, 0.0),
    "float32": (torch.float32, None, 1e-4, 4.0),
    "bf16": (torch.float32, torch.bfloat16, 5e-2, 3.0),
    "fp16": (torch.float32, torch.float16, 1e-2, 3.0),
}


@pytest.fixture(autouse=True)
def _ieee_float32():
    with ieee_float32():
        yield


def _impls(kernel_size: int) -> list[str]:
    return (
        ["naive", "cov", "recompute", "auto"]
        if kernel_size == 1
        else ["naive", "recompute", "auto"]
    )


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _problem(c_in: int, groups: int, conv: dict, seed: int):
    """Initial state (randomized gamma / beta), three float32 inputs, two output weightings."""
    g = torch.Generator().manual_seed(seed)
    m = FBNConv2d(c_in, C_OUT, fbn_groups=groups, impl="naive", **conv)
    with torch.no_grad():
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 2 - 1)
        m.weight.mul_(1 / (c_in * conv["kernel_size"] ** 2) ** 0.5)
        m.norm_weight.copy_(torch.rand(m.norm_weight.shape, generator=g) + 0.5)
        m.norm_bias.copy_(torch.randn(m.norm_bias.shape, generator=g))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    xs = [torch.randn(BATCH, c_in, SIZE, SIZE, generator=g) * 2 + 0.5 for _ in range(3)]
    with torch.no_grad():
        out_shape = m(xs[0]).shape
    rs = [torch.randn(out_shape, generator=g) for _ in range(2)]
    return state, xs, rs


def _run(m, xs, rs, device, amp=None, memory_format=torch.contiguous_format):
    """Two training steps and one eval step; everything compared, on the CPU."""
    dtype = m.weight.dtype
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out = {}
    for i in range(2):
        # clone: on the CPU .to() may return the input itself, whose .grad would accumulate
        x = xs[i].to(device=device, dtype=dtype).clone(memory_format=memory_format)
        x.requires_grad_()
        with _autocast(device, amp):
            y = m(x)
        if amp is not None:
            assert y.dtype == amp, (y.dtype, amp)
        (y.to(loss_dtype) * rs[i].to(device=device, dtype=loss_dtype)).sum().backward()
        out[f"y{i}"], out[f"dx{i}"] = y.detach(), x.grad
        assert x.grad.dtype == dtype
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.dtype == dtype, name
        out[f"d{name}"] = p.grad
    assert m.running_mean.dtype == m.running_var.dtype == dtype
    out["running_mean"], out["running_var"] = m.running_mean.clone(), m.running_var.clone()
    out["num_batches_tracked"] = m.num_batches_tracked.clone()
    m.eval()
    with torch.no_grad(), _autocast(device, amp):
        x = xs[2].to(device=device, dtype=dtype).clone(memory_format=memory_format)
        out["eval"] = m(x)
    m.train()
    return {k: v.detach().cpu() for k, v in out.items()}


def _reference(state, xs, rs, c_in, groups, conv):
    m = FBNConv2d(c_in, C_OUT, fbn_groups=groups, impl="naive", **conv).double()
    m.load_state_dict(state)
    return _run(m, [x.double() for x in xs], [r.double() for r in rs], torch.device("cpu"))


def _check(results, ref, floor, factor, where):
    """Every impl within max(floor, factor x naive's error); naive within floor."""
    problems = []
    for impl, got in results.items():
        assert int(got["num_batches_tracked"]) == 2, impl
    naive = {
        k: rel_err(v, ref[k]) for k, v in results["naive"].items() if k != "num_batches_tracked"
    }
    for key, err in naive.items():
        if not err <= floor:
            problems.append(f"naive {key}: {err:.2e} > {floor:.0e}")
    for impl, got in results.items():
        if impl == "naive":
            continue
        for key, value in got.items():
            if key == "num_batches_tracked":
                continue
            err = rel_err(value, ref[key])
            bound = max(floor, factor * naive[key])
            if not err <= bound:
                problems.append(f"{impl} {key}: {err:.2e} > {bound:.2e} (naive {naive[key]:.2e})")
    assert not problems, f"{where}:\n" + "\n".join(problems)


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("c_in,groups", CHANNELS, ids=[f"C{c}-G{g}" for c, g in CHANNELS])
@pytest.mark.parametrize("conv_name", list(CONVS))
def test_every_impl_matches_naive(device, conv_name, c_in, groups, precision):
    dtype, amp, floor, factor = PRECISIONS[precision]
    conv = CONVS[conv_name]
    state, xs, rs = _problem(c_in, groups, conv, seed=c_in * 10 + groups)
    ref = _reference(state, xs, rs, c_in, groups, conv)
    results = {}
    for impl in _impls(conv["kernel_size"]):
        m = FBNConv2d(c_in, C_OUT, fbn_groups=groups, impl=impl, **conv)
        m.load_state_dict(state)
        m = m.to(device=device, dtype=dtype)
        results[impl] = _run(m, xs, rs, device, amp)
    _check(results, ref, floor, factor, f"{conv_name} C_in={c_in} G={groups} {precision}")


@pytest.mark.parametrize("conv_name", list(CONVS))
def test_channels_last_matches_naive(device, conv_name):
    """Module and inputs in channels-last memory format (what train.channels_last does),
    float32, against the same float64 reference and bounds."""
    conv = CONVS[conv_name]
    state, xs, rs = _problem(16, 4, conv, seed=7)
    ref = _reference(state, xs, rs, 16, 4, conv)
    results = {}
    for impl in _impls(conv["kernel_size"]):
        m = FBNConv2d(16, C_OUT, fbn_groups=4, impl=impl, **conv)
        m.load_state_dict(state)
        m = m.to(device).to(memory_format=torch.channels_last)
        results[impl] = _run(m, xs, rs, device, memory_format=torch.channels_last)
    _, _, floor, factor = PRECISIONS["float32"]
    _check(results, ref, floor, factor, f"{conv_name} channels_last")


def _train_and_eval(m: FBNConv2d, x: torch.Tensor, r: torch.Tensor) -> None:
    y = m(x)
    (y * r).sum().backward()
    m.eval()
    with torch.no_grad():
        m(x)
    m.train()


@pytest.mark.parametrize(
    "impl,kernel_size", [("naive", 1), ("cov", 1), ("auto", 1), ("naive", 3), ("recompute", 3)]
)
def test_training_step_does_not_sync(device, impl, kernel_size):
    """Forward, backward and an eval forward: no host-device synchronization (after one
    warm-up step, outside the guard, that creates cuDNN / cuBLAS handles)."""
    torch.manual_seed(0)
    m = FBNConv2d(16, C_OUT, kernel_size, padding=kernel_size // 2, fbn_groups=4, impl=impl)
    m = m.to(device)
    x = torch.randn(BATCH, 16, SIZE, SIZE, device=device, requires_grad=True)
    r = torch.randn(BATCH, C_OUT, SIZE, SIZE, device=device)
    _train_and_eval(m, x, r)
    with no_host_sync(device):
        _train_and_eval(m, x, r)


@pytest.mark.xfail(
    strict=True,
    raises=RuntimeError,
    reason="lightnets/nn/fbn.py (FBNConv2d._exponential_average_factor): with momentum=None "
    "the cumulative average reads num_batches_tracked, a device buffer, with float(): one "
    "device sync per training forward, as torch's own BatchNorm does with momentum=None",
)
def test_cumulative_average_syncs(device):
    torch.manual_seed(0)
    m = FBNConv2d(16, C_OUT, 1, fbn_groups=4, momentum=None).to(device)
    x = torch.randn(BATCH, 16, SIZE, SIZE, device=device, requires_grad=True)
    r = torch.randn(BATCH, C_OUT, SIZE, SIZE, device=device)
    _train_and_eval(m, x, r)
    with no_host_sync(device):
        _train_and_eval(m, x, r)
