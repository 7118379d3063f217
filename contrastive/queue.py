"""The MoCo queue: a FIFO of the K most recent keys, held in buffers (He et al. 2020, sec. 3.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KeyQueue(nn.Module):
    """K keys of dimension D, oldest overwritten first; state in buffers, so checkpoints hold it.

    Buffers: ``keys`` (K, D), L2-normalised rows (random unit vectors at start, as
    MoCo); ``ptr`` (long scalar), the slot the next key goes to.
    ``enqueue`` wraps around, so K need not be a multiple of the number of keys per
    step; given more than K keys, only the newest K survive (as if enqueued one by one).

    Args:
        size: K, the number of negatives.
        dim: D, the key dimension.
    """

    keys: Tensor  # buffers, registered in __init__
    ptr: Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"queue size and dim must be >= 1, got size={size}, dim={dim}")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write ``keys`` (n, D) at ``ptr, ptr+1, ...`` (mod K) and advance ``ptr`` by n (mod K).

        The keys are detached and cast to the queue's dtype; no host synchronisation.
        """
        if keys.ndim != 2 or keys.shape[1] != self.keys.shape[1]:
            raise ValueError(f"keys must be (n, {self.keys.shape[1]}), got {tuple(keys.shape)}")
        n = keys.shape[0]
        kept = keys.detach()[-self.size :]  # (m, D), m = min(n, K): the last K of n
        start = self.ptr + (n - kept.shape[0])  # the slot key n-m would have taken
        slots = (start + torch.arange(kept.shape[0], device=self.ptr.device)) % self.size  # (m,)
        self.keys.index_copy_(0, slots, kept.to(self.keys.dtype))
        self.ptr.copy_((self.ptr + n) % self.size)

    def forward(self) -> Tensor:
        """The current negatives (K, D): a detached copy, so that enqueueing after the
        loss (before its backward) cannot modify a tensor autograd saved."""
        return self.keys.detach().clone()

    def extra_repr(self) -> str:
        return f"size={self.keys.shape[0]}, dim={self.keys.shape[1]}"
