"""Weighted k-nearest-neighbour classification on frozen features (InstDisc monitor)."""

from __future__ import annotations

import torch
from torch import Tensor

from contrastive.evaluation._common import accuracy, check_labels
from contrastive.evaluation.neighbors import prepare_features, tie_order, topk_neighbors


def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    weighted: bool = True,
    chunk_size: int = 1024,
    exclude_self: bool = False,
) -> Tensor:
    """Predict labels by a (weighted) vote of the k nearest training features.

    Cosine similarity ``s_j = q . x_j`` on L2-normalised features; over the top-k
    neighbours ``N_k(q)`` the score of class ``c`` is

        weighted:  ``score_c = sum_{j in N_k(q), y_j = c} exp(s_j / T)``
        majority:  ``score_c = #{j in N_k(q) : y_j = c}``

    and the prediction is ``argmax_c score_c`` (Wu et al. 2018, "Unsupervised Feature
    Learning via Non-Parametric Instance Discrimination", Sec. 3.4). The weights are
    computed as ``exp((s_j - s_max) / T)`` in float64, which scales every class by the
    same factor: the argmax is unchanged and no ``T`` overflows.

    Ties: neighbours tied in similarity enter the top k in a fixed pseudo-random order
    of the training set (:func:`.neighbors.tie_order`); classes tied in score go to the
    lowest class index (``torch.argmax``).
    ``k`` larger than the train set (minus one with ``exclude_self``) is clamped.
    Memory is ``O(chunk_size * N)`` for N training features.

    Args:
        train_features: (N, D) training features.
        train_labels: (N,) integer labels in [0, num_classes).
        query_features: (Q, D) query features on the same device.
        num_classes: number of classes C.
        k: number of neighbours.
        temperature: T of the weights (only with ``weighted=True``).
        weighted: exp-similarity weights if True, plain majority vote if False.
        chunk_size: queries scored at once.
        exclude_self: leave-one-out: query ``i`` is train item ``i`` (requires Q == N)
            and is never its own neighbour.

    Returns:
        (Q,) int64 predicted labels.
    """
    n, q = train_features.shape[0], query_features.shape[0]
    check_labels(train_labels, num_classes, n, "train_labels")
    train_labels = train_labels.long()  # any integer dtype (scatter indexes with int64)
    if exclude_self and q != n:
        raise ValueError(f"exclude_self needs the query set to be the train set, got Q={q}, N={n}")
    if k < 1 or chunk_size < 1 or not temperature > 0:  # NaN too: it made every prediction class 0
        raise ValueError("k and chunk_size must be >= 1 and temperature > 0")
    k = min(k, n - 1 if exclude_self else n)
    if k < 1:
        raise ValueError("no neighbours available: the train set is too small")
    prepared = prepare_features(train_features)  # (N, D), unit rows
    queries = prepare_features(query_features).to(prepared.dtype)  # (Q, D)
    perm, position = tie_order(n, prepared.device)
    train, train_labels = prepared[perm], train_labels.to(prepared.device)[perm]  # searched in tie order
    preds = []
    for start in range(0, q, chunk_size):
        chunk = queries[start : start + chunk_size]  # (c, D)
        self_index = position[start : start + chunk.shape[0]] if exclude_self else None
        sims, idx = topk_neighbors(chunk, train, k, self_index=self_index)  # (c, k)
        if weighted:
            sims = sims.double()
            weights = ((sims - sims[:, :1]) / temperature).exp()  # (c, k), sims[:, 0] is the row max
        else:
            weights = torch.ones_like(sims, dtype=torch.float64)
        scores = torch.zeros(chunk.shape[0], num_classes, dtype=torch.float64, device=chunk.device)
        scores.scatter_add_(1, train_labels[idx], weights)  # (c, C)
        preds.append(scores.argmax(1))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=train_features.device)


def knn_top1(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    query_labels: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    weighted: bool = True,
    chunk_size: int = 1024,
    exclude_self: bool = False,
) -> float:
    """Top-1 accuracy of :func:`knn_predict` in percent (0-100).

    Args:
        train_features, train_labels, query_features, num_classes, k, temperature,
        weighted, chunk_size, exclude_self: as in :func:`knn_predict`.
        query_labels: (Q,) true labels of the queries.

    Returns:
        ``100 * mean(pred == query_labels)``.
    """
    q = query_features.shape[0]
    check_labels(query_labels, num_classes, q, "query_labels")
    if q == 0:
        raise ValueError("no queries")
    pred = knn_predict(
        train_features, train_labels, query_features, num_classes, k, temperature, weighted, chunk_size, exclude_self
    )
    return accuracy(pred, query_labels)
