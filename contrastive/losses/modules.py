"""nn.Module wrappers that hold the hyper-parameters of the functional losses.

Constructor arguments are plain values so that Hydra can ``_target_`` them; they
are validated here (a clear ValueError) rather than at the first batch.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from contrastive.losses._common import Temperature, check_chunk_size
from contrastive.losses.forms import LossForm
from contrastive.losses.metric import check_pair_margins, check_triplet_args, contrastive_margin, triplet_margin
from contrastive.losses.softmax import info_nce, nt_xent, sup_con


class _SoftmaxLoss(nn.Module):
    """Shared state of the softmax losses: temperature, chunking, gathering."""

    def __init__(self, temperature: float, learnable: bool, chunk_size: int | None, gather: bool) -> None:
        super().__init__()
        check_chunk_size(chunk_size)
        self.temperature = Temperature(temperature, learnable)
        self.chunk_size = chunk_size
        self.gather = gather

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, gather={self.gather}"


class NTXent(_SoftmaxLoss):
    """SimCLR's NT-Xent; see :func:`nt_xent`. ``forward(z1, z2)``, both (N, D)."""

    input_forms: ClassVar[frozenset[LossForm]] = frozenset({"two_views"})

    def __init__(
        self, temperature: float = 0.5, learnable: bool = False, chunk_size: int | None = None, gather: bool = False
    ) -> None:
        super().__init__(temperature, learnable, chunk_size, gather)

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return nt_xent(z1, z2, self.temperature(), chunk_size=self.chunk_size, gather=self.gather)


class InfoNCE(_SoftmaxLoss):
    """InfoNCE / MoCo; see :func:`info_nce`. ``forward(query, key, negatives=None)``.

    ``symmetric=True`` (in-batch form only, as CLIP): the mean of
    ``info_nce(query, key)`` and ``info_nce(key, query)``.
    """

    input_forms: ClassVar[frozenset[LossForm]] = frozenset({"two_views", "query_key_negatives"})

    def __init__(
        self,
        temperature: float = 0.1,
        learnable: bool = False,
        symmetric: bool = False,
        chunk_size: int | None = None,
        gather: bool = False,
    ) -> None:
        super().__init__(temperature, learnable, chunk_size, gather)
        self.symmetric = symmetric

    def forward(self, query: Tensor, key: Tensor, negatives: Tensor | None = None) -> Tensor:
        if self.symmetric and negatives is not None:
            raise ValueError("symmetric=True is the in-batch (CLIP) form; it takes no negatives.")
        t = self.temperature()
        loss = info_nce(query, key, negatives, t, chunk_size=self.chunk_size, gather=self.gather)
        if self.symmetric:
            reverse = info_nce(key, query, None, t, chunk_size=self.chunk_size, gather=self.gather)
            loss = 0.5 * (loss + reverse)
        return loss


class SupCon(_SoftmaxLoss):
    """Supervised / multi-view contrastive loss; see :func:`sup_con`.

    ``forward(z, labels)``, or ``forward(z, labels, memory, memory_labels)`` against a cross-batch memory too.
    """

    input_forms: ClassVar[frozenset[LossForm]] = frozenset(
        {"multi_view", "embeddings_labels", "embeddings_labels_memory"}
    )

    def __init__(
        self, temperature: float = 0.1, learnable: bool = False, chunk_size: int | None = None, gather: bool = False
    ) -> None:
        super().__init__(temperature, learnable, chunk_size, gather)

    def forward(
        self, z: Tensor, labels: Tensor, memory: Tensor | None = None, memory_labels: Tensor | None = None
    ) -> Tensor:
        return sup_con(
            z,
            labels,
            self.temperature(),
            chunk_size=self.chunk_size,
            gather=self.gather,
            memory=memory,
            memory_labels=memory_labels,
        )


class TripletMargin(nn.Module):
    """Triplet margin loss with mining; see :func:`triplet_margin`.

    ``forward(embeddings, labels)``, or ``forward(embeddings, labels, memory, memory_labels)`` mining among
    a cross-batch memory too.
    """

    input_forms: ClassVar[frozenset[LossForm]] = frozenset({"embeddings_labels", "embeddings_labels_memory"})

    def __init__(
        self,
        margin: float = 0.2,
        mining: str = "batch_hard",
        squared: bool = False,
        normalize: bool = True,
        gather: bool = False,
        soft: bool = False,
    ) -> None:
        super().__init__()
        check_triplet_args(margin, mining)
        self.margin, self.mining, self.squared, self.normalize = margin, mining, squared, normalize
        self.gather, self.soft = gather, soft

    def forward(
        self, embeddings: Tensor, labels: Tensor, memory: Tensor | None = None, memory_labels: Tensor | None = None
    ) -> Tensor:
        return triplet_margin(
            embeddings,
            labels,
            self.margin,
            self.mining,
            self.squared,
            self.normalize,
            soft=self.soft,
            gather=self.gather,
            memory=memory,
            memory_labels=memory_labels,
        )

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, mining={self.mining!r}, squared={self.squared}, normalize={self.normalize}, "
            f"soft={self.soft}, gather={self.gather}"
        )


class ContrastiveMargin(nn.Module):
    """Hadsell et al. 2006 pair loss; see :func:`contrastive_margin`.

    ``forward(embeddings, labels)``, or ``forward(embeddings, labels, memory, memory_labels)`` pairing the batch
    with a cross-batch memory too.
    """

    input_forms: ClassVar[frozenset[LossForm]] = frozenset({"embeddings_labels", "embeddings_labels_memory"})

    def __init__(
        self,
        pos_margin: float = 0.0,
        neg_margin: float = 1.0,
        squared: bool = False,
        normalize: bool = True,
        gather: bool = False,
    ) -> None:
        super().__init__()
        check_pair_margins(pos_margin, neg_margin)
        self.pos_margin, self.neg_margin, self.squared, self.normalize = pos_margin, neg_margin, squared, normalize
        self.gather = gather

    def forward(
        self, embeddings: Tensor, labels: Tensor, memory: Tensor | None = None, memory_labels: Tensor | None = None
    ) -> Tensor:
        return contrastive_margin(
            embeddings,
            labels,
            self.pos_margin,
            self.neg_margin,
            self.squared,
            self.normalize,
            gather=self.gather,
            memory=memory,
            memory_labels=memory_labels,
        )

    def extra_repr(self) -> str:
        return (
            f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}, squared={self.squared}, "
            f"normalize={self.normalize}, gather={self.gather}"
        )
