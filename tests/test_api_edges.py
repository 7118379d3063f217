"""The Python API used directly (own training loop, plain Lightning Trainer): inputs it must take
or refuse clearly, and settings that must survive a cast or an early stop."""

from __future__ import annotations

import time
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from contrastive.augment import Augment
from contrastive.cli import ConfigError
from contrastive.cli.checks import check_config, check_eval_config, check_feature_dim
from contrastive.cli.run import build_pipeline
from contrastive.data import DataError, ImageTensors, IndexBatches, PKBatches, TensorDataModule, shapes
from contrastive.evaluation import knn_predict, linear_probe
from contrastive.losses import (
    ContrastiveMargin,
    InfoNCE,
    NTXent,
    SoftmaxCERegularizer,
    contrastive_margin,
    info_nce,
    nt_xent,
    pairwise_distance,
    sup_con,
    triplet_margin,
)
from contrastive.pipelines import SimCLR
from contrastive.schedules import warmup_cosine

G = torch.Generator().manual_seed(0)


# --------------------------------------------------------------------------- losses


def test_fixed_temperature_stays_exact_through_a_dtype_cast() -> None:
    """``.to(bfloat16)`` rounded T = 0.07 to 0.0698 (the loss then moved in its third digit)."""
    z1, z2 = torch.randn(6, 3, generator=G, dtype=torch.float64), torch.randn(6, 3, generator=G, dtype=torch.float64)
    cast = NTXent(0.07).to(torch.bfloat16)
    assert cast.temperature.value.dtype == torch.float64 and float(cast.temperature.value) == 0.07
    assert cast(z1, z2).item() == nt_xent(z1, z2, 0.07).item()
    assert "Temperature(0.07, learnable=False)" in repr(NTXent(0.07))
    assert "Temperature(initial=0.2, learnable=True)" in repr(NTXent(0.2, learnable=True))
    assert "normalize=False" in repr(ContrastiveMargin(normalize=False))


def test_a_temperature_tensor_of_several_values_is_refused() -> None:
    z = torch.randn(4, 2, generator=G)
    with pytest.raises(ValueError, match=r"temperature must be one number .* shape \(2,\)"):
        nt_xent(z, z.flip(0), torch.tensor([0.1, 0.5]))  # was broadcast over the columns: 8.04, neither T's value
    with pytest.raises(ValueError, match=r"shape \(4, 1\)"):
        sup_con(z, torch.arange(4) % 2, torch.full((4, 1), 0.1))


@pytest.mark.parametrize(
    "loss",
    [
        lambda z, y: nt_xent(z, z),
        lambda z, y: info_nce(z, z),
        lambda z, y: sup_con(z, y),
        lambda z, y: triplet_margin(z, y),
        lambda z, y: contrastive_margin(z, y),
    ],
)
def test_an_empty_batch_is_refused_not_nan(loss) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=r"N >= 1|M >= 1|n >= 1"):
        loss(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_pairwise_distance_of_empty_sets_is_empty() -> None:
    assert pairwise_distance(torch.zeros(0, 3), torch.ones(2, 3)).shape == (0, 2)
    with pytest.raises(ValueError, match=r"\(n, D\) and \(m, D\)"):
        pairwise_distance(torch.zeros(2, 3), torch.ones(2, 4))


def test_integer_labels_of_any_dtype() -> None:
    x, y = torch.randn(24, 4, generator=G), torch.arange(24) % 3
    reg = SoftmaxCERegularizer(4, 3)
    assert reg(x, y.int())[0].item() == reg(x, y)[0].item()
    assert torch.equal(knn_predict(x, y.to(torch.uint8), x, 3, k=5), knn_predict(x, y, x, 3, k=5))
    a = linear_probe(x, y.int(), x, y.to(torch.int16), num_classes=3, epochs=2)
    assert a["linear_top1"] == linear_probe(x, y, x, y, num_classes=3, epochs=2)["linear_top1"]


# --------------------------------------------------------------------------- evaluation


def test_linear_probe_runs_under_inference_mode_and_leaves_the_global_rng_alone() -> None:
    """Lightning's validation hooks run in inference mode: the probe used to fail there."""
    x, y = torch.randn(30, 5, generator=G), torch.arange(30) % 3
    plain = linear_probe(x, y, x, y, num_classes=3, epochs=2)
    state = torch.random.get_rng_state()
    with torch.inference_mode():
        inside = linear_probe(x.clone(), y.clone(), x.clone(), y.clone(), num_classes=3, epochs=2)
    assert torch.equal(state, torch.random.get_rng_state())  # "no RNG is involved" in W, b
    assert torch.equal(inside["classifier"].weight, plain["classifier"].weight)
    with pytest.raises(ValueError, match=r"\(N, D\) and \(M, D\)"):
        linear_probe(x[None], y, x, y, num_classes=3)


def test_knn_refuses_a_nan_temperature() -> None:
    x, y = torch.randn(10, 3, generator=G), torch.arange(10) % 2
    with pytest.raises(ValueError, match="temperature > 0"):
        knn_predict(x, y, x, 2, k=3, temperature=float("nan"))  # predicted class 0 everywhere


# --------------------------------------------------------------------------- data


def test_batches_move_on_when_a_pass_stops_early() -> None:
    """Without an epoch source (a plain loop that breaks, limit_train_batches) every pass repeated the first."""
    data = shapes(num_train=40, num_test=4, size=8, seed=0).train
    for batches in (
        IndexBatches(data, 8, shuffle=True, drop_last=True),
        PKBatches(data, 8, classes_per_batch=4, samples_per_class=2),
    ):
        firsts = []
        for _ in range(3):
            for _images, labels in batches:
                firsts.append(labels.tolist())
                break
        assert firsts[0] != firsts[1] and firsts[1] != firsts[2], type(batches).__name__


def test_data_inputs_that_would_be_silently_wrong_are_refused() -> None:
    images = torch.zeros(3, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(DataError, match="fractional"):
        ImageTensors(images, torch.tensor([0.9, 1.7, 0.0]), 2)  # truncated to 0, 1, 0 before
    assert ImageTensors(images, torch.tensor([0.0, 1.0, 1.0]), 2).labels.dtype == torch.long
    data = ImageTensors(images, torch.tensor([0, 1, 1]), 2)
    with pytest.raises(DataError, match=r"distinct class ids in \[0, 2\), got \[1, 1\]"):
        data.select_classes([1, 1])
    with pytest.raises(DataError, match="batch_size must be a positive integer, got 0"):
        IndexBatches(data, 0, shuffle=True, drop_last=True)
    with pytest.raises(ValueError, match="needs of="):
        Augment(size=4)(images, G, rows=torch.arange(3))


# --------------------------------------------------------------------------- a plain Lightning Trainer


class _Lr(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch, batch_idx: int) -> None:  # type: ignore[no-untyped-def]
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def _simclr(dtype: torch.dtype = torch.float32) -> SimCLR:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6))
    return SimCLR(
        projector=nn.Linear(6, 4),
        loss=NTXent(0.5),
        backbone=backbone,
        augment=Augment(size=8),
        optimizer=partial(torch.optim.SGD, lr=1.0),
        scheduler=partial(warmup_cosine, warmup_epochs=1),
        feature_dim=6,
        num_classes=10,
        online_probe=False,
    )


def _fit(precision: str = "32-true", **limits: int) -> list[float]:
    lr = _Lr()
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        precision=precision,
        callbacks=[lr],
        **limits,
    )
    trainer.fit(_simclr(), datamodule=TensorDataModule(shapes(num_train=32, num_test=4, size=8), batch_size=8))
    return lr.lrs


def test_schedule_under_max_steps_equals_the_one_under_max_epochs() -> None:
    """Only max_steps given (Lightning's max_epochs is then -1): the warm-up lasted the whole run."""
    by_epochs, by_steps = _fit(max_epochs=5), _fit(max_steps=20)
    assert by_steps == pytest.approx(by_epochs) and len(by_steps) == 20
    assert by_steps[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and by_steps[-1] < 0.05


def test_bf16_true_precision_trains() -> None:
    """The views were float32 for a bf16 backbone: 'mat1 and mat2 must have the same dtype'."""
    assert len(_fit("bf16-true", max_steps=2)) == 2


# --------------------------------------------------------------------------- pipelines in a plain Trainer


def _trainer(**kwargs) -> pl.Trainer:  # type: ignore[no-untyped-def]
    args = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**(args | kwargs))


def test_throughput_leaves_out_the_validation_pass() -> None:
    """images/s and epoch_seconds counted the kNN pass Lightning runs inside the epoch (half the rate)."""

    class SlowValidation(pl.Callback):
        def on_validation_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            time.sleep(1.0)

    pipeline = _simclr()
    trainer = _trainer(max_epochs=1, callbacks=[SlowValidation()])
    trainer.fit(pipeline, datamodule=TensorDataModule(shapes(num_train=32, num_test=8, size=8), batch_size=8))
    assert pipeline.train_seconds >= 1.0  # the wall-clock still includes it
    assert trainer.callback_metrics["train/epoch_seconds"].item() < 0.8
    assert trainer.callback_metrics["train/images_per_s"].item() > 32 / 0.8


def test_a_single_validation_loader_and_a_run_without_length_are_refused() -> None:
    data = shapes(num_train=32, num_test=8, size=8)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.test.images, data.test.labels), batch_size=8
    )
    with pytest.raises(
        ValueError, match=r"needs two validation loaders.*got 1.*val_dataloaders=\[bank_loader, test_loader\]"
    ):
        _trainer(max_steps=1).fit(_simclr(), train_dataloaders=loader, val_dataloaders=loader)  # logged nothing before
    with pytest.raises(ValueError, match="needs the run's length: give the Trainer max_epochs or max_steps"):
        _trainer(max_epochs=-1, max_time="00:00:00:05", limit_val_batches=0).fit(  # OverflowError before
            _simclr(), datamodule=TensorDataModule(data, batch_size=8)
        )


def test_moco_key_encoder_moves_once_per_optimiser_step_under_gradient_accumulation(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """With accumulate_grad_batches=4 the EMA ran on every micro-batch: m^4 per step."""
    import contrastive.pipelines.moco as moco_module
    from contrastive.models import convnet, mlp
    from contrastive.pipelines import MoCo

    momenta: list[float] = []
    ema = moco_module.ema_update
    monkeypatch.setattr(moco_module, "ema_update", lambda t, s, m: (momenta.append(m), ema(t, s, m)))
    torch.manual_seed(0)
    moco = MoCo(
        backbone=convnet(width=4),
        projector=mlp(16, 16, 8),
        loss=InfoNCE(0.2),
        augment=Augment(size=8),
        optimizer=partial(torch.optim.SGD, lr=0.05),
        queue_size=32,
        feature_dim=16,
        online_probe=False,
        bn_splits=2,
    )
    trainer = _trainer(max_epochs=1, limit_val_batches=0, accumulate_grad_batches=4)
    trainer.fit(moco, datamodule=TensorDataModule(shapes(num_train=64, num_test=8, size=8), batch_size=8))
    assert trainer.global_step == 2 and len(momenta) == 2 * 2  # backbone and projector, once per step (was 8 steps)


# --------------------------------------------------------------------------- CLI validation, at its boundaries


@pytest.mark.parametrize(
    ("valid", "invalid", "message"),
    [
        (
            "eval.every_n_epochs=1",
            "eval.every_n_epochs=true",
            "eval.every_n_epochs=True is invalid: it must be a positive integer",
        ),  # a bool is an int to isinstance
        (
            "data.batch_size=2",
            "data.batch_size=1",
            "data.batch_size=1 is invalid: it must be an integer >= 2 (a contrastive batch needs pairs)",
        ),
        # scheduler=constant keeps the experiment's warm-up (2 in simclr_shapes): warmup_epochs=0 means none
        (
            "scheduler=constant scheduler.warmup_epochs=0",
            "scheduler=constant scheduler.warmup_epochs=-0.5",
            "scheduler.warmup_epochs=-0.5 is invalid: it must be a non-negative number",
        ),
        (
            "eval.knn_temperature=1e-9",
            "eval.knn_temperature=0",
            "eval.knn_temperature=0 is invalid: it must be a positive number",
        ),
        (
            "trainer.max_time=00:04:00:00",
            "trainer.max_time=00:04:00:00x",
            "trainer.max_time='00:04:00:00x' is invalid: it must be DD:HH:MM:SS, e.g. trainer.max_time=00:04:00:00 "
            "for four hours",
        ),  # the whole value, not a valid prefix
        ("optimizer.lr=1e-9", "optimizer.lr=0", "optimizer.lr=0 is invalid: it must be a positive number"),
        # torch's own checks of these run inside trainer.fit, after the untrained kNN and probe
        (
            "optimizer.momentum=0",
            "optimizer.momentum=-0.5",
            "optimizer.momentum=-0.5 is invalid: it must be a number in [0, 1)",
        ),
        (
            "optimizer=lars optimizer.momentum=0.999",
            "optimizer=lars optimizer.momentum=1",
            "optimizer.momentum=1 is invalid: it must be a number in [0, 1)",
        ),
        (
            "optimizer=adamw optimizer.weight_decay=0",
            "optimizer=adamw optimizer.weight_decay=-1e-9",
            "optimizer.weight_decay=-1e-09 is invalid: it must be a non-negative number",
        ),
        # a negative fraction made the end of the cosine a negative lr (gradient ascent); above 1 it rose
        (
            "scheduler.final_lr_fraction=1",
            "scheduler.final_lr_fraction=-1",
            "scheduler.final_lr_fraction=-1 is invalid: it must be a number in [0, 1] "
            "(the final lr as a fraction of the peak)",
        ),
        (
            "scheduler.final_lr_fraction=0",
            "scheduler.final_lr_fraction=1.5",
            "scheduler.final_lr_fraction=1.5 is invalid: it must be a number in [0, 1] "
            "(the final lr as a fraction of the peak)",
        ),
        # the probe runs at the end of training: its settings are checked before
        ("probe.optimizer=adamw", "probe.optimizer=adam", "probe.optimizer='adam' is invalid: it must be sgd or adamw"),
        (
            "probe.normalize=l2",
            "probe.normalize=L2",
            "probe.normalize='L2' is invalid: it must be standardize, l2 or none",
        ),
        ("probe.batch_size=1", "probe.batch_size=0", "probe.batch_size=0 is invalid: it must be a positive integer"),
        (
            "probe.lr=null",
            "probe.lr=-1",
            "probe.lr=-1 is invalid: it must be a positive number (or null for the default)",
        ),
        (
            "probe.weight_decay=0",
            "probe.weight_decay=-1",
            "probe.weight_decay=-1 is invalid: it must be a non-negative number",
        ),
        (
            "eval.final_probe=false probe.epochs=0",
            "probe.epochs=0",
            "probe.epochs=0 is invalid: it must be a positive integer",
        ),
    ],
    ids=[
        "every_n_epochs",
        "batch_size",
        "warmup_epochs",
        "knn_temperature",
        "max_time",
        "lr",
        "momentum",
        "lars_momentum",
        "weight_decay",
        "final_lr_fraction_low",
        "final_lr_fraction_high",
        "probe_optimizer",
        "probe_normalize",
        "probe_batch_size",
        "probe_lr",
        "probe_weight_decay",
        "probe_only_with_final_probe",
    ],
)
def test_train_values_pass_at_the_boundary_and_are_refused_past_it(
    config,
    valid: str,
    invalid: str,  # type: ignore[no-untyped-def]
    message: str,
) -> None:
    """check_config: the smallest valid value passes, the first invalid one is one ConfigError naming it."""
    check_config(config("train", valid.split()))
    with pytest.raises(ConfigError) as error:
        check_config(config("train", invalid.split()))
    assert str(error.value) == message


@pytest.mark.parametrize(
    ("valid", "invalid", "message"),
    [
        ("probe.optimizer=sgd", "probe.optimizer=adam", "probe.optimizer='adam' is invalid: it must be sgd or adamw"),
        (
            "probe.lr=1e-9",
            "probe.lr=0",
            "probe.lr=0 is invalid: it must be a positive number (or null for the default)",
        ),
        (
            "linear_probe=false probe.batch_size=0",
            "probe.batch_size=0",
            "probe.batch_size=0 is invalid: it must be a positive integer",
        ),
    ],
)
def test_eval_probe_values_are_checked_before_the_checkpoint_is_read(
    config,
    valid: str,
    invalid: str,  # type: ignore[no-untyped-def]
    message: str,
) -> None:
    check_eval_config(config("eval", ["checkpoint=x.ckpt", *valid.split()]))
    with pytest.raises(ConfigError) as error:
        check_eval_config(config("eval", ["checkpoint=x.ckpt", *invalid.split()]))
    assert str(error.value) == message


@pytest.mark.parametrize("key", ["subset", "test_subset"])
def test_eval_subset_of_zero_is_refused_and_one_passes(config, key: str) -> None:  # type: ignore[no-untyped-def]
    """contrastive-eval subset=0 (falsy, not None) is refused, not read as 'keep the run's setting'."""
    check_eval_config(config("eval", ["checkpoint=x.ckpt", f"{key}=1"]))
    with pytest.raises(ConfigError) as error:
        check_eval_config(config("eval", ["checkpoint=x.ckpt", f"{key}=0"]))
    assert str(error.value) == f"{key}=0 is invalid: it must be a positive integer"


def test_eval_on_cuda_needs_a_visible_gpu(config, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """device=cuda where no CUDA GPU is visible is one ConfigError before the checkpoint is read (on any machine:
    CUDA's presence is patched)."""
    cfg = config("eval", ["checkpoint=x.ckpt", "device=cuda"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_eval_config(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as error:
        check_eval_config(cfg)
    assert str(error.value) == "device=cuda, but no CUDA GPU is visible here: use device=auto or device=cpu"


@pytest.mark.parametrize(("world", "fits"), [(1, 40), (2, 20)])
def test_a_batch_of_the_whole_training_set_passes_and_one_more_is_refused(
    config, world: int, fits: int, run_checks
) -> None:  # type: ignore[no-untyped-def]
    """data.batch_size x processes may equal the training set's size; one image more is refused."""
    splits = shapes(num_train=40, num_test=8, size=32)
    run_checks(config("train", [f"data.batch_size={fits}"]), splits, world=world)
    with pytest.raises(ConfigError) as error:
        run_checks(config("train", [f"data.batch_size={fits + 1}"]), splits, world=world)
    assert str(error.value) == (
        f"data.batch_size={fits + 1} x {world} process(es) is larger than the training set "
        "(40 images): lower data.batch_size"
    )


def test_symmetric_moco_enqueues_twice_the_batch(config, run_checks) -> None:  # type: ignore[no-untyped-def]
    """pipeline.symmetric=true enqueues both views' keys (2 x 64 a step): a queue of 96 is refused, 128 passes."""
    splits = shapes(num_train=128, num_test=8, size=32)
    run_checks(config("train", ["experiment=moco_shapes", "pipeline.queue_size=96"]), splits, world=1)
    moco = ["experiment=moco_shapes", "pipeline.symmetric=true"]
    run_checks(config("train", [*moco, "pipeline.queue_size=128"]), splits, world=1)
    with pytest.raises(ConfigError) as error:
        run_checks(config("train", [*moco, "pipeline.queue_size=96"]), splits, world=1)
    assert str(error.value) == (
        "pipeline.queue_size=96 is smaller than the keys enqueued per step (128 = "
        "data.batch_size x processes, x 2 when pipeline.symmetric): raise "
        "pipeline.queue_size or lower data.batch_size"
    )


def test_the_shape_check_leaves_the_backbone_in_its_mode(config) -> None:  # type: ignore[no-untyped-def]
    """check_feature_dim runs the backbone in eval mode: build_pipeline must hand it on in training mode
    (else BatchNorm trains on running statistics), and an eval-mode backbone stays in eval mode."""
    pipeline = build_pipeline(config("train"))
    assert pipeline.backbone.training and all(m.training for m in pipeline.backbone.modules())
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    check_feature_dim(backbone, 4, image_size=8)
    assert not any(m.training for m in backbone.modules())


def test_a_backbone_that_does_not_output_feature_vectors_is_refused() -> None:
    """A backbone whose output is not (N, feature_dim), e.g. (N, 3, 8, 8) with feature_dim=3 (its first
    dimension), is refused with the shape it gives."""
    check_feature_dim(nn.Flatten(), 3 * 8 * 8, image_size=8)
    with pytest.raises(ConfigError) as error:
        check_feature_dim(nn.Identity(), 3, image_size=8)
    assert str(error.value) == (
        "the backbone outputs shape (3, 8, 8) per image, not a feature vector: end "
        "model.backbone with a global pooling and a flatten (as the built-in backbones do)"
    )


def test_an_image_size_other_than_the_images_is_refused(config, run_checks) -> None:  # type: ignore[no-untyped-def]
    """On CIFAR, data.image_size=64 trained on 64x64 views but measured kNN and the probe on the 32x32 images."""
    splits = shapes(num_train=16, num_test=4, size=32)
    run_checks(config("train", ["data.batch_size=8"]), splits, world=1)
    with pytest.raises(ConfigError) as error:
        run_checks(config("train", ["data.batch_size=8", "data.image_size=64"]), splits, world=1)
    assert str(error.value) == (
        "data.image_size=64 but the images are 32x32 (CIFAR's are 32x32; image folders are "
        "resized to data.image_size): pass data.image_size=32"
    )


def test_a_knn_k_beyond_the_training_images_is_named() -> None:
    """eval.knn_k=100000 (or the default 200 on a 5-image subset) was clamped in silence."""
    from contrastive.cli.checks import knn_k_warning

    assert knn_k_warning("eval.knn_k", 200, 200) is None and knn_k_warning("eval.knn_k", 0, 5) is None
    assert knn_k_warning("knn_k", 201, 200) == (
        "knn_k=201 is more than the 200 training images: the kNN votes over all of them (k = 200), which is not "
        "the k-NN figure asked for; pass a smaller knn_k"
    )
