"""Siamese metric learning: an embedding network trained on labelled batches with a metric loss
(triplet, pair or supervised contrastive), optionally regularised by a softmax cross-entropy
classifier on the embedding."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from contrastive.distributed import all_gather
from contrastive.evaluation.neighbors import Metric
from contrastive.losses import LossForm, RegularizedMetricLoss, SoftmaxCERegularizer, input_forms
from contrastive.memory import CrossBatchMemory
from contrastive.pipelines.base import Pipeline, RunFacts


class Siamese(Pipeline):
    """``e = g(f(aug(x)))``, ``loss = metric(e, y) + weight * CE(classifier(e), y)``.

    One augmented view per image by default: a P x K batch already holds K - 1
    positives per anchor, and two views of one image would only add the easiest
    positive at twice the cost. ``num_views=2`` is SupCon's recipe (Khosla et al.
    2020): each image twice, the embeddings stacked ``(V*B, D)`` with the labels
    repeated, so the loss sees the other view as one more positive. The classifier
    of the regulariser (and a loss's class weights or proxies) is a submodule
    (``self.loss``), so the optimiser trains it with the network.

    Cross-batch memory (XBM, Wang et al. 2020), ``memory_size=M``: the embeddings and labels of
    the last M images trained on (all processes', so the same on every rank) are kept, detached,
    in buffers (:class:`~contrastive.memory.CrossBatchMemory`, checkpointed), written after each
    step's loss (not by a step that ``on_nonfinite="skip"`` skips). From optimiser step
    ``memory_start`` on, the metric loss takes the batch as anchors against batch + memory as
    candidates (``loss(e, y, memory, memory_labels)``).

    Retrieval, kNN and the linear probe use the embedding ``e`` (:meth:`features`) by default,
    the space the metric loss shapes (Musgrave et al. 2020 evaluate it too). Retrieval ranks
    them in the loss's geometry (:attr:`retrieval_metric`): by cosine similarity, which orders
    neighbours as the Euclidean distance of L2-normalised embeddings does, or by Euclidean
    distance for a margin loss on raw embeddings (``normalize=False``). kNN and the probe
    use cosine / the raw features as for every pipeline.

    Args:
        projector: embedding head g, (B, F) -> (B, D).
        loss: metric loss ``(embeddings, labels) -> scalar`` (``TripletMargin``, ``ContrastiveMargin``,
            ``SupCon``, ``CosFace``, ``ArcFace``, ``ProxyAnchor``).
        regularizer: a ``SoftmaxCERegularizer`` on the embedding, or None.
        regularizer_weight: >= 0, the weight of its cross-entropy.
        num_views: augmented views per image, >= 1.
        eval_features: what :meth:`features` returns for kNN, retrieval and the probe:
            ``"embedding"`` (the metric space, default) or ``"backbone"`` (the encoder's
            output, as SupCon's linear evaluation).
        memory_size: M, the cross-batch memory's rows; 0 (default) for none.
        memory_start: the optimiser step from which the memory joins the loss (it fills from the
            first step); the XBM paper waits 1k iterations, until the embeddings drift slowly.
        embed_dim: D, the embedding's width (the memory's); needed with a memory.
        **base: the :class:`Pipeline` arguments (backbone, augment, optimizer, ...).
    """

    loss_forms: ClassVar[tuple[LossForm, ...]] = ("embeddings_labels",)
    loss_hint: ClassVar[str] = (
        "it calls loss(embeddings, labels); use loss=triplet, contrastive_margin, sup_con, cosface, arcface or "
        "proxy_anchor (NT-Xent and InfoNCE on two views run in pipeline=simclr)"
    )

    def __init__(
        self,
        projector: nn.Module,
        loss: nn.Module,
        regularizer: SoftmaxCERegularizer | None = None,
        regularizer_weight: float = 1.0,
        num_views: int = 1,
        eval_features: str = "embedding",
        memory_size: int = 0,
        memory_start: int = 0,
        embed_dim: int | None = None,
        **base: Any,
    ) -> None:
        if not (isinstance(num_views, int) and num_views >= 1):
            raise ValueError(f"num_views must be a positive integer, got {num_views!r}.")
        if eval_features not in ("embedding", "backbone"):
            raise ValueError(f"eval_features must be 'embedding' or 'backbone', got {eval_features!r}.")
        self.loss_form(loss)
        if memory_size:
            self._check_memory(loss, memory_size, memory_start, embed_dim)
        super().__init__(**base)
        self.projector = projector
        self.loss = RegularizedMetricLoss(loss, regularizer, regularizer_weight)
        self.num_views = num_views
        self.eval_features = eval_features
        self.memory = CrossBatchMemory(memory_size, embed_dim) if memory_size and embed_dim else None
        self.memory_start = memory_start

    @staticmethod
    def _check_memory(loss: nn.Module, size: int, start: int, embed_dim: int | None) -> None:
        """A memory needs a positive size and start >= 0, the embedding's width, and a loss that takes one."""
        if not (isinstance(size, int) and size > 0 and isinstance(start, int) and start >= 0):
            raise ValueError(
                f"pipeline.memory_size must be an integer >= 0 (0: no memory) and pipeline.memory_start >= 0, "
                f"got {size!r} and {start!r}"
            )
        if not (isinstance(embed_dim, int) and embed_dim >= 1):
            raise ValueError(
                f"pipeline.memory_size={size} needs the embedding's width: pass embed_dim (the configs set "
                "pipeline.embed_dim=${model.projector.out_dim})"
            )
        forms = input_forms(loss)
        if forms is not None and "embeddings_labels_memory" not in forms:
            raise ValueError(
                f"pipeline.memory_size={size}: loss {type(loss).__name__} takes no cross-batch memory (it compares "
                "embeddings with its own class vectors, not with other images): use loss=triplet, "
                "contrastive_margin or sup_con, or pipeline.memory_size=0"
            )

    def check_run(self, facts: RunFacts) -> None:
        """A regulariser weight without a regulariser would be silently ignored."""
        super().check_run(facts)
        if self.loss.regularizer is None and self.loss.weight:
            raise ValueError(
                f"regularizer.weight={self.loss.weight} has no effect without a classifier head (regularizer=none): "
                "add regularizer=softmax_ce (or cosine_softmax_ce) to train with the softmax-CE regulariser"
            )

    @property
    def retrieval_metric(self) -> Metric:  # type: ignore[override]
        """Euclidean where the loss measured raw embeddings (``normalize=False``), else cosine."""
        raw = self.eval_features == "embedding" and getattr(self.loss.metric_loss, "normalize", True) is False
        return "euclidean" if raw else "cosine"

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch  # (B, C, H, W) uint8, B = P x K (or any labelled batch)
        h = self.backbone(torch.cat(self.views(images, n=self.num_views)))  # (V*B, F), one pass
        labels = labels.repeat(self.num_views)  # (V*B,), view-major like h
        e = self.projector(h)  # (V*B, D)
        joined = self.memory is not None and self.global_step >= self.memory_start
        memory = self.memory() if self.memory is not None and joined else ()  # ((M', D), (M',)) copies, M' <= M
        terms = self.loss(e, labels, *memory)  # loss, metric [, ce, ce_acc]
        skipped = self.skipped_steps
        out = self.finish_step(terms, self.online_probe_loss(h, labels))
        if self.memory is not None and self.skipped_steps == skipped:  # a skipped (non-finite) step writes nothing
            # after the loss; the global batch, so every rank holds the same memory
            self.memory.enqueue(all_gather(e.detach()), all_gather(labels))
        return out

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Embeddings (B, D), or backbone features (B, F), of an unaugmented uint8 batch."""
        h = super().features(images)
        return h if self.eval_features == "backbone" else self.projector(h.to(self.dtype)).float()
