"""DINO's loss (Caron et al. 2021): cross-entropy of sharpened, centred teacher distributions to the student's.

The teacher's outputs of the G global views are centred (minus ``c``) and sharpened (a low temperature T_t),
the student's outputs of all V views are softened (T_s), and every student view learns every teacher view
but its own (facebookresearch/dino, ``main_dino.py``, ``DINOLoss``). The centre is a running mean of the
teacher's outputs, updated after the loss by :func:`dino_center_update` (a pure function: the pipeline
holds the centre in a buffer, so a checkpoint holds it).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastive.distributed import all_reduce_sum, world_size
from contrastive.losses._common import check_temperature, compute_dtype, no_autocast
from contrastive.losses.forms import LossForm


def _check_shapes(student_out: Tensor, teacher_out: Tensor, center: Tensor) -> None:
    if student_out.dim() != 3 or teacher_out.dim() != 3:
        raise ValueError(
            f"dino_loss takes student_out (V, N, K) and teacher_out (G, N, K), got shapes {tuple(student_out.shape)} "
            f"and {tuple(teacher_out.shape)}: stack the views along a first dimension"
        )
    (v, n, k), (g, n_t, k_t) = student_out.shape, teacher_out.shape
    if (n, k) != (n_t, k_t) or center.shape != (k,):
        raise ValueError(
            f"dino_loss: student_out {tuple(student_out.shape)}, teacher_out {tuple(teacher_out.shape)} and center "
            f"{tuple(center.shape)} must share N images and K outputs, as (V, N, K), (G, N, K) and (K,)"
        )
    if not 1 <= g <= v or v < 2:
        raise ValueError(
            f"dino_loss needs 1 <= G <= V global views among V >= 2 (the student's first G views are the teacher's), "
            f"got G={g}, V={v}: a view is never compared with itself, so one view leaves no pair"
        )


@no_autocast
def dino_loss(
    student_out: Tensor,
    teacher_out: Tensor,
    center: Tensor,
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.04,
) -> Tensor:
    """``mean_{g < G, v != g} mean_n sum_k -softmax((t_gn - c) / T_t)_k log_softmax(s_vn / T_s)_k``.

    G (V - 1) pairs: teacher view g against every student view v but the same view g. The teacher side is
    detached (its targets carry no gradient), so the gradient reaches only ``student_out``. Computed in
    float32 (float64 for float64 inputs) with autocast off: ``log_softmax`` of the upcast logits is finite
    for any finite half-precision input.

    Args:
        student_out: (V, N, K) the student head's outputs of V views of N images, the G global views first.
        teacher_out: (G, N, K) the teacher head's outputs of the G global views, in the same order.
        center: (K,) the running centre of the teacher's outputs (:func:`dino_center_update`).
        student_temperature: T_s > 0 (DINO: 0.1).
        teacher_temperature: T_t > 0 (DINO: 0.04, warmed up to 0.07 by the pipeline).

    Returns:
        Scalar loss, float32 (float64 for float64 inputs).
    """
    check_temperature(student_temperature)
    check_temperature(teacher_temperature)
    _check_shapes(student_out, teacher_out, center)
    dtype = compute_dtype(student_out)
    g, v = len(teacher_out), len(student_out)
    targets = F.softmax((teacher_out.detach().to(dtype) - center.detach().to(dtype)) / teacher_temperature, dim=-1)
    log_p = F.log_softmax(student_out.to(dtype) / student_temperature, dim=-1)  # (V, N, K)
    cross = -torch.einsum("gnk,vnk->gv", targets, log_p) / student_out.shape[1]  # (G, V): mean over n
    same = torch.eye(g, v, dtype=torch.bool, device=cross.device)  # teacher view g against its own student view
    return cross.masked_fill(same, 0.0).sum() / (g * (v - 1))


@torch.no_grad()
def dino_center_update(center: Tensor, teacher_out: Tensor, momentum: float = 0.9) -> Tensor:
    """``c <- m c + (1 - m) mean of the teacher's outputs`` over every view, image and process.

    Every process passes the same number of rows, so the mean of the summed sums is that of the global
    batch: two processes give what one process holding both batches gives, on every process alike.

    Args:
        center: (K,) the current centre.
        teacher_out: (..., K) the teacher head's outputs of this step (any leading shape, e.g. (G, N, K)).
        momentum: m in [0, 1] (DINO: 0.9).

    Returns:
        (K,) the new centre, in ``center``'s dtype, without gradient.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"the centre's momentum must be in [0, 1] (DINO: 0.9), got {momentum}")
    rows = teacher_out.detach().reshape(-1, teacher_out.shape[-1]).to(compute_dtype(teacher_out))
    batch_center = all_reduce_sum(rows.sum(0)) / (len(rows) * world_size())  # (K,)
    return (momentum * center + (1 - momentum) * batch_center.to(center.dtype)).to(center.dtype)


class DINOLoss(nn.Module):
    """DINO's loss; see :func:`dino_loss`. ``forward(student_out, teacher_out, center, teacher_temperature=None)``.

    Holds the temperatures only; the centre and the teacher are the pipeline's.

    Args:
        student_temperature: T_s (DINO: 0.1).
        teacher_temperature: T_t after the warm-up (DINO: 0.04 by default, 0.07 in its longer runs).
        warmup_teacher_temperature: T_t at the first epoch, raised linearly to ``teacher_temperature`` by the
            pipeline (DINO: 0.04; equal to ``teacher_temperature``: no warm-up).
    """

    input_forms: ClassVar[frozenset[LossForm]] = frozenset({"student_teacher_center"})

    def __init__(
        self,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.04,
        warmup_teacher_temperature: float | None = None,
    ) -> None:
        super().__init__()
        warmup = teacher_temperature if warmup_teacher_temperature is None else warmup_teacher_temperature
        for t in (student_temperature, teacher_temperature, warmup):
            check_temperature(t)
        self.student_temperature = float(student_temperature)
        self.teacher_temperature = float(teacher_temperature)
        self.warmup_teacher_temperature = float(warmup)

    def forward(
        self, student_out: Tensor, teacher_out: Tensor, center: Tensor, teacher_temperature: float | None = None
    ) -> Tensor:
        t_t = self.teacher_temperature if teacher_temperature is None else teacher_temperature
        return dino_loss(student_out, teacher_out, center, self.student_temperature, t_t)

    def extra_repr(self) -> str:
        return (
            f"student_temperature={self.student_temperature}, teacher_temperature={self.teacher_temperature}, "
            f"warmup_teacher_temperature={self.warmup_teacher_temperature}"
        )
