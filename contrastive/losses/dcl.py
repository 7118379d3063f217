"""Decoupled contrastive learning: DCL and DCLW (Yeh et al. 2022, "Decoupled Contrastive Learning").

NT-Xent's denominator holds the positive pair, which couples the gradient of the negatives to
how easy the positive is (the paper's "negative-positive coupling"). DCL drops the positive
from the denominator; DCLW also weights the positive term by a von Mises-Fisher weight that
favours the hard positive pairs of the batch.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from contrastive.distributed import all_gather, rank
from contrastive.losses._common import (
    check_chunk_size,
    check_temperature,
    global_rows,
    l2_normalize,
    no_autocast,
    zero_loss,
)
from contrastive.losses.forms import LossForm
from contrastive.losses.logsumexp import row_logsumexp
from contrastive.losses.modules import _SoftmaxLoss
from contrastive.losses.softmax import _check_pair


def check_weight_sigma(weight_sigma: float | None) -> None:
    """Raise a ValueError unless ``weight_sigma`` is None (DCL) or a number > 0 (DCLW)."""
    if weight_sigma is not None and (isinstance(weight_sigma, bool) or not weight_sigma > 0):
        raise ValueError(
            f"weight_sigma must be None (DCL) or a number > 0 (DCLW; the paper uses 0.5), got {weight_sigma!r}."
        )


@torch.no_grad()
def dclw_weight(z1: Tensor, z2: Tensor, sigma: float, gather: bool = False) -> Tensor:
    """DCLW's weight of each positive pair, ``w_i = 2 - M softmax_i(z1_i . z2_i / sigma)``, not differentiated.

    The softmax runs over the M pairs of the (global, with ``gather``) batch, so the weights average
    to 1 over it; pairs less similar than the batch's typical pair weigh more than 1.

    Args:
        z1: (n, D) L2-normalised first view.
        z2: (n, D) L2-normalised second view.
        sigma: sigma > 0, the von Mises-Fisher scale (the paper: 0.5).
        gather: the softmax over all ranks' pairs (no-op without a process group).

    Returns:
        (n,) the weights of this rank's pairs.
    """
    similarity = (z1 * z2).sum(dim=1) / sigma  # (n,)
    n = similarity.shape[0]
    every, start = (all_gather(similarity), rank() * n) if gather else (similarity, 0)  # (M,)
    weights = 2 - every.shape[0] * torch.softmax(every, dim=0)  # (M,)
    return weights[start : start + n]


@no_autocast
def dcl(
    z1: Tensor,
    z2: Tensor,
    temperature: float | Tensor = 0.1,
    weight_sigma: float | None = None,
    *,
    chunk_size: int | None = None,
    gather: bool = False,
) -> Tensor:
    """Decoupled contrastive loss, DCL (and DCLW with ``weight_sigma``), Yeh et al. 2022, eq. 6 and 7.

    With ``z = normalize(cat([z1, z2]))`` (2N, D), ``s_ij = z_i . z_j / T`` and ``pos(i) = i +- N``:
    ``L = 1/2N sum_i [ log sum_{j not in {i, pos(i)}} exp(s_ij) - w_i s_i,pos(i) ]``,
    i.e. NT-Xent with each anchor's positive removed from its denominator, symmetric over the two
    views, mean over the 2N anchors. DCL: ``w_i = 1``. DCLW: ``w_i = 2 - N softmax_i(z1_i . z2_i / sigma)``
    over the batch's N pairs (the same weight for both views of a pair), a constant of the gradient
    as in the authors' code (:func:`dclw_weight`).

    Args:
        z1: (N, D) first view.
        z2: (N, D) second view.
        temperature: T > 0 (float or 0-dim tensor, e.g. learnable).
        weight_sigma: None for DCL; sigma > 0 for DCLW (the paper: 0.5).
        chunk_size: compute the logits this many rows at a time with memory linear in N (same
            value and gradient); None = plain.
        gather: under torch.distributed, local anchors against all ranks' views, and DCLW's
            softmax over the global batch; DDP's gradient averaging then gives the loss of one
            process holding the global batch.

    Returns:
        Scalar loss, float32 (float64 for float64 inputs); a graph-connected zero for a (global)
        batch of one pair, which has no negative.
    """
    _check_pair(z1, z2, "z1 and z2")
    check_temperature(temperature)
    check_weight_sigma(weight_sigma)
    check_chunk_size(chunk_size)
    z1, z2 = l2_normalize(z1), l2_normalize(z2)  # (n, D)
    n = z1.shape[0]
    all1, offset = global_rows(z1, gather)  # (Wn, D)
    all2, _ = global_rows(z2, gather)  # (Wn, D)
    if all1.shape[0] < 2:  # one pair: no negative, the log-sum-exp is over nothing
        return zero_loss(z1, z2, temperature)
    anchors = torch.cat([z1, z2]) / temperature  # (2n, D)
    own = torch.arange(offset, offset + n, device=z1.device)  # (n,)
    # Anchor i of either view excludes column own(i) in both views' candidates: its self in one, its positive
    # in the other. So the denominator is a sum of two single-exclusion log-sum-exps.
    excluded = torch.cat([own, own])  # (2n,)
    lse = torch.logaddexp(
        row_logsumexp(anchors, all1, excluded, chunk_size), row_logsumexp(anchors, all2, excluded, chunk_size)
    )  # (2n,)
    positive = (anchors * torch.cat([z2, z1])).sum(dim=1)  # (2n,)
    if weight_sigma is not None:
        positive = positive * dclw_weight(z1, z2, weight_sigma, gather).repeat(2)
    return (lse - positive).mean()


class DCL(_SoftmaxLoss):
    """DCL / DCLW; see :func:`dcl`. ``forward(z1, z2)``, both (N, D): plugs into SimCLR (``loss=dcl``).

    ``weight_sigma=None`` is DCL; a number (the paper: 0.5) is DCLW (``loss=dclw``).
    """

    input_forms: ClassVar[frozenset[LossForm]] = frozenset({"two_views"})

    def __init__(
        self,
        temperature: float = 0.1,
        weight_sigma: float | None = None,
        learnable: bool = False,
        chunk_size: int | None = None,
        gather: bool = False,
    ) -> None:
        check_weight_sigma(weight_sigma)
        super().__init__(temperature, learnable, chunk_size, gather)
        self.weight_sigma = weight_sigma

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return dcl(z1, z2, self.temperature(), self.weight_sigma, chunk_size=self.chunk_size, gather=self.gather)

    def extra_repr(self) -> str:
        return f"weight_sigma={self.weight_sigma}, {super().extra_repr()}"
