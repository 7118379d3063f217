"""A method `contrastive` does not ship, added from outside the package: alignment + uniformity
(Wang & Isola, "Understanding Contrastive Representation Learning through Alignment and Uniformity
on the Hypersphere", ICML 2020). docs/adding_a_method.md walks through these files.

Train it (from this folder):

    PYTHONPATH=. contrastive-train hydra.searchpath=[file://$PWD/configs] experiment=align_uniform_shapes
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastive.losses import LossForm
from contrastive.pipelines import Pipeline


def align_uniform(z1: Tensor, z2: Tensor, alpha: float = 2.0, t: float = 2.0, weight: float = 1.0) -> Tensor:
    """``L = mean_i ||u_i - v_i||^alpha + weight * (U(u) + U(v)) / 2`` on unit vectors u, v (N, D),
    with ``U(x) = log mean_{i<j} exp(-t ||x_i - x_j||^2)`` (Wang & Isola 2020, Eq. 4-5)."""
    u, v = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)  # (N, D) each
    align = (u - v).norm(dim=1).pow(alpha).mean()

    def uniformity(x: Tensor) -> Tensor:
        return torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()  # pdist: the N(N-1)/2 pairs i < j

    return align + weight * 0.5 * (uniformity(u) + uniformity(v))


class AlignUniformLoss(nn.Module):
    """:func:`align_uniform` with its hyper-parameters; called as ``loss(z1, z2)``."""

    input_forms: ClassVar[frozenset[LossForm]] = frozenset({"two_views"})  # the form SimCLR-like pipelines call

    def __init__(self, alpha: float = 2.0, t: float = 2.0, weight: float = 1.0) -> None:
        super().__init__()
        if alpha <= 0 or t <= 0 or weight < 0:
            raise ValueError(f"alpha and t must be > 0 and weight >= 0, got {alpha}, {t}, {weight}")
        self.alpha, self.t, self.weight = alpha, t, weight

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return align_uniform(z1, z2, self.alpha, self.t, self.weight)


class AlignUniform(Pipeline):
    """Two views -> backbone -> projector -> ``loss(z1, z2)``; the base class does the rest
    (optimiser and schedule, kNN monitor, online probe, non-finite checks, checkpointed state)."""

    loss_forms: ClassVar[tuple[LossForm, ...]] = ("two_views",)
    loss_hint: ClassVar[str] = "it calls loss(z1, z2) on two views; use loss=align_uniform or loss=nt_xent"

    def __init__(self, projector: nn.Module, loss: nn.Module, **base: Any) -> None:
        self.loss_form(loss)  # refuses, in one line, a loss of another form
        super().__init__(**base)
        self.projector = projector
        self.loss = loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        h = self.backbone(torch.cat(self.views(images, n=2)))  # (2B, F)
        z1, z2 = self.projector(h).chunk(2)  # (B, D) each
        return self.finish_step({"loss": self.loss(z1, z2)}, self.online_probe_loss(h, labels.repeat(2)))
