"""DINO (Caron et al. 2021): self-distillation of a momentum teacher, centred and sharpened, over multi-crop views.

One step, as the authors' ``main_dino.py``: the teacher (an EMA of the student's backbone and head, m raised
from m0 to 1 on a cosine) encodes the G global views, the student every view; each student view learns the
teacher's distribution of every other global view (``contrastive.losses.dino_loss``), with the teacher's
temperature warmed up linearly over the first epochs; then the centre, a buffer, takes the teacher's batch mean
(``dino_center_update``, over all processes). The head's weight-normalised last layer may stay frozen for the
first epoch(s) (the authors' ``freeze_last_layer``), which they found to stabilise the start.

Views of one size pass the backbone together, as the authors' ``MultiCropWrapper`` concatenates consecutive
crops of one resolution: BatchNorm normalises the global crops with their joint statistics, the local crops
with theirs. The teacher sees every view of the largest size (the global crops: DINO's 2 global crops of
``aug=multicrop``, or both views of an Augment or of ``aug=asymmetric``). Under W processes, with
``trainer.sync_batchnorm=true`` (``trainer=ddp``) a step equals that of one process holding the global batch;
without it (``trainer=ddp_cpu``) the BatchNorm statistics are each process's.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm
from torch.optim import Optimizer

from contrastive.losses import LossForm, dino_center_update
from contrastive.models import ema_update, momentum_copy
from contrastive.pipelines.base import Pipeline, total_steps
from contrastive.schedules import linear, momentum_at
from contrastive.views import MultiCrop


class DINOHead(nn.Module):
    """DINO's projection head: an MLP to a bottleneck, L2 normalisation, a weight-normalised linear layer to K.

    ``x -> MLP (Linear-[BN]-GELU x (num_layers - 1), Linear to bottleneck_dim) -> x / ||x|| -> last_layer``, the
    last layer ``W = g v / ||v||`` per output row without bias (facebookresearch/dino, ``vision_transformer.py``).

    Args:
        in_dim: the backbone's feature width F.
        hidden_dim: the MLP's hidden width (DINO: 2048).
        out_dim: K, the number of outputs ("prototypes"; DINO: 65536, solo-learn's CIFAR: 4096).
        bottleneck_dim: the MLP's output width (DINO: 256).
        num_layers: linear layers of the MLP, >= 1 (DINO: 3).
        batchnorm: BatchNorm after each hidden linear layer (DINO: off for ViT, on for ResNet in solo-learn).
        norm_last_layer: fix the last layer's norms g to 1 (DINO's default; off helps ViT-S).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        out_dim: int = 65536,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        batchnorm: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"DINOHead needs at least one layer before the last one, got num_layers={num_layers}")
        widths = [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        norm = nn.BatchNorm1d if batchnorm else None
        self.mlp = torchvision.ops.MLP(in_dim, widths, norm_layer=norm, activation_layer=nn.GELU, inplace=None)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):  # the authors' initialisation
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0  # (K, 1), the rows' norms
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        """(B, F) -> (B, K)."""
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class DINO(Pipeline):
    """DINO: student ``projector(backbone(.))`` on every view, teacher its EMA on the global views.

    Args:
        projector: the head, (B, F) -> (B, K), whose last ``nn.Linear`` gives K and is the layer frozen at the
            start: :class:`DINOHead` (the authors'), or any MLP (``model.projector`` of another model).
        loss: ``loss(student_out, teacher_out, center, teacher_temperature=)`` (form ``student_teacher_center``):
            ``contrastive.losses.DINOLoss``, whose temperatures (student, teacher, teacher at the start) it holds.
        momentum: m0 of the teacher's EMA (DINO: 0.996), raised to 1 on a cosine unless ``momentum_cosine`` is false.
        momentum_cosine: raise m from m0 to 1 on a cosine over the run's optimiser steps (DINO's).
        center_momentum: m of the centre's running mean (DINO: 0.9).
        teacher_temperature_warmup_epochs: W; the teacher's temperature goes linearly from the loss's
            ``warmup_teacher_temperature`` at epoch 0 to its ``teacher_temperature`` at epoch W - 1 (DINO's
            ``np.linspace``; 30), then holds; W <= 1: ``teacher_temperature`` throughout.
        freeze_last_layer_epochs: epochs in which the head's last layer gets no update (DINO: 1).
        **base: the :class:`Pipeline` arguments. ``augment``: an ``Augment`` (two views, both global) or a
            ``contrastive.views.MultiCrop`` (``aug=multicrop``: 2 global crops, then local ones).
    """

    center: Tensor  # (K,) buffer
    multi_crop: ClassVar[bool] = True
    loss_forms: ClassVar[tuple[LossForm, ...]] = ("student_teacher_center",)
    loss_hint: ClassVar[str] = (
        "it calls loss(student_out, teacher_out, center, teacher_temperature=) on the heads' outputs; use loss=dino"
    )

    def __init__(
        self,
        projector: nn.Module,
        loss: nn.Module,
        momentum: float = 0.996,
        momentum_cosine: bool = True,
        center_momentum: float = 0.9,
        teacher_temperature_warmup_epochs: int = 30,
        freeze_last_layer_epochs: int = 1,
        **base: Any,
    ) -> None:
        for name, value in (("momentum", momentum), ("center_momentum", center_momentum)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"pipeline.{name}={value} must be in [0, 1]")
        for name, count in (
            ("teacher_temperature_warmup_epochs", teacher_temperature_warmup_epochs),
            ("freeze_last_layer_epochs", freeze_last_layer_epochs),
        ):
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"pipeline.{name} must be a whole number of epochs >= 0, got {count!r}")
        self.loss_form(loss)
        linears = [m for m in projector.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(
                f"DINO's head must end in an nn.Linear (its K outputs, the layer it may freeze), but model.projector "
                f"is a {type(projector).__name__} without one: use contrastive.pipelines.dino.DINOHead"
            )
        last = linears[-1]
        augment = base.get("augment")
        if isinstance(augment, MultiCrop) and augment.num_views < 2:
            raise ValueError(
                f"DINO compares each view with the others, but the MultiCrop draws {augment.num_views} view: "
                "give it at least two (aug=multicrop: 2 global + 6 local)"
            )
        super().__init__(**base)
        self.projector, self.loss, self.last_layer = projector, loss, [last]  # a list: not a second submodule
        self.teacher_backbone = momentum_copy(self.backbone)  # frozen: requires_grad False, in the checkpoint
        self.teacher_projector = momentum_copy(self.projector)
        self.register_buffer("center", torch.zeros(last.out_features))  # (K,), in the checkpoint
        self.momentum, self.momentum_cosine, self.center_momentum = momentum, momentum_cosine, center_momentum
        self.teacher_temperature_warmup_epochs = teacher_temperature_warmup_epochs
        self.freeze_last_layer_epochs = freeze_last_layer_epochs
        self._ema_step = -1  # the optimiser step whose EMA is done (accumulated micro-batches share one)

    # ------------------------------------------------------------------ schedules
    def current_momentum(self) -> float:
        """m of this step: m0 raised to 1 on a cosine over the run's optimiser steps (``momentum_at``)."""
        if not self.momentum_cosine or self._trainer is None:
            return self.momentum
        return momentum_at(self.global_step, total_steps(self.trainer), self.momentum)

    def current_teacher_temperature(self) -> float | None:
        """T_t of this epoch: linear from the loss's warm-up value at epoch 0 to its final one at epoch W - 1;
        None for a loss without both temperatures (it keeps its own)."""
        start = getattr(self.loss, "warmup_teacher_temperature", None)
        end = getattr(self.loss, "teacher_temperature", None)
        if start is None or end is None:
            return None
        epoch = self.current_epoch if self._trainer is not None else 0
        return linear(epoch, max(self.teacher_temperature_warmup_epochs - 1, 0), start, end)

    # ------------------------------------------------------------------ the step
    def global_views(self, views: list[Tensor]) -> int:
        """G: the views at the largest size (all views of an Augment), which the teacher sees."""
        return sum(v.shape[-1] == views[0].shape[-1] for v in views)

    def student(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Backbone features (V B, F) and head outputs (V B, K) of every view; one backbone pass per size."""
        sizes = [v.shape[-1] for v in views]
        starts = [i for i in range(len(views)) if i == 0 or sizes[i] != sizes[i - 1]] + [len(views)]
        h = torch.cat([self.backbone(torch.cat(views[a:b])) for a, b in zip(starts, starts[1:])])
        return h, self.projector(h)

    @torch.no_grad()
    def teacher(self, global_views: list[Tensor]) -> Tensor:
        """The teacher's head outputs (G B, K) of the global views, one pass, without gradient."""
        return self.teacher_projector(self.teacher_backbone(torch.cat(global_views)))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        m, t_t = self.current_momentum(), self.current_teacher_temperature()
        if self.global_step != self._ema_step:  # once per optimiser step (trainer.accumulate_grad_batches)
            ema_update(self.teacher_backbone, self.backbone, m)  # before the teacher's pass, as MoCo v3
            ema_update(self.teacher_projector, self.projector, m)
            self._ema_step = self.global_step
        views = self.crops(images) if isinstance(self.augment, MultiCrop) else self.views(images, n=2)
        g, b = self.global_views(views), len(images)
        h, student_out = self.student(views)  # (V B, F), (V B, K)
        teacher_out = self.teacher(views[:g]).view(g, b, -1)  # (G, B, K)
        loss = self.loss(student_out.view(len(views), b, -1), teacher_out, self.center, teacher_temperature=t_t)
        self.log("train/momentum", m, on_step=True, on_epoch=False)
        if t_t is not None:
            self.log("train/teacher_temperature", t_t, on_step=True, on_epoch=False)
        skipped = self.skipped_steps
        out = self.finish_step({"loss": loss}, self.online_probe_loss(h[: g * b], labels.repeat(g)))
        if self.skipped_steps == skipped:  # a skipped (non-finite) step leaves the centre alone
            self.center.copy_(dino_center_update(self.center, teacher_out, self.center_momentum))
        return out

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """The head's last layer gets no update in the first ``freeze_last_layer_epochs`` (the authors'
        ``cancel_gradients_last_layer``: its gradient is dropped, so neither momentum nor weight decay moves it)."""
        if self.current_epoch < self.freeze_last_layer_epochs:
            for p in self.last_layer[0].parameters():
                p.grad = None
        super().on_before_optimizer_step(optimizer)
