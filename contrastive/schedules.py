"""Per-step schedules: pure functions of the step, and the LR scheduler built from them.

Every value schedule maps a step ``t`` (0-based) to a float and holds its last value past
its length, so a run that goes on a little longer than planned is still defined:

- :func:`linear`: ``start + (end - start) * min(t / T, 1)``.
- :func:`cosine`: ``end + (start - end) * (1 + cos(pi * min(t / T, 1))) / 2`` (SGDR, BYOL's EMA).
- :func:`warmup_then_cosine`: :func:`linear` for ``W`` steps, then :func:`cosine` to ``T``
  (DINO's teacher temperature, its weight decay, any warm-up + decay).

:func:`momentum_at` (MoCo's / BYOL's EMA) and :func:`warmup_cosine` (the LR) are built
from them, bit-identical to the expressions they had before (``tests/test_schedules.py``).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["cosine", "linear", "momentum_at", "warmup_cosine", "warmup_then_cosine"]


def linear(step: float, total_steps: int, start: float, end: float) -> float:
    """``start + (end - start) * t / T`` for ``t < T``, exactly ``end`` from ``t = T`` on (``T`` of 0: at once)."""
    return end if step >= total_steps else start + (end - start) * (step / total_steps)


def cosine(step: float, total_steps: int, start: float, end: float) -> float:
    """Half a cosine from ``start`` at ``t = 0`` (to rounding) to exactly ``end`` at ``t = T``, held after.

    ``v(t) = end + (start - end) * (1 + cos(pi * min(t / T, 1))) / 2`` (``T`` of 0 counts as 1).
    """
    progress = min(step / max(total_steps, 1), 1.0)
    return end + (start - end) * (1.0 + math.cos(math.pi * progress)) / 2.0


def warmup_then_cosine(
    step: float, total_steps: int, warmup_steps: int, start: float, peak: float, end: float
) -> float:
    """Linear warm-up from ``start`` to ``peak`` over ``W`` steps, then a cosine from ``peak`` to ``end`` at ``T``.

    ``v(t) = linear(t, W, start, peak)`` for ``t < W``, else ``cosine(t - W, T - W, peak, end)``: ``v(0) = start``
    (for ``W > 0``), ``v(W) = peak`` (to rounding), ``v(t >= T) = end``. ``peak == end`` holds the peak after
    the warm-up (exactly).

    DINO (Caron et al. 2021) in these terms, with its ``np.linspace(a, b, n)`` warm-ups (``b`` at index
    ``n - 1``) as ``W = n - 1``: the teacher temperature 0.04 -> 0.07 over 30 epochs then constant is
    ``warmup_then_cosine(epoch, epochs, 29, 0.04, 0.07, 0.07)``; the weight decay 0.04 -> 0.4 per step is
    ``warmup_then_cosine(t, T, 0, 0.04, 0.04, 0.4)`` (= ``cosine(t, T, 0.04, 0.4)``).

    Raises:
        ValueError: ``warmup_steps`` negative or not below ``total_steps`` (the cosine needs a step to reach ``end``).
    """
    if not 0 <= warmup_steps < max(total_steps, 1):
        raise ValueError(
            f"warmup_steps must lie in [0, total_steps) = [0, {total_steps}) (the cosine to `end` needs "
            f"a step), got {warmup_steps}"
        )
    if step < warmup_steps:
        return linear(step, warmup_steps, start, peak)
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, end)


def momentum_at(step: int, total_steps: int, base: float) -> float:
    """EMA momentum at ``step`` raised from ``m0 = base`` to 1 on a cosine (BYOL).

    ``m_t = 1 - (1 - m0) * (cos(pi t / T) + 1) / 2``, so ``m_0 = m0`` and ``m_T = 1`` (held after T):
    ``cosine(t, T, m0, 1)``.
    """
    return cosine(step, total_steps, base, 1.0)


def warmup_cosine(
    optimizer: Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float = 10.0,
    final_lr_fraction: float = 0.0,
) -> LambdaLR:
    """Linear warm-up for ``warmup_epochs`` then cosine decay to ``final_lr_fraction`` (per step).

    With t the optimiser step (0-based), W warm-up steps and T total steps:
    lr(t) = lr0 * (t + 1) / W for t < W (the first step is not wasted at lr 0; step W - 1
    reaches lr0), else lr0 * (f + (1 - f) * (1 + cos(pi * (t - W) / (T - W))) / 2).
    The factor is ``linear(t + 1, W, 0, 1)`` then ``cosine(t - W, T - W, 1, f)``.
    """
    warmup = min(int(round(warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return linear(step + 1, warmup, 0.0, 1.0)
        return cosine(step - warmup, total_steps - warmup, 1.0, final_lr_fraction)

    return LambdaLR(optimizer, factor)
