"""Collectives that keep gradients, and no-ops in a single process.

The softmax losses use :func:`gather_with_grad` to see the candidates of every rank
while computing the loss only for their local anchors. With DDP's gradient
averaging this reproduces, to round-off, one process holding the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is up."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group; 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Rank of this process in the default group; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


@torch.no_grad()
def all_gather(x: Tensor) -> Tensor:
    """``cat([x_0, ..., x_{W-1}])`` along dim 0 over ranks, (W*n, ...), without gradient.

    Identity in one process. Every rank must pass the same shape (pad first otherwise).
    For what carries no gradient (MoCo's keys, evaluation features); see :func:`gather_with_grad`.
    """
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the gradient over ranks."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:
        return all_gather(x)  # (W*n, ...)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        # Every rank's loss depends on every rank's rows: this rank's rows receive
        # the sum of the gradients that all ranks computed for them.
        # A copy: autograd may hand the same gradient tensor to other inputs (the other
        # operand of an add), which an in-place all-reduce would scale by W.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        n = grad.shape[0] // world_size()
        return grad[rank() * n : (rank() + 1) * n]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0, differentiably.

    Forward: ``cat([x_0, ..., x_{W-1}])``, shape (W*n, ...). Backward: the incoming
    gradient is summed over ranks (all-reduce) and this rank's slice
    ``[rank*n, (rank+1)*n)`` is returned. Every rank must pass the same shape.
    Identity in one process or without an initialised process group.

    Args:
        x: (n, ...) local tensor; integer tensors (labels) are gathered too.

    Returns:
        (W*n, ...) tensor; rows ``[rank*n, (rank+1)*n)`` are this rank's ``x``.
    """
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over ranks (a new tensor, no gradient); ``x`` itself in one process."""
    if world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_true(flags: Tensor) -> Tensor:
    """Elementwise AND of boolean ``flags`` over ranks; ``flags`` itself in one process.

    On a GPU the all-reduce is queued on the stream like any kernel: the host does not wait.
    """
    if world_size() == 1:
        return flags
    x = flags.to(torch.uint8)  # NCCL reduces no bool
    dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return x.bool()
