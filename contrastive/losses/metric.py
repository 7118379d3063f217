"""Distance-based metric losses: triplet margin (with mining) and contrastive pair loss.

Defaults: embeddings L2-normalised (``normalize=True``), plain Euclidean distance
(``squared=False``), computed difference-wise (no ``|a|^2 + |b|^2 - 2ab``
cancellation, exact zeros on the diagonal, zero gradient at zero distance).
Half precision inputs are computed in float32.

Distributed (``gather=True``): each rank mines for its LOCAL anchors among the
GATHERED embeddings and labels of all ranks, and divides its sum by the global
number of terms over world size (one all-reduce of a count), so that DDP's
gradient averaging gives exactly the single-process loss of the global batch.

Cross-batch memory (``memory``, ``memory_labels``; XBM, Wang et al. 2020): earlier
embeddings (M, D) and their labels (M,) join the candidates after the batch's, so each
anchor of the batch mines its positives and negatives among batch + memory (its own row
of the batch excluded; the memory is the same on every rank and is not gathered).
"""

from __future__ import annotations

import torch
from torch import Tensor

from contrastive.distributed import all_reduce_sum, world_size
from contrastive.losses._common import check_margin, global_rows, l2_normalize, max_abs_scale, no_autocast, upcast

MINING = ("all", "batch_hard", "semi_hard")


def check_triplet_args(margin: float, mining: str) -> None:
    """Raise a ValueError for a negative margin or an unknown mining strategy."""
    check_margin("margin", margin)
    if mining not in MINING:
        raise ValueError(f"mining must be one of {MINING}, got {mining!r}.")


def check_pair_margins(pos_margin: float, neg_margin: float) -> None:
    """Raise a ValueError unless ``0 <= pos_margin < neg_margin``."""
    check_margin("pos_margin", pos_margin)
    check_margin("neg_margin", neg_margin)
    if not neg_margin > pos_margin:
        raise ValueError(
            f"neg_margin ({neg_margin}) must be larger than pos_margin ({pos_margin}); "
            "otherwise a pair can be penalised whichever its label."
        )


def pairwise_distance(x: Tensor, y: Tensor | None = None, *, squared: bool = False) -> Tensor:
    """Euclidean distance matrix ``d_ij = ||x_i - y_j||`` (or its square); ``y = x`` if None.

    Both are divided by their joint max-abs entry (detached; distance is homogeneous)
    so that huge or tiny inputs neither overflow nor underflow.

    Args:
        x: (n, D) float32/float64.
        y: (m, D) or None.
        squared: return ``d_ij^2``.

    Returns:
        (n, m) distances; zero diagonal when ``y`` is None.
    """
    y = x if y is None else y
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be (n, D) and (m, D), got {tuple(x.shape)} and {tuple(y.shape)}.")
    if not len(x) or not len(y):
        return x.new_zeros(len(x), len(y))
    scale = torch.maximum(max_abs_scale(x), max_abs_scale(y))
    d = torch.cdist(x / scale, y / scale, compute_mode="donot_use_mm_for_euclid_dist") * scale  # (n, m)
    return d * d if squared else d


def check_memory(embeddings: Tensor, memory: Tensor | None, memory_labels: Tensor | None) -> None:
    """Raise a ValueError unless the memory is absent, or (M, D) embeddings with (M,) labels."""
    if (memory is None) != (memory_labels is None):
        raise ValueError("give memory and memory_labels together (the earlier embeddings and their labels), or neither")
    if memory is not None and memory_labels is not None:
        if memory.ndim != 2 or memory.shape[1] != embeddings.shape[-1] or memory_labels.shape != memory.shape[:1]:
            raise ValueError(
                f"memory must be (M, {embeddings.shape[-1]}) with memory_labels (M,), got {tuple(memory.shape)} "
                f"and {tuple(memory_labels.shape)}"
            )


def _distances_and_masks(
    embeddings: Tensor,
    labels: Tensor,
    squared: bool,
    normalize: bool,
    gather: bool,
    memory: Tensor | None = None,
    memory_labels: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Distances of the local anchors to all candidates (n, Wn + M), positive mask (same label,
    not itself) and negative mask (other label); W = 1 without ``gather``, M = 0 without a memory."""
    if embeddings.ndim != 2 or labels.shape != embeddings.shape[:1] or len(embeddings) == 0:
        raise ValueError(
            f"embeddings must be (n, D), n >= 1, and labels (n,), got {tuple(embeddings.shape)} and "
            f"{tuple(labels.shape)}."
        )
    check_memory(embeddings, memory, memory_labels)
    x = l2_normalize(embeddings) if normalize else upcast(embeddings)  # (n, D)
    candidates, offset = global_rows(x, gather)  # (Wn, D)
    all_labels, _ = global_rows(labels, gather)  # (Wn,)
    if memory is not None and memory_labels is not None and len(memory):  # an empty one: the plain loss, bitwise
        stored = l2_normalize(memory) if normalize else upcast(memory)  # (M, D)
        candidates = torch.cat([candidates, stored.to(x.dtype)])  # (Wn + M, D)
        all_labels = torch.cat([all_labels, memory_labels.to(all_labels.device)])  # (Wn + M,)
    d = pairwise_distance(x, candidates, squared=squared)  # (n, Wn + M)
    same = labels[:, None] == all_labels[None, :]  # (n, Wn + M)
    columns = torch.arange(len(all_labels), device=labels.device)
    itself = columns[None, :] == torch.arange(offset, offset + len(labels), device=labels.device)[:, None]
    return d, same & ~itself, ~same


def _masked_mean(values: Tensor, mask: Tensor, gather: bool) -> Tensor:
    """Mean of ``values`` where ``mask``; a graph-connected 0 when the mask is empty.

    With ``gather``: this rank's sum times W over the count of all ranks, whose mean
    over ranks is the mean over the global batch.
    """
    count, world = mask.sum(), 1
    if gather:
        count, world = all_reduce_sum(count), world_size()
    return torch.where(mask, values, 0.0).sum() * world / count.clamp_min(1)


@no_autocast
def triplet_margin(
    embeddings: Tensor,
    labels: Tensor,
    margin: float = 0.2,
    mining: str = "batch_hard",
    squared: bool = False,
    normalize: bool = True,
    *,
    soft: bool = False,
    gather: bool = False,
    memory: Tensor | None = None,
    memory_labels: Tensor | None = None,
) -> Tensor:
    """Triplet margin loss ``[d(a, p) - d(a, n) + margin]_+`` with in-batch mining.

    ``soft=True`` replaces the hinge ``[x]_+`` by ``softplus(x) = log(1 + e^x)``: the soft
    margin of Hermans et al. 2017 (their best variant, with ``margin=0``), which keeps
    pulling already-separated triplets instead of stopping at the margin
    (pytorch-metric-learning's ``smooth_loss`` is the same with a margin).

    Mining:
        ``"all"``: every valid triplet (a, p, n); the mean is over the triplets
            with a positive loss (pytorch-metric-learning's AvgNonZero), as
            Hermans et al. 2017 found necessary for batch-all ("BA != 0"): easy
            triplets would otherwise dilute the gradient as training progresses.
        ``"batch_hard"``: per anchor, the farthest positive and the closest
            negative (Hermans et al. 2017); mean over anchors having both.
        ``"semi_hard"``: per anchor-positive pair, the closest negative that is
            still farther than the positive, ``d(a,p) < d(a,n)`` (semi-hard when
            also inside the margin; FaceNet, Schroff et al. 2015); when no
            negative is farther, the farthest negative (as TensorFlow's
            ``triplet_semihard_loss``). Mean over all anchor-positive pairs whose
            anchor has a negative.

    Args:
        embeddings: (n, D).
        labels: (n,) class labels.
        margin: >= 0; 0.2 suits L2-normalised embeddings (distances in [0, 2]).
        mining: "all", "batch_hard" or "semi_hard".
        squared: use squared Euclidean distances.
        normalize: L2-normalise the embeddings first (default True).
        soft: softplus instead of the hinge (see above).
        gather: under torch.distributed, mine the local anchors' positives and
            negatives among all ranks' embeddings (see the module docstring).
        memory: (M, D) earlier embeddings, more candidates for every anchor (XBM); the
            "all" and "semi_hard" minings hold an (n, Wn + M, Wn + M) tensor, so a large
            memory suits "batch_hard".
        memory_labels: (M,) their labels.

    Returns:
        Scalar loss (float32, float64 for float64 inputs); a graph-connected zero
        when there is no valid triplet.
    """
    check_triplet_args(margin, mining)
    d, positive, negative = _distances_and_masks(embeddings, labels, squared, normalize, gather, memory, memory_labels)

    def hinge(x: Tensor) -> Tensor:
        return torch.nn.functional.softplus(x + margin) if soft else torch.relu(x + margin)

    if mining == "all":
        per_triplet = hinge(d[:, :, None] - d[:, None, :])  # (a, p, n)
        valid = positive[:, :, None] & negative[:, None, :]  # (a, p, n)
        return _masked_mean(per_triplet, valid if soft else valid & (per_triplet > 0), gather)  # soft: all > 0
    inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
    if mining == "batch_hard":
        hardest_positive = torch.where(positive, d, -inf).amax(dim=1)  # (a,)
        hardest_negative = torch.where(negative, d, inf).amin(dim=1)  # (a,)
        per_anchor = hinge(hardest_positive - hardest_negative)  # (a,)
        return _masked_mean(per_anchor, positive.any(dim=1) & negative.any(dim=1), gather)
    farther = negative[:, None, :] & (d[:, None, :] > d[:, :, None])  # (a, p, n)
    closest_farther = torch.where(farther, d[:, None, :], inf).amin(dim=2)  # (a, p)
    farthest = torch.where(negative, d, -inf).amax(dim=1, keepdim=True)  # (a, 1)
    chosen = torch.where(farther.any(dim=2), closest_farther, farthest)  # (a, p)
    per_pair = hinge(d - chosen)  # (a, p)
    return _masked_mean(per_pair, positive & negative.any(dim=1, keepdim=True), gather)


@no_autocast
def contrastive_margin(
    embeddings: Tensor,
    labels: Tensor,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    squared: bool = False,
    normalize: bool = True,
    *,
    gather: bool = False,
    memory: Tensor | None = None,
    memory_labels: Tensor | None = None,
) -> Tensor:
    """Contrastive pair loss (Hadsell, Chopra & LeCun 2006) over all pairs in the batch.

    ``L = mean_{(i,j) pos} 1/2 [d_ij - pos_margin]_+^2 + mean_{(i,j) neg} 1/2 [neg_margin - d_ij]_+^2``.
    With ``pos_margin = 0`` the positive term is Hadsell's ``D^2 / 2``. Positive and
    negative pairs are averaged separately (each absent set contributes 0): with
    P classes x K samples there are (P-1)K negatives per (K-1) positives, and one
    pooled mean would let the negatives drown the positives.

    Args:
        embeddings: (n, D).
        labels: (n,) class labels.
        pos_margin: >= 0, positives closer than this cost nothing (default 0).
        neg_margin: > pos_margin, negatives are pushed past it (default 1.0,
            for L2-normalised embeddings whose distances lie in [0, 2]).
        squared: use squared Euclidean distances.
        normalize: L2-normalise the embeddings first (default True).
        gather: under torch.distributed, pairs of the local rows with all ranks' rows.
        memory: (M, D) earlier embeddings, paired with every row of the batch too (XBM).
        memory_labels: (M,) their labels.

    Returns:
        Scalar loss; a graph-connected zero when there are no pairs.
    """
    check_pair_margins(pos_margin, neg_margin)
    d, positive, negative = _distances_and_masks(embeddings, labels, squared, normalize, gather, memory, memory_labels)
    pull = 0.5 * torch.relu(d - pos_margin) ** 2  # (n, Wn)
    push = 0.5 * torch.relu(neg_margin - d) ** 2  # (n, Wn)
    return _masked_mean(pull, positive, gather) + _masked_mean(push, negative, gather)
