"""Siamese metric learning: an embedding network trained on P x K batches with a metric loss,
optionally regularised by a softmax cross-entropy classifier on the embedding."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from contrastive.losses import RegularizedMetricLoss, SoftmaxCERegularizer
from contrastive.pipelines.base import Pipeline


class Siamese(Pipeline):
    """``e = g(f(aug(x)))``, ``loss = metric(e, y) + weight * CE(classifier(e), y)``.

    One augmented view per image: a P x K batch already holds K - 1 positives per
    anchor, and two views of one image would only add the easiest positive at twice
    the cost. The classifier of the regulariser is a submodule (``self.loss``), so
    the optimiser trains it with the network.

    Retrieval, kNN and the linear probe use the embedding ``e`` (:meth:`features`),
    the space the metric loss shapes (Musgrave et al. 2020 evaluate it too); the
    metrics rank by cosine similarity, which orders neighbours as the loss's
    Euclidean distance of L2-normalised embeddings does.

    Args:
        projector: embedding head g, (B, F) -> (B, D).
        loss: metric loss ``(embeddings, labels) -> scalar`` (``TripletMargin``, ``ContrastiveMargin``).
        regularizer: a ``SoftmaxCERegularizer`` on the embedding, or None.
        regularizer_weight: >= 0, the weight of its cross-entropy.
        **base: the :class:`Pipeline` arguments (backbone, augment, optimizer, ...).
    """

    def __init__(  # type: ignore[no-untyped-def]
        self,
        projector: nn.Module,
        loss: nn.Module,
        regularizer: SoftmaxCERegularizer | None = None,
        regularizer_weight: float = 1.0,
        **base,
    ) -> None:
        super().__init__(**base)
        self.projector = projector
        self.loss = RegularizedMetricLoss(loss, regularizer, regularizer_weight)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        images, labels = batch  # (B, C, H, W) uint8, B = P x K
        (x,) = self.views(images, n=1)
        h = self.backbone(x)  # (B, F)
        terms = self.loss(self.projector(h), labels)  # loss, metric [, ce, ce_acc]
        return self.finish_step(terms, self.online_probe_loss(h, labels))

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Embeddings (B, D) of an unaugmented uint8 batch: what retrieval ranks."""
        return self.projector(super().features(images)).float()
