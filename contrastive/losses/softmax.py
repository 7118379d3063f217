"""Softmax (InfoNCE-family) losses: NT-Xent, InfoNCE / MoCo, SupCon.

Each loss is ``mean_i [ lse_i - mean_{p in P(i)} s_ip ]`` with ``s = a . c / T`` on
L2-normalised vectors: a row log-sum-exp (plain or chunked, see ``logsumexp``)
minus a term linear in the inputs. Half precision inputs are computed in float32
and the result is float32; float64 stays float64.

Distributed (``gather=True``): each rank computes the loss of its LOCAL anchors
against the GATHERED candidates of all ranks (``gather_with_grad``), with the
self masks offset to this rank's rows; the result is scaled so that DDP's
gradient averaging gives exactly the single-process loss of the global batch.
Every rank must hold the same number of rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from contrastive.losses._common import (
    check_chunk_size,
    check_temperature,
    global_rows,
    l2_normalize,
    no_autocast,
    zero_loss,
)
from contrastive.losses.logsumexp import row_logsumexp
from contrastive.losses.metric import check_memory


def _check_pair(a: Tensor, b: Tensor, names: str) -> None:
    if a.ndim != 2 or a.shape != b.shape or len(a) == 0:
        raise ValueError(
            f"{names} must both be (N, D), N >= 1, with the same shape, got {tuple(a.shape)} and {tuple(b.shape)}."
        )


@no_autocast
def nt_xent(
    z1: Tensor,
    z2: Tensor,
    temperature: float | Tensor = 0.5,
    *,
    chunk_size: int | None = None,
    gather: bool = False,
) -> Tensor:
    """NT-Xent, the SimCLR loss (Chen et al. 2020).

    With ``z = normalize(cat([z1, z2]))`` (2N, D) and ``s_ij = z_i . z_j / T``:
    ``L = 1/2N sum_i [ log sum_{j != i} exp(s_ij) - s_i,pos(i) ]``, ``pos(i) = i +- N``,
    i.e. a 2N-way cross-entropy over the other 2N-1 samples (self masked with -inf).

    Args:
        z1: (N, D) first view.
        z2: (N, D) second view.
        temperature: T > 0 (float or 0-dim tensor, e.g. learnable).
        chunk_size: compute the (2N, 2N) logits this many rows at a time with
            memory linear in N (same value and gradient); None = plain.
        gather: under torch.distributed, local anchors against all ranks' views.

    Returns:
        Scalar loss, float32 (float64 for float64 inputs).
    """
    _check_pair(z1, z2, "z1 and z2")
    check_temperature(temperature)
    check_chunk_size(chunk_size)
    z1, z2 = l2_normalize(z1), l2_normalize(z2)  # (n, D)
    n = z1.shape[0]
    all1, offset = global_rows(z1, gather)  # (Wn, D)
    all2, _ = global_rows(z2, gather)  # (Wn, D)
    candidates = torch.cat([all1, all2])  # (2Wn, D)
    anchors = torch.cat([z1, z2]) / temperature  # (2n, D)
    own = torch.arange(offset, offset + n, device=z1.device)  # (n,)
    self_index = torch.cat([own, own + all1.shape[0]])  # (2n,)
    lse = row_logsumexp(anchors, candidates, self_index, chunk_size)  # (2n,)
    positive = (anchors * torch.cat([z2, z1])).sum(dim=1)  # (2n,)
    return (lse - positive).mean()


@no_autocast
def info_nce(
    query: Tensor,
    key: Tensor,
    negatives: Tensor | None = None,
    temperature: float | Tensor = 0.1,
    *,
    chunk_size: int | None = None,
    gather: bool = False,
) -> Tensor:
    """InfoNCE (Oord et al. 2018) in its in-batch and MoCo (He et al. 2020) forms.

    All vectors are L2-normalised. With ``negatives`` (MoCo):
    ``logits = [q_i . k_i, q_i . n_1, ..., q_i . n_M] / T`` (N, 1+M), target 0.
    Without (in-batch): ``logits = q . k^T / T`` (N, N), target the diagonal.
    ``L = mean_i [ logsumexp_j logits_ij - logits_i,target ]``.

    Args:
        query: (N, D).
        key: (N, D), key i is the positive of query i.
        negatives: (M, D) shared negatives (e.g. a MoCo queue), or None.
        temperature: T > 0.
        chunk_size: row chunking with linear memory (see ``nt_xent``); None = plain.
        gather: in-batch form under torch.distributed: local queries against the
            keys of all ranks. With ``negatives`` nothing is gathered (each query
            only sees its own key and the queue, identical on every rank), and the
            local mean is already exact.

    Returns:
        Scalar loss, float32 (float64 for float64 inputs).
    """
    _check_pair(query, key, "query and key")
    check_temperature(temperature)
    check_chunk_size(chunk_size)
    if negatives is not None and (negatives.ndim != 2 or negatives.shape[1] != query.shape[1]):
        raise ValueError(f"negatives must be (M, {query.shape[1]}), got {tuple(negatives.shape)}.")
    # One compute dtype for all (float64 if any input is): the matmuls need it.
    dtype = torch.promote_types(
        query.dtype, key.dtype if negatives is None else torch.promote_types(key.dtype, negatives.dtype)
    )
    query, key = l2_normalize(query.to(dtype)), l2_normalize(key.to(dtype))  # (n, D)
    anchors = query / temperature  # (n, D)
    positive = (anchors * key).sum(dim=1)  # (n,)
    if negatives is None:
        candidates, _ = global_rows(key, gather)  # (Wn, D)
        lse = row_logsumexp(anchors, candidates, None, chunk_size)  # (n,)
    else:
        negative_lse = row_logsumexp(anchors, l2_normalize(negatives.to(dtype)), None, chunk_size)  # (n,)
        lse = torch.logaddexp(positive, negative_lse)  # (n,) over the 1+M logits
    return (lse - positive).mean()


@no_autocast
def sup_con(
    z: Tensor,
    labels: Tensor,
    temperature: float | Tensor = 0.1,
    *,
    chunk_size: int | None = None,
    gather: bool = False,
    memory: Tensor | None = None,
    memory_labels: Tensor | None = None,
) -> Tensor:
    """Multi-positive contrastive loss, SupCon ``L_out`` (Khosla et al. 2020).

    ``z`` holds all views stacked; positives of anchor i are ``P(i) = {p != i :
    y_p = y_i}``, candidates ``A(i) = {a != i}``, ``s_ij = z_i . z_j / T`` (normalised):
    ``L = 1/|V| sum_{i in V} [ log sum_{a in A(i)} exp(s_ia) - 1/|P(i)| sum_{p in P(i)} s_ip ]``
    over the anchors ``V`` that have at least one positive (as pytorch-metric-learning; the
    authors' code averages over all anchors, an anchor without positives adding 0, and
    scales the loss by ``T / 0.07``: both only rescale a batch's loss. When every anchor has a
    positive, an SGD learning rate tuned on that code takes the same steps here times ``T / 0.07``).

    ``L_out`` (mean of log-probabilities, 1/|P| outside the log) rather than
    ``L_in`` (log of the mean probability): Khosla et al. (Table 2) found ``L_out``
    clearly better. Inside the log, 1/|P| becomes an additive constant that does
    not reach the gradient, so ``L_in`` does not normalise over the positives.

    With ``labels = cat([arange(N), arange(N)])`` and ``z = cat([z1, z2])`` this is
    ``nt_xent(z1, z2)``; with instance indices over V views it is multi-crop SimCLR.
    The positive term is linear: ``sum_p z_p = (class sum) - z_i``, so only the
    log-sum-exp needs the (M, M) matrix (chunked with ``chunk_size``).

    Args:
        z: (M, D) embeddings of all views.
        labels: (M,) integer class or instance labels.
        temperature: T > 0.
        chunk_size: row chunking with linear memory; None = plain.
        gather: under torch.distributed, local anchors against all ranks' rows,
            normalised by the global number of anchors with a positive.
        memory: (K, D) earlier embeddings, candidates (and positives, by label) of every
            anchor after the batch's rows; never anchors themselves (XBM, Wang et al. 2020).
        memory_labels: (K,) their labels.

    Returns:
        Scalar loss, float32 (float64 for float64 inputs); a graph-connected zero
        when no anchor has a positive (one sample, all labels distinct).
    """
    if z.ndim != 2 or labels.shape != z.shape[:1] or len(z) == 0:
        raise ValueError(f"z must be (M, D), M >= 1, and labels (M,), got {tuple(z.shape)} and {tuple(labels.shape)}.")
    check_temperature(temperature)
    check_chunk_size(chunk_size)
    check_memory(z, memory, memory_labels)
    z = l2_normalize(z)  # (m, D)
    m = z.shape[0]
    all_z, offset = global_rows(z, gather)  # (Wm, D)
    all_labels, _ = global_rows(labels, gather)  # (Wm,)
    batch = all_z.shape[0]  # Wm: the anchors of all ranks
    if memory is not None and memory_labels is not None and len(memory):  # an empty one: the plain loss, bitwise
        all_z = torch.cat([all_z, l2_normalize(memory).to(z.dtype)])  # (Wm + K, D)
        all_labels = torch.cat([all_labels, memory_labels.to(all_labels.device)])  # (Wm + K,)
    if all_z.shape[0] < 2:  # no candidate at all: the -inf row would give NaN gradients
        return zero_loss(z, temperature)
    _, inverse = torch.unique(all_labels, return_inverse=True)  # (Wm,) class ids 0..K-1
    counts = torch.bincount(inverse)  # (K,)
    class_sums = all_z.new_zeros(counts.shape[0], z.shape[1]).index_add(0, inverse, all_z)  # (K, D)
    own_class = inverse[offset : offset + m]  # (m,)
    num_positives = counts[own_class] - 1  # (m,)
    anchors = z / temperature  # (m, D)
    self_index = torch.arange(offset, offset + m, device=z.device)  # (m,)
    lse = row_logsumexp(anchors, all_z, self_index, chunk_size)  # (m,)
    positive_mean = (anchors * (class_sums[own_class] - z)).sum(dim=1) / num_positives.clamp_min(1)  # (m,)
    per_anchor = torch.where(num_positives > 0, lse - positive_mean, 0.0)  # (m,)
    # Divide by the global count of valid anchors over world size, so the mean of the
    # per-rank losses is the global mean (no communication: labels are gathered).
    world = batch // m
    num_valid = (counts[inverse[:batch]] > 1).sum().clamp_min(1)  # anchors with a positive, all ranks
    return per_anchor.sum() * world / num_valid
