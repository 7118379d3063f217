"""LARS, the optimiser of SimCLR's large-batch recipe (none of torch, torchvision or Lightning has one)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer


class LARS(Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as SimCLR uses it.

    For each parameter ``w`` with gradient ``g`` (weight decay ``wd`` of its group):

    ``u = g + wd * w``;
    ``u <- u * eta * ||w|| / ||u||`` when adapted and both norms are > 0 (else unchanged);
    with ``clip_lr``, ``u <- u * min(eta * ||w|| / ||u|| / lr, 1)`` instead, so that no layer's rate
    ``lr * ratio`` exceeds ``lr`` (the clip mode of NVIDIA apex's LARC, solo-learn's ``clip_lr``);
    ``v <- m * v + u``; ``w <- w - lr * v`` (Nesterov: ``w <- w - lr * (u + m * v)``).

    SimCLR (Chen et al. 2020) exempts biases and BatchNorm parameters from the
    adaptation and from weight decay: ``exclude_1d=True`` leaves every parameter with
    ``ndim <= 1`` unadapted (plain SGD with momentum), and the pipelines already put
    those parameters in a group with ``weight_decay=0``.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (> 0); SimCLR scales it linearly, ``0.3 * batch / 256``.
        momentum: in [0, 1).
        weight_decay: >= 0 (SimCLR: 1e-6).
        trust_coefficient: eta > 0, the scale of the layer-wise rate (SimCLR: 0.001).
        exclude_1d: leave biases and normalisation parameters unadapted.
        nesterov: Nesterov momentum.
        clip_lr: cap each layer's adapted rate at the (scheduled) ``lr`` (solo-learn's recipes, eta 0.02).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.3,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        trust_coefficient: float = 1e-3,
        exclude_1d: bool = True,
        nesterov: bool = False,
        clip_lr: bool = False,
    ) -> None:
        checks = [
            ("lr", lr, lr > 0),
            ("momentum", momentum, 0 <= momentum < 1),
            ("weight_decay", weight_decay, weight_decay >= 0),
            ("trust_coefficient", trust_coefficient, trust_coefficient > 0),
        ]
        for name, value, ok in checks:
            if not ok:
                raise ValueError(
                    f"LARS: invalid {name}={value} (lr and trust_coefficient > 0, "
                    "0 <= momentum < 1, weight_decay >= 0)."
                )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            exclude_1d=exclude_1d,
            nesterov=nesterov,
            clip_lr=clip_lr,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad.clone()
                if not (group["exclude_1d"] and p.ndim <= 1):
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    trust = group["trust_coefficient"] * w_norm / u_norm
                    if group.get("clip_lr", False):  # absent from the groups of a checkpoint saved before it
                        trust = (trust / group["lr"]).clamp(max=1.0)
                    # no host sync: the ratio is chosen on the device
                    update.mul_(torch.where((w_norm > 0) & (u_norm > 0), trust, torch.ones_like(trust)))
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = update.clone()  # v_1 = u_1, as torch.optim.SGD
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                buf = state["momentum_buffer"]
                step = update.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                p.add_(step, alpha=-group["lr"])
        return loss
