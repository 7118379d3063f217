"""Every figure of frozen features in one call: what the final evaluation and the online monitor report."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from contrastive.evaluation.knn import knn_top1
from contrastive.evaluation.neighbors import Metric
from contrastive.evaluation.retrieval import retrieval_metrics


def feature_metrics(
    features: dict[str, tuple[Tensor, Tensor]],
    num_classes: int,
    closed_set: bool,
    knn_k: int,
    knn_temperature: float,
    probe: Callable[..., dict] | None = None,
    metric: Metric = "cosine",
    retrieval: bool = True,
) -> dict[str, float]:
    """Every figure of frozen features, under plain keys (percent).

    Closed set (test classes = train classes): weighted kNN top-1 (unless ``knn_k=0``) and,
    when ``probe`` is given, the linear probe's train/test top-1. With ``retrieval``: retrieval
    metrics of the test split against itself (leave-one-out), the measure for unseen classes,
    ranked by ``metric`` (the pipeline's ``retrieval_metric``: the geometry its loss trained).

    Args:
        features: ``{"train": (x (N, F), y (N,)), "test": (x (M, F), y (M,))}``.
        probe: ``probe(xtr, ytr, xte, yte, num_classes=C) -> {"linear_top1", "linear_train_top1", ...}``.
    """
    (xtr, ytr), (xte, yte) = features["train"], features["test"]
    out: dict[str, float] = {}
    if closed_set:
        if knn_k > 0:  # knn_k=0: the run monitors MAP@R instead
            out["knn_top1"] = knn_top1(xtr, ytr, xte, yte, num_classes, knn_k, knn_temperature)
        if probe is not None:
            result = probe(xtr, ytr, xte, yte, num_classes=num_classes)
            out |= {k: float(result[k]) for k in ("linear_top1", "linear_train_top1")}
    if retrieval:
        out |= {k: float(v) for k, v in retrieval_metrics(xte, yte, metric=metric).items() if not k.startswith("num_")}
    return out
