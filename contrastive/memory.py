"""Cross-batch memory (XBM, Wang, Zhang, Huang & Scott 2020): the last M embeddings with their labels.

Past the first iterations a network's embeddings drift slowly, so embeddings of earlier batches are
nearly those the current network would compute: kept in a FIFO they give each anchor far more
positives and negatives than its batch holds, at the cost of one matrix product.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class CrossBatchMemory(nn.Module):
    """A FIFO of the M most recent embeddings (M, D) and their labels (M,), in buffers (checkpointed).

    Buffers: ``embeddings`` (M, D), ``labels`` (M,) long, ``ptr`` the slot the next row goes to, ``filled``
    the rows written so far (at most M). Rows are detached and stored in the buffer's dtype. Under DDP the
    caller enqueues the gathered global batch, so every rank holds the same memory.

    Args:
        size: M >= 1.
        dim: D >= 1, the embedding width.
    """

    embeddings: Tensor  # buffers, registered in __init__
    labels: Tensor
    ptr: Tensor
    filled: Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"memory size and dim must be >= 1, got size={size}, dim={dim}")
        self.register_buffer("embeddings", torch.zeros(size, dim))
        self.register_buffer("labels", torch.zeros(size, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.embeddings.shape[0]

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, labels: Tensor) -> None:
        """Write ``embeddings`` (n, D) and ``labels`` (n,) at ``ptr, ptr+1, ...`` (mod M); of more than M rows
        only the last M stay (as if written one by one). No host synchronisation."""
        if (
            embeddings.ndim != 2
            or embeddings.shape[1] != self.embeddings.shape[1]
            or labels.shape != embeddings.shape[:1]
        ):
            raise ValueError(
                f"the memory takes embeddings (n, {self.embeddings.shape[1]}) and labels (n,), got "
                f"{tuple(embeddings.shape)} and {tuple(labels.shape)}"
            )
        n = embeddings.shape[0]
        kept = slice(max(n - self.size, 0), n)  # the last min(n, M) rows
        start = self.ptr + kept.start  # the slot row kept.start would have taken
        slots = (start + torch.arange(n - kept.start, device=self.ptr.device)) % self.size  # (m,)
        self.embeddings.index_copy_(0, slots, embeddings.detach()[kept].to(self.embeddings.dtype))
        self.labels.index_copy_(0, slots, labels[kept].to(self.labels.device, torch.long))
        self.ptr.copy_((self.ptr + n) % self.size)
        self.filled.copy_((self.filled + n).clamp(max=self.size))

    def forward(self) -> tuple[Tensor, Tensor]:
        """The rows written so far, (F, D) and (F,), F <= M: copies, so that enqueueing after the loss (before its
        backward) cannot modify a tensor autograd saved. One host synchronisation (F) until the memory is full."""
        filled = self.size if self._full else int(self.filled)
        self._full = filled == self.size
        return self.embeddings[:filled].clone(), self.labels[:filled].clone()

    _full = False  # a plain flag (not state): once full, the memory stays full and F needs no sync

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._full = False  # a checkpoint may hold a memory not yet full

    def extra_repr(self) -> str:
        return f"size={self.embeddings.shape[0]}, dim={self.embeddings.shape[1]}"
