"""Schedules: hand-computed factors, torch's own schedulers as reference, resume, other keys."""

from __future__ import annotations

import io
import math

import pytest
import torch

from lightnets.errors import UserError
from lightnets.optim import Scheduler, build_schedule, list_schedules


def make_opt(lr: float = 0.1, **group_extra) -> torch.optim.Optimizer:
    p = torch.nn.Parameter(torch.zeros(2))
    q = torch.nn.Parameter(torch.zeros(2))
    groups = [{"params": [p], **group_extra}, {"params": [q], "lr": lr * 10, **group_extra}]
    return torch.optim.SGD(groups, lr=lr, momentum=0.9)


def lrs(sched: Scheduler, steps: int, group: int = 0, key: str = "lr") -> list[float]:
    """Values at t = 0..steps-1 (the value used by the optimizer step at t)."""
    out = []
    for _ in range(steps):
        out.append(sched.optimizer.param_groups[group][key])
        sched.step()
    return out


def test_multistep_hand_values():
    sched = build_schedule(make_opt(0.1), "multistep", 10, milestones=[2, 4])
    assert lrs(sched, 5) == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])


def test_step_hand_values_and_every_group_scaled():
    sched = build_schedule(make_opt(0.1), "step", 10, step_size=3, gamma=0.5)
    assert lrs(sched, 7) == pytest.approx([0.1] * 3 + [0.05] * 3 + [0.025])
    assert sched.get_last_value("lr") == pytest.approx([0.025, 0.25])  # t=7, both groups
    assert sched.get_last_lr() == sched.get_last_value()


def test_linear_and_constant():
    sched = build_schedule(make_opt(1.0), "linear", 4)
    assert lrs(sched, 6) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0])  # stays at the end
    sched = build_schedule(make_opt(1.0), "linear", 4, min_factor=0.2)
    assert lrs(sched, 5) == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    assert lrs(build_schedule(make_opt(0.3), "constant", 3), 4) == pytest.approx([0.3] * 4)


def test_cosine_endpoints_and_midpoint():
    sched = build_schedule(make_opt(1.0), "cosine", 10, min_factor=0.1)
    assert sched.factor(0) == 1.0
    assert sched.factor(5) == pytest.approx(0.55)
    assert sched.factor(10) == pytest.approx(0.1)
    assert sched.factor(25) == pytest.approx(0.1)


def test_poly_half_way():
    sched = build_schedule(make_opt(1.0), "poly", 10, power=0.9)
    assert sched.factor(5) == pytest.approx(0.5**0.9)
    assert sched.factor(10) == 0.0
    sched = build_schedule(make_opt(1.0), "poly", 10, power=2.0, min_factor=0.5)
    assert sched.factor(5) == pytest.approx(0.5 + 0.5 * 0.25)
    assert sched.factor(10) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("cosine", lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, 12, eta_min=0.0)),
        ("poly", lambda opt: torch.optim.lr_scheduler.PolynomialLR(opt, 12, power=0.9)),
        ("multistep", lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, [3, 7], 0.1)),
        ("step", lambda opt: torch.optim.lr_scheduler.StepLR(opt, 4, 0.5)),
    ],
)
def test_matches_torch_schedulers(name, reference):
    kwargs = {"milestones": [3, 7]} if name == "multistep" else {}
    if name == "step":
        kwargs = {"step_size": 4, "gamma": 0.5}
    ours = lrs(build_schedule(make_opt(0.1), name, 12, **kwargs), 13)
    opt = make_opt(0.1)
    ref = reference(opt)
    theirs = []
    for _ in range(13):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_warmup_then_cosine_over_remaining_steps():
    sched = build_schedule(make_opt(1.0), "cosine", 14, warmup_steps=4)
    assert lrs(sched, 5) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert sched.factor(9) == pytest.approx(0.5)  # half of the 10 remaining steps
    assert sched.factor(14) == pytest.approx(0.0)
    sched = build_schedule(make_opt(1.0), "linear", 6, warmup_steps=2, warmup_start_factor=0.5)
    assert lrs(sched, 7) == pytest.approx([0.5, 0.75, 1.0, 0.75, 0.5, 0.25, 0.0])


def test_warmup_with_multistep_counts_milestones_from_zero():
    sched = build_schedule(
        make_opt(1.0), "multistep", 10, warmup_steps=2, warmup_start_factor=0.5, milestones=[3]
    )
    assert lrs(sched, 5) == pytest.approx([0.5, 0.75, 1.0, 0.1, 0.1])


def test_matches_torch_linear_warmup():
    ours = lrs(
        build_schedule(make_opt(0.1), "constant", 20, warmup_steps=5, warmup_start_factor=0.2), 8
    )
    opt = make_opt(0.1)
    ref = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.2, total_iters=5)
    theirs = []
    for _ in range(8):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert ours == pytest.approx(theirs)


def test_state_dict_round_trip_resumes_exactly():
    def build(opt):
        return build_schedule(opt, "cosine", 20, warmup_steps=3, min_factor=0.01)

    opt = make_opt(0.1)
    sched = build(opt)
    lrs(sched, 7)
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buf)
    expected = lrs(sched, 13)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    opt2 = make_opt(0.1)
    sched2 = build(opt2)
    opt2.load_state_dict(ckpt["optimizer"])
    sched2.load_state_dict(ckpt["scheduler"])
    assert sched2.state_dict() == ckpt["scheduler"]
    assert sched2.t == 7 and sched2.last_epoch == 7
    assert lrs(sched2, 13) == expected

    # Without the optimizer state the base values are the same, so the values are too.
    sched3 = build(make_opt(0.1))
    sched3.load_state_dict(ckpt["scheduler"])
    assert lrs(sched3, 13) == expected


def test_schedules_a_custom_key():
    opt = make_opt(0.1, gamma=1e-4, threshold=1e-6)
    sched = build_schedule(opt, "linear", 4, keys=("gamma",))
    assert opt.param_groups[0]["initial_gamma"] == 1e-4
    assert lrs(sched, 5, key="gamma") == pytest.approx([1e-4, 7.5e-5, 5e-5, 2.5e-5, 0.0])
    assert opt.param_groups[0]["lr"] == 0.1  # lr untouched
    assert sched.last_factor == 0.0
    assert sched.get_last_value("gamma") == [0.0, 0.0]
    with pytest.raises(UserError, match="'lr' is not scheduled"):
        sched.get_last_value("lr")

    sched = build_schedule(
        make_opt(0.1, gamma=1e-4, threshold=1e-6),
        "step",
        9,
        step_size=2,
        gamma=0.5,
        keys=("lr", "threshold"),
    )
    sched.step()
    sched.step()
    assert sched.get_last_value("threshold") == pytest.approx([5e-7, 5e-7])
    assert sched.get_last_value("lr") == pytest.approx([0.05, 0.5])


def test_second_scheduler_does_not_compound():
    opt = make_opt(0.1)
    build_schedule(opt, "cosine", 10, warmup_steps=2)  # sets lr to 0 at t=0
    sched = build_schedule(opt, "constant", 10)
    assert sched.get_last_value() == pytest.approx([0.1, 1.0])


def test_missing_key_is_refused():
    with pytest.raises(UserError, match="param group 0 has no numeric 'gamma'"):
        build_schedule(make_opt(), "cosine", 10, keys=("gamma",))


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("cosinee", {}, r"unknown schedule 'cosinee' \(did you mean 'cosine'\?\).*multistep"),
        ("cosine", {"total_steps": 0}, "total_steps=0 must be at least 1"),
        ("cosine", {"warmup_steps": 10}, "warmup_steps=10 must be shorter"),
        ("cosine", {"warmup_steps": -1}, "warmup_steps=-1"),
        ("multistep", {"milestones": [4, 2]}, r"milestones=\[4, 2\] must be"),
        ("multistep", {"milestones": [2, 2]}, "strictly increasing"),
        ("multistep", {}, "needs milestones"),
        ("step", {}, "needs step_size"),
        ("step", {"step_size": 0}, "step_size"),
        ("poly", {"power": 0.0}, "power=0.0 must be positive"),
        ("cosine", {"min_factor": 1.5}, "min_factor=1.5"),
        ("cosine", {"warmup_steps": 2, "warmup_start_factor": -0.1}, "warmup_start_factor"),
        ("step", {"step_size": 2, "gamma": 0.0}, "gamma=0.0"),
    ],
)
def test_refusals(name, kwargs, match):
    args = {"total_steps": 10} | kwargs
    with pytest.raises(UserError, match=match):
        build_schedule(make_opt(), name, **args)


def test_names_case_insensitive():
    assert set(list_schedules()) == {"constant", "step", "multistep", "linear", "cosine", "poly"}
    sched = build_schedule(make_opt(), "Cosine", 10)
    assert sched.name == "cosine" and math.isclose(sched.factor(10), 0.0, abs_tol=1e-15)
