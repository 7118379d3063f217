"""Per-step schedules (contrastive.schedules): closed forms, naive float64 loops, and bit-identity with
the expressions they replaced (pipelines/base.py's warmup_cosine factor, pipelines/moco.py's momentum_at)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from contrastive.schedules import cosine, linear, momentum_at, warmup_cosine, warmup_then_cosine


def _old_momentum_at(step: int, total_steps: int, base: float) -> float:
    """pipelines/moco.py's momentum_at before the move, verbatim."""
    progress = min(step / max(total_steps, 1), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def _old_warmup_cosine_factor(
    step: int, total_steps: int, steps_per_epoch: int, warmup_epochs: float, final_lr_fraction: float
) -> float:
    """pipelines/base.py's warmup_cosine factor before the move, verbatim."""
    warmup = min(int(round(warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
    return final_lr_fraction + (1 - final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def test_momentum_schedule() -> None:
    assert momentum_at(0, 100, 0.99) == pytest.approx(0.99, abs=1e-15)
    assert momentum_at(50, 100, 0.99) == pytest.approx(0.995)
    assert momentum_at(100, 100, 0.99) == momentum_at(130, 100, 0.99) == 1.0
    for t in range(0, 100, 7):
        assert momentum_at(t, 100, 0.9) == pytest.approx(1 - 0.1 * (math.cos(math.pi * t / 100) + 1) / 2)


def test_momentum_at_is_bit_identical_to_the_former_formula() -> None:
    """Written via cosine(t, T, m0, 1): the same float on every step, so a resumed MoCo run is unchanged."""
    checked = 0
    for base in (0.0, 0.9, 0.99, 0.996, 0.9995, 0.999, 0.123456789, 1.0):
        for total in (0, 1, 2, 7, 100, 1000, 97_651, 390 * 800):
            for step in {*range(min(total, 3000) + 5), *range(0, total + 50, max(total // 997, 1))}:
                assert momentum_at(step, total, base) == _old_momentum_at(step, total, base), (step, total, base)
                checked += 1
    assert checked > 50_000


def test_warmup_cosine_values() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, total_steps=20, steps_per_epoch=2, warmup_epochs=2, final_lr_fraction=0.1)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    t = (10 - 4) / 16
    assert lrs[10] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))


def test_warmup_cosine_factor_is_bit_identical_to_the_former_expression() -> None:
    """Its factor, now linear(t + 1, W, 0, 1) then cosine(t - W, T - W, 1, f), gives the same float as the old
    inline expression for every step, so the learning rates of a run (and of a resumed one) are unchanged."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    checked = 0
    for total, per_epoch in ((1, 1), (2, 1), (20, 2), (391, 391), (800 * 97, 97), (19_550, 391)):
        for warmup_epochs in (0.0, 0.5, 1.0, 10.0, 1e6):
            for f in (0.0, 0.1, 1e-3, 1 / 3, 1.0):
                factor = warmup_cosine(opt, total, per_epoch, warmup_epochs, f).lr_lambdas[0]
                for step in {*range(min(total, 2000) + 3), *range(0, total + 10, max(total // 499, 1))}:
                    old = _old_warmup_cosine_factor(step, total, per_epoch, warmup_epochs, f)
                    assert factor(step) == old, (step, total, per_epoch, warmup_epochs, f)
                    checked += 1
    assert checked > 50_000


def test_the_former_target_still_resolves_for_old_checkpoints() -> None:
    """Checkpoints written before the move store scheduler._target_ = contrastive.pipelines.warmup_cosine."""
    from hydra.utils import get_method

    import contrastive.pipelines

    assert contrastive.pipelines.warmup_cosine is warmup_cosine
    assert get_method("contrastive.pipelines.warmup_cosine") is get_method("contrastive.schedules.warmup_cosine")


def test_linear_and_cosine_closed_forms() -> None:
    assert [linear(t, 4, 1.0, 3.0) for t in range(7)] == [1.0, 1.5, 2.0, 2.5, 3.0, 3.0, 3.0]
    assert linear(0, 0, 1.0, 3.0) == 3.0  # no steps: the end at once
    assert linear(3, 3, 0.04, 0.07) == 0.07  # exactly the end (0.04 + 0.03 rounds to 0.07000000000000001)
    assert cosine(0, 10, 0.04, 0.4) == pytest.approx(0.04, abs=1e-16)  # end + (start - end): start to rounding
    assert cosine(10, 10, 0.04, 0.4) == cosine(11, 10, 0.04, 0.4) == 0.4  # the end exactly, and held
    assert cosine(5, 10, 0.0, 1.0) == pytest.approx(0.5, abs=1e-15)
    assert cosine(3, 0, 2.0, 5.0) == 5.0  # T of 0 counts as 1: held at the end
    assert cosine(7, 50, 3.0, 3.0) == 3.0  # a constant is exactly constant
    for t in range(40):  # increasing towards a higher end, symmetric about the midpoint
        assert cosine(t, 40, 0.0, 1.0) <= cosine(t + 1, 40, 0.0, 1.0)
        assert cosine(t, 40, 0.0, 1.0) + cosine(40 - t, 40, 0.0, 1.0) == pytest.approx(1.0, abs=1e-15)


def _naive(step: int, total: int, warmup: int, start: float, peak: float, end: float) -> float:
    """The same schedule as a float64 table built with numpy, as DINO's utils.cosine_scheduler does."""
    ramp = np.linspace(start, peak, warmup + 1)[:-1]  # W values, peak itself comes next
    after = np.arange(total - warmup + 1, dtype=np.float64)  # t - W = 0 .. T - W
    tail = end + 0.5 * (peak - end) * (1 + np.cos(np.pi * after / max(total - warmup, 1)))
    table = np.concatenate([ramp, tail])  # T + 1 values: t = 0 .. T
    return float(table[min(step, total)])


@pytest.mark.parametrize(
    "total, warmup, start, peak, end",
    [
        (100, 29, 0.04, 0.07, 0.07),  # DINO's teacher temperature: 30 epochs of np.linspace(0.04, 0.07, 30), then 0.07
        (1000, 0, 0.04, 0.04, 0.4),  # DINO's weight decay: cosine 0.04 -> 0.4, no warm-up
        (1000, 100, 0.0, 5e-4, 1e-6),  # an LR: warm-up from 0 to the peak, cosine to a floor
        (10, 9, 0.2, 1.0, 0.5),  # warm-up all but the last step
        (1, 0, 3.0, 3.0, -1.0),
    ],
)
def test_warmup_then_cosine_against_a_float64_table(
    total: int, warmup: int, start: float, peak: float, end: float
) -> None:
    values = [warmup_then_cosine(t, total, warmup, start, peak, end) for t in range(total + 20)]
    want = [_naive(t, total, warmup, start, peak, end) for t in range(total + 20)]
    assert values == pytest.approx(want, rel=1e-13, abs=1e-15)
    assert values[0] == start if warmup else values[0] == pytest.approx(peak, abs=1e-16)
    assert values[warmup] == pytest.approx(peak, abs=1e-16) and values[total] == values[-1] == end  # end exactly


def test_dino_teacher_temperature_is_numpy_linspace_then_constant() -> None:
    """DINO's DINOLoss: np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(epochs - 30) * 0.07))[epoch]."""
    epochs = 100
    table = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(epochs - 30) * 0.07))
    got = [warmup_then_cosine(e, epochs, 29, 0.04, 0.07, 0.07) for e in range(epochs)]
    assert got == pytest.approx(table.tolist(), rel=1e-14)
    assert got[29:] == [0.07] * (epochs - 29)


def test_warmup_then_cosine_refuses_a_warmup_outside_the_run() -> None:
    for warmup in (-1, 10, 11):
        with pytest.raises(
            ValueError, match=rf"warmup_steps must lie in \[0, total_steps\) = \[0, 10\) .*, got {warmup}"
        ):
            warmup_then_cosine(0, 10, warmup, 0.0, 1.0, 0.0)
