"""Softmax cross-entropy regulariser on the embedding, and its sum with a metric loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastive.losses._common import check_temperature, l2_normalize, no_autocast, upcast
from contrastive.losses.margin_softmax import MARGIN_LOGITS, check_margin_scale, plain_logits

KINDS = ("linear", "cosine", "cosface", "arcface")


class SoftmaxCERegularizer(nn.Module):
    """A classifier head on the embedding, trained with cross-entropy.

    ``kind="linear"``: ``logits = W f + b``. ``kind="cosine"`` (normalised softmax,
    NormFace, Wang et al. 2017): ``logits = normalize(f) . normalize(W)^T / T``.
    ``kind="cosface"`` / ``"arcface"``: the margin-softmax heads (:func:`.cosface_logits`,
    :func:`.arcface_logits`), ``s cos`` with the margin ``m`` on the target class in training;
    the accuracy is that of the plain ``s cos``, the prediction without a margin.
    ``bnneck=True`` (Luo et al. 2019, "Bag of Tricks"): the classifier sees
    ``BatchNorm1d(f)`` (bias frozen at 0, classifier without bias) while the
    metric loss keeps using ``f`` itself, so the two losses do not fight over
    one normalisation of the space.

    Args:
        embed_dim: D, size of the embedding.
        num_classes: C; labels are class ids in ``[0, C)``.
        kind: "linear" or "cosine".
        temperature: T > 0 of the cosine classifier (scale 1/T; 0.05 = 20);
            unused by the other kinds.
        bnneck: put a BatchNorm1d between the embedding and the classifier.
        label_smoothing: in [0, 1), as in ``F.cross_entropy``.
        margin: m of the cosface (a cosine) and arcface (an angle in radians) kinds; must be 0 for
            the others.
        scale: s > 0 of the cosface and arcface kinds; unused by the others.
    """

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        kind: str = "linear",
        temperature: float = 0.05,
        bnneck: bool = False,
        label_smoothing: float = 0.0,
        margin: float = 0.0,
        scale: float = 64.0,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
        if kind in MARGIN_LOGITS:
            check_margin_scale(margin, scale, math.pi if kind == "arcface" else math.inf)
        elif margin != 0:
            raise ValueError(f"margin={margin} belongs to kind cosface or arcface; kind {kind!r} has none: pass 0")
        if embed_dim < 1 or num_classes < 2:
            raise ValueError(f"need embed_dim >= 1 and num_classes >= 2, got {embed_dim} and {num_classes}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        check_temperature(temperature)
        self.kind = kind
        self.temperature = temperature
        self.label_smoothing = label_smoothing
        self.margin, self.scale = margin, scale
        self.neck: nn.Module = nn.Identity()
        if bnneck:
            self.neck = nn.BatchNorm1d(embed_dim)
            self.neck.bias.requires_grad_(False)
        self.classifier = nn.Linear(embed_dim, num_classes, bias=kind == "linear" and not bnneck)

    @no_autocast
    def logits(self, embeddings: Tensor, labels: Tensor | None = None) -> Tensor:
        """(n, D) embeddings -> (n, C) class logits, in the classifier's dtype (at least float32).

        With ``labels`` (n,) the margin kinds put their margin on each row's target class (training);
        without, they give the plain ``s cos`` (prediction). The other kinds ignore ``labels``.
        """
        features = self.neck(embeddings.to(self.classifier.weight.dtype))  # (n, D)
        weight = self.classifier.weight  # (C, D)
        if self.kind == "cosine":
            return l2_normalize(features) @ l2_normalize(weight).T / self.temperature  # (n, C)
        if self.kind in MARGIN_LOGITS:
            if labels is None:
                return plain_logits(features, weight, self.scale)  # (n, C)
            return MARGIN_LOGITS[self.kind](features, weight, labels, self.margin, self.scale)  # (n, C)
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
        logits = self.logits(embeddings, labels)  # (n, C)
        ce = F.cross_entropy(logits, labels.long(), label_smoothing=self.label_smoothing)  # any integer dtype
        if self.kind in MARGIN_LOGITS:  # the prediction has no margin
            with torch.no_grad():
                logits = self.logits(embeddings)  # (n, C)
        accuracy = (logits.detach().argmax(dim=1) == labels).to(logits.dtype).mean() * 100  # percent, as every top-1
        return ce, accuracy

    def extra_repr(self) -> str:
        if self.kind in MARGIN_LOGITS:
            return (
                f"kind={self.kind!r}, margin={self.margin}, scale={self.scale}, label_smoothing={self.label_smoothing}"
            )
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

    def forward(self, embeddings: Tensor, labels: Tensor, *memory: Tensor) -> dict[str, Tensor]:
        """Returns ``{"loss", "metric"}`` plus ``{"ce", "ce_acc"}`` with a regulariser.

        ``memory``: a cross-batch memory's ``(embeddings (M, D), labels (M,))``, passed on to the metric
        loss only (the classifier learns from the batch).
        """
        metric = self.metric_loss(embeddings, labels, *memory)
        if self.regularizer is None:
            return {"loss": metric, "metric": metric}
        ce, accuracy = self.regularizer(embeddings, labels)
        return {"loss": metric + self.weight * ce, "metric": metric, "ce": ce, "ce_acc": accuracy}
