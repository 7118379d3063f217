"""MoCo v3's contrastive loss (Chen, Xie & He 2021): in-batch InfoNCE scaled by 2T.

One direction of the authors' ``ctr(q, k)`` (facebookresearch/moco-v3, ``moco/builder.py``):
``CrossEntropy(q . k_all^T / T, labels) * 2T`` on L2-normalised vectors, where ``k_all`` holds the
keys of every process and query i's target is its own key. The pipeline sums both directions,
``ctr(q1, k2) + ctr(q2, k1)``, as the authors' code does.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from contrastive.losses._common import check_temperature
from contrastive.losses.forms import LossForm
from contrastive.losses.modules import _SoftmaxLoss
from contrastive.losses.softmax import info_nce


def mocov3_loss(
    query: Tensor,
    key: Tensor,
    temperature: float | Tensor = 1.0,
    *,
    chunk_size: int | None = None,
    gather: bool = False,
) -> Tensor:
    """``2T * mean_i [ log sum_j exp(q_i . k_j / T) - q_i . k_i / T ]`` (MoCo v3, Algorithm 1).

    The factor 2T is the authors': the gradient of logits divided by T carries 1/T, which 2T
    cancels, so the size of a step does not follow the temperature.

    Args:
        query: (N, D) predictor outputs of one view.
        key: (N, D) momentum-encoder outputs of the other view; key i is query i's positive,
            the other keys its negatives. MoCo v3's keys carry no gradient (computed under
            ``no_grad``), so gathering them (``gather``) adds no backward communication.
        temperature: T > 0 (ResNet: 1.0 on ImageNet, 0.2 in solo-learn's CIFAR recipe; ViT: 0.2).
        chunk_size: compute the (N, W*N) logits this many rows at a time (memory linear in N); None = plain.
        gather: under torch.distributed, each process's queries against the keys of all processes.

    Returns:
        Scalar loss, float32 (float64 for float64 inputs).
    """
    check_temperature(temperature)
    loss = info_nce(query, key, None, temperature, chunk_size=chunk_size, gather=gather)
    return (loss * (2 * temperature)).to(loss.dtype)  # a float64 0-dim T must not promote a float32 loss


class MoCoV3Loss(_SoftmaxLoss):
    """MoCo v3's loss; see :func:`mocov3_loss`. ``forward(query, key)``, both (N, D)."""

    input_forms: ClassVar[frozenset[LossForm]] = frozenset({"two_views"})

    def __init__(
        self, temperature: float = 1.0, learnable: bool = False, chunk_size: int | None = None, gather: bool = False
    ) -> None:
        super().__init__(temperature, learnable, chunk_size, gather)

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        return mocov3_loss(query, key, self.temperature(), chunk_size=self.chunk_size, gather=self.gather)
