"""SimCLR (Chen et al. 2020): two augmented views, a projection head, NT-Xent."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from contrastive.losses import ContrastiveMargin, SupCon, TripletMargin
from contrastive.pipelines.base import Pipeline, check_loss_fits


class SimCLR(Pipeline):
    """SimCLR: ``z = g(f(aug(x)))`` for two views, loss ``nt_xent(z1, z2)``.

    Args:
        projector: projection head g, (B, F) -> (B, D).
        loss: ``loss(z1, z2) -> scalar``, e.g. ``contrastive.losses.NTXent``.
        **base: the :class:`Pipeline` arguments (backbone, augment, optimizer, ...).
    """

    def __init__(self, projector: nn.Module, loss: nn.Module, **base) -> None:  # type: ignore[no-untyped-def]
        check_loss_fits("SimCLR", loss, (SupCon, TripletMargin, ContrastiveMargin),
                        "it calls loss(z1, z2) on two views; use loss=nt_xent or loss=info_nce "
                        "(label-based losses run in pipeline=siamese, e.g. experiment=supcon_cifar10)")
        super().__init__(**base)
        self.projector = projector
        self.loss = loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        images, labels = batch
        v1, v2 = self.views(images)
        h = self.backbone(torch.cat([v1, v2]))  # (2B, F), one pass: BN sees both views
        z1, z2 = self.projector(h).chunk(2)  # (B, D) each
        loss = self.loss(z1, z2)
        return self.finish_step({"loss": loss}, self.online_probe_loss(h, labels.repeat(2)))
