"""Evaluation on feature tensors: kNN, linear probe, retrieval metrics, plots and sweep reports.

Everything here takes tensors (features, labels) or paths, never a config or a model.
matplotlib, scikit-learn and numpy are imported inside the functions that need them.
"""

from contrastive.evaluation.knn import knn_predict, knn_top1
from contrastive.evaluation.neighbors import topk_neighbors
from contrastive.evaluation.retrieval import retrieval_metrics

__all__ = [
    "knn_predict",
    "knn_top1",
    "retrieval_metrics",
    "topk_neighbors",
]
