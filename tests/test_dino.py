"""DINO: the step (student on every view, teacher on the global ones, the centre after the loss), the head, the
EMA, the teacher-temperature warm-up, the frozen last layer, its rules, exact resume, two processes against one,
the configs and the CPU demo."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp
from pipeline_helpers import Inputs, StopAfterEpoch, demo_run, float64_steps, quiet_trainer, run_as_rank, shrunk_run
from torch import Tensor, nn

from contrastive.augment import Augment, normalize_uint8
from contrastive.data import TensorDataModule, shapes
from contrastive.losses import DINOLoss, SupCon, dino_center_update, dino_loss
from contrastive.models import convnet, mlp
from contrastive.pipelines import DINO, DINOHead
from contrastive.pipelines.base import RunFacts
from contrastive.views import MultiCrop, ViewGroup


def _augment(size: int = 16, **kwargs: Any) -> Augment:
    return Augment(size=size, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], **kwargs)


def _multicrop(local: int = 3) -> MultiCrop:
    return MultiCrop({"global": ViewGroup(_augment(), 2), "local": ViewGroup(_augment(size=8), local)})


def _dino(seed: int = 0, **kwargs: Any) -> DINO:
    torch.manual_seed(seed)
    args: dict[str, Any] = dict(
        projector=DINOHead(32, 32, out_dim=24, bottleneck_dim=8, batchnorm=True),
        loss=DINOLoss(student_temperature=0.1, teacher_temperature=0.07, warmup_teacher_temperature=0.04),
        momentum=0.9,
        teacher_temperature_warmup_epochs=0,
        feature_dim=32,
        online_probe=True,
        augment=_multicrop(),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4),
    )
    args.update(kwargs)
    return DINO(backbone=convnet(width=8), **args)


def _images(n: int = 6, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g), torch.arange(n) % 10


class _Recorder(nn.Module):
    """Wraps DINO's loss and records its inputs."""

    def __init__(self, loss: DINOLoss) -> None:
        super().__init__()
        self.inner, self.calls = loss, []  # type: ignore[var-annotated]
        self.teacher_temperature = loss.teacher_temperature
        self.warmup_teacher_temperature = loss.warmup_teacher_temperature

    def forward(self, s: Tensor, t: Tensor, c: Tensor, teacher_temperature: float | None = None) -> Tensor:
        self.calls.append((s, t, c.clone(), teacher_temperature))
        return self.inner(s, t, c, teacher_temperature)


# --------------------------------------------------------------------------- the step


def test_the_student_sees_every_view_and_the_teacher_the_global_ones() -> None:
    """student_out (V, B, K) = head(backbone(view)), teacher_out (G, B, K) = the EMA nets' of the 2 global views,
    without gradient; one backbone pass per size (2B global, then 3B local) and one head pass over all, as the
    authors' MultiCropWrapper."""
    dino = _dino(online_probe=False)
    dino.backbone, dino.loss = Inputs(dino.backbone), _Recorder(dino.loss)
    loss = dino.training_step(_images(), 0)
    glob, local = dino.backbone.seen
    assert glob.shape == (12, 3, 16, 16) and local.shape == (18, 3, 8, 8)
    ((s, t, c, t_t),) = dino.loss.calls
    assert s.shape == (5, 6, 24) and t.shape == (2, 6, 24) and t_t == 0.07
    assert s.requires_grad and not t.requires_grad and t.grad_fn is None
    assert torch.equal(c, torch.zeros(24))  # the centre before this step's update
    with torch.no_grad():  # train-mode BN gives the same batch the same outputs again
        student = dino.projector(torch.cat([dino.backbone.net(glob), dino.backbone.net(local)]))  # one head pass
        torch.testing.assert_close(s, student.view(5, 6, 24), rtol=0, atol=1e-6)
        teacher = dino.teacher_projector(dino.teacher_backbone(glob)).view(2, 6, 24)
        torch.testing.assert_close(t, teacher, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss, dino_loss(s, t, c, 0.1, 0.07), rtol=0, atol=0)
    loss.backward()
    assert all(p.grad is None for p in [*dino.teacher_backbone.parameters(), *dino.teacher_projector.parameters()])
    assert dino.projector.mlp[0].weight.grad is not None


def test_an_augment_gives_two_global_views_both_seen_by_the_teacher() -> None:
    dino = _dino(augment=_augment(), online_probe=False)
    dino.loss = _Recorder(dino.loss)
    dino.training_step(_images(), 0)
    ((s, t, _, _),) = dino.loss.calls
    assert s.shape == (2, 6, 24) and t.shape == (2, 6, 24)


def test_the_centre_takes_the_teachers_batch_mean_after_the_loss() -> None:
    dino = _dino(online_probe=False)
    dino.loss = _Recorder(dino.loss)
    for step in range(2):
        dino.training_step(_images(seed=step), step)
    (_, t0, c0, _), (_, t1, c1, _) = dino.loss.calls
    torch.testing.assert_close(c1, dino_center_update(c0, t0, 0.9), rtol=0, atol=0)
    torch.testing.assert_close(dino.center, dino_center_update(c1, t1, 0.9), rtol=0, atol=0)
    assert "center" in dino.state_dict() and dino.center.abs().sum() > 0


class _NaNLoss(DINOLoss):
    def forward(self, s: Tensor, t: Tensor, c: Tensor, teacher_temperature: float | None = None) -> Tensor:
        return super().forward(s, t, c, teacher_temperature) * float("nan")


def test_a_skipped_step_leaves_the_centre_alone() -> None:
    dino = _dino(loss=_NaNLoss(), on_nonfinite="skip", online_probe=False)
    dino.print = lambda *a, **k: None  # type: ignore[method-assign]  # no Trainer attached
    dino.training_step(_images(), 0)
    assert dino.skipped_steps == 1 and torch.equal(dino.center, torch.zeros(24))


def _assert_ema(new: Tensor, xi: Tensor, theta: Tensor, m: float) -> None:
    """``new`` is ``m xi + (1 - m) theta`` (float64) to float32 rounding (2 ulp of the larger term)."""
    a, b = m * xi.double(), (1 - m) * theta.double()
    assert ((new.double() - (a + b)).abs() <= 2 * torch.finfo(torch.float32).eps * (a.abs() + b.abs())).all()


def test_the_teacher_is_the_ema_of_backbone_and_head_once_per_optimiser_step() -> None:
    dino = _dino(momentum=0.9)
    student = [*dino.backbone.parameters(), *dino.projector.parameters()]
    with torch.no_grad():
        for p in student:
            p.add_(0.1 * torch.randn_like(p))  # student != teacher
    teacher = [*dino.teacher_backbone.parameters(), *dino.teacher_projector.parameters()]
    xi, theta = [p.clone() for p in teacher], [p.detach().clone() for p in student]
    assert len(teacher) == len(theta) and not any(p.requires_grad for p in teacher)
    dino.training_step(_images(), 0)
    for x, t, new in zip(xi, theta, teacher):
        _assert_ema(new, x, t, 0.9)
    after = [p.clone() for p in teacher]
    dino.training_step(_images(seed=2), 1)  # the same optimiser step (global_step 0): an accumulated micro-batch
    assert all(torch.equal(a, p) for a, p in zip(after, teacher))
    assert not {id(p) for g in dino.parameter_groups() for p in g["params"]} & {id(p) for p in teacher}


def test_the_head_normalises_then_applies_a_weight_normalised_layer_with_unit_norms() -> None:
    head = DINOHead(10, 16, out_dim=7, bottleneck_dim=5, num_layers=3, batchnorm=False)
    linears = [m for m in head.mlp.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 16), (16, 16), (16, 5)]
    assert any(isinstance(m, nn.GELU) for m in head.mlp.modules())
    assert not any(isinstance(m, nn.BatchNorm1d) for m in head.mlp.modules())
    g = head.last_layer.parametrizations.weight.original0
    assert g.shape == (7, 1) and not g.requires_grad and torch.equal(g, torch.ones(7, 1))
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(7), rtol=0, atol=1e-6)
    x = torch.randn(4, 10)
    z = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    torch.testing.assert_close(head(x), z @ head.last_layer.weight.T, rtol=0, atol=1e-6)
    assert DINOHead(10, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad


def test_any_mlp_is_a_head_whose_last_linear_gives_k_and_is_the_frozen_layer() -> None:
    head = mlp(32, 32, 20)
    dino = _dino(projector=head)
    last = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    assert dino.last_layer[0] is last and dino.center.shape == (20,)
    with_head = _dino()
    assert with_head.last_layer[0] is with_head.projector.last_layer  # DINOHead: its weight-normalised layer


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(loss=SupCon()), "loss SupCon does not fit the DINO pipeline: .*use loss=dino"),
        (dict(momentum=1.5), r"pipeline.momentum=1.5 must be in \[0, 1\]"),
        (dict(center_momentum=-0.1), r"pipeline.center_momentum=-0.1 must be in \[0, 1\]"),
        (dict(freeze_last_layer_epochs=-1), "freeze_last_layer_epochs must be a whole number of epochs >= 0"),
        (dict(teacher_temperature_warmup_epochs=1.5), "teacher_temperature_warmup_epochs must be a whole number"),
        (dict(projector=nn.Sequential(nn.ReLU())), "DINO's head must end in an nn.Linear.*DINOHead"),
        (dict(augment=MultiCrop([ViewGroup(_augment(), 1)])), "draws 1 view: give it at least two"),
    ],
)
def test_what_it_cannot_train_is_one_value_error(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _dino(**kwargs)


def test_check_run_is_the_base_rule() -> None:
    dino = _dino()
    dino.check_run(RunFacts(batch_size=2))
    with pytest.raises(ValueError, match="last batch of 1 image"):
        dino.check_run(RunFacts(batch_size=8, last_batch=1))


# --------------------------------------------------------------------------- schedules, freezing, exact resume


class _Schedules(pl.Callback):
    """The momentum and teacher temperature of every step, and the loss."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, float, float | None]] = []
        self.losses: list[Tensor] = []

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, *args: Any) -> None:
        step = (trainer.current_epoch, trainer.global_step)
        self.steps.append((*step, module.current_momentum(), module.current_teacher_temperature()))

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        self.losses.append(outputs["loss"].detach().clone())


def _fit(tmp: Path, ckpt: str | None = None, stop_after: int | None = None) -> tuple[DINO, pl.Trainer, _Schedules]:
    pl.seed_everything(0, verbose=False)
    splits = shapes(num_train=64, num_test=16, size=16, seed=0)
    data = TensorDataModule(splits, batch_size=16, eval_batch_size=64, seed=0)
    dino = _dino(momentum=0.9, teacher_temperature_warmup_epochs=3, freeze_last_layer_epochs=1)
    schedules = _Schedules()
    callbacks: list[pl.Callback] = [schedules] + ([StopAfterEpoch(stop_after)] if stop_after is not None else [])
    trainer = quiet_trainer(max_epochs=3, default_root_dir=tmp, callbacks=callbacks)
    trainer.fit(dino, datamodule=data, ckpt_path=ckpt)
    return dino, trainer, schedules


def test_resume_mid_run_is_exact_with_the_schedules_and_the_frozen_last_layer(tmp_path: Path) -> None:
    """Stopped after epoch 1 and resumed from its checkpoint, the run ends bitwise as the uninterrupted one:
    student, teacher, centre, BN statistics, generator, and the momentum and teacher temperature of every step.
    The head's last layer does not move in epoch 1 (frozen) and does in epoch 2; T_t is linear over 3 epochs."""
    straight, t_straight, s_straight = _fit(tmp_path / "a")
    first, t_first, s_first = _fit(tmp_path / "b", stop_after=0)
    initial = _dino(momentum=0.9).projector.last_layer.parametrizations.weight.original1
    assert t_first.global_step == 4
    assert torch.equal(first.projector.last_layer.parametrizations.weight.original1, initial)  # frozen in epoch 1
    assert not torch.equal(first.projector.mlp[0].weight, _dino().projector.mlp[0].weight)  # the rest trained
    t_first.save_checkpoint(tmp_path / "mid.ckpt")
    resumed, t_resumed, s_resumed = _fit(tmp_path / "c", ckpt=str(tmp_path / "mid.ckpt"))
    assert t_straight.global_step == t_resumed.global_step == 12
    a, b = straight.state_dict(), resumed.state_dict()
    assert {"center", "teacher_backbone.0.weight", "teacher_projector.mlp.0.weight"} <= set(a)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not torch.equal(resumed.projector.last_layer.parametrizations.weight.original1, initial)
    assert not torch.equal(first.center, resumed.center) and not torch.equal(
        first.teacher_backbone[0].weight, resumed.teacher_backbone[0].weight
    )
    assert torch.equal(straight.generator.get_state(), resumed.generator.get_state())
    assert s_first.steps + s_resumed.steps == s_straight.steps
    for x, y in zip(s_first.losses + s_resumed.losses, s_straight.losses):
        assert torch.equal(x, y)
    for epoch, t, m, t_t in s_straight.steps:  # T = 12 optimiser steps; T_t: linspace(0.04, 0.07, 3), then 0.07
        assert m == pytest.approx(1 - 0.1 * (math.cos(math.pi * t / 12) + 1) / 2, abs=1e-15)
        assert t_t == pytest.approx([0.04, 0.055, 0.07][epoch], abs=1e-15)
    assert [t for _, t, _, _ in s_straight.steps] == list(range(12))


# --------------------------------------------------------------------------- two processes against one

WORLD, PER_RANK = 2, 6


class _MirrorDINO(DINO):
    """DINO whose views are the image and its mirror image (global) and the image at half size (local): the
    comparison isolates what DDP changes (sharding, the centre's all-reduce, gradient averaging) from the RNG."""

    def views(self, images: Tensor, n: int = 2) -> list[Tensor]:
        x = normalize_uint8(images, self.augment.mean, self.augment.std).to(self.dtype)
        return [x, x.flip(-1), x[..., ::2, ::2]]


def _bn_free_dino() -> DINO:
    """Without BatchNorm: per-process statistics differ from global ones and SyncBatchNorm is GPU-only, so
    exactness on the CPU is shown without BN (``trainer=ddp`` syncs BN on GPUs)."""
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip
    return _MirrorDINO(
        backbone=backbone,
        projector=DINOHead(16, 32, out_dim=12, bottleneck_dim=8, batchnorm=False, norm_last_layer=False),
        loss=DINOLoss(student_temperature=0.1, teacher_temperature=0.05),
        momentum=0.9,
        freeze_last_layer_epochs=0,
        augment=Augment(size=16),
        optimizer=partial(torch.optim.SGD, lr=0.5, momentum=0.9),
        feature_dim=16,
        online_probe=False,
    ).double()


def _three_steps(devices: int) -> dict[str, Any]:
    """Three float64 steps of 6 images per rank (12 in one process); the loss, gradients, state."""
    splits = shapes(num_train=3 * PER_RANK * WORLD, num_test=4, size=16, seed=1)
    return float64_steps(_bn_free_dino(), splits, PER_RANK * WORLD // devices, devices)


def test_two_processes_equal_one_process_holding_the_global_batch(tmp_path: Path, free_port) -> None:  # type: ignore[no-untyped-def]
    """The centre all-reduced, DDP's gradient averaging: three float64 steps (2 global + 1 local view) on two gloo
    processes give the loss, gradients, weights, teacher and centre of one process on the global batch."""
    args = (free_port(), str(tmp_path), WORLD, _three_steps)
    mp.start_processes(run_as_rank, args=args, nprocs=WORLD, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    ref = _three_steps(1)
    assert len(ref["losses"]) == 3 and "projector.last_layer.parametrizations.weight.original0" in ref["grads"]
    for step in range(3):  # each rank's loss is the mean over its own images: their mean is the global batch's
        mean = sum(out["losses"][step] for out in ranks) / WORLD
        torch.testing.assert_close(mean, ref["losses"][step], rtol=1e-10, atol=0)
    assert not torch.equal(ranks[0]["losses"][0], ranks[1]["losses"][0])  # the ranks saw different images
    assert torch.equal(ranks[0]["state"]["center"], ranks[1]["state"]["center"])
    for out in ranks:
        assert out["grads"].keys() == ref["grads"].keys()
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(out["grads"][name], grad, rtol=1e-10, atol=1e-14, msg=name)
        assert {"center", "teacher_projector.mlp.0.weight"} <= out["state"].keys() == ref["state"].keys()
        for name, value in ref["state"].items():
            torch.testing.assert_close(out["state"][name], value, rtol=1e-10, atol=1e-14, msg=name)


# --------------------------------------------------------------------------- configs and CLI


def test_experiment_dino_cifar10_holds_solo_learns_recipe(config) -> None:  # type: ignore[no-untyped-def]
    cfg = config("train", ["experiment=dino_cifar10"])
    assert cfg.name == "dino_cifar10" and cfg.pipeline._target_ == "contrastive.pipelines.DINO"
    assert cfg.data.source._target_ == "contrastive.data.cifar10" and cfg.data.batch_size == 256
    assert cfg.model.backbone.name == "resnet18" and cfg.model.backbone.cifar_stem is True
    h = cfg.model.projector
    assert h._target_ == "contrastive.pipelines.dino.DINOHead"
    assert (h.hidden_dim, h.bottleneck_dim, h.out_dim, h.num_layers, h.batchnorm) == (2048, 256, 4096, 3, True)
    p = cfg.pipeline
    assert (p.momentum, p.momentum_cosine, p.center_momentum) == (0.9995, True, 0.9)
    assert (p.teacher_temperature_warmup_epochs, p.freeze_last_layer_epochs) == (50, 1)
    loss = cfg.loss
    assert (loss.student_temperature, loss.warmup_teacher_temperature, loss.teacher_temperature) == (0.1, 0.04, 0.07)
    o = cfg.optimizer
    assert (o._target_, o.lr, o.weight_decay, o.trust_coefficient, o.clip_lr) == (
        "contrastive.optim.LARS",
        0.3,
        1e-6,
        0.02,
        True,
    )
    assert (cfg.scheduler.warmup_epochs, cfg.trainer.max_epochs) == (10, 1000)
    assert list(cfg.aug.groups) == ["first", "second"]  # BYOL's asymmetric pair, both global


def test_experiment_dino_cifar10_builds_the_heads_and_multicrop_adds_local_views(config) -> None:  # type: ignore[no-untyped-def]
    from contrastive.cli.run import build_pipeline

    dino = build_pipeline(config("train", ["experiment=dino_cifar10"]))
    assert isinstance(dino, DINO) and isinstance(dino.augment, MultiCrop) and dino.augment.sizes == [32, 32]
    shapes_of = lambda head: [(m.in_features, m.out_features) for m in head.modules() if isinstance(m, nn.Linear)]  # noqa: E731
    expected = [(512, 2048), (2048, 2048), (2048, 256), (256, 4096)]
    assert shapes_of(dino.projector) == shapes_of(dino.teacher_projector) == expected
    assert dino.center.shape == (4096,)
    crops = build_pipeline(config("train", ["experiment=dino_cifar10", "aug=multicrop"])).augment
    assert isinstance(crops, MultiCrop) and crops.sizes == [32, 32] + [16] * 6


def test_dino_shapes_cli_run(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, ckpt = shrunk_run(cli, "dino_shapes", tmp_path)
    assert {"center", "teacher_backbone.0.weight", "teacher_projector.mlp.0.weight"} <= set(ckpt["state_dict"])
    assert ckpt["state_dict"]["center"].abs().sum() > 0


def test_a_loss_of_another_form_is_refused_in_one_line(config) -> None:  # type: ignore[no-untyped-def]
    from hydra.errors import InstantiationException

    from contrastive.cli.run import build_pipeline

    with pytest.raises(InstantiationException, match="loss SupCon does not fit the DINO pipeline.*loss=dino"):
        build_pipeline(config("train", ["experiment=dino_shapes", "loss=sup_con"]))


@pytest.mark.slow
def test_dino_shapes_demo_learns(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The CPU demo as shipped beats the untrained network by 30 points of kNN and 10 of the linear probe.

    (kNN 73.1 vs 24.7, probe 97.0 vs 79.9 at seed 0: margins of 48.4 and 17.1; see the config.)
    """
    metrics = demo_run(cli, "dino_shapes", tmp_path)
    assert metrics["epochs"] == 12
    assert metrics["knn_top1"] >= metrics["knn_top1_untrained"] + 30, metrics
    assert metrics["linear_top1"] >= metrics["linear_top1_untrained"] + 10, metrics
