"""Softmax cross-entropy regulariser on the embedding, and its sum with a metric loss."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from contrastive.losses._common import check_temperature, l2_normalize, no_autocast, upcast

KINDS = ("linear", "cosine")


class SoftmaxCERegularizer(nn.Module):
    """A classifier head on the embedding, trained with cross-entropy.

    ``kind="linear"``: ``logits = W f + b``. ``kind="cosine"`` (normalised softmax,
    NormFace, Wang et al. 2017): ``logits = normalize(f) . normalize(W)^T / T``.
    ``bnneck=True`` (Luo et al. 2019, "Bag of Tricks"): the classifier sees
    ``BatchNorm1d(f)`` (bias frozen at 0, classifier without bias) while the
    metric loss keeps using ``f`` itself, so the two losses do not fight over
    one normalisation of the space.

    Args:
        embed_dim: D, size of the embedding.
        num_classes: C; labels are class ids in ``[0, C)``.
        kind: "linear" or "cosine".
        temperature: T > 0 of the cosine classifier (scale 1/T; 0.05 = 20);
            unused by the linear one.
        bnneck: put a BatchNorm1d between the embedding and the classifier.
        label_smoothing: in [0, 1), as in ``F.cross_entropy``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        kind: str = "linear",
        temperature: float = 0.05,
        bnneck: bool = False,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
        if embed_dim < 1 or num_classes < 2:
            raise ValueError(f"need embed_dim >= 1 and num_classes >= 2, got {embed_dim} and {num_classes}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        check_temperature(temperature)
        self.kind = kind
        self.temperature = temperature
        self.label_smoothing = label_smoothing
        self.neck: nn.Module = nn.Identity()
        if bnneck:
            self.neck = nn.BatchNorm1d(embed_dim)
            self.neck.bias.requires_grad_(False)
        self.classifier = nn.Linear(embed_dim, num_classes, bias=kind == "linear" and not bnneck)

    @no_autocast
    def logits(self, embeddings: Tensor) -> Tensor:
        """(n, D) embeddings -> (n, C) class logits, in the classifier's dtype (at least float32)."""
        features = self.neck(embeddings.to(self.classifier.weight.dtype))  # (n, D)
        if self.kind == "cosine":
            return l2_normalize(features) @ l2_normalize(self.classifier.weight).T / self.temperature  # (n, C)
        return upcast(self.classifier(features))  # (n, C)

    def forward(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-entropy and accuracy (detached) of the classifier.

        Args:
            embeddings: (n, D), the features the metric loss sees.
            labels: (n,) class ids in ``[0, num_classes)``.

        Returns:
            (scalar cross-entropy, scalar top-1 accuracy in percent, 0-100).
        """
        if labels.dtype.is_floating_point or labels.dtype.is_complex:
            raise ValueError(
                f"labels must be integer class ids in [0, {self.classifier.out_features}), got {labels.dtype}: "
                "cast them with .long() if they are whole numbers."
            )
        logits = self.logits(embeddings)  # (n, C)
        ce = F.cross_entropy(logits, labels.long(), label_smoothing=self.label_smoothing)  # any integer dtype
        accuracy = (logits.detach().argmax(dim=1) == labels).to(logits.dtype).mean() * 100  # percent, as every top-1
        return ce, accuracy

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, temperature={self.temperature}, label_smoothing={self.label_smoothing}"


class RegularizedMetricLoss(nn.Module):
    """``loss = metric + weight * ce``, with the parts returned for logging.

    Args:
        metric_loss: a module ``(embeddings, labels) -> scalar`` (e.g. ``TripletMargin``).
        regularizer: a ``SoftmaxCERegularizer``, or None for the metric loss alone.
        weight: >= 0, weight of the cross-entropy term.
    """

    def __init__(
        self, metric_loss: nn.Module, regularizer: SoftmaxCERegularizer | None = None, weight: float = 1.0
    ) -> None:
        super().__init__()
        if not weight >= 0:
            raise ValueError(f"weight must be >= 0, got {weight}.")
        self.metric_loss = metric_loss
        self.regularizer = regularizer
        self.weight = weight

    def forward(self, embeddings: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Returns ``{"loss", "metric"}`` plus ``{"ce", "ce_acc"}`` with a regulariser."""
        metric = self.metric_loss(embeddings, labels)
        if self.regularizer is None:
            return {"loss": metric, "metric": metric}
        ce, accuracy = self.regularizer(embeddings, labels)
        return {"loss": metric + self.weight * ce, "metric": metric, "ce": ce, "ce_acc": accuracy}
