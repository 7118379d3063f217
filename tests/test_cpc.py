"""CPC v2: the patch grid, the causal context network, the step (InfoNCE of predictions k rows below), the
pooled features, its rules, exact resume, two processes against one, the configs and the CPU demo."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from pipeline_helpers import StopAfterEpoch, demo_run, float64_steps, quiet_trainer, run_as_rank, shrunk_run
from torch import Tensor, nn

from contrastive.augment import Augment, normalize_uint8
from contrastive.data import TensorDataModule, shapes
from contrastive.losses import InfoNCE, SupCon, info_nce
from contrastive.models import convnet, mlp
from contrastive.pipelines import CPC, MaskedContext
from contrastive.pipelines.cpc import patch_grid
from contrastive.views import MultiCrop, ViewGroup


def _augment(size: int = 8) -> Augment:
    return Augment(size=size, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])


def _cpc(seed: int = 0, **kwargs: Any) -> CPC:
    torch.manual_seed(seed)
    args: dict[str, Any] = dict(
        projector=mlp(32, 32, 16),
        context=MaskedContext(16, num_layers=2),
        loss=InfoNCE(temperature=0.2),
        latent_dim=16,
        patch_size=8,
        patch_stride=4,
        prediction_steps=2,
        image_size=16,
        feature_dim=32,
        augment=_augment(),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    )
    args.update(kwargs)
    return CPC(backbone=convnet(width=8), **args)


def _images(n: int = 6, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g), torch.arange(n) % 10


def test_patch_grid_cuts_overlapping_patches_row_by_row() -> None:
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    grid = patch_grid(x, 8, 4)  # (16 - 8) // 4 + 1 = 3
    assert grid.shape == (2, 3, 3, 3, 8, 8)
    for i in range(3):
        for j in range(3):
            assert torch.equal(grid[:, i, j], x[:, :, 4 * i : 4 * i + 8, 4 * j : 4 * j + 8])
    with pytest.raises(ValueError, match="patch_size=20 and patch_stride=4 do not cut a 16x16 image"):
        patch_grid(x, 20, 4)


def test_the_context_of_row_i_sees_rows_up_to_i_and_never_below() -> None:
    torch.manual_seed(0)
    context = MaskedContext(4, num_layers=3, kernel_size=3)
    z = torch.randn(1, 4, 6, 5, requires_grad=True)
    c = context(z)
    assert c.shape == z.shape
    for i in range(6):
        (grad,) = torch.autograd.grad(c[0, :, i].sum(), z, retain_graph=True)
        rows = grad[0].abs().sum(dim=(0, 2))  # (G,): how much each input row reaches output row i
        assert (rows[i + 1 :] == 0).all(), i  # nothing from below
        assert rows[i] > 0 and (i == 0 or rows[i - 1] > 0), i  # its own row and the one above
    with pytest.raises(ValueError, match="odd kernel_size"):
        MaskedContext(4, kernel_size=2)


def test_the_step_averages_infonce_of_each_offsets_predictions_against_the_latents_below() -> None:
    """Each patch augmented on its own, encoded; InfoNCE of W_k c (rows i) against z (rows i + k), mean over k."""
    cpc = _cpc(online_probe=False)
    images, labels = _images()
    loss = cpc.training_step((images, labels), 0)
    patches = patch_grid(images, 8, 4).reshape(6 * 9, 3, 8, 8)
    (view,) = _cpc().views(patches, n=1)  # the same generator seed: the same views
    assert not torch.equal(view, normalize_uint8(patches, cpc.augment.mean, cpc.augment.std))
    with torch.no_grad():  # train-mode BN gives the same batch the same outputs again
        z = cpc.projector(cpc.backbone(view)).view(6, 3, 3, 16).permute(0, 3, 1, 2)  # (B, D, G, G)
        c = cpc.context(z)
        expected = []
        for k in (1, 2):
            pred = cpc.predictors[k - 1](c[:, :, : 3 - k].permute(0, 2, 3, 1).reshape(-1, 16))
            expected.append(info_nce(pred, z[:, :, k:].permute(0, 2, 3, 1).reshape(-1, 16), None, 0.2))
    torch.testing.assert_close(loss.detach(), torch.stack(expected).mean(), rtol=0, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in [*cpc.backbone.parameters(), *cpc.context.parameters()])


def test_the_evaluation_features_are_the_patch_features_averaged_over_the_grid() -> None:
    cpc = _cpc().eval()
    images, _ = _images(4)
    x = normalize_uint8(patch_grid(images, 8, 4).reshape(4 * 9, 3, 8, 8), cpc.augment.mean, cpc.augment.std)
    expected = cpc.backbone(x).view(4, 9, 32).mean(1)
    torch.testing.assert_close(cpc.features(images), expected, rtol=0, atol=1e-6)


def test_the_augment_is_drawn_at_the_patch_size_with_its_recipe() -> None:
    given = Augment(size=32, gray_p=1.0, scale=(0.5, 1.0))
    cpc = _cpc(augment=given)
    assert cpc.augment.size == 8 and given.size == 32  # a copy: the object passed in is left alone
    assert (cpc.augment.gray_p, cpc.augment.scale) == (1.0, (0.5, 1.0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(loss=SupCon()), "loss SupCon does not fit the CPC pipeline: .*use loss=info_nce"),
        (dict(loss=InfoNCE(symmetric=True)), "loss.symmetric=true also scores targets.*symmetric=false"),
        (dict(prediction_steps=3), r"prediction_steps=3: a 3-row grid .* 1 <= K <= 2"),
        (dict(patch_size=32), "patch_size=32 and patch_stride=4 do not cut a 16x16 image"),
        (dict(augment=Augment(size=16, blur_p=0.5, blur_kernel=23)), "aug.blur_kernel=23 is too large for 8 px"),
        (dict(augment=MultiCrop([ViewGroup(_augment(), 2)])), "draws its views from one Augment, not a MultiCrop"),
    ],
)
def test_what_it_cannot_train_is_one_value_error(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _cpc(**kwargs)


# --------------------------------------------------------------------------- exact resume


def _fit(tmp: Path, ckpt: str | None = None, stop_after: int | None = None) -> tuple[CPC, Any]:
    import pytorch_lightning as pl

    pl.seed_everything(0, verbose=False)
    data = TensorDataModule(shapes(num_train=48, num_test=16, size=16, seed=0), batch_size=16, eval_batch_size=64)
    cpc = _cpc()
    callbacks = [StopAfterEpoch(stop_after)] if stop_after is not None else []
    trainer = quiet_trainer(max_epochs=2, default_root_dir=tmp, callbacks=callbacks)
    trainer.fit(cpc, datamodule=data, ckpt_path=ckpt)
    return cpc, trainer


def test_resume_mid_run_is_exact(tmp_path: Path) -> None:
    """Stopped after epoch 1 and resumed, the run ends bitwise as the uninterrupted one (encoder, context,
    predictors, BN statistics, generator)."""
    straight, t_straight = _fit(tmp_path / "a")
    _, t_first = _fit(tmp_path / "b", stop_after=0)
    t_first.save_checkpoint(tmp_path / "mid.ckpt")
    resumed, t_resumed = _fit(tmp_path / "c", ckpt=str(tmp_path / "mid.ckpt"))
    assert t_straight.global_step == t_resumed.global_step == 6
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and {"context.convs.0.weight", "predictors.1.weight"} <= set(a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert torch.equal(straight.generator.get_state(), resumed.generator.get_state())


# --------------------------------------------------------------------------- two processes against one

WORLD, PER_RANK = 2, 4


class _PlainCPC(CPC):
    """CPC on the unaugmented patches: the comparison isolates what DDP changes from the augmentation RNG."""

    def views(self, images: Tensor, n: int = 2) -> list[Tensor]:
        return [normalize_uint8(images, self.augment.mean, self.augment.std).to(self.dtype)]


def _bn_free_cpc() -> CPC:
    """Without BatchNorm (per-process statistics differ from global ones; SyncBatchNorm is GPU-only)."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return _PlainCPC(
        backbone=backbone,
        projector=nn.Linear(8, 6),
        context=MaskedContext(6, num_layers=2),
        loss=InfoNCE(temperature=0.2, gather=True),
        latent_dim=6,
        prediction_steps=2,
        image_size=16,
        augment=Augment(size=8),
        optimizer=partial(torch.optim.SGD, lr=0.5, momentum=0.9),
        feature_dim=8,
        online_probe=False,
    ).double()


def _three_steps(devices: int) -> dict[str, Any]:
    splits = shapes(num_train=3 * PER_RANK * WORLD, num_test=4, size=16, seed=1)
    return float64_steps(_bn_free_cpc(), splits, PER_RANK * WORLD // devices, devices)


def test_two_processes_equal_one_process_holding_the_global_batch(tmp_path: Path, free_port) -> None:  # type: ignore[no-untyped-def]
    """Targets gathered with their gradient (info_nce's gather), DDP's averaging: three float64 steps on two gloo
    processes give the loss (mean of the ranks'), gradients and weights of one process on the global batch."""
    args = (free_port(), str(tmp_path), WORLD, _three_steps)
    mp.start_processes(run_as_rank, args=args, nprocs=WORLD, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    ref = _three_steps(1)
    for step in range(3):
        mean = sum(out["losses"][step] for out in ranks) / WORLD
        torch.testing.assert_close(mean, ref["losses"][step], rtol=1e-10, atol=0)
    for out in ranks:
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(out["grads"][name], grad, rtol=1e-10, atol=1e-14, msg=name)
        for name, value in ref["state"].items():
            torch.testing.assert_close(out["state"][name], value, rtol=1e-10, atol=1e-14, msg=name)


# --------------------------------------------------------------------------- configs and CLI


def test_experiment_cpc_cifar10_holds_the_grid_and_the_heads(config) -> None:  # type: ignore[no-untyped-def]
    from contrastive.cli.run import build_pipeline

    cfg = config("train", ["experiment=cpc_cifar10"])
    assert cfg.name == "cpc_cifar10" and cfg.pipeline._target_ == "contrastive.pipelines.CPC"
    p = cfg.pipeline
    assert (p.patch_size, p.patch_stride, p.prediction_steps, p.latent_dim) == (8, 4, 3, 128)
    assert cfg.loss._target_ == "contrastive.losses.InfoNCE" and cfg.loss.gather and not cfg.loss.symmetric
    cpc = build_pipeline(cfg)
    assert isinstance(cpc, CPC) and len(cpc.predictors) == 3 and cpc.predictors[0].in_features == 128
    assert cpc.augment.size == 8 and cpc.features(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 512)


def test_cpc_shapes_cli_run(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, ckpt = shrunk_run(cli, "cpc_shapes", tmp_path)
    assert {"context.convs.0.weight", "predictors.1.weight"} <= set(ckpt["state_dict"])


@pytest.mark.slow
def test_cpc_shapes_demo_learns(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The CPU demo as shipped beats the untrained network by 40 points of kNN and 15 of the linear probe, both
    on the patch features averaged over the grid.

    (kNN 89.4 vs 22.0, probe 99.5 vs 66.9 at seed 0: margins of 67.4 and 32.6; see the config.)
    """
    metrics = demo_run(cli, "cpc_shapes", tmp_path)
    assert metrics["epochs"] == 15
    assert metrics["knn_top1"] >= metrics["knn_top1_untrained"] + 40, metrics
    assert metrics["linear_top1"] >= metrics["linear_top1_untrained"] + 15, metrics
