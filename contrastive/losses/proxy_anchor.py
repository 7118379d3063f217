"""Proxy-Anchor loss (Kim, Kim, Cho & Kwak 2020): one learned proxy per class as the anchor.

Each proxy pulls all the batch's embeddings of its class and pushes all the others, weighted by
their hardness through a log-sum-exp; cost linear in the batch (N x C similarities), no mining.
Half precision inputs are computed in float32; float64 stays float64.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from contrastive.losses._common import check_margin, compute_dtype, global_rows, l2_normalize, no_autocast
from contrastive.losses.forms import LossForm


def check_proxy_anchor_args(margin: float, alpha: float) -> None:
    """Raise a ValueError for a negative margin or a non-positive alpha."""
    check_margin("margin", margin)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}: it scales the similarities (the paper's 32)")


def _log1p_sum_exp(logits: Tensor, mask: Tensor) -> Tensor:
    """``log(1 + sum_{i: mask_ic} exp(logits_ic))`` per column (C,), as a log-sum-exp with a zero logit.

    The zero column keeps the log-sum-exp finite where the mask is empty (the term is then 0 with a zero
    gradient, never the NaN of a log-sum-exp over nothing but -inf).
    """
    masked = torch.where(mask, logits, -torch.inf)  # (N, C)
    return torch.cat([masked, logits.new_zeros(1, logits.shape[1])]).logsumexp(dim=0)  # (C,)


@no_autocast
def proxy_anchor(
    embeddings: Tensor,
    labels: Tensor,
    proxies: Tensor,
    margin: float = 0.1,
    alpha: float = 32.0,
    *,
    gather: bool = False,
) -> Tensor:
    """Proxy-Anchor loss (Kim et al. 2020, eq. 4) on cosine similarity.

    ``L = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x, p) - margin)))
        + 1/|P|  sum_{p in P}  log(1 + sum_{x in X_p-} exp( alpha (s(x, p) + margin)))``

    with ``P`` all proxies, ``P+`` those with a positive in the batch, ``X_p+`` the embeddings of
    proxy p's class, ``X_p-`` the others, and ``s`` the cosine similarity.

    Args:
        embeddings: (N, D).
        labels: (N,) class ids in ``[0, C)``.
        proxies: (C, D), one per class (a parameter of :class:`ProxyAnchor`).
        margin: delta >= 0 (the paper's 0.1).
        alpha: the scale > 0 (the paper's 32).
        gather: under torch.distributed, every rank computes the loss of the global batch (all ranks'
            embeddings and labels, gathered with gradients). The loss is not a mean over samples, so
            this is what makes DDP's averaged gradient that of one process holding the global batch:
            each rank's rows receive the sum of W equal gradients, which the average divides by W.

    Returns:
        Scalar loss, float32 (float64 for float64 inputs). Every batch has one: a proxy with no
        positive in the batch adds nothing to the first term, one with no negative nothing to the second.
    """
    if embeddings.ndim != 2 or labels.shape != embeddings.shape[:1] or len(embeddings) == 0:
        raise ValueError(
            f"embeddings must be (N, D), N >= 1, and labels (N,), got {tuple(embeddings.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if proxies.ndim != 2 or proxies.shape[1] != embeddings.shape[1]:
        raise ValueError(f"proxies must be (C, {embeddings.shape[1]}), got {tuple(proxies.shape)}")
    check_proxy_anchor_args(margin, alpha)
    dtype = torch.promote_types(compute_dtype(embeddings), compute_dtype(proxies))
    x, _ = global_rows(l2_normalize(embeddings.to(dtype)), gather)  # (N, D), N over all ranks
    y, _ = global_rows(labels, gather)  # (N,)
    cos = x @ l2_normalize(proxies.to(dtype)).T  # (N, C)
    positive = y[:, None] == torch.arange(proxies.shape[0], device=y.device)  # (N, C)
    pull = _log1p_sum_exp(-alpha * (cos - margin), positive)  # (C,), 0 for a proxy without positives
    push = _log1p_sum_exp(alpha * (cos + margin), ~positive)  # (C,)
    with_positive = positive.any(dim=0).sum()  # |P+|
    return pull.sum() / with_positive.clamp_min(1) + push.mean()


class ProxyAnchor(nn.Module):
    """Proxy-Anchor loss with its proxies, a parameter trained with the network; see :func:`proxy_anchor`.

    ``forward(embeddings, labels)``, (N, D) and (N,) class ids. The proxies start as the authors'
    (Kaiming normal, fan-out) and learn ``lr_scale`` times as fast as the network (the paper's 100):
    the pipelines' optimiser gives the parameters of a module with an ``lr_scale`` attribute their
    own parameter groups at that multiple of the rate.

    Args:
        embed_dim: D.
        num_classes: C, one proxy each.
        margin: delta >= 0.
        alpha: scale > 0.
        lr_scale: > 0, the proxies' learning rate over the network's.
        gather: see :func:`proxy_anchor`.
    """

    input_forms: ClassVar[frozenset[LossForm]] = frozenset({"embeddings_labels"})

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        margin: float = 0.1,
        alpha: float = 32.0,
        lr_scale: float = 100.0,
        gather: bool = False,
    ) -> None:
        super().__init__()
        if embed_dim < 1 or num_classes < 2:
            raise ValueError(f"need embed_dim >= 1 and num_classes >= 2, got {embed_dim} and {num_classes}.")
        check_proxy_anchor_args(margin, alpha)
        if not (lr_scale > 0 and math.isfinite(lr_scale)):
            raise ValueError(
                f"lr_scale must be a finite number > 0, got {lr_scale}: the proxies' rate over the network's"
            )
        self.margin, self.alpha, self.lr_scale, self.gather = margin, alpha, lr_scale, gather
        self.proxies = nn.Parameter(nn.init.kaiming_normal_(torch.empty(num_classes, embed_dim), mode="fan_out"))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return proxy_anchor(embeddings, labels, self.proxies, self.margin, self.alpha, gather=self.gather)

    def extra_repr(self) -> str:
        return (
            f"classes={self.proxies.shape[0]}, dim={self.proxies.shape[1]}, margin={self.margin}, "
            f"alpha={self.alpha}, lr_scale={self.lr_scale}, gather={self.gather}"
        )
