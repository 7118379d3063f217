"""MoCo v3: the step (both directions, keys without gradient), the EMA and its cosine momentum, its rules,
exact resume, two processes against one, the configs and the CPU demo."""

from __future__ import annotations

import json
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
from contrastive.losses import InfoNCE, MoCoV3Loss, NTXent, SupCon
from contrastive.models import convnet, mlp
from contrastive.pipelines import MoCoV3
from contrastive.pipelines.base import RunFacts
from contrastive.views import MultiCrop, ViewGroup


def _augment(size: int = 16, **kwargs: Any) -> Augment:
    return Augment(size=size, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], **kwargs)


def _mocov3(seed: int = 0, **kwargs: Any) -> MoCoV3:
    torch.manual_seed(seed)
    args: dict[str, Any] = dict(
        projector=mlp(32, 32, 16, last_bn=True),
        predictor=mlp(16, 32, 16),
        loss=MoCoV3Loss(temperature=0.2),
        momentum=0.9,
        feature_dim=32,
        online_probe=True,
        augment=_augment(),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4),
    )
    args.update(kwargs)
    return MoCoV3(backbone=convnet(width=8), **args)


def _images(n: int = 16, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g), torch.arange(n) % 10


class _Recorder(nn.Module):
    """Wraps a loss and records its inputs."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = loss, []  # type: ignore[var-annotated]

    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        self.calls.append((q, k))
        return self.inner(q, k)


# --------------------------------------------------------------------------- the step


def test_the_step_sums_both_directions_of_queries_against_the_other_views_keys() -> None:
    """loss = ctr(q1, k2) + ctr(q2, k1), q = predictor(projector(backbone(v))), k = the key encoder's, no gradient."""
    moco = _mocov3(online_probe=False)
    moco.backbone = Inputs(moco.backbone)
    moco.loss = _Recorder(moco.loss)
    loss = moco.training_step(_images(), 0)
    v1, v2 = moco.backbone.seen[:2]  # the query passes: view 1, then view 2
    (q1, k2), (q2, k1) = moco.loss.calls
    for k in (k1, k2):
        assert not k.requires_grad and k.grad_fn is None and k.shape == (16, 16)
    assert q1.requires_grad and q2.requires_grad
    # train-mode BN gives the same batch the same outputs again: recompute every input from the views
    with torch.no_grad():
        for q, v in ((q1, v1), (q2, v2)):
            torch.testing.assert_close(q, moco.predictor(moco.projector(moco.backbone.net(v))), rtol=0, atol=1e-6)
        for k, v in ((k1, v1), (k2, v2)):
            torch.testing.assert_close(k, moco.key_projector(moco.key_backbone(v)), rtol=0, atol=1e-6)
    expected = moco.loss.inner(q1, k2) + moco.loss.inner(q2, k1)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    assert not torch.equal(v1, v2)  # two different views
    loss.backward()
    assert all(p.grad is None for p in [*moco.key_backbone.parameters(), *moco.key_projector.parameters()])
    assert all(p.grad is not None for p in moco.predictor.parameters())


def test_each_view_is_normalised_with_its_own_batch_statistics() -> None:
    """As the authors, one pass per view: BN statistics of view 1 never mix with view 2's."""
    moco = _mocov3(online_probe=False)
    moco.backbone = Inputs(moco.backbone)
    moco.training_step(_images(), 0)
    assert [len(x) for x in moco.backbone.seen] == [16, 16]


def _assert_ema(new: Tensor, xi: Tensor, theta: Tensor, m: float) -> None:
    """``new`` is ``m xi + (1 - m) theta`` (float64) to float32 rounding (2 ulp of the larger term)."""
    a, b = m * xi.double(), (1 - m) * theta.double()
    assert ((new.double() - (a + b)).abs() <= 2 * torch.finfo(torch.float32).eps * (a.abs() + b.abs())).all()


def test_the_key_encoder_is_the_ema_of_backbone_and_projector_once_per_optimiser_step() -> None:
    moco = _mocov3(momentum=0.9)
    with torch.no_grad():
        for p in [*moco.backbone.parameters(), *moco.projector.parameters()]:
            p.add_(0.1 * torch.randn_like(p))  # query != key encoder
    keys = [*moco.key_backbone.parameters(), *moco.key_projector.parameters()]
    xi = [p.clone() for p in keys]
    theta = [p.detach().clone() for p in [*moco.backbone.parameters(), *moco.projector.parameters()]]
    assert len(keys) == len(theta) and not any(p.requires_grad for p in keys)
    moco.training_step(_images(), 0)
    for x, t, new in zip(xi, theta, keys):
        _assert_ema(new, x, t, 0.9)
    after = [p.clone() for p in keys]
    moco.training_step(_images(seed=2), 1)  # the same optimiser step (global_step 0): an accumulated micro-batch
    assert all(torch.equal(a, p) for a, p in zip(after, keys))
    # the predictor has no key twin; the optimiser sees none of the key encoder
    opt_params = {id(p) for g in moco.parameter_groups() for p in g["params"]}
    assert not opt_params & {id(p) for p in keys}
    assert {id(p) for p in moco.predictor.parameters()} <= opt_params


def test_an_asymmetric_pair_draws_view_1_from_the_first_group_and_view_2_from_the_second() -> None:
    pair = MultiCrop({"first": ViewGroup(_augment(), 1), "second": ViewGroup(_augment(solarize_p=1.0), 1)})
    moco = _mocov3(augment=pair, online_probe=False, seed=3)
    moco.backbone = Inputs(moco.backbone)
    images, labels = _images()
    moco.training_step((images, labels), 0)
    expected = pair(images, torch.Generator().manual_seed(0))  # the pipeline's generator: seed 0
    for seen, view in zip(moco.backbone.seen, expected):
        torch.testing.assert_close(seen, view, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(loss=SupCon()), "loss SupCon does not fit the MoCoV3 pipeline: .*use loss=mocov3"),
        (dict(loss=InfoNCE(symmetric=True)), "loss.symmetric=true adds InfoNCE.*pass loss.symmetric=false"),
        (dict(momentum=1.5), r"pipeline.momentum=1.5 must be in \[0, 1\]"),
        (
            dict(augment=MultiCrop([ViewGroup(_augment(), 2), ViewGroup(_augment(size=8), 2)])),
            r"MoCo v3 contrasts two views of one size, but the MultiCrop draws views of \[16, 16, 8, 8\] px",
        ),
    ],
)
def test_what_it_cannot_train_is_one_value_error(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _mocov3(**kwargs)


def test_info_nce_and_nt_xent_are_taken_as_one_direction_losses() -> None:
    for loss in (InfoNCE(0.2), NTXent(0.2)):
        assert isinstance(_mocov3(loss=loss), MoCoV3)


def test_check_run_refuses_a_batch_without_negatives_and_a_last_batch_of_one() -> None:
    moco = _mocov3()
    moco.check_run(RunFacts(batch_size=2))
    moco.check_run(RunFacts(batch_size=1, world_size=2))  # one query and one key per process, two in all
    with pytest.raises(ValueError, match="data.batch_size=1 on 1 process.*without a negative key"):
        moco.check_run(RunFacts(batch_size=1))
    with pytest.raises(ValueError, match="last batch of 1 image"):
        moco.check_run(RunFacts(batch_size=8, last_batch=1))


def test_mlp_last_bn_standardises_each_output_without_affine_parameters() -> None:
    """The projector's end (the authors' ResNet head): BN over the batch, no weight or bias."""
    head = mlp(6, 12, 5, last_bn=True)
    bn = list(head.children())[-1]
    assert isinstance(bn, nn.BatchNorm1d) and not bn.affine and bn.num_features == 5
    out = head.train()(torch.randn(64, 6) * 3 + 2)
    torch.testing.assert_close(out.mean(0), torch.zeros(5), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.var(0, unbiased=False), torch.ones(5), rtol=0, atol=1e-3)
    assert not isinstance(list(mlp(6, 12, 5).children())[-1], nn.BatchNorm1d)  # off by default


# --------------------------------------------------------------------------- the momentum and exact resume


class _Momenta(pl.Callback):
    """The momentum of every step, and the loss."""

    def __init__(self) -> None:
        self.momenta: list[tuple[int, float]] = []
        self.losses: list[Tensor] = []

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        self.momenta.append((trainer.global_step, module.current_momentum()))  # type: ignore[operator]

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        self.losses.append(outputs["loss"].detach().clone())


def _fit(tmp: Path, ckpt: str | None = None, stop_after: int | None = None) -> tuple[MoCoV3, pl.Trainer, _Momenta]:
    pl.seed_everything(0, verbose=False)
    splits = shapes(num_train=64, num_test=16, size=16, seed=0)
    data = TensorDataModule(splits, batch_size=16, eval_batch_size=64, seed=0)
    moco = _mocov3(momentum=0.9)
    momenta = _Momenta()
    callbacks: list[pl.Callback] = [momenta] + ([StopAfterEpoch(stop_after)] if stop_after is not None else [])
    trainer = quiet_trainer(max_epochs=2, default_root_dir=tmp, callbacks=callbacks)
    trainer.fit(moco, datamodule=data, ckpt_path=ckpt)
    return moco, trainer, momenta


def test_resume_mid_run_is_exact_and_the_momentum_follows_the_cosine(tmp_path: Path) -> None:
    """A run stopped after epoch 1 and resumed from its checkpoint ends bitwise where the uninterrupted one
    ends: weights, key encoder, BN statistics, augmentation generator, and the momentum of every step."""
    straight, t_straight, m_straight = _fit(tmp_path / "a")
    first, t_first, m_first = _fit(tmp_path / "b", stop_after=0)
    assert t_first.global_step == 4
    t_first.save_checkpoint(tmp_path / "mid.ckpt")
    resumed, t_resumed, m_resumed = _fit(tmp_path / "c", ckpt=str(tmp_path / "mid.ckpt"))
    assert t_straight.global_step == t_resumed.global_step == 8
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and {"key_backbone.0.weight", "key_projector.6.running_mean"} <= set(a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not torch.equal(first.key_backbone[0].weight, resumed.key_backbone[0].weight)  # epoch 2 moved it
    assert torch.equal(straight.generator.get_state(), resumed.generator.get_state())
    assert m_first.momenta + m_resumed.momenta == m_straight.momenta
    for x, y in zip(m_first.losses + m_resumed.losses, m_straight.losses):
        assert torch.equal(x, y)
    # m_t = 1 - (1 - m0) (cos(pi t / T) + 1) / 2 over the T = 8 optimiser steps, from 0.9 towards 1
    for t, m in m_straight.momenta:
        assert m == pytest.approx(1 - 0.1 * (math.cos(math.pi * t / 8) + 1) / 2, abs=1e-15)
    assert [t for t, _ in m_straight.momenta] == list(range(8))


def test_momentum_cosine_false_keeps_m0() -> None:
    assert _mocov3(momentum=0.97, momentum_cosine=False).current_momentum() == 0.97


# --------------------------------------------------------------------------- two processes against one

WORLD, PER_RANK = 2, 6


class _MirrorMoCoV3(MoCoV3):
    """MoCo v3 whose two views are the image and its mirror image: the comparison isolates what DDP changes
    (sharding, gathering the keys, gradient averaging) from the augmentation RNG."""

    def views(self, images: Tensor, n: int = 2) -> list[Tensor]:
        x = normalize_uint8(images, self.augment.mean, self.augment.std).to(self.dtype)
        return [x, x.flip(-1)]


def _bn_free_mocov3() -> MoCoV3:
    """Without BatchNorm: per-process statistics differ from global ones and SyncBatchNorm is GPU-only, so
    exactness on the CPU is shown without BN (``trainer=ddp`` syncs BN on GPUs, as the authors)."""
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip
    return _MirrorMoCoV3(
        backbone=backbone,
        projector=mlp(16, 32, 8, batchnorm=False),
        predictor=mlp(8, 32, 8, batchnorm=False),
        loss=MoCoV3Loss(temperature=0.2, gather=True),
        momentum=0.9,
        augment=Augment(size=16),
        optimizer=partial(torch.optim.SGD, lr=0.5, momentum=0.9),
        feature_dim=16,
        online_probe=False,
    ).double()


def _three_steps(devices: int) -> dict[str, Any]:
    """Three float64 steps through the Trainer (DDP on ``devices`` gloo processes); the loss, gradients, weights."""
    splits = shapes(num_train=3 * PER_RANK * WORLD, num_test=4, size=16, seed=1)
    return float64_steps(_bn_free_mocov3(), splits, PER_RANK * WORLD // devices, devices)


def test_two_processes_equal_one_process_holding_the_global_batch(tmp_path: Path, free_port) -> None:  # type: ignore[no-untyped-def]
    """Keys gathered (without gradient) from both ranks, DDP's gradient averaging: three float64 steps on two
    gloo processes give the loss, gradients, weights and key encoder of one process on the global batch."""
    args = (free_port(), str(tmp_path), WORLD, _three_steps)
    mp.start_processes(run_as_rank, args=args, nprocs=WORLD, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    ref = _three_steps(1)
    assert len(ref["losses"]) == 3 and len(ref["grads"]) == 12  # backbone, projector, predictor: 2 layers each
    for step in range(3):  # each rank's loss is over its own queries: their mean is the global batch's
        mean = sum(out["losses"][step] for out in ranks) / WORLD
        torch.testing.assert_close(mean, ref["losses"][step], rtol=1e-10, atol=0)
    assert not torch.equal(ranks[0]["losses"][0], ranks[1]["losses"][0])  # the ranks saw different images
    for out in ranks:
        assert out["grads"].keys() == ref["grads"].keys()
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(out["grads"][name], grad, rtol=1e-10, atol=1e-14, msg=name)
        assert out["state"].keys() == ref["state"].keys() and "key_projector.3.weight" in ref["state"]
        for name, value in ref["state"].items():
            torch.testing.assert_close(out["state"][name], value, rtol=1e-10, atol=1e-14, msg=name)


# --------------------------------------------------------------------------- configs and CLI


def test_experiment_mocov3_cifar10_holds_solo_learns_recipe(config) -> None:  # type: ignore[no-untyped-def]
    cfg = config("train", ["experiment=mocov3_cifar10"])
    assert cfg.name == "mocov3_cifar10" and cfg.pipeline._target_ == "contrastive.pipelines.MoCoV3"
    assert cfg.data.source._target_ == "contrastive.data.cifar10" and cfg.data.batch_size == 256
    assert cfg.model.backbone.name == "resnet18" and cfg.model.backbone.cifar_stem is True
    pr = cfg.model.projector
    assert (pr.hidden_dim, pr.out_dim, pr.num_layers, pr.last_bn) == (4096, 256, 2, True)
    pd = cfg.pipeline.predictor
    assert (pd.in_dim, pd.hidden_dim, pd.out_dim, pd.num_layers) == (256, 4096, 256, 2)
    assert (cfg.pipeline.momentum, cfg.pipeline.momentum_cosine) == (0.99, True)
    assert cfg.loss._target_ == "contrastive.losses.MoCoV3Loss" and cfg.loss.temperature == 0.2 and cfg.loss.gather
    o = cfg.optimizer
    assert (o._target_, o.lr, o.weight_decay, o.trust_coefficient, o.clip_lr, o.exclude_1d) == (
        "contrastive.optim.LARS",
        0.3,
        1e-6,
        0.02,
        True,
        True,
    )
    assert (cfg.scheduler.warmup_epochs, cfg.scheduler.final_lr_fraction) == (10, 0.0)
    assert cfg.trainer.max_epochs == 1000
    first, second = cfg.aug.groups.first.augment, cfg.aug.groups.second.augment
    assert list(first.jitter) == list(second.jitter) == [0.4, 0.4, 0.2, 0.1]
    assert (first.solarize_p, second.solarize_p, first.blur_p, second.blur_p) == (0.0, 0.2, 0.0, 0.0)
    assert list(first.scale) == list(second.scale) == [0.08, 1.0]
    assert config("train", ["experiment=mocov3_cifar10", "trainer=ddp"]).trainer.sync_batchnorm is True


def test_experiment_mocov3_cifar10_builds_the_authors_heads(config) -> None:  # type: ignore[no-untyped-def]
    from contrastive.cli.run import build_pipeline

    moco = build_pipeline(config("train", ["experiment=mocov3_cifar10"]))
    assert isinstance(moco, MoCoV3) and isinstance(moco.augment, MultiCrop) and moco.augment.sizes == [32, 32]
    shapes_of = lambda head: [(m.in_features, m.out_features) for m in head.modules() if isinstance(m, nn.Linear)]  # noqa: E731
    assert shapes_of(moco.projector) == shapes_of(moco.key_projector) == [(512, 4096), (4096, 256)]
    assert shapes_of(moco.predictor) == [(256, 4096), (4096, 256)]
    assert not list(moco.projector.children())[-1].affine
    assert not hasattr(moco, "key_predictor") and not any("queue" in k for k in moco.state_dict())


def test_mocov3_shapes_cli_run(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, ckpt = shrunk_run(cli, "mocov3_shapes", tmp_path)
    assert {"key_backbone.0.weight", "key_projector.4.weight", "predictor.0.weight"} <= set(ckpt["state_dict"])


def test_a_loss_of_another_form_is_refused_in_one_line(config) -> None:  # type: ignore[no-untyped-def]
    from hydra.errors import InstantiationException

    from contrastive.cli.run import build_pipeline

    with pytest.raises(InstantiationException, match="loss SupCon does not fit the MoCoV3 pipeline.*loss=mocov3"):
        build_pipeline(config("train", ["experiment=mocov3_shapes", "loss=sup_con"]))


@pytest.mark.slow
def test_mocov3_cifar10_few_steps(cli, cifar10_root: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The real experiment config (ResNet-18, 4096-wide heads, LARS, asymmetric views) on a CIFAR-10 subset."""
    out = cli(
        "contrastive-train",
        "experiment=mocov3_cifar10",
        f"data.root={cifar10_root}",
        "data.subset=256",
        "data.test_subset=128",
        "data.batch_size=64",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "probe.epochs=5",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and 0 <= metrics["knn_top1"] <= 100 and 0 <= metrics["linear_top1"] <= 100
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4 and "key_projector.6.running_var" in ckpt["state_dict"]


@pytest.mark.slow
def test_mocov3_shapes_demo_learns(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The CPU demo as shipped beats the untrained network by 30 points of kNN and 10 of the linear probe.

    (kNN 88.2 vs 24.7, probe 99.8 vs 79.9 at seed 0; with colour views it ended below: see the config.)
    """
    metrics = demo_run(cli, "mocov3_shapes", tmp_path)
    assert metrics["epochs"] == 15
    assert metrics["knn_top1"] >= metrics["knn_top1_untrained"] + 30, metrics
    assert metrics["linear_top1"] >= metrics["linear_top1_untrained"] + 10, metrics
