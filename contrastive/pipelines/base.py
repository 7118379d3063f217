"""Lightning plumbing shared by the pipelines: optimisation, monitors, safety checks.

A pipeline subclasses :class:`Pipeline` and writes ``training_step`` as
"views -> encode -> loss -> log". Everything here receives finished objects
(networks, loss, augmentation, optimiser factory), never a config.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from contrastive.augment import Augment, normalize_uint8
from contrastive.data import MonitorBatches
from contrastive.distributed import all_gather, all_true, rank, world_size
from contrastive.evaluation import alignment, check_finite, feature_metrics, label_free_monitors
from contrastive.evaluation.neighbors import Metric
from contrastive.losses import LossForm, input_forms
from contrastive.views import MultiCrop, draw_views

OptimizerFactory = Callable[..., Optimizer]
SchedulerFactory = Callable[..., LRScheduler]


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or Inf during training."""


def channels_last(device: torch.device) -> bool:
    """Whether images and conv weights go channels-last (NHWC) on ``device``.

    cuDNN and oneDNN both run NHWC convolutions faster: on 2 CPU cores the default run trained
    1.35x as fast, ResNet-18's step 1.14-1.18x; MoCo's split BN copies, 0.93x (docs/benchmarks.md,
    "Channels-last on the CPU"). MPS is left NCHW.
    """
    return device.type in ("cuda", "cpu")


@dataclass(frozen=True)
class RunFacts:
    """What a run's rules are checked against before any work (:meth:`Pipeline.check_run`).

    Args:
        batch_size: images each process takes per step (``data.batch_size``).
        world_size: training processes (the Trainer's: ``devices=auto``, torchrun and SLURM resolved).
        num_train: images of the training split.
        last_batch: images of the epoch's last, smaller global step; 0 when every step is full
            (``sampler.drop_last=true``, or a batch that divides the data set).
        sync_batchnorm: BatchNorm statistics over all processes (``trainer.sync_batchnorm``).
    """

    batch_size: int
    world_size: int = 1
    num_train: int = 0
    last_batch: int = 0
    sync_batchnorm: bool = False


def total_steps(trainer: pl.Trainer) -> int:
    """The optimiser steps of the whole run, which the schedules need; an error for a run without end."""
    total = trainer.estimated_stepping_batches
    if math.isinf(total):
        raise ValueError(
            "the LR schedule (and MoCo's momentum_cosine) needs the run's length: give the Trainer max_epochs "
            "or max_steps (max_time alone has no step count), or use no scheduler"
        )
    return int(total)


def steps_per_epoch(trainer: pl.Trainer) -> int:
    """Optimiser steps per epoch of this process: ``ceil(batches / accumulate_grad_batches)`` (>= 1), as
    Lightning steps on an epoch's last, incomplete accumulation window too."""
    return max(math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches), 1)


class Pipeline(pl.LightningModule):
    """Base of the SimCLR / MoCo / Siamese modules.

    Args:
        backbone: image -> features (B, F).
        augment: uint8 batch -> augmented, normalised float batch (``contrastive.augment.Augment``), drawn by
            :meth:`views`; or a ``contrastive.views.MultiCrop`` (views of several sizes), drawn by :meth:`crops`,
            for a pipeline whose :attr:`multi_crop` is set.
        optimizer: ``optimizer(params) -> Optimizer`` (a Hydra ``_partial_``).
        scheduler: ``scheduler(optimizer, total_steps=, steps_per_epoch=) -> LRScheduler``, stepped per batch.
        feature_dim: F, the backbone's output width.
        num_classes: classes of the monitoring labels (kNN, online probe).
        knn_k, knn_temperature: weighted kNN monitor (InstDisc: k=200, T=0.1); ``knn_k=0``
            monitors MAP@R among the test images instead (class-disjoint protocol).
        online_probe: train a linear classifier on detached features alongside
            (its gradient never reaches the backbone).
        on_nonfinite: ``"raise"`` stops at a NaN/Inf loss, ``"skip"`` skips that step.
        seed: seed of the augmentation generator (its state is checkpointed).
    """

    #: The geometry retrieval ranks :meth:`features` in ("cosine" or "euclidean"): that of the loss.
    retrieval_metric: Metric = "cosine"
    #: Whether ``training_step`` draws :meth:`crops` from a ``MultiCrop`` (DINO, SwAV); the others refuse one.
    multi_crop: ClassVar[bool] = False
    #: The loss calls this pipeline makes (``contrastive.losses.forms``); a loss declaring none of them is refused.
    loss_forms: ClassVar[tuple[LossForm, ...]] = ()
    #: The end of the refusal's one line: how this pipeline calls its loss and which losses fit.
    loss_hint: ClassVar[str] = ""

    def __init__(
        self,
        backbone: nn.Module,
        augment: Augment | MultiCrop,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        feature_dim: int = 512,
        num_classes: int = 10,
        knn_k: int = 200,
        knn_temperature: float = 0.1,
        online_probe: bool = True,
        on_nonfinite: str = "raise",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        for name, value, ok in (
            ("feature_dim", feature_dim, feature_dim >= 1),
            ("num_classes", num_classes, num_classes >= 1),
            ("knn_k", knn_k, knn_k >= 0),
            ("knn_temperature", knn_temperature, knn_temperature > 0),
        ):
            if not ok:
                raise ValueError(
                    f"Pipeline: invalid {name}={value} (feature_dim and num_classes >= 1, knn_k >= 0 "
                    "where 0 monitors MAP@R instead, knn_temperature > 0)"
                )
        if isinstance(augment, MultiCrop) and not self.multi_crop:
            raise ValueError(
                f"the {type(self).__name__} pipeline draws its views from one Augment, not a MultiCrop of "
                f"{augment.sizes} px views: use an Augment (aug=simclr), or a pipeline that takes multi-crop"
            )
        self.backbone = backbone
        self.augment = augment
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.num_classes = num_classes
        self.knn_k = knn_k
        self.knn_temperature = knn_temperature
        self.on_nonfinite = on_nonfinite
        self.online_head = nn.Linear(feature_dim, num_classes) if online_probe else None
        self.generator = torch.Generator().manual_seed(seed)
        self._val_outputs: dict[int, list[tuple[Tensor, Tensor]]] = {}
        self._epoch_validation = 0.0  # seconds of validation inside the current training epoch
        self.train_seconds = 0.0  # wall-clock of the finished epochs (validation included), across resumes
        self.last_features: dict[str, tuple[Tensor, Tensor]] = {}
        self.last_monitors: dict[str, float] = {}  # the label-free monitors of the last validation
        self._monitor_width = 0  # F: where the backbone's part of monitor_outputs ends
        self.skipped_steps = 0
        self._step_has_loss = False  # a batch since the last optimiser step returned a real loss
        self._pending_check: tuple[Tensor, Any, dict[str, Tensor], int] | None = None  # see finish_step

    # ------------------------------------------------------------------ the pipeline's rules
    @classmethod
    def loss_form(cls, loss: nn.Module) -> LossForm | None:
        """The first of :attr:`loss_forms` that ``loss`` declares (None: it declares none, taken on trust).

        Raises:
            ValueError: ``loss`` declares forms, none of which this pipeline makes (one line, with :attr:`loss_hint`).
        """
        forms = input_forms(loss)
        if forms is None:
            return None
        fitting = [form for form in cls.loss_forms if form in forms]
        if not fitting:
            raise ValueError(f"loss {type(loss).__name__} does not fit the {cls.__name__} pipeline: {cls.loss_hint}")
        return fitting[0]

    def check_run(self, facts: RunFacts) -> None:
        """Refuse, before any work, a run this pipeline cannot train: one ValueError naming the setting and the fix.

        The base rule: a last batch of one image cannot be normalised by BatchNorm. Subclasses add
        theirs (MoCo: queue and BatchNorm groups) and call this.
        """
        self._check_last_batch(facts, groups=1)

    @staticmethod
    def _check_last_batch(facts: RunFacts, groups: int) -> None:
        """The last, smaller batch splits into ``groups`` BatchNorm groups of at least 2 images."""
        last = facts.last_batch
        if last and (last % groups or last // groups < 2):
            what = (
                f"split into pipeline.bn_splits={groups} BatchNorm groups of 2 or more"
                if groups > 1
                else "normalise with BatchNorm (one image)"
            )
            raise ValueError(
                f"sampler.drop_last=false leaves a last batch of {last} image(s), which the network "
                f"cannot {what}: use sampler.drop_last=true (the default) or another data.batch_size"
            )

    # ------------------------------------------------------------------ encoding
    def views(self, images: Tensor, n: int = 2) -> list[Tensor]:
        """``n`` independently augmented views of a uint8 batch, channels-last on CPU and GPU.

        One ``Augment`` call on the n-fold batch; under W processes each rank gets its rows of the
        views one process holding the global batch would draw (``contrastive.views.draw_views``).
        """
        if isinstance(self.augment, MultiCrop):
            raise ValueError(
                f"views() draws n views of one Augment, but augment is a MultiCrop of {self.augment.sizes} "
                "px views: use crops()"
            )
        return self._layout(draw_views(self.augment, images, n, self.generator, world_size(), rank()))

    def crops(self, images: Tensor) -> list[Tensor]:
        """Every view of every group of a ``MultiCrop``, channels-last on CPU and GPU.

        The groups in order, largest first (DINO: 2 x (B, C, 32, 32) global, then 6 x (B, C, 16, 16) local);
        each group one ``Augment`` call on its n-fold batch, drawn as :meth:`views` draws.
        """
        if not isinstance(self.augment, MultiCrop):
            raise ValueError(
                "crops() draws the groups of a contrastive.views.MultiCrop, but augment is one Augment: "
                "use views(), or build the pipeline with a MultiCrop (aug=multicrop)"
            )
        return self._layout(self.augment(images, self.generator, world_size(), rank()))

    def _layout(self, views: list[Tensor]) -> list[Tensor]:
        """Views in the module's dtype (float32 unless it was cast: ``precision="bf16-true"`` or ``"64-true"``),
        channels-last on CPU and GPU (:func:`channels_last`)."""
        views = [v.to(self.dtype) for v in views]
        if views and channels_last(views[0].device):
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        return views

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Backbone features (B, F) of an unaugmented uint8 batch (eval-time input)."""
        x = normalize_uint8(images, self.augment.mean, self.augment.std).to(self.dtype)
        if channels_last(x.device):
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x).float()

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images)

    # ------------------------------------------------------------------ step plumbing
    def online_probe_loss(self, features: Tensor, labels: Tensor) -> Tensor | None:
        """Cross-entropy of the online linear probe on detached features; logs its accuracy."""
        if self.online_head is None:
            return None
        if features.shape[-1] != self.online_head.in_features:  # else a bare matmul shape error
            raise ValueError(
                f"the backbone outputs {features.shape[-1]} features per image, but the pipeline was "
                f"built with feature_dim={self.online_head.in_features}: pass feature_dim={features.shape[-1]}"
            )
        logits = self.online_head(features.detach().to(self.online_head.weight.dtype))
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(1) == labels).float().mean() * 100
        self.log("train/online_probe_top1", acc, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def finish_step(self, terms: dict[str, Tensor], extra: Tensor | None = None) -> Tensor:
        """Check and log the loss terms; returns what Lightning should minimise.

        ``terms["loss"]`` is the objective; other entries are logged beside it.
        ``extra`` (the online probe's loss) is added after the check. With
        ``on_nonfinite="raise"`` the check of step t is read at step t + 1 (or at the
        epoch's end, before the checkpoint is written) from an asynchronous copy, so
        the GPU never waits for the host; ``"skip"`` must decide now and syncs.
        """
        if self.on_nonfinite == "skip":
            finite = _finite_per_term(terms)
            if not bool(finite.all()):  # decided by all processes alike, so their collectives stay paired
                self.skipped_steps += 1
                self.print(f"skipping step: {self._nonfinite_message(terms, finite, self.global_step)}")
                self.log("train/skipped_steps", float(self.skipped_steps))
                # Not None, which Lightning refuses under DDP: a zero on every trainable parameter, so every
                # process runs the same backward and gradient all-reduce; on_before_optimizer_step then
                # drops the (zero) gradients, so the optimiser moves nothing, momentum and decay included.
                # (sum() of tensors is a tensor; typeshed's sum() adds int for an empty iterable)
                return cast(Tensor, sum(p.sum() for p in self.parameters() if p.requires_grad)) * 0.0
        else:
            self.raise_if_nonfinite()
            self._pending_check = self._finite_flags(terms)
        for name, value in terms.items():
            # per step: this process's value (no sync in the hot loop); per epoch: the mean over
            # processes too, which is the global batch's loss (each process's loss is its share)
            value = value.detach().float()
            self.log(f"train/{name}_step", value, prog_bar=name == "loss", on_step=True, on_epoch=False)
            self.log(f"train/{name}_epoch", value, on_step=False, on_epoch=True, sync_dist=True)
        self._step_has_loss = True
        return terms["loss"] if extra is None else terms["loss"] + extra

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """A step whose every (accumulated) batch was skipped updates nothing (see :meth:`finish_step`)."""
        if self.on_nonfinite == "skip" and not self._step_has_loss:
            optimizer.zero_grad(set_to_none=True)  # optimisers leave parameters without a gradient alone
        self._step_has_loss = False

    def _finite_flags(self, terms: dict[str, Tensor]) -> tuple[Tensor, Any, dict[str, Tensor], int]:
        terms = {k: v.detach() for k, v in terms.items()}  # the check must not keep the step's graph alive
        flags = _finite_per_term(terms)
        if not flags.is_cuda:
            return flags, None, terms, self.global_step
        host = torch.empty(flags.shape, dtype=torch.bool, pin_memory=True)
        host.copy_(flags, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event, terms, self.global_step

    def raise_if_nonfinite(self) -> None:
        """Raise :class:`NonFiniteLossError` if the last checked step had a NaN/Inf term."""
        pending, self._pending_check = self._pending_check, None
        if pending is None:
            return
        flags, event, terms, step = pending
        if event is not None:
            event.synchronize()  # waits for that step's loss only, not for the work queued since
        if not bool(flags.all()):
            raise NonFiniteLossError(self._nonfinite_message(terms, flags, step))

    def _nonfinite_message(self, terms: dict[str, Tensor], finite: Tensor, step: int) -> str:
        bad = ", ".join(
            f"{k}={float(v.detach().float().mean())}" for (k, v), ok in zip(terms.items(), finite.tolist()) if not ok
        )
        if world_size() > 1:
            bad += f" (this process's value; non-finite on at least one of the {world_size()} processes)"
        return (
            f"non-finite loss at epoch {self.current_epoch}, global step {step}: {bad}. "
            "Likely causes: temperature too low, learning rate too high, or fp16 overflow "
            "(use trainer.precision=bf16-mixed or 32). The last good checkpoint is untouched."
        )

    # ------------------------------------------------------------------ kNN and label-free monitors
    def _monitor_loader(self) -> int | None:
        """Which validation loader holds the label-free monitors' sample (a ``MonitorBatches``, always the
        last: after the memory bank and the test split, or alone without labels); None without one."""
        if self._trainer is None:
            return None
        loaders = self.trainer.val_dataloaders
        loaders = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
        return len(loaders) - 1 if loaders and isinstance(loaders[-1], MonitorBatches) else None

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        if dataloader_idx == self._monitor_loader():
            self._val_outputs.setdefault(dataloader_idx, []).append((self.monitor_outputs(images, batch_idx), labels))
            return
        self._val_outputs.setdefault(dataloader_idx, []).append((self.features(images), labels))

    @torch.no_grad()
    def monitor_outputs(self, images: Tensor, batch_idx: int) -> Tensor:
        """What the label-free monitors read of a uint8 batch, side by side: (B, 3 * (F + D)).

        Backbone features of the images, then of two augmented views drawn from a generator seeded by
        ``batch_idx`` (so every measurement sees the same views, and training's generator is untouched);
        then the projector's outputs (width D) of the three, where the pipeline has a ``projector``.
        A ``MultiCrop`` gives no views: the image itself stands in for both (alignment 0).
        """
        plain = Pipeline.features(self, images)  # the backbone's, whatever a subclass evaluates (Siamese: embeddings)
        if isinstance(self.augment, MultiCrop):
            inputs = [plain, plain]
        else:
            drawn = self._layout(draw_views(self.augment, images, 2, torch.Generator().manual_seed(batch_idx)))
            inputs = [self.backbone(x).float() for x in drawn]
        h = [plain, *inputs]  # 3 x (B, F)
        projector = getattr(self, "projector", None)
        z = [projector(x.to(self.dtype)).float() for x in h] if isinstance(projector, nn.Module) else []
        self._monitor_width = h[0].shape[1]
        return torch.cat(h + z, dim=1)

    def _monitors(self, idx: int) -> dict[str, float]:
        """The label-free monitors of the gathered sample of loader ``idx``: ``<monitor>_backbone`` and
        ``<monitor>_projector`` (:func:`contrastive.evaluation.label_free_monitors`; alignment of the two views)."""
        packed, _ = self._gathered(idx)  # (N, 3 * (F + D))
        f = self._monitor_width
        parts = {"backbone": packed[:, : 3 * f]}
        if packed.shape[1] > 3 * f:
            parts["projector"] = packed[:, 3 * f :]
        out: dict[str, float] = {}
        for part, x in parts.items():
            plain, view1, view2 = x.double().chunk(3, dim=1)
            out |= {f"{k}_{part}": v for k, v in label_free_monitors(plain).items()}
            out[f"alignment_{part}"] = float(alignment(view1, view2))
        return out

    def on_validation_epoch_start(self) -> None:
        self._val_outputs = {}

    def _gathered(self, idx: int) -> tuple[Tensor, Tensor]:
        """Features (N, F) and labels (N,) of dataloader ``idx`` over all processes, in global order.

        With W processes the b-th global batch is the concatenation of every rank's
        b-th local batch in rank order (how ``IndexBatches`` shards), so the result
        is batch-major, rank-minor: exactly the rows one process would have seen.
        Local batches may differ in size (the uneven last batch, even empty ones);
        they are padded to a common length for ``all_gather`` and trimmed after.
        """
        outputs = self._val_outputs[idx]
        feats = torch.cat([f for f, _ in outputs])  # (n_local, F)
        labels = torch.cat([y for _, y in outputs])  # (n_local,)
        if world_size() == 1:
            return feats, labels
        sizes = _all_gather_padded(torch.tensor([len(f) for f, _ in outputs], device=feats.device))  # (W, B)
        rows = int(sizes.sum(1).max())
        all_feats = _all_gather_padded(feats, rows).flatten(0, 1)  # (W*rows, F)
        all_labels = _all_gather_padded(labels, rows).flatten(0, 1)  # (W*rows,)
        starts = sizes.cumsum(1) - sizes  # (W, B): where batch b begins in rank r's rows
        size_of, start_of = sizes.tolist(), starts.tolist()  # [r][b], on the host
        order = torch.cat(
            [
                torch.arange(size_of[r][b], device=feats.device) + r * rows + start_of[r][b]
                for b in range(len(size_of[0]))
                for r in range(len(size_of))
            ]
        )  # (N,)
        return all_feats[order], all_labels[order]

    def on_validation_epoch_end(self) -> None:
        monitor = self._monitor_loader()
        plain = None if self._trainer is None else len(self.trainer.num_val_batches) - (monitor is not None)
        if plain is not None and plain != 2 and not (plain == 0 and monitor is not None):  # silently nothing before
            raise ValueError(
                f"the kNN monitor needs two validation loaders, [memory bank, test] (unaugmented training images, "
                f"then the test images), got {plain}: pass val_dataloaders=[bank_loader, test_loader], or a "
                "contrastive.data.TensorDataModule"
            )
        if monitor is not None and monitor in self._val_outputs:
            self.last_monitors = self._monitors(monitor)
            for name, value in self.last_monitors.items():
                self.log(f"val/{name}", value, add_dataloader_idx=False, sync_dist=True, reduce_fx="max")
        if not {0, 1} <= set(self._val_outputs) or monitor == 0:
            self._val_outputs = {}
            return
        bank, bank_labels = self._gathered(0)
        test, test_labels = self._gathered(1)
        for name, x in (("train", bank), ("test", test)):  # the same on every rank: all stop alike
            try:
                check_finite(x, f"the features of the {name} images")
            except ValueError as e:
                raise NonFiniteLossError(
                    f"{e} at epoch {self.current_epoch}: the weights or BatchNorm statistics diverged. "
                    "The last good checkpoint is untouched."
                ) from None
        # Every rank holds the full, ordered bank and test set, so every rank computes the
        # same figure as one process would. Synced by max, which returns it exactly (a mean of W
        # equal floats can round); without a sync Lightning warns on every validation under DDP.
        log: dict[str, Any] = dict(prog_bar=True, add_dataloader_idx=False, sync_dist=True, reduce_fx="max")
        self.last_features = {"train": (bank, bank_labels), "test": (test, test_labels)}
        # knn_k=0: the test classes differ from the train classes, so retrieval among the test images instead
        figures = feature_metrics(
            self.last_features,
            self.num_classes,
            self.knn_k > 0,
            self.knn_k,
            self.knn_temperature,
            metric=self.retrieval_metric,
            retrieval=self.knn_k == 0,
        )
        name = "knn_top1" if self.knn_k > 0 else "map_at_r"
        self.log(f"val/{name}", figures[name], **log)
        self._val_outputs = {}

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameter_groups())
        for group in optimizer.param_groups:  # before the scheduler records each group's initial rate
            group["lr"] *= group.get("lr_scale", 1.0)
        if self.scheduler_factory is None:
            return optimizer
        trainer = self.trainer
        total = total_steps(trainer)
        if trainer.train_dataloader is None:  # only max_steps given (max_epochs -1): not loaded by the estimate
            trainer.fit_loop.setup_data()  # what estimated_stepping_batches does otherwise
        # this process's steps per epoch (finite: index batches); not total // max_epochs, as max_epochs may be -1
        scheduler = self.scheduler_factory(optimizer, total_steps=total, steps_per_epoch=steps_per_epoch(trainer))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Weight decay on weights only: biases and normalisation parameters are exempt.

        The parameters of a submodule with an ``lr_scale`` attribute other than 1 (Proxy-Anchor's proxies,
        which learn 100 times as fast) go into groups of their own carrying ``"lr_scale"``, by which
        :meth:`configure_optimizers` multiplies the optimiser's rate for them.
        """
        scale_of: dict[int, float] = {}  # parameter id -> its module's lr_scale (a descendant's overrides)
        for module in self.modules():
            scale = getattr(module, "lr_scale", None)
            if scale is not None:
                scale_of |= {id(p): float(scale) for p in module.parameters()}
        groups: dict[tuple[float, bool], list[nn.Parameter]] = {(1.0, False): [], (1.0, True): []}
        for p in self.parameters():
            if p.requires_grad:
                groups.setdefault((scale_of.get(id(p), 1.0), p.ndim <= 1), []).append(p)
        return [
            {"params": params}
            | ({"weight_decay": 0.0} if exempt else {})
            | ({"lr_scale": scale} if scale != 1.0 else {})
            for (scale, exempt), params in groups.items()
            if params or scale == 1.0
        ]

    # ------------------------------------------------------------------ throughput
    def on_train_epoch_start(self) -> None:
        self._epoch_start, self._epoch_images, self._epoch_validation = time.perf_counter(), 0, 0.0

    def on_validation_start(self) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self) -> None:
        # the kNN pass Lightning runs inside a training epoch is not training throughput
        self._epoch_validation += time.perf_counter() - self._validation_start

    def on_train_batch_end(self, outputs: Any, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._epoch_images += len(batch[0])

    def on_train_epoch_end(self) -> None:
        """Checks the last step (before the checkpoint callbacks run); logs ``train/images_per_s``."""
        self.raise_if_nonfinite()
        seconds = time.perf_counter() - self._epoch_start
        self.train_seconds += seconds  # validation included: the run's wall-clock
        training = seconds - self._epoch_validation
        # summed over processes: the whole job's throughput; the slowest process's epoch time
        self.log(
            "train/images_per_s",
            self._epoch_images / max(training, 1e-9),
            prog_bar=True,
            sync_dist=True,
            reduce_fx="sum",
        )
        self.log("train/epoch_seconds", training, sync_dist=True, reduce_fx="max")

    # ------------------------------------------------------------------ state
    def setup(self, stage: str) -> None:
        """Channels-last weights, before the strategy wraps the module: DDP built on NCHW weights and
        then handed NHWC gradients returned wrong averages (2 processes, gloo; PyTorch only warns of
        a slowdown, "Grad strides do not match bucket view strides")."""
        if channels_last(self.trainer.strategy.root_device):
            self.to(memory_format=torch.channels_last)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["augment_generator"] = self.generator.get_state()
        checkpoint["train_seconds"] = self.train_seconds
        checkpoint["skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "augment_generator" in checkpoint:
            self.generator.set_state(checkpoint["augment_generator"])
        self.train_seconds = float(checkpoint.get("train_seconds", 0.0))
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))


def _finite_per_term(terms: dict[str, Tensor]) -> Tensor:
    """(T,) bool, term t finite on every process: all decide alike, so their collectives stay paired."""
    return all_true(torch.stack([torch.isfinite(v.detach()).all() for v in terms.values()]))


def _all_gather_padded(x: Tensor, rows: int | None = None) -> Tensor:
    """Stack ``x`` (n, ...) of every rank into (W, rows, ...), zero-padded along dim 0.

    ``rows`` must be at least every rank's ``n`` (default: ``n``, equal on all ranks).
    """
    rows = len(x) if rows is None else rows
    padded = x.new_zeros((rows, *x.shape[1:]))
    padded[: len(x)] = x
    return all_gather(padded).view(world_size(), rows, *x.shape[1:])
