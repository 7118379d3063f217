"""MoCo v3 (Chen, Xie & He 2021): a momentum key encoder, in-batch keys, no queue.

One step, as the authors' ``moco/builder.py``: update the key encoder
``xi <- m xi + (1 - m) theta`` (m raised from m0 to 1 on a cosine over training), encode each
view with the query encoder ``q = predictor(projector(backbone(x)))`` and, without gradient, with
the key encoder ``k = key_projector(key_backbone(x))``, and sum the two directions
``ctr(q1, k2) + ctr(q2, k1)``, each an in-batch InfoNCE against the other view's keys of every
process, scaled by 2T (``contrastive.losses.MoCoV3Loss``).

Each view passes through the networks on its own, so BatchNorm normalises a view's batch with that
view's statistics, as in the authors' code. Under W processes the authors convert every BatchNorm
to SyncBatchNorm (``main_moco.py``): with ``trainer.sync_batchnorm=true`` (``trainer=ddp`` sets it)
a step equals that of one process holding the global batch. Without it (``trainer=ddp_cpu``:
PyTorch's SyncBatchNorm is GPU-only) the statistics are each process's.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from contrastive.losses import LossForm
from contrastive.models import ema_update, momentum_copy
from contrastive.pipelines.base import Pipeline, RunFacts, total_steps
from contrastive.schedules import momentum_at
from contrastive.views import MultiCrop


class MoCoV3(Pipeline):
    """MoCo v3: query encoder ``predictor(projector(backbone(.)))``, key encoder the EMA of ``projector(backbone(.))``.

    Args:
        projector: (B, F) -> (B, D), the head the key encoder copies (the authors': Linear-BN-ReLU-Linear-BN).
        predictor: (B, D) -> (B, D), the query encoder's alone (the authors': Linear-BN-ReLU-Linear).
        loss: ``loss(query, key) -> scalar`` of one direction (form ``two_views``): ``MoCoV3Loss``
            (the authors' 2T-scaled InfoNCE), or ``InfoNCE`` for the unscaled one. The step sums both directions.
        momentum: m0 of the key encoder's EMA (the authors': 0.99; 0.996 for 1000 epochs).
        momentum_cosine: raise m from m0 to 1 on a cosine over training (every recipe of the authors);
            false keeps m0.
        **base: the :class:`Pipeline` arguments (backbone, augment, optimizer, ...). ``augment`` may be a
            ``contrastive.views.MultiCrop`` of two groups of one view each at one size: an asymmetric pair
            (BYOL's, ``aug=asymmetric``), view 1 from the first group, view 2 from the second.
    """

    #: Takes a ``MultiCrop`` too, of exactly two same-size views (an asymmetric pair).
    multi_crop: ClassVar[bool] = True
    loss_forms: ClassVar[tuple[LossForm, ...]] = ("two_views",)
    loss_hint: ClassVar[str] = (
        "it calls loss(query, key) of each view's queries against the other view's keys; "
        "use loss=mocov3 (or loss=info_nce unscaled)"
    )

    def __init__(
        self,
        projector: nn.Module,
        predictor: nn.Module,
        loss: nn.Module,
        momentum: float = 0.99,
        momentum_cosine: bool = True,
        **base: Any,
    ) -> None:
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"pipeline.momentum={momentum} must be in [0, 1]")
        self.loss_form(loss)
        if getattr(loss, "symmetric", False):
            raise ValueError(
                "loss.symmetric=true adds InfoNCE(key, query) to each direction, a term MoCo v3 does not have: "
                "pass loss.symmetric=false (the pipeline sums ctr(q1, k2) + ctr(q2, k1) itself)"
            )
        augment = base.get("augment")
        if isinstance(augment, MultiCrop) and (augment.num_views != 2 or len(set(augment.sizes)) != 1):
            raise ValueError(
                f"MoCo v3 contrasts two views of one size, but the MultiCrop draws views of {augment.sizes} px: "
                "use aug=asymmetric (two groups of one view) or an Augment (aug=simclr)"
            )
        super().__init__(**base)
        self.projector, self.predictor, self.loss = projector, predictor, loss
        self.key_backbone = momentum_copy(self.backbone)  # frozen: requires_grad False, in the checkpoint
        self.key_projector = momentum_copy(self.projector)
        self.momentum, self.momentum_cosine = momentum, momentum_cosine
        self._ema_step = -1  # the optimiser step whose EMA is done (accumulated micro-batches share one)

    def check_run(self, facts: RunFacts) -> None:
        """The base rule, and a global batch of at least two images: a query's negatives are the other keys."""
        super().check_run(facts)
        if facts.batch_size * facts.world_size < 2:
            raise ValueError(
                f"data.batch_size={facts.batch_size} on {facts.world_size} process(es) leaves each query without "
                "a negative key (MoCo v3 contrasts in the batch): raise data.batch_size"
            )

    def current_momentum(self) -> float:
        """m of this step: m0 raised to 1 on a cosine over the run's optimiser steps (``momentum_at``)."""
        if not self.momentum_cosine or self._trainer is None:
            return self.momentum
        return momentum_at(self.global_step, total_steps(self.trainer), self.momentum)

    @torch.no_grad()
    def keys(self, x: Tensor) -> Tensor:
        """Key-encoder embeddings (B, D) of a view, without gradient."""
        return self.key_projector(self.key_backbone(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        m = self.current_momentum()
        if self.global_step != self._ema_step:  # once per optimiser step (trainer.accumulate_grad_batches)
            ema_update(self.key_backbone, self.backbone, m)  # before the keys, as the authors
            ema_update(self.key_projector, self.projector, m)
            self._ema_step = self.global_step
        v1, v2 = self.crops(images) if isinstance(self.augment, MultiCrop) else self.views(images, n=2)
        h1, h2 = self.backbone(v1), self.backbone(v2)  # (B, F) each: BN statistics per view
        q1, q2 = self.predictor(self.projector(h1)), self.predictor(self.projector(h2))  # (B, D) each
        k1, k2 = self.keys(v1), self.keys(v2)  # (B, D) each, no gradient
        loss = self.loss(q1, k2) + self.loss(q2, k1)  # the authors' sum of the two directions
        self.log("train/momentum", m, on_step=True, on_epoch=False)
        return self.finish_step({"loss": loss}, self.online_probe_loss(torch.cat([h1, h2]), labels.repeat(2)))
