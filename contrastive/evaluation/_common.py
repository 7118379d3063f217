"""Helpers shared by the evaluation functions: argument checks, accuracy."""

from __future__ import annotations

import torch
from torch import Tensor


def check_labels(labels: Tensor, num_classes: int | None, n: int, name: str) -> None:
    """Raise ``ValueError`` unless ``labels`` is an (n,) integer tensor, in [0, num_classes) if given."""
    if labels.shape != (n,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of shape ({n},), got {labels.dtype} {tuple(labels.shape)}")
    if num_classes is not None and n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes})")


def check_finite(features: Tensor, name: str) -> None:
    """Raise ``ValueError`` if any row of ``features`` holds NaN/Inf.

    A NaN similarity ranks first in ``topk`` and spreads through a standardised probe,
    so the figures would look plausible (e.g. every prediction class 0) instead of failing.
    """
    bad = int((~torch.isfinite(features).reshape(len(features), -1).all(1)).sum())
    if bad:
        raise ValueError(f"{name} hold NaN/Inf in {bad} of {len(features)} rows")


def accuracy(pred: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent: ``100 * mean(pred == labels)``."""
    if not len(pred):
        return float("nan")
    return 100.0 * int((pred == labels.to(pred.device)).sum()) / len(pred)  # 91.6, not 91.60000000000001
