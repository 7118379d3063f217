"""Label-free monitors of an embedding: collapse, effective rank, alignment and uniformity.

Each takes embeddings ``z`` (n, d) and normalises every row to unit length first, so the figures
do not depend on the scale of the features. They need no labels: the run logs them on a fixed
sample of training images when there is no labelled evaluation set (and beside kNN when there is).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _unit_rows(z: Tensor, name: str = "z") -> Tensor:
    """``z`` (n, d) with each row scaled to unit L2 norm, in float32 at least (float64 stays)."""
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"{name} must be an (n, d) tensor with n >= 2 rows, got shape {tuple(z.shape)}")
    if not z.is_floating_point() or z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    return F.normalize(z, dim=1)


def embedding_std(z: Tensor) -> Tensor:
    """Mean over dimensions of the standard deviation over samples of unit-length embeddings.

    ``mean_j std_i(u_ij)`` with ``u_i = z_i / ||z_i||`` (unbiased std): 0 when every row is the same
    (complete collapse), about ``1 / sqrt(d)`` for rows spread over the sphere (SimSiam, Chen & He 2021).

    Args:
        z: (n, d), n >= 2.

    Returns:
        A scalar tensor.
    """
    return _unit_rows(z).std(dim=0).mean()


def rank_me(z: Tensor, eps: float = 1e-7) -> Tensor:
    """Effective rank of unit-length embeddings (RankMe, Garrido et al. 2023).

    ``exp(-sum_k p_k log p_k)`` with ``p_k = s_k / sum(s) + eps`` over the singular values ``s`` of
    the (n, d) matrix of unit rows: 1 when all rows are equal, ``k`` (within eps) for k orthonormal rows,
    at most ``min(n, d)``.

    Args:
        z: (n, d), n >= 2.
        eps: added to each ``p_k`` so that ``log`` of a zero singular value is finite.

    Returns:
        A scalar tensor.
    """
    s = torch.linalg.svdvals(_unit_rows(z))  # (min(n, d),)
    p = s / s.sum() + eps
    return torch.exp(-(p * p.log()).sum())


def alignment(z1: Tensor, z2: Tensor, alpha: float = 2.0) -> Tensor:
    """Mean distance of positive pairs of unit-length embeddings (Wang & Isola 2020).

    ``mean_i ||u1_i - u2_i||^alpha``: 0 when both views embed alike, 4 (alpha=2) when opposite.

    Args:
        z1: (n, d) embeddings of one view.
        z2: (n, d) embeddings of the other view, row ``i`` the positive of ``z1``'s row ``i``.
        alpha: the exponent.

    Returns:
        A scalar tensor.
    """
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape (pairs by row): {tuple(z1.shape)} vs {tuple(z2.shape)}")
    u1, u2 = _unit_rows(z1, "z1"), _unit_rows(z2, "z2")
    return (u1 - u2).norm(dim=1).pow(alpha).mean()


def uniformity(z: Tensor, t: float = 2.0) -> Tensor:
    """How evenly unit-length embeddings cover the sphere (Wang & Isola 2020).

    ``log mean_{i<j} exp(-t ||u_i - u_j||^2)``: 0 when all rows are equal, lower (more negative)
    when spread; ``-4t`` at best for two antipodal rows.

    Args:
        z: (n, d), n >= 2.
        t: the temperature of the Gaussian kernel.

    Returns:
        A scalar tensor.
    """
    u = _unit_rows(z)
    sq = torch.pdist(u).pow(2)  # (n (n - 1) / 2,): the pairs i < j
    return torch.logsumexp(-t * sq, dim=0) - torch.log(torch.tensor(float(len(sq)), dtype=sq.dtype))


def label_free_monitors(z: Tensor, z2: Tensor | None = None) -> dict[str, float]:
    """All the monitors of one embedding as plain floats: ``embedding_std``, ``rank_me``, ``uniformity``,
    and ``alignment`` when a second view ``z2`` (n, d) of the same images is given."""
    out = {"embedding_std": float(embedding_std(z)), "rank_me": float(rank_me(z)), "uniformity": float(uniformity(z))}
    if z2 is not None:
        out["alignment"] = float(alignment(z, z2))
    return out
