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


def accuracy(pred: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent: ``100 * mean(pred == labels)``."""
    return 100.0 * (pred == labels.to(pred.device)).double().mean().item()
