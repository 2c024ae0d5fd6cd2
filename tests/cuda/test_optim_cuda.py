"""Bop and the composite optimizer (Bop + a real-valued optimizer) on the device.

- The same steps on the device and on the CPU, from identical state, give the same flips, the
  same +1/-1 weights and the same moving averages, and both equal an independent float64
  reference of eq. 5-6 (paper 004) written here from the definition (|m| against tau, signs),
  not from Bop's `w * m` test. With dyadic gradients, gamma and tau (few significant bits)
  every value is exact in float32, so all three agree bit for bit, fused multiply-adds or not;
  with the recipes' gamma / tau, weights whose |m| lies within 1e-5 (relative) of tau may round
  either way and are counted, then aligned.
- Tensors over 65,536 elements take Bop's chunked path (flat chunks in cache-sized windows);
  a non-contiguous one takes the whole-tensor path.
- No host-device synchronization inside `step()`: on CUDA under
  ``torch.cuda.set_sync_debug_mode("error")``; on the CPU under a stand-in that catches reads
  of tensor values into Python (tests/cuda/support.py).
"""

from __future__ import annotations

import copy

import pytest
import torch

from lightnets.models.registry import create_model
from lightnets.optim import Bop, binary_parameters, build_binary_optimizer, real_parameters
from lightnets.optim.bop import _CHUNK
from tests.cuda.support import SyncError, host_resident_state, no_host_sync, require_cuda

pytestmark = pytest.mark.cuda

# Two param groups; "T" marks a transposed (non-contiguous) tensor. 300,000 elements are five
# chunks (two windows), 70,000 two chunks; the transposed 400 x 500 is over a chunk but takes
# the whole-tensor path.
EXACT_GROUPS = [
    {
        "gamma": 0.25,
        "threshold": 2.0**-7,
        "flip_test": "strict",
        "shapes": [(300_000,), (70_000,), (33, 17)],
    },
    {
        "gamma": 0.5,
        "threshold": 2.0**-5,
        "flip_test": "inclusive",
        "shapes": [("T", 400, 500), (9,)],
    },
]
STEPS = 6


def _weights(shapes, gen: torch.Generator) -> list[torch.Tensor]:
    out = []
    for shape in shapes:
        if shape[0] == "T":
            w = torch.randint(0, 2, shape[:0:-1], generator=gen).float().mul_(2).sub_(1).t()
        else:
            w = torch.randint(0, 2, shape, generator=gen).float().mul_(2).sub_(1)
        out.append(w)
    return out


def _dyadic_grads(weights, steps: int, gen: torch.Generator) -> list[list[torch.Tensor | None]]:
    """k / 128 with |k| <= 96: a fixed drift (so that averages grow consistent) plus noise."""
    drifts = [torch.randint(-32, 33, w.shape, generator=gen) for w in weights]
    grads = []
    for t in range(steps):
        step = []
        for i, (w, d) in enumerate(zip(weights, drifts)):
            if i == len(weights) - 1 and t % 3 == 2:
                step.append(None)  # no gradient on some steps: skipped, its m untouched
                continue
            noise = torch.randint(-64, 65, w.shape, generator=gen)
            step.append((d + noise).float() / 128)
        grads.append(step)
    return grads


class ReferenceBop:
    """Eq. 5-6 in float64, from the definition: m <- m + gamma (g - m) (m from 0, never
    reset); flip w where |m| > tau (>= when inclusive) and sign(m) = sign(w) != 0."""

    def __init__(self, weights, gamma: float, tau: float, flip_test: str) -> None:
        self.w = [w.double().clone() for w in weights]
        self.m = [torch.zeros_like(w) for w in self.w]
        self.gamma, self.tau, self.inclusive = gamma, tau, flip_test == "inclusive"

    def step(self, grads) -> int:
        flips = 0
        for i, g in enumerate(grads):
            if g is None:
                continue
            m = self.m[i] + self.gamma * (g.double() - self.m[i])
            strong = m.abs() >= self.tau if self.inclusive else m.abs() > self.tau
            flip = strong & (torch.sign(m) == torch.sign(self.w[i])) & (m != 0)
            self.w[i] = torch.where(flip, -self.w[i], self.w[i])
            self.m[i] = m
            flips += int(flip.sum())
        return flips


def _bop(groups, weights, device) -> tuple[list[list[torch.nn.Parameter]], Bop]:
    # clone: on the CPU .to() returns the tensor itself, which Bop would flip in place
    params = [[torch.nn.Parameter(w.to(device).clone()) for w in ws] for ws in weights]
    hyper = [{k: g[k] for k in ("gamma", "threshold", "flip_test")} for g in groups]
    return params, Bop([{"params": ps, **h} for ps, h in zip(params, hyper)])


def _set_grads(params, grads, device) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.to(device).clone()


def test_bop_exact_steps_equal_cpu_and_reference(device):
    gen = torch.Generator().manual_seed(0)
    weights = [_weights(g["shapes"], gen) for g in EXACT_GROUPS]
    grads = [_dyadic_grads(ws, STEPS, gen) for ws in weights]
    flat = [w for ws in weights for w in ws]
    assert any(w.numel() > _CHUNK and w.is_contiguous() for w in flat)  # the chunked path
    assert any(w.numel() > _CHUNK and not w.is_contiguous() for w in flat)  # whole tensor
    refs = [
        ReferenceBop(ws, g["gamma"], g["threshold"], g["flip_test"])
        for ws, g in zip(weights, EXACT_GROUPS)
    ]
    on_device, opt = _bop(EXACT_GROUPS, weights, device)
    on_cpu, opt_cpu = _bop(EXACT_GROUPS, weights, torch.device("cpu"))
    assert not on_device[1][0].is_contiguous()
    total_flips = 0
    for t in range(STEPS):
        for gi in range(len(EXACT_GROUPS)):
            _set_grads(on_device[gi], grads[gi][t], device)
            _set_grads(on_cpu[gi], grads[gi][t], torch.device("cpu"))
        opt.step()
        opt_cpu.step()
        expected = [ref.step(grads[gi][t]) for gi, ref in enumerate(refs)]
        assert opt.last_flips_per_group == opt_cpu.last_flips_per_group == expected, t
        flips = opt.last_flips_tensor
        assert flips.device.type == device.type and int(flips) == sum(expected)
        total_flips += sum(expected)
        for gi, ref in enumerate(refs):
            for i, (p, q) in enumerate(zip(on_device[gi], on_cpu[gi])):
                where = f"step {t} group {gi} tensor {i}"
                assert p.device.type == device.type
                assert torch.equal(p.detach().cpu(), q.detach()), where
                assert torch.equal(p.detach().cpu().double(), ref.w[i]), where
                if "m" in opt.state[p]:
                    m = opt.state[p]["m"]
                    assert m.dtype == torch.float32 and m.shape == p.shape
                    assert torch.equal(m.cpu(), opt_cpu.state[q]["m"]), where
                    assert torch.equal(m.cpu().double(), ref.m[i]), where
    assert total_flips > 1000  # the test saw flips, in both groups
    assert all(int(ref.w[0].ne(w).sum()) > 0 for ref, w in zip(refs, [ws[0] for ws in weights]))


@pytest.mark.parametrize("gamma,tau", [(1e-4, 1e-8), (1e-3, 1e-6)])
def test_bop_recipe_hyperparameters_match_reference(device, gamma, tau):
    """Bop's defaults and the bnn_mnist_bop recipe's values, float32 gradients of realistic
    size (1e-3): device == CPU == float64 reference except where |m| is within 1e-5 of tau."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(200_000,), (64, 32, 3, 3)]
    weights = _weights(shapes, gen)
    groups = [{"gamma": gamma, "threshold": tau, "flip_test": "strict", "shapes": shapes}]
    drifts = [torch.randn(w.shape, generator=gen) * 1e-3 for w in weights]
    ref = ReferenceBop(weights, gamma, tau, False)
    on_device, opt = _bop(groups, [weights], device)
    on_cpu, opt_cpu = _bop(groups, [weights], torch.device("cpu"))
    ambiguous_total, n = 0, sum(w.numel() for w in weights)
    for t in range(STEPS):
        grads = [d + torch.randn(d.shape, generator=gen) * 1e-3 for d in drifts]
        _set_grads(on_device[0], grads, device)
        _set_grads(on_cpu[0], grads, torch.device("cpu"))
        opt.step()
        opt_cpu.step()
        ref.step(grads)
        for i, (p, q) in enumerate(zip(on_device[0], on_cpu[0])):
            m_ref = ref.m[i]
            m = opt.state[p]["m"].cpu()
            scale = float(m_ref.abs().max())  # float32 rounding near zero is relative to it
            torch.testing.assert_close(m.double(), m_ref, rtol=1e-5, atol=1e-5 * scale)
            torch.testing.assert_close(m, opt_cpu.state[q]["m"], rtol=1e-6, atol=1e-6 * scale)
            ambiguous = (m_ref.abs() - tau).abs() <= 1e-5 * m_ref.abs()
            ambiguous_total += int(ambiguous.sum())
            w = p.detach().cpu()
            clear = ~ambiguous
            assert torch.equal(w[clear], q.detach()[clear]), f"step {t} tensor {i}"
            assert torch.equal(w[clear].double(), ref.w[i][clear]), f"step {t} tensor {i}"
            with torch.no_grad():  # ties: all three continue from the device's choice
                q[ambiguous] = w[ambiguous]
                ref.w[i][ambiguous] = w[ambiguous].double()
    assert ambiguous_total <= 1e-4 * n * STEPS, ambiguous_total


def test_sync_guard_catches_a_host_read(device):
    """The guard the sync tests rely on raises on a plain .item()-style read (on CUDA:
    torch's sync debug mode really is on inside it, and off after)."""
    x = torch.ones(3, device=device)
    with pytest.raises(RuntimeError, match="synchroniz"):
        with no_host_sync(device):
            float(x.sum())
    if device.type == "cuda":
        assert torch.cuda.get_sync_debug_mode() == 0
    assert float(x.sum()) == 3.0


def test_bop_step_does_not_sync(device):
    """The first step (which creates the averages) and later ones, chunked and whole-tensor
    paths, a tensor without a gradient, and a param group none of whose tensors has one."""
    gen = torch.Generator().manual_seed(2)
    groups = [
        *EXACT_GROUPS,
        {"gamma": 0.1, "threshold": 0.0, "flip_test": "inclusive", "shapes": [(5,)]},
    ]
    weights = [_weights(g["shapes"], gen) for g in groups]
    grads = [_dyadic_grads(ws, 3, gen) for ws in weights[:2]]
    params, opt = _bop(groups, weights, device)
    for t in range(3):
        for gi in range(2):
            _set_grads(params[gi], grads[gi][t], device)
        with no_host_sync(device):
            opt.step()
    assert opt.last_flips_per_group[2] == 0 and sum(opt.last_flips_per_group) > 0


def test_last_flips_tensor_does_not_sync(device):
    """What the trainer reads after every step (the docstring promises no device sync)."""
    gen = torch.Generator().manual_seed(3)
    weights = [_weights(g["shapes"], gen) for g in EXACT_GROUPS]
    grads = [_dyadic_grads(ws, 1, gen) for ws in weights]
    params, opt = _bop(EXACT_GROUPS, weights, device)
    for gi in range(len(EXACT_GROUPS)):
        _set_grads(params[gi], grads[gi][0], device)  # step 0: every tensor has a gradient
    opt.step()
    with no_host_sync(device):
        flips = opt.last_flips_tensor
    assert flips.device.type == device.type and int(flips) == opt.last_flips


def test_last_flips_tensor_with_a_group_without_gradients(device):
    require_cuda(device, "a blocking copy from host to device")
    gen = torch.Generator().manual_seed(4)
    weights = [_weights([(10,)], gen), _weights([(6,)], gen)]
    groups = [{"gamma": 0.5, "threshold": 0.0, "flip_test": "strict"}] * 2
    params, opt = _bop(groups, weights, device)
    params[0][0].grad = torch.ones(10, device=device)  # group 1 has no gradient
    opt.step()
    # a group without gradients counts its (zero) flips on the weights' device too, so the
    # total is gathered without a blocking host-to-device copy
    with no_host_sync(device):
        flips = opt.last_flips_tensor
    assert flips.device.type == device.type and int(flips) == opt.last_flips
    assert opt.last_flips_per_group[1] == 0


# ----------------------------------------------------------------- the composite optimizer

COMPOSITE = {
    "adam": {"lr": 1e-2, "weight_decay": 1e-4},
    "sgd": {"lr": 1e-2, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
}


def _binary_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("bnn_mnist", mode="bop")  # BN with scale: a real part to train


def _composite(model, name):
    return build_binary_optimizer(model, name, gamma=0.25, threshold=2.0**-7, **COMPOSITE[name])


def _composite_grads(model, steps: int, gen: torch.Generator):
    """Per step: dyadic gradients for the binary weights, float32 for the real ones."""
    binary = {id(p) for p in binary_parameters(model)}
    out = []
    for _ in range(steps):
        step = []
        for p in model.parameters():
            if id(p) in binary:
                step.append(torch.randint(-64, 65, p.shape, generator=gen).float() / 128)
            else:
                step.append(torch.randn(p.shape, generator=gen) * 0.1)
        out.append(step)
    return out


@pytest.mark.parametrize("name", list(COMPOSITE))
def test_composite_matches_cpu_from_identical_state(device, name):
    """Two steps on the CPU; the model and the optimizer state (Bop's averages, the real
    optimizer's moments) loaded onto the device; four more steps on both with the same
    gradients."""
    gen = torch.Generator().manual_seed(5)
    cpu_model = _binary_model()
    cpu_opt = _composite(cpu_model, name)
    grads = _composite_grads(cpu_model, 6, gen)
    assert {"real", "binary"} == set(cpu_opt.optimizers)

    def step(model, opt, t, where):
        for p, g in zip(model.parameters(), grads[t]):
            p.grad = g.to(where).clone()
        opt.step()

    for t in range(2):
        step(cpu_model, cpu_opt, t, "cpu")
    model = copy.deepcopy(cpu_model).to(device)
    opt = _composite(model, name)
    opt.load_state_dict(copy.deepcopy(cpu_opt.state_dict()))
    for t in range(2, 6):
        step(cpu_model, cpu_opt, t, "cpu")
        step(model, opt, t, device)
        bop, cpu_bop = opt["binary"], cpu_opt["binary"]
        assert bop.last_flips_per_group == cpu_bop.last_flips_per_group, t
        for p, q in zip(binary_parameters(model), binary_parameters(cpu_model)):
            assert torch.equal(p.detach().cpu(), q.detach()), t
            assert torch.equal(bop.state[p]["m"].cpu(), cpu_bop.state[q]["m"]), t
        for p, q in zip(real_parameters(model), real_parameters(cpu_model)):
            assert p.device.type == device.type
            torch.testing.assert_close(p.detach().cpu(), q.detach(), msg=f"{name} step {t}")
    assert sum(opt["binary"].last_flips_per_group) > 0


@pytest.mark.parametrize("name", list(COMPOSITE))
def test_composite_step_does_not_sync(device, name):
    """Gradients from a real forward/backward on the device; the first step (which creates
    every state) and the second under the guard. Adam's step counters live on the host by
    torch's design (capturable=False) and are no sync."""
    model = _binary_model().to(device)
    opt = _composite(model, name)
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(6)).to(device)
    y = torch.arange(16, device=device) % 10
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        with no_host_sync(device, lambda: host_resident_state(opt)):
            opt.step()
    assert opt["binary"].last_flips is not None


def test_cpu_stand_in_sees_host_reads_the_optimizers_would_make(device):
    """The CPU stand-in is not vacuous: a step counter that is not declared host-resident is
    caught (on the CPU only; on CUDA the counters really are on the host)."""
    if device.type != "cpu":
        pytest.skip("checks the CPU stand-in of the sync guard")
    model = _binary_model()
    opt = _composite(model, "adam")
    torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.arange(4)).backward()
    with pytest.raises(SyncError):
        with no_host_sync(device):
            opt.step()
