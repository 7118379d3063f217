"""Exact top-k nearest-neighbour search over feature tensors, one chunk of queries at a time.

Shared by the kNN classifier (:mod:`.knn`) and the retrieval metrics (:mod:`.retrieval`).
The tie rule: among equal similarities the reference that comes first in
:func:`tie_order`, a fixed pseudo-random order of the references, ranks first, on every
device, for every ``k``. Not the lower index: data sets stored class by class (image
folders) would then rank a query's own class first among ties, and a collapsed network
(every similarity equal) would score MAP@R far above chance. The rule applies to the
*computed* similarities: a BLAS kernel may give two identical reference vectors dot
products one last bit apart, which then rank by value.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from contrastive.evaluation._common import check_finite
from contrastive.losses._common import l2_normalize, upcast

Metric = Literal["cosine", "euclidean"]


def prepare_features(features: Tensor, metric: Metric = "cosine") -> Tensor:
    """Cast to a float type fit for exact search and L2-normalise for the cosine metric.

    Half precision is promoted to float32; float32 and float64 are kept. The cosine rows are
    normalised as the losses do (:func:`~contrastive.losses._common.l2_normalize`): each row is
    divided by its max-abs entry first, so features of any finite scale (1e20 included) give
    the same neighbours.

    Args:
        features: (N, D) feature vectors.
        metric: ``"cosine"`` (rows scaled to unit length) or ``"euclidean"`` (unchanged).

    Returns:
        (N, D) floating tensor on the same device.

    Raises:
        ValueError: a row holds NaN/Inf (its rank would be meaningless).
    """
    if features.dim() != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}")
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    check_finite(features, "features")
    return l2_normalize(features) if metric == "cosine" else upcast(features)


def tie_order(n: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """The order in which tied references rank: a fixed permutation of ``range(n)`` (seed 0).

    Returns:
        ``perm`` (n,): ``perm[p]`` is the reference at tie position ``p``, and its inverse
        ``position`` (n,): ``position[j]`` is reference ``j``'s place. Search the references
        in ``perm`` order with :func:`topk_neighbors` (lower place first among ties).
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(device)
    position = torch.empty_like(perm).scatter_(0, perm, torch.arange(n, device=device))
    return perm, position


def similarity(query: Tensor, reference: Tensor, metric: Metric = "cosine") -> Tensor:
    """Similarity matrix, larger is closer.

    ``cosine``: ``s_ij = q_i . r_j`` (inputs already unit length, see :func:`prepare_features`).
    ``euclidean``: ``s_ij = -||q_i - r_j||^2``, so that ranking by ``s`` is ranking by distance.
    It is expanded as ``2 q.r - |q|^2 - |r|^2`` (one matrix product) after both sides are shifted
    by the references' mean: distances do not change, and the expansion's rounding error scales
    with the spread of the features instead of their distance from the origin.

    Args:
        query: (Q, D) prepared features.
        reference: (N, D) prepared features.
        metric: ``"cosine"`` or ``"euclidean"``.

    Returns:
        (Q, N) similarities.
    """
    if metric == "cosine":
        return query @ reference.T  # (Q, N)
    centre = reference.mean(0)  # (D,)
    query, reference = query - centre, reference - centre
    dots = query @ reference.T  # (Q, N)
    q_sq = query.pow(2).sum(1, keepdim=True)  # (Q, 1)
    r_sq = reference.pow(2).sum(1)  # (N,)
    return 2 * dots - q_sq - r_sq


def topk_lowest_index(sims: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k per row, sorted by value (descending) then by column index (ascending).

    ``torch.topk`` picks an arbitrary member of a tie; this fixes both which tied
    columns make the cut at the k-th place and their order inside the top k, so the
    result equals a stable descending sort of each row truncated to ``k``.

    Args:
        sims: (C, N) scores.
        k: 1 <= k <= N.

    Returns:
        values (C, k) and column indices (C, k).
    """
    values, indices = sims.topk(k, dim=1)  # (C, k), values exact, tied indices arbitrary
    kth = values[:, -1:]  # (C, 1)
    ragged = (sims >= kth).sum(1) > k  # rows where ties straddle the cut
    if bool(ragged.any()):
        rows = ragged.nonzero().squeeze(1)
        sub, cut = sims[rows], kth[rows]  # (c, N), (c, 1)
        above, level = sub > cut, sub == cut
        room = k - above.sum(1, keepdim=True)  # tied columns that fit, lowest index first
        keep = above | (level & (level.cumsum(1) <= room))  # exactly k per row
        indices[rows] = keep.nonzero()[:, 1].view(-1, k)
        values[rows] = sub.gather(1, indices[rows])
    by_index, perm = indices.sort(dim=1)
    values, order = values.gather(1, perm).sort(dim=1, descending=True, stable=True)
    return values, by_index.gather(1, order)


def topk_neighbors(
    query: Tensor,
    reference: Tensor,
    k: int,
    metric: Metric = "cosine",
    self_index: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` most similar references of each query, ties to the lower reference index
    (the callers pass the references in :func:`tie_order`).

    Args:
        query: (C, D) prepared query features (a chunk).
        reference: (N, D) prepared reference features.
        k: number of neighbours, 1 <= k <= N (N - 1 with ``self_index``).
        metric: ``"cosine"`` or ``"euclidean"``.
        self_index: (C,) if given, query row ``i`` is reference row ``self_index[i]`` and
            that row is excluded by index (leave-one-out), whatever its similarity.

    Returns:
        similarities (C, k) and reference indices (C, k), most similar first.
    """
    sims = similarity(query, reference, metric)  # (C, N)
    if self_index is not None:
        rows = torch.arange(query.shape[0], device=sims.device)
        sims[rows, self_index] = -torch.inf
    return topk_lowest_index(sims, k)
