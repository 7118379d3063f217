"""Shared pieces of the losses: dtype policy, safe normalisation, validation, temperature."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastive.distributed import gather_with_grad, rank

P = ParamSpec("P")
R = TypeVar("R")


def no_autocast(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` with autocast off, so that its fp32 matmuls stay fp32 under mixed precision."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def upcast(x: Tensor) -> Tensor:
    """Cast half precision (fp16/bf16) up to float32; float32/float64 unchanged."""
    return x.to(compute_dtype(x))


def l2_normalize(x: Tensor) -> Tensor:
    """Row-wise ``x / ||x||`` in fp32 (or fp64), safe for any finite scale.

    The rows are first divided by their max-abs entry (detached, so the gradient is
    that of plain normalisation, which is scale invariant): norms of 1e30 or 1e-30
    neither overflow nor underflow in float32. Zero rows stay zero, with a finite gradient.

    Args:
        x: (n, D).

    Returns:
        (n, D) unit rows (zero rows stay zero), dtype ``compute_dtype(x)``.
    """
    x = upcast(x)
    # After the division every non-zero row has norm >= 1, so eps = 0.5 never touches
    # them; a zero row gets the gradient of the identity (not F.normalize's 1/1e-12).
    return F.normalize(x / max_abs_scale(x, dim=1), dim=1, eps=0.5)


def max_abs_scale(x: Tensor, dim: int | None = None) -> Tensor:
    """Detached max-abs of ``x`` (over ``dim``, kept; over all if None), 1 where it is 0.

    Dividing by it brings any finite input to max-abs 1 without changing directions;
    zero rows keep a scale of 1, so their gradient stays that of ``F.normalize``.
    """
    top = x.detach().abs()
    top = top.amax() if dim is None else top.amax(dim=dim, keepdim=True)
    return torch.where(top > 0, top, torch.ones_like(top))


def zero_loss(*tensors: Tensor | float) -> Tensor:
    """A scalar 0 connected to the graph of every floating tensor given.

    ``(x * 0).sum()`` rather than ``x.sum() * 0``: the sum of large half-precision
    values could overflow to inf, and ``inf * 0`` is NaN.
    """
    parts = [(upcast(t) * 0).sum() for t in tensors if isinstance(t, Tensor) and t.is_floating_point()]
    return torch.stack(parts).sum() if parts else torch.zeros(())


def check_temperature(temperature: float | Tensor) -> float | Tensor:
    """Raise a ValueError for a non-positive float temperature, or a tensor of more than one element;
    a tensor's value passes unchecked (no device sync)."""
    if isinstance(temperature, Tensor) and temperature.numel() != 1:
        raise ValueError(
            f"temperature must be one number (a 0-dim tensor if learnable), got a tensor of shape "
            f"{tuple(temperature.shape)}: it would be broadcast over the logits' columns"
        )
    if not isinstance(temperature, Tensor) and (
        isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0
    ):
        raise ValueError(
            f"temperature must be a number > 0, got {temperature!r}; logits are divided by it "
            "(typical values: 0.05 to 0.5)."
        )
    return temperature


def check_margin(name: str, value: float) -> None:
    """Raise a ValueError for a negative (or NaN) margin."""
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}; pass a non-negative distance margin.")


def check_chunk_size(chunk_size: int | None) -> None:
    """Raise a ValueError unless ``chunk_size`` is None or a positive int."""
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None (no chunking) or a positive int, got {chunk_size!r}.")


def global_rows(x: Tensor, gather: bool) -> tuple[Tensor, int]:
    """All ranks' rows and the offset of this rank's rows in them.

    Args:
        x: (n, ...) local rows.
        gather: gather across processes (no-op without a process group).

    Returns:
        ((W*n, ...) rows, rank * n); ``(x, 0)`` when ``gather`` is False.
    """
    if not gather:
        return x, 0
    return gather_with_grad(x), rank() * x.shape[0]


class Temperature(nn.Module):
    """A softmax temperature, fixed or learnable.

    Fixed: a non-persistent buffer (the config, not an old checkpoint, decides it).
    Learnable: as in CLIP (Radford et al. 2021), the parameter is the log logit
    scale ``log(1/T)``, kept at most ``log(max_scale)`` (so ``T >= 1/max_scale``) by
    projecting the parameter itself, not by clamping its use: a step that carries it past
    the bound is undone at the next call, and the gradient keeps flowing there, so T
    can rise again when the loss wants it (a clamp in the graph would pin T at the
    floor for good, with zero gradient).
    """

    value: Tensor  # the fixed T's buffer (not registered where learnable)

    def __init__(self, value: float, learnable: bool = False, max_scale: float = 100.0) -> None:
        super().__init__()
        check_temperature(value)
        if not max_scale > 0:
            raise ValueError(f"max_scale must be > 0, got {max_scale}.")
        self.learnable = learnable
        self.max_log_scale = math.log(max_scale)
        if learnable and -math.log(value) > self.max_log_scale + 1e-12:
            raise ValueError(
                f"a learnable temperature starts at {value}, below its floor 1/max_scale = {1 / max_scale:g}: "
                "it would be clamped there and get no gradient. Start it higher or raise max_scale."
            )
        self.initial = float(value)
        if learnable:
            self.log_scale = nn.Parameter(torch.tensor(-math.log(value)))
        else:
            # float64 so that float64 inputs see T exactly; float32 inputs round it as a float would.
            self.register_buffer("value", torch.tensor(self.initial, dtype=torch.float64), persistent=False)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Temperature:
        """``.to(device)`` moves the fixed T; ``.to(dtype)``, ``.half()`` would round it: it stays float64."""
        super()._apply(fn, recurse)
        if not self.learnable and self.value.dtype != torch.float64:
            self.value = torch.tensor(self.initial, dtype=torch.float64, device=self.value.device)
        return self

    def forward(self) -> Tensor:
        """Current temperature, a 0-dim tensor."""
        if not self.learnable:
            return self.value
        if torch.is_grad_enabled():
            with torch.no_grad():  # the projection after the optimiser's step, done lazily (no host sync)
                self.log_scale.clamp_(max=self.max_log_scale)
            return torch.exp(-self.log_scale)
        return torch.exp(-self.log_scale.clamp(max=self.max_log_scale))  # no_grad/inference: leave it

    def extra_repr(self) -> str:
        return f"{'initial=' if self.learnable else ''}{self.initial:g}, learnable={self.learnable}"
