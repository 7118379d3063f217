"""Retrieval metrics for metric learning (Musgrave et al. 2020, "A Metric Learning Reality Check")."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from contrastive.evaluation._common import check_labels
from contrastive.evaluation.neighbors import Metric, prepare_features, tie_order, topk_neighbors

#: The most similarities one block of queries holds (256 MiB in float32): larger galleries rank fewer
#: queries at once, so the memory beyond the features does not grow with the gallery.
MAX_BLOCK = 2**26


def relevant_counts(query_labels: Tensor, reference_labels: Tensor, leave_one_out: bool) -> Tensor:
    """``R_i``: how many references share query ``i``'s label (itself not counted in leave-one-out).

    Args:
        query_labels: (Q,) integer labels, any values.
        reference_labels: (N,) integer labels.
        leave_one_out: the queries are the references, so each query's own entry is subtracted.

    Returns:
        (Q,) int64 counts.
    """
    both = torch.cat([query_labels, reference_labels])
    _, inverse = torch.unique(both, return_inverse=True)  # dense class ids
    q_ids, r_ids = inverse[: len(query_labels)], inverse[len(query_labels) :]
    counts = torch.bincount(r_ids, minlength=int(inverse.max()) + 1 if len(both) else 0)
    return counts[q_ids] - int(leave_one_out)


def retrieval_metrics(
    query: Tensor,
    query_labels: Tensor,
    reference: Tensor | None = None,
    reference_labels: Tensor | None = None,
    ks: Sequence[int] | int = (1, 2, 4, 8),
    chunk_size: int = 512,
    metric: Metric = "cosine",
) -> dict[str, float]:
    """Recall@K, precision@1, R-precision and MAP@R of ranking references by similarity.

    For query ``i`` let ``R_i`` be the number of references with its label and
    ``rel_i(j) = 1`` if the ``j``-th nearest reference has it. Then

        ``recall_at_K  = 1[sum_{j<=K} rel(j) > 0]``  (the usual metric-learning "Recall@K")
        ``precision_at_1 = rel(1)``
        ``r_precision  = (1/R) sum_{j<=R} rel(j)``
        ``map_at_r     = (1/R) sum_{j<=R} P@j * rel(j)``,  ``P@j = (1/j) sum_{l<=j} rel(l)``

    each averaged over queries and reported in **percent** (0-100, like ``knn_top1``;
    the Reality Check tables use percent too, pytorch-metric-learning fractions).
    Definitions follow Musgrave, Belongie & Lim 2020, Sec. 3.2 / 4.

    Queries with ``R_i = 0`` (a class with no other member among the references) have
    no defined R-precision or MAP@R; they are left out of *every* mean, as
    pytorch-metric-learning does, and counted in ``num_excluded_queries``. If no query
    is left, every metric is ``nan``.

    Ties in (computed) similarity rank in a fixed pseudo-random order of the references
    (:func:`.neighbors.tie_order`), so results are deterministic, reproducible by a plain
    Python sort, and do not favour a class because the data set is stored class by class;
    means are summed with ``math.fsum``, so they do not depend on
    ``chunk_size`` or the device. ``K`` larger
    than the number of references is clamped. Only the top ``max(max R, max ks)`` of
    each chunk of queries is kept: memory is that of the features (one normalised copy, in
    leave-one-out too) plus one block of ``min(chunk_size, MAX_BLOCK // N) x N``
    similarities, never ``Q x N``; no index (faiss) is needed for exact search.
    A 100,000 x 100,000 gallery of 512-d embeddings: see docs/benchmarks.md.

    Args:
        query: (Q, D) query features.
        query_labels: (Q,) integer labels.
        reference: (N, D) reference features, or ``None`` for leave-one-out on the query
            set (each query's own row excluded by index, not by distance).
        reference_labels: (N,) integer labels; required iff ``reference`` is given.
        ks: the K of ``recall_at_K``.
        chunk_size: queries ranked at once (fewer where ``chunk_size x N`` passes :data:`MAX_BLOCK`).
        metric: ``"cosine"`` (L2-normalised dot product) or ``"euclidean"``.

    Returns:
        ``{"recall_at_K": ..., "precision_at_1", "r_precision", "map_at_r"}`` in percent,
        plus ``num_queries`` (queries averaged over) and ``num_excluded_queries``.
    """
    if reference is not None and reference is query:
        warnings.warn(
            "reference is the query tensor itself, so every query finds itself at rank 1 (P@1 100): "
            "for leave-one-out retrieval within one set pass reference=None",
            stacklevel=2,
        )
    ks = (ks,) if isinstance(ks, int) else ks
    leave_one_out = reference is None
    if leave_one_out != (reference_labels is None):
        raise ValueError("give both reference and reference_labels, or neither")
    if reference is None or reference_labels is None:
        reference, reference_labels = query, query_labels
    n_q, n_r = query.shape[0], reference.shape[0]
    check_labels(query_labels, None, n_q, "query_labels")
    check_labels(reference_labels, None, n_r, "reference_labels")
    if not ks or min(ks) < 1 or chunk_size < 1:
        raise ValueError("ks must be non-empty positive integers and chunk_size >= 1")
    available = n_r - int(leave_one_out)
    chunk_size = max(1, min(chunk_size, MAX_BLOCK // n_r))
    refs = prepare_features(reference, metric)  # (N, D)
    # leave-one-out: query i is row position[i] of the permuted references, not a second copy
    queries = None if leave_one_out else prepare_features(query, metric).to(refs.dtype)  # (Q, D)
    reference_labels = reference_labels.to(refs.device)
    query_labels = query_labels.to(refs.device)
    r_all = relevant_counts(query_labels, reference_labels, leave_one_out)  # (Q,)
    perm, position = tie_order(n_r, refs.device)
    refs, reference_labels = refs[perm], reference_labels[perm]  # searched in tie order

    recall_ks = list(dict.fromkeys((1, *ks)))  # K=1 is precision@1 too
    per_query = []  # (c, len(recall_ks) + 2) per chunk
    for start in range(0, n_q, chunk_size):
        stop = min(start + chunk_size, n_q)
        valid = r_all[start:stop] > 0  # (c,)
        if not bool(valid.any()):
            continue
        rows = torch.arange(start, stop, device=refs.device)[valid]  # (c,)
        r = r_all[rows]  # (c,)
        k = min(available, max(int(r.max()), max(ks)))
        block = refs[position[rows]] if queries is None else queries[rows]  # (c, D)
        _, idx = topk_neighbors(block, refs, k, metric, position[rows] if queries is None else None)  # (c, k)
        rel = reference_labels[idx] == query_labels[rows, None]  # (c, k)
        rank = torch.arange(1, k + 1, device=rel.device, dtype=torch.float64)  # (k,)
        hits = rel.double().cumsum(1)  # (c, k): relevant among the first j
        recall = [hits[:, min(kk, k) - 1].gt(0).double() for kk in recall_ks]  # each (c,)
        r_prec = hits.gather(1, r[:, None] - 1).squeeze(1) / r  # (c,)
        map_r = (hits / rank * rel * (rank <= r[:, None])).sum(1) / r  # (c,)
        per_query.append(torch.stack([*recall, r_prec, map_r], dim=1))

    # math.fsum is correctly rounded: the result cannot depend on chunking, order or device
    columns = torch.cat(per_query).T.cpu().tolist() if per_query else [[] for _ in range(len(recall_ks) + 2)]
    count = len(columns[0])
    sums = [math.fsum(c) for c in columns]
    means = [100.0 * v / count if count else float("nan") for v in sums]
    out = {f"recall_at_{kk}": means[recall_ks.index(kk)] for kk in ks}
    out["precision_at_1"] = means[0]
    out["r_precision"], out["map_at_r"] = means[-2], means[-1]
    out["num_queries"], out["num_excluded_queries"] = float(count), float(n_q - count)
    return out
