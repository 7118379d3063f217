"""SimCLR (Chen et al. 2020): augmented views, a projection head, NT-Xent (or its V-view form)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from contrastive.distributed import rank
from contrastive.losses import LossForm, input_forms
from contrastive.pipelines.base import Pipeline


def instance_labels(
    batch_size: int, num_views: int, process_rank: int = 0, device: torch.device | str | None = None
) -> Tensor:
    """Labels that make every view of an image a positive of the others and nothing else.

    ``(arange(B) + rank * B).repeat(V)``, shape (V*B,), view-major like ``cat(views)``:
    offset by the rank so that images of different processes never share a label when
    the loss gathers them.
    """
    start = process_rank * batch_size
    return torch.arange(start, start + batch_size, device=device).repeat(num_views)


class SimCLR(Pipeline):
    """SimCLR: ``z = g(f(aug(x)))`` for each view, loss ``nt_xent(z1, z2)``.

    With a loss of the ``multi_view`` form (``SupCon``) the views may be more than two: the loss is over the
    ``V*B`` embeddings with instance labels (:func:`instance_labels`), i.e. each view's
    positives are the ``V - 1`` other views of its image (multi-view SimCLR; with
    ``V = 2`` it equals NT-Xent exactly).

    Args:
        projector: projection head g, (B, F) -> (B, D).
        loss: ``loss(z1, z2) -> scalar`` (form ``two_views``: ``NTXent``, in-batch ``InfoNCE``), or
            ``loss(z, instance_labels)`` (form ``multi_view``: ``SupCon``); see ``contrastive.losses.forms``.
        num_views: views per image; more than 2 needs a ``multi_view`` loss.
        **base: the :class:`Pipeline` arguments (backbone, augment, optimizer, ...).
    """

    loss_forms: ClassVar[tuple[LossForm, ...]] = ("two_views", "multi_view")
    loss_hint: ClassVar[str] = (
        "it contrasts views of the same image; use loss=nt_xent, loss=info_nce or loss=sup_con "
        "(class-label losses run in pipeline=siamese)"
    )

    def __init__(self, projector: nn.Module, loss: nn.Module, num_views: int = 2, **base: Any) -> None:
        self.loss_form(loss)  # refuses a loss of another form
        forms = input_forms(loss) or frozenset()
        if not (isinstance(num_views, int) and num_views >= 2):
            raise ValueError(f"pipeline.num_views must be an integer >= 2, got {num_views!r}.")
        if num_views > 2 and "multi_view" not in forms:
            raise ValueError(f"pipeline.num_views={num_views} needs loss=sup_con (NT-Xent and InfoNCE take two views).")
        super().__init__(**base)
        self.projector = projector
        self.loss = loss
        self.num_views = num_views
        #: loss(z, instance labels) rather than loss(z1, z2): beyond two views, or a loss of that form only
        self.multi_view = "multi_view" in forms and (num_views > 2 or "two_views" not in forms)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        h = self.backbone(torch.cat(self.views(images, n=self.num_views)))  # (V*B, F), one pass: BN sees all views
        z = self.projector(h)  # (V*B, D)
        if self.multi_view:
            loss = self.loss(z, instance_labels(len(images), self.num_views, rank(), z.device))
        else:
            loss = self.loss(*z.chunk(2))  # (B, D) each
        return self.finish_step({"loss": loss}, self.online_probe_loss(h, labels.repeat(self.num_views)))
