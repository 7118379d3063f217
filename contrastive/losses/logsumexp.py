"""Row log-sum-exp of a similarity matrix, plain or chunked with linear memory.

All softmax losses reduce to ``lse_i = log sum_{j != self(i)} exp(a_i . c_j)`` plus a
term linear in the inputs. The plain form materialises the (n, m) logits; the
chunked form computes them ``chunk_size`` rows at a time, saves only the inputs
and the (n,) result, and recomputes each chunk in backward, so memory is
O((n + m) D + chunk_size * m) instead of O(n m).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from contrastive.losses._common import no_autocast


def masked_logits(anchors: Tensor, candidates: Tensor, self_index: Tensor | None) -> Tensor:
    """``anchors @ candidates.T`` with entry ``(i, self_index[i])`` set to -inf.

    Args:
        anchors: (n, D), already divided by the temperature.
        candidates: (m, D).
        self_index: (n,) column of each anchor's own copy among the candidates, or None.

    Returns:
        (n, m) logits.
    """
    logits = anchors @ candidates.T  # (n, m)
    if self_index is None:
        return logits
    rows = torch.arange(anchors.shape[0], device=anchors.device)
    return logits.index_put((rows, self_index), logits.new_tensor(float("-inf")))


class _Ctx(Protocol):
    """What ``_ChunkedLogSumExp`` uses of its ``ctx``, as autograd documents it. torch's ``FunctionCtx`` type has
    neither ``saved_tensors`` nor ``needs_input_grad`` (the real ctx gets them from a C base class) and refuses the
    None that ``save_for_backward`` takes."""

    saved_tensors: tuple[Any, ...]  # what forward saved, in order
    needs_input_grad: tuple[bool, ...]
    chunk_size: int  # set in forward, read in backward

    def save_for_backward(self, *tensors: Tensor | None) -> None: ...


class _ChunkedLogSumExp(torch.autograd.Function):
    """Row log-sum-exp of ``masked_logits``, ``chunk_size`` rows at a time."""

    @staticmethod
    def forward(ctx: _Ctx, anchors: Tensor, candidates: Tensor, self_index: Tensor | None, chunk_size: int) -> Tensor:
        lse = anchors.new_empty(anchors.shape[0])  # (n,)
        for start in range(0, anchors.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            index = None if self_index is None else self_index[rows]
            lse[rows] = torch.logsumexp(masked_logits(anchors[rows], candidates, index), dim=1)
        ctx.save_for_backward(anchors, candidates, self_index, lse)
        ctx.chunk_size = chunk_size
        return lse

    @staticmethod
    @no_autocast  # a backward called inside an autocast block would otherwise run these matmuls in bf16
    def backward(ctx: _Ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        if torch.is_grad_enabled():  # backward(create_graph=True): once_differentiable would not say so
            raise RuntimeError(
                "the chunked softmax losses (chunk_size set) have no second derivative, which "
                "backward(create_graph=True) (a gradient penalty, MAML, Hessian-vector products) needs: "
                "pass chunk_size=None there."
            )
        # d lse_i / d logits_ij = softmax_ij, so dL/dlogits = grad_i * softmax_ij (0 at self).
        saved: tuple[Tensor, Tensor, Tensor | None, Tensor] = ctx.saved_tensors
        anchors, candidates, self_index, lse = saved
        chunk_size = ctx.chunk_size
        grad_anchors = torch.empty_like(anchors) if ctx.needs_input_grad[0] else None
        grad_candidates = torch.zeros_like(candidates) if ctx.needs_input_grad[1] else None
        for start in range(0, anchors.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            index = None if self_index is None else self_index[rows]
            logits = masked_logits(anchors[rows], candidates, index)  # (c, m)
            weights = torch.exp(logits - lse[rows, None]) * grad[rows, None]  # (c, m)
            if grad_anchors is not None:
                grad_anchors[rows] = weights @ candidates
            if grad_candidates is not None:
                grad_candidates.addmm_(weights.T, anchors[rows])
        return grad_anchors, grad_candidates, None, None


def row_logsumexp(
    anchors: Tensor, candidates: Tensor, self_index: Tensor | None = None, chunk_size: int | None = None
) -> Tensor:
    """``lse_i = log sum_{j != self_index[i]} exp(anchors_i . candidates_j)``.

    Args:
        anchors: (n, D), already divided by the temperature.
        candidates: (m, D).
        self_index: (n,) long, the excluded column of each row, or None.
        chunk_size: None for the plain form (materialises (n, m)); an int for the
            chunked form (same value and gradient, memory linear in n + m).

    Returns:
        (n,) log-sum-exp per anchor.
    """
    if chunk_size is None:
        return torch.logsumexp(masked_logits(anchors, candidates, self_index), dim=1)
    return _ChunkedLogSumExp.apply(anchors, candidates, self_index, chunk_size)
