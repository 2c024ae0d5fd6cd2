"""Bop bit for bit against larq's float32 arithmetic, the flip tests, and what Bop refuses.

larq 0.14's Bop (larq/optimizers.py, `_resource_apply_dense`) does, in the variable's dtype:

    m_t = m.assign_add(gamma * (grad - m))
    var_t = lq.math.sign(-tf.sign(var * m_t - threshold) * var)     # lq sign(0) = +1

The reference below is that, written in numpy float32 (each operation rounded to float32,
as TensorFlow's separate Sub / Mul / AssignAdd kernels do; no TensorFlow needed). The LCE lane
(tests/lce/test_lce_bop.py) runs larq itself against the same stream.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lightnets.errors import UserError
from lightnets.optim import Bop

# one tensor larger than Bop's 65,536-element chunks, so the chunked path is compared too
SHAPES = [(257, 256), (16, 8, 3, 3), (10,)]
STEPS = 2000


def larq_sign(x: np.ndarray) -> np.ndarray:
    """lq.math.sign: sign(sign(x) + 0.1), so sign(0) = +1."""
    return np.sign(np.sign(x) + np.float32(0.1)).astype(np.float32)


class LarqBop:
    """larq's Bop step in numpy float32 (see the module docstring)."""

    def __init__(self, weights: list[np.ndarray], gamma: float, threshold: float) -> None:
        self.w = [w.astype(np.float32).copy() for w in weights]
        self.m = [np.zeros_like(w) for w in self.w]
        self.gamma, self.tau = np.float32(gamma), np.float32(threshold)

    def step(self, grads: list[np.ndarray]) -> None:
        for i, g in enumerate(grads):
            self.m[i] = self.m[i] + self.gamma * (g - self.m[i])
            inner = np.sign(self.w[i] * self.m[i] - self.tau)  # tf.sign(0) = 0
            self.w[i] = larq_sign(-inner * self.w[i])


def gradient_stream(seed: int, scale: float, zero_first: int = 0):
    """Seeded float32 gradients with a slow drift per element (so averages build up and
    cross the threshold) plus noise; the first `zero_first` steps of tensor 2 are zero."""
    rng = np.random.default_rng(seed)
    drift = [rng.standard_normal(s).astype(np.float32) * np.float32(scale) for s in SHAPES]
    for t in range(STEPS):
        grads = []
        for i, s in enumerate(SHAPES):
            g = drift[i] + rng.standard_normal(s).astype(np.float32) * np.float32(2 * scale)
            if i == 2 and t < zero_first:
                g = np.zeros(s, np.float32)
            grads.append(g.astype(np.float32))
        yield grads


def initial_weights(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed + 100)
    return [np.where(rng.standard_normal(s) < 0, -1.0, 1.0).astype(np.float32) for s in SHAPES]


@pytest.mark.parametrize(
    "gamma, threshold, zero_first",
    [
        (1e-3, 1e-6, 0),  # many flips
        (1e-4, 1e-8, 0),  # the paper's defaults
        (1e-2, 0.0, 50),  # tau = 0 with zero gradients: larq's ties (Fig. 2 setting)
    ],
)
def test_bop_equals_larq_bit_for_bit_over_2000_steps(gamma, threshold, zero_first):
    start = initial_weights(0)
    ref = LarqBop(start, gamma, threshold)
    params = [nn.Parameter(torch.from_numpy(w.copy())) for w in start]
    opt = Bop(params, threshold=threshold, gamma=gamma, flip_test="larq")
    total = 0
    for t, grads in enumerate(gradient_stream(1, scale=gamma * 0.1 + 1e-4, zero_first=zero_first)):
        before = [w.copy() for w in ref.w]
        ref.step(grads)
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g)
        opt.step()
        changed = sum(int((a != b).sum()) for a, b in zip(before, ref.w))
        assert opt.last_flips == changed, t
        total += changed
        if t % 100 == 99 or t < 3 or t == STEPS - 1:
            for i, p in enumerate(params):
                m = opt.state[p]["m"].numpy()
                assert np.array_equal(m.view(np.int32), ref.m[i].view(np.int32)), (t, i)
                assert np.array_equal(p.detach().numpy(), ref.w[i]), (t, i)
    assert total > 100  # the stream makes Bop flip: the comparison is not vacuous


def test_the_old_arithmetic_drifts_from_larq():
    """(1 - gamma) m + gamma g is not larq's float32 number: the test above can tell."""
    gamma = np.float32(1e-3)
    m_larq = np.zeros(SHAPES[0], np.float32)
    m_old = np.zeros(SHAPES[0], np.float32)
    for grads in gradient_stream(1, scale=1e-4):
        g = grads[0]
        m_larq = m_larq + gamma * (g - m_larq)
        m_old = (np.float32(1) - gamma) * m_old + gamma * g
        if not np.array_equal(m_larq, m_old):
            break
    assert not np.array_equal(m_larq, m_old)


def test_strict_and_inclusive_on_larq_averages():
    """The other two flip tests on the same (larq) averages: > tau, and >= tau."""
    start = initial_weights(2)
    for test in ("strict", "inclusive"):
        params = [nn.Parameter(torch.from_numpy(w.copy())) for w in start]
        opt = Bop(params, threshold=1e-6, gamma=1e-3, flip_test=test)
        w = [x.copy() for x in start]
        m = [np.zeros_like(x) for x in start]
        for t, grads in enumerate(gradient_stream(3, scale=2e-4)):
            if t == 300:
                break
            for i, g in enumerate(grads):
                m[i] = m[i] + np.float32(1e-3) * (g - m[i])
                product = w[i] * m[i]
                tau = np.float32(1e-6)
                flip = product >= tau if test == "inclusive" else product > tau
                w[i] = np.where(flip, -w[i], w[i])
            for p, g in zip(params, grads):
                p.grad = torch.from_numpy(g)
            opt.step()
        for p, expected in zip(params, w):
            assert np.array_equal(p.detach().numpy(), expected)


def test_larq_ties_at_zero_threshold_make_every_weight_plus_one():
    """tau = 0 and zero gradients: w m = 0 = tau everywhere, so larq sets every weight +1."""
    w = nn.Parameter(torch.tensor([1.0, -1.0, -1.0, 1.0]))
    for test, expected, flips in (
        ("larq", [1.0, 1.0, 1.0, 1.0], 2),
        ("strict", [1.0, -1.0, -1.0, 1.0], 0),
        ("inclusive", [1.0, -1.0, -1.0, 1.0], 0),
    ):
        p = nn.Parameter(w.detach().clone())
        opt = Bop([p], threshold=0.0, gamma=0.5, flip_test=test)
        p.grad = torch.zeros(4)
        opt.step()
        assert p.tolist() == expected, test
        assert opt.last_flips == flips


# ----------------------------------------------------------------------------- no silent freezing


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_gradient_skips_that_tensor_and_warns_with_a_count(bad):
    a = nn.Parameter(torch.tensor([1.0, -1.0, 1.0]))
    b = nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = Bop([a, b], threshold=0.0, gamma=0.5)
    a.grad = torch.tensor([1.0, bad, -1.0])
    b.grad = torch.tensor([1.0, -1.0])
    opt.step()
    assert a.tolist() == [1.0, -1.0, 1.0]  # skipped: no flip, m untouched
    assert opt.state[a]["m"].tolist() == [0.0, 0.0, 0.0]
    assert b.tolist() == [-1.0, 1.0]  # the finite tensor stepped as usual
    assert opt.nonfinite_skips == 1
    with pytest.warns(RuntimeWarning, match=r"skipped 1 tensor update.*NaN or an infinity"):
        assert opt.last_flips == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: no second warning for the same skip
        assert opt.last_flips == 2
    a.grad = torch.tensor([1.0, 0.0, -1.0])  # finite again: steps normally
    opt.step()
    assert torch.isfinite(opt.state[a]["m"]).all()
    assert a.tolist() == [-1.0, -1.0, 1.0]  # w m = [0.5, 0, -0.5]: only the first flips


def test_skipped_tensor_resumes_from_its_unchanged_average():
    p = nn.Parameter(torch.tensor([1.0, -1.0]))
    q = nn.Parameter(torch.tensor([1.0, -1.0]))
    opt_p, opt_q = Bop([p], 1e-3, 0.25), Bop([q], 1e-3, 0.25)
    grads = [[0.001, 0.002], [float("nan"), 0.0], [0.003, -0.001]]
    for g in grads:
        p.grad = torch.tensor(g)
        opt_p.step()
    for g in (grads[0], grads[2]):  # the same without the bad step
        q.grad = torch.tensor(g)
        opt_q.step()
    assert torch.equal(opt_p.state[p]["m"], opt_q.state[q]["m"])
    assert torch.equal(p, q)


@pytest.mark.parametrize("key", ["weight_decay", "lr", "momentum", "inclusive"])
def test_unknown_param_group_keys_are_refused(key):
    with pytest.raises(UserError, match=rf"param group 0 has '{key}'.*gamma, threshold"):
        Bop([{"params": [nn.Parameter(torch.ones(2) * -1)], key: 0.1}])
    opt = Bop([nn.Parameter(torch.tensor([1.0, -1.0]))])
    with pytest.raises(UserError, match=rf"param group 1 has '{key}'"):
        opt.add_param_group({"params": [nn.Parameter(torch.tensor([-1.0, 1.0]))], key: 0.1})


def test_a_weight_changed_by_another_optimizer_is_an_error_at_the_next_step():
    w = nn.Parameter(torch.tensor([1.0, -1.0, 1.0]))
    bop = Bop([("layer.weight", w)])
    adam = torch.optim.Adam([w], lr=1e-3)  # the classic mistake: both optimizers get w
    w.grad = torch.tensor([0.1, 0.2, 0.3])
    bop.step()
    adam.step()  # w is now 1 - 1e-3 etc.
    with pytest.raises(UserError, match=r"'layer.weight'.*no longer \+1/-1.*second optimizer"):
        bop.step()


def test_load_state_dict_of_latent_weights_is_caught_and_data_writes_by_a_full_check():
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.0, 1.0], [-1.0, -1.0, 1.0]]))
    opt = Bop([("weight", layer.weight)])
    layer.weight.grad = torch.zeros(2, 3)
    opt.step()
    layer.load_state_dict({"weight": torch.full((2, 3), 0.3)})
    with pytest.raises(UserError, match="'weight'.*no longer"):
        opt.step()
    with torch.no_grad():
        layer.weight.copy_(torch.ones(2, 3))
    opt.step()  # +1/-1 again: fine
    layer.weight.data[0, 0] = 0.5  # .data: torch does not count this write
    opt.step()
    with pytest.raises(UserError, match="'weight'.*no longer"):
        opt.check_binary(full=True)


def test_unchanged_weights_are_not_rechecked_each_step():
    """The value check runs only for tensors written by something else (version counter)."""
    w = nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = Bop([w])
    calls = []
    import lightnets.optim.bop as bop_module

    original = bop_module._not_binary
    try:
        bop_module._not_binary = lambda p: calls.append(1) or original(p)
        for _ in range(5):
            w.grad = torch.tensor([0.5, 0.5])
            opt.step()
    finally:
        bop_module._not_binary = original
    assert calls == []
