"""Evaluation on feature tensors: kNN, linear probe, retrieval metrics, label-free monitors, plots and
sweep reports.

Everything here takes tensors (features, labels) or paths, never a config or a model.
matplotlib, scikit-learn and numpy are imported inside the functions that need them.
"""

from contrastive.evaluation._common import check_finite
from contrastive.evaluation.knn import knn_predict, knn_top1
from contrastive.evaluation.linear import linear_probe, predict_linear
from contrastive.evaluation.metrics import feature_metrics
from contrastive.evaluation.monitors import alignment, embedding_std, label_free_monitors, rank_me, uniformity
from contrastive.evaluation.neighbors import topk_neighbors
from contrastive.evaluation.plots import (
    confusion_matrix,
    plot_confusion_matrix,
    plot_embedding_2d,
    plot_similarity_histograms,
    plot_training_curves,
)
from contrastive.evaluation.report import read_run, summarize_runs
from contrastive.evaluation.retrieval import retrieval_metrics

__all__ = [
    "alignment",
    "embedding_std",
    "label_free_monitors",
    "rank_me",
    "uniformity",
    "check_finite",
    "confusion_matrix",
    "feature_metrics",
    "knn_predict",
    "knn_top1",
    "linear_probe",
    "plot_confusion_matrix",
    "plot_embedding_2d",
    "plot_similarity_histograms",
    "plot_training_curves",
    "predict_linear",
    "read_run",
    "retrieval_metrics",
    "summarize_runs",
    "topk_neighbors",
]
