"""Margin-softmax heads (CosFace, ArcFace): class logits with a margin on the target class.

Embeddings and class weights are both taken to unit length, so every logit is a scaled cosine
``s cos(theta_ic)``; the margin makes the target class harder to win during training, which
pulls each class tighter round its weight. Cross-entropy over the returned logits is the loss.
At test time (no labels) the logits are the plain ``s cos(theta_ic)``.

Half precision inputs are computed in float32; float64 stays float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastive.losses._common import compute_dtype, l2_normalize, no_autocast
from contrastive.losses.forms import LossForm


def check_margin_scale(margin: float, scale: float, max_margin: float = math.inf) -> None:
    """Raise a ValueError unless ``0 <= margin < max_margin`` and ``scale > 0``."""
    if not 0 <= margin < max_margin:
        raise ValueError(
            f"margin must be in [0, {max_margin:g}), got {margin}: CosFace subtracts it from the target cosine, "
            "ArcFace adds it to the target angle in radians (0.35 is about 20 degrees)"
        )
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}: the logits are scale * cosine (typical 30 to 128)")


def _cosines(embeddings: Tensor, weight: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Cosines (N, C) of unit embeddings and unit class weights, and the target mask (N, C)."""
    if embeddings.ndim != 2 or weight.ndim != 2 or embeddings.shape[1] != weight.shape[1]:
        raise ValueError(
            f"embeddings must be (N, D) and weight (C, D), got {tuple(embeddings.shape)} and {tuple(weight.shape)}"
        )
    if labels.shape != embeddings.shape[:1]:
        raise ValueError(f"labels must be (N,) = ({len(embeddings)},), got {tuple(labels.shape)}")
    dtype = torch.promote_types(compute_dtype(embeddings), compute_dtype(weight))
    cos = l2_normalize(embeddings.to(dtype)) @ l2_normalize(weight.to(dtype)).T  # (N, C)
    # a mask, not F.one_hot: no device sync to check the labels' range (cross-entropy checks them)
    target = labels[:, None] == torch.arange(weight.shape[0], device=labels.device)  # (N, C)
    return cos, target


@no_autocast
def cosface_logits(embeddings: Tensor, weight: Tensor, labels: Tensor, margin: float, scale: float) -> Tensor:
    """CosFace / large-margin cosine loss logits (Wang et al. 2018, eq. 4).

    ``logit_ic = s (cos(theta_ic) - m [c = y_i])``, ``cos(theta_ic) = e_i . w_c / (|e_i| |w_c|)``.

    Args:
        embeddings: (N, D).
        weight: (C, D) class weights.
        labels: (N,) class ids in ``[0, C)``.
        margin: m >= 0, subtracted from the target cosine.
        scale: s > 0.

    Returns:
        (N, C) logits, float32 (float64 for float64 inputs).
    """
    check_margin_scale(margin, scale)
    cos, target = _cosines(embeddings, weight, labels)  # (N, C)
    return scale * torch.where(target, cos - margin, cos)


@no_autocast
def arcface_logits(embeddings: Tensor, weight: Tensor, labels: Tensor, margin: float, scale: float) -> Tensor:
    """ArcFace / additive angular margin logits (Deng et al. 2019, eq. 3).

    ``logit_ic = s cos(theta_ic + m)`` for the target class ``c = y_i`` and ``s cos(theta_ic)``
    otherwise. Past ``theta = pi - m`` the target's ``cos(theta + m)`` would rise again with the
    angle; there the authors' code (insightface, ``easy_margin=False``) takes the monotone
    ``cos(theta) - m sin(m)``, and so does this.

    ``cos(theta + m) = cos(theta) cos(m) - sin(theta) sin(m)``, with ``sin(theta)`` kept at or above
    ``sqrt(eps)`` of the dtype: its derivative ``-cos / sin`` is infinite at ``theta = 0`` (an
    embedding on its class weight), which would make the gradient NaN; the value there moves by at
    most ``sqrt(eps) sin(m)`` (3e-4 in float32).

    Args:
        embeddings: (N, D).
        weight: (C, D) class weights.
        labels: (N,) class ids in ``[0, C)``.
        margin: m in [0, pi), an angle in radians.
        scale: s > 0.

    Returns:
        (N, C) logits, float32 (float64 for float64 inputs).
    """
    check_margin_scale(margin, scale, math.pi)
    cos, target = _cosines(embeddings, weight, labels)  # (N, C)
    sin = (1 - cos * cos).clamp_min(torch.finfo(cos.dtype).eps).sqrt()  # (N, C), sin(theta) >= 0
    shifted = cos * math.cos(margin) - sin * math.sin(margin)  # cos(theta + m)
    shifted = torch.where(cos > math.cos(math.pi - margin), shifted, cos - margin * math.sin(margin))
    return scale * torch.where(target, shifted, cos)


MARGIN_LOGITS: dict[str, Callable[[Tensor, Tensor, Tensor, float, float], Tensor]] = {
    "cosface": cosface_logits,
    "arcface": arcface_logits,
}


def plain_logits(embeddings: Tensor, weight: Tensor, scale: float) -> Tensor:
    """``s cos(theta_ic)`` (N, C): the margin heads' logits at test time, without labels."""
    dtype = torch.promote_types(compute_dtype(embeddings), compute_dtype(weight))
    return scale * (l2_normalize(embeddings.to(dtype)) @ l2_normalize(weight.to(dtype)).T)


class _MarginSoftmax(nn.Module):
    """A margin-softmax loss with its class weights, a parameter trained with the network."""

    input_forms: ClassVar[frozenset[LossForm]] = frozenset({"embeddings_labels"})
    kind: ClassVar[str]
    max_margin: ClassVar[float] = math.inf

    def __init__(self, embed_dim: int, num_classes: int, margin: float, scale: float) -> None:
        super().__init__()
        if embed_dim < 1 or num_classes < 2:
            raise ValueError(f"need embed_dim >= 1 and num_classes >= 2, got {embed_dim} and {num_classes}.")
        check_margin_scale(margin, scale, self.max_margin)
        self.margin, self.scale = margin, scale
        # nn.Linear's initialisation, as the softmax-CE regulariser's classifier (only directions matter)
        self.weight = nn.Parameter(nn.Linear(embed_dim, num_classes, bias=False).weight.detach().clone())

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy of the margin logits, averaged over the batch (float32, float64 for float64 inputs)."""
        logits = MARGIN_LOGITS[self.kind](embeddings, self.weight, labels, self.margin, self.scale)  # (N, C)
        return F.cross_entropy(logits, labels.long())

    def extra_repr(self) -> str:
        return f"classes={self.weight.shape[0]}, dim={self.weight.shape[1]}, margin={self.margin}, scale={self.scale}"


class CosFace(_MarginSoftmax):
    """CosFace (Wang et al. 2018) as a loss on its own; see :func:`cosface_logits`.

    ``forward(embeddings, labels)``, (N, D) and (N,) class ids. Defaults: the paper's m = 0.35, s = 64
    (the configs take the Reality Check's tuned values, ``loss/cosface.yaml``).
    """

    kind = "cosface"

    def __init__(self, embed_dim: int, num_classes: int, margin: float = 0.35, scale: float = 64.0) -> None:
        super().__init__(embed_dim, num_classes, margin, scale)


class ArcFace(_MarginSoftmax):
    """ArcFace (Deng et al. 2019) as a loss on its own; see :func:`arcface_logits`.

    ``forward(embeddings, labels)``, (N, D) and (N,) class ids. Defaults: the paper's m = 0.5 rad
    (28.6 degrees), s = 64 (the configs take the Reality Check's tuned values, ``loss/arcface.yaml``).
    """

    kind = "arcface"
    max_margin = math.pi

    def __init__(self, embed_dim: int, num_classes: int, margin: float = 0.5, scale: float = 64.0) -> None:
        super().__init__(embed_dim, num_classes, margin, scale)
