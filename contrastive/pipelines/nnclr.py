"""NNCLR (Dwibedi et al. 2021, "With a Little Help from My Friends"): nearest neighbours as positives.

One step: two views -> backbone -> projector ``z`` -> predictor ``p``. Each view's positive is the
nearest neighbour (cosine) of its own ``z`` in a support set of past embeddings, taken without
gradient; it is contrasted in-batch against the other view's predictions (the paper's eq. 1,
``-log exp(NN(z1_i) . p2_i / T) / sum_k exp(NN(z1_i) . p2_k / T)``), symmetric over the two views:
``L = (loss(NN(z1), p2) + loss(NN(z2), p1)) / 2``, as solo-learn. After the loss the first view's
embeddings of every process are enqueued (gathered, in global order), so the support set is the
same on every rank and equals that of one process holding the global batch. The loss stays pure.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from contrastive.distributed import all_gather, world_size
from contrastive.losses import LossForm, l2_normalize
from contrastive.pipelines.base import Pipeline, RunFacts
from contrastive.queue import KeyQueue


def support_problem(queue_size: int, per_step: int) -> str | None:
    """What is wrong with a support set of ``queue_size`` embeddings for ``per_step`` enqueued a step
    (``data.batch_size`` x processes), or None: it must hold at least one step's embeddings."""
    if per_step <= queue_size:
        return None
    return (
        f"pipeline.queue_size={queue_size} is smaller than the embeddings enqueued per step ({per_step} = "
        "data.batch_size x processes): raise pipeline.queue_size or lower data.batch_size"
    )


def out_dim(head: nn.Module) -> int:
    """D, the width of a head's output: its last ``nn.Linear``'s ``out_features``."""
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the projector needs a final nn.Linear to size the support set (its output width)")
    return linears[-1].out_features


class NNCLR(Pipeline):
    """NNCLR: ``z = g(f(aug(x)))``, ``p = q(z)``, loss ``(loss(NN(z1), p2) + loss(NN(z2), p1)) / 2``.

    Args:
        projector: g, (B, F) -> (B, D) (the paper: 3 layers, 2048 hidden, D = 256).
        predictor: q, (B, D) -> (B, D) (the paper: 2 layers, 4096 hidden).
        loss: ``loss(neighbours, predictions)`` of the ``two_views`` form: in-batch ``InfoNCE`` is the
            paper's eq. 1 (``loss.symmetric=true`` adds each term's reverse direction); ``NTXent`` is
            lightly's form (also the neighbours among the negatives); ``DCL`` drops the positive from the
            denominator (the DCL paper's NNCLR + DCL).
        queue_size: K, the support set (FIFO of the first view's L2-normalised embeddings; random unit
            vectors at the start, as solo-learn); at least one step's embeddings.
        **base: the :class:`Pipeline` arguments (backbone, augment, optimizer, ...).
    """

    loss_forms: ClassVar[tuple[LossForm, ...]] = ("two_views",)
    loss_hint: ClassVar[str] = (
        "it calls loss(neighbours, predictions) on two views; use loss=info_nce (the paper's eq. 1), "
        "loss=nt_xent or loss=dcl"
    )

    def __init__(
        self, projector: nn.Module, predictor: nn.Module, loss: nn.Module, queue_size: int = 65536, **base: Any
    ) -> None:
        self.loss_form(loss)  # refuses a loss of another form
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"pipeline.queue_size must be a positive integer (the support set), got {queue_size!r}")
        super().__init__(**base)
        self.projector, self.predictor, self.loss = projector, predictor, loss
        self.support = KeyQueue(queue_size, out_dim(projector))  # buffers: the checkpoint holds them

    def check_run(self, facts: RunFacts) -> None:
        """The base rule, and a support set of at least one step's embeddings."""
        super().check_run(facts)
        if problem := support_problem(self.support.size, facts.batch_size * facts.world_size):
            raise ValueError(problem)

    @torch.no_grad()
    def nearest_neighbours(self, z: Tensor) -> Tensor:
        """The support set's row of highest cosine similarity to each row of ``z`` (n, D): (n, D), no gradient.

        In float32 (float64 for a float64 module) whatever the autocast state, so that bf16 rounding does not
        pick the neighbour. Rows of the support set are unit vectors, so the dot product is the cosine.
        """
        with torch.autocast(z.device.type, enabled=False):
            support = self.support.keys  # (K, D)
            index = (l2_normalize(z).to(support.dtype) @ support.T).argmax(dim=1)  # (n,)
            return support[index]  # a new tensor: the enqueue after the loss leaves it alone

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        if problem := support_problem(self.support.size, len(images) * world_size()):
            raise ValueError(problem)
        h = self.backbone(torch.cat(self.views(images, n=2)))  # (2B, F), one pass: BN sees both views
        z = self.projector(h)  # (2B, D)
        p1, p2 = self.predictor(z).chunk(2)  # (B, D) each
        z1, z2 = z.chunk(2)
        nn1, nn2 = self.nearest_neighbours(z1), self.nearest_neighbours(z2)  # the support set of before this step
        loss = 0.5 * (self.loss(nn1, p2) + self.loss(nn2, p1))
        skipped = self.skipped_steps
        out = self.finish_step({"loss": loss}, self.online_probe_loss(h, labels.repeat(2)))
        if self.skipped_steps == skipped:  # a skipped (non-finite) step enqueues nothing
            # every rank's first views, in global order: the support set one process with the global batch holds
            self.support.enqueue(all_gather(l2_normalize(z1.detach())))
        return out
