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
from contrastive.data import DataError, ImageTensors, IndexBatches, TensorDataModule, shapes
from contrastive.evaluation import knn_predict, linear_probe
from contrastive.losses import (
    ContrastiveMargin, InfoNCE, NTXent, SoftmaxCERegularizer, contrastive_margin, info_nce, nt_xent, pairwise_distance, sup_con,
    triplet_margin,
)
from contrastive.pipelines import SimCLR, warmup_cosine
from contrastive.samplers import PKBatches

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


@pytest.mark.parametrize("loss", [
    lambda z, y: nt_xent(z, z), lambda z, y: info_nce(z, z), lambda z, y: sup_con(z, y),
    lambda z, y: triplet_margin(z, y), lambda z, y: contrastive_margin(z, y),
])
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
    for batches in (IndexBatches(data, 8, shuffle=True, drop_last=True), PKBatches(data, 8, classes_per_batch=4, samples_per_class=2)):
        firsts = []
        for _ in range(3):
            for images, labels in batches:
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
    return SimCLR(projector=nn.Linear(6, 4), loss=NTXent(0.5), backbone=backbone, augment=Augment(size=8),
                  optimizer=partial(torch.optim.SGD, lr=1.0), scheduler=partial(warmup_cosine, warmup_epochs=1),
                  feature_dim=6, num_classes=10, online_probe=False)


def _fit(precision: str = "32-true", **limits: int) -> list[float]:
    lr = _Lr()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         precision=precision, callbacks=[lr], **limits)
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
    args = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)
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
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.test.images, data.test.labels), batch_size=8)
    with pytest.raises(ValueError, match=r"needs two validation loaders.*got 1.*val_dataloaders=\[bank_loader, test_loader\]"):
        _trainer(max_steps=1).fit(_simclr(), train_dataloaders=loader, val_dataloaders=loader)  # logged nothing before
    with pytest.raises(ValueError, match="needs the run's length: give the Trainer max_epochs or max_steps"):
        _trainer(max_epochs=-1, max_time="00:00:00:05", limit_val_batches=0).fit(  # OverflowError before
            _simclr(), datamodule=TensorDataModule(data, batch_size=8))


def test_moco_key_encoder_moves_once_per_optimiser_step_under_gradient_accumulation(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """With accumulate_grad_batches=4 the EMA ran on every micro-batch: m^4 per step."""
    import contrastive.pipelines.moco as moco_module
    from contrastive.models import convnet, mlp
    from contrastive.pipelines import MoCo

    momenta: list[float] = []
    ema = moco_module.ema_update
    monkeypatch.setattr(moco_module, "ema_update", lambda t, s, m: (momenta.append(m), ema(t, s, m)))
    torch.manual_seed(0)
    moco = MoCo(backbone=convnet(width=4), projector=mlp(16, 16, 8), loss=InfoNCE(0.2), augment=Augment(size=8),
                optimizer=partial(torch.optim.SGD, lr=0.05), queue_size=32, feature_dim=16, online_probe=False,
                bn_splits=2)
    trainer = _trainer(max_epochs=1, limit_val_batches=0, accumulate_grad_batches=4)
    trainer.fit(moco, datamodule=TensorDataModule(shapes(num_train=64, num_test=8, size=8), batch_size=8))
    assert trainer.global_step == 2 and len(momenta) == 2 * 2  # backbone and projector, once per step (was 8 steps)
