"""Two gloo processes on the CPU give what one process gives on the global batch.

Each worker is a real Lightning ``Trainer(strategy="ddp", devices=2)`` started the way
torchrun starts one (``LOCAL_RANK`` etc. in the environment), so DDP's gradient
averaging, ``IndexBatches``' sharding and the pipeline's gathering are all the real ones.
The reference is the same ``Trainer`` with one device, in this process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor, nn

from contrastive.augment import Augment, normalize_uint8
from contrastive.data import TensorDataModule, shapes
from contrastive.distributed import gather_with_grad, rank
from contrastive.losses import InfoNCE, NTXent
from contrastive.models import convnet, mlp
from contrastive.pipelines import MoCo, SimCLR
from contrastive.pipelines.base import NonFiniteLossError

WORLD = 2


# --------------------------------------------------------------------------- harness


def _worker(r: int, fn: Callable[[Path], Any], port: int, out_dir: str) -> None:
    # what torchrun / SLURM set; Lightning then joins instead of launching children
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD),
        RANK=str(r),
        LOCAL_RANK=str(r),
        NODE_RANK="0",
    )
    torch.set_num_threads(1)
    torch.save(fn(Path(out_dir)), os.path.join(out_dir, f"rank{r}.pt"))
    if dist.is_initialized():
        dist.barrier()  # no rank tears gloo down while its peer still talks (SIGABRT otherwise)
        dist.destroy_process_group()


def _on_two_ranks(fn: Callable[[Path], Any], tmp_path: Path, port: int) -> list[Any]:
    """``fn(tmp_path)`` on 2 gloo ranks (picklable, module level); its results, in rank order."""
    mp.start_processes(_worker, args=(fn, port, str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _everything_on_this_rank(tmp_path: Path) -> dict[str, Any]:
    # one spawn for every check: starting a process (importing Lightning) is the slow part
    return {
        "step": _one_step(WORLD),
        "validate": _validate(WORLD),
        "resume": _fit_then_resume(WORLD, tmp_path),
        "moco": _moco_steps(WORLD),
        "moco_symmetric": _moco_steps(WORLD, symmetric=True),
        "shuffle_bn": _shuffle_bn_keys(),
        "nonfinite": _inf_on_rank_0_only(),
        "skip_fit": _skip_fit(WORLD),
    }


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory, free_port) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """The results of :func:`_everything_on_this_rank` on rank 0 and rank 1."""
    return _on_two_ranks(_everything_on_this_rank, tmp_path_factory.mktemp("ddp"), free_port())


def _trainer(devices: int, **kwargs: Any) -> pl.Trainer:
    args = dict(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    return pl.Trainer(**(args | kwargs))


# --------------------------------------------------------------------------- training step

PER_RANK = 6  # training images per process and step


class _MirrorViews(SimCLR):
    """SimCLR whose two views are the image and its mirror image.

    The random augmentation is replaced so that the comparison isolates what DDP
    changes (sharding, gathering, gradient averaging) from the augmentation RNG.
    """

    def views(self, images: Tensor, n: int = 2) -> list[Tensor]:
        x = normalize_uint8(images, self.augment.mean, self.augment.std).to(self.dtype)
        return [x, x.flip(-1)]


def _simclr_without_bn(momentum: float = 0.0) -> SimCLR:
    """The SimCLR pipeline with a BN-free backbone and head.

    Per-process BatchNorm statistics differ from global ones (and SyncBatchNorm is
    GPU-only), so exactness on the CPU is shown without BN; ``trainer=ddp`` turns
    on SyncBatchNorm on GPUs for the same reason.
    """
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(4),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return _MirrorViews(
        projector=mlp(16, 32, 8, batchnorm=False),
        loss=NTXent(temperature=0.3, learnable=True, gather=True),  # the temperature is a parameter too
        backbone=backbone,
        augment=Augment(size=16),
        optimizer=partial(torch.optim.SGD, lr=0.1, momentum=momentum),
        feature_dim=16,
        num_classes=10,
        knn_k=5,
    )


class _Capture(pl.Callback):
    """The training loss and the (DDP-averaged) gradient of every parameter at the first step."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule, optimizer: Any) -> None:
        self.grads = {n: p.grad.detach().clone() for n, p in module.named_parameters()}

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.loss = outputs["loss"].detach().clone()


def _one_step(devices: int) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """This process's loss and gradients, and the epoch loss Lightning logged (synced over processes)."""
    splits = shapes(num_train=WORLD * PER_RANK, num_test=4, size=16, seed=1)
    datamodule = TensorDataModule(splits, batch_size=PER_RANK * WORLD // devices, eval_batch_size=8, seed=3)
    capture = _Capture()
    trainer = _trainer(devices, max_steps=1, limit_val_batches=0, precision="64-true", callbacks=[capture])
    trainer.fit(_simclr_without_bn(), datamodule=datamodule)
    return capture.loss, capture.grads, trainer.callback_metrics["train/loss_epoch"]


def test_gather_true_is_the_identity_in_one_process() -> None:
    """nt_xent.yaml sets gather: true; without a process group it changes nothing, bitwise."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    assert gather_with_grad(z1) is z1
    values = []
    for gather in (False, True):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        loss = NTXent(0.5, gather=gather)(a, b)
        loss.backward()
        values.append((loss.detach(), a.grad, b.grad))
    for x, y in zip(*values):
        assert torch.equal(x, y)


def test_simclr_step_on_two_processes_equals_one_process(two_ranks: list[dict[str, Any]]) -> None:
    """Loss and every parameter's gradient (float64) after one SimCLR step through the Trainer."""
    ref_loss, ref_grads, ref_logged = _one_step(1)  # one process, global batch of 12
    assert len(ref_grads) == 11 and all(g.abs().sum() > 0 for g in ref_grads.values())
    results = [out["step"] for out in two_ranks]
    # each rank's loss is over its own anchors; DDP averages gradients, so the global
    # objective is the mean of the ranks' losses
    mean_loss = sum(loss for loss, _, _ in results) / WORLD
    torch.testing.assert_close(mean_loss, ref_loss, rtol=1e-10, atol=0)
    assert not torch.equal(results[0][0], results[1][0])  # the ranks did see different data
    for _, _, logged in results:  # the logged epoch loss is the global batch's on every rank
        torch.testing.assert_close(logged, ref_logged, rtol=1e-6, atol=0)
    for _, grads, _ in results:
        assert grads.keys() == ref_grads.keys()
        for name, ref in ref_grads.items():
            torch.testing.assert_close(grads[name], ref, rtol=1e-10, atol=1e-15, msg=name)


# --------------------------------------------------------------------------- evaluation

# 2 ranks x 16: the bank's last global batch has 1 image (rank 1's is empty), the test
# set's has 5 (3 + 2), so both the uneven and the empty case are exercised.
NUM_BANK, NUM_TEST, EVAL_BATCH = 97, 101, 16


def _validate(devices: int) -> dict[str, Any]:
    splits = shapes(num_train=NUM_BANK, num_test=NUM_TEST, size=16, seed=2)
    torch.manual_seed(0)
    pipeline = SimCLR(
        projector=mlp(32, 32, 8),
        loss=NTXent(gather=True),
        backbone=convnet(width=8),
        augment=Augment(size=16),
        optimizer=partial(torch.optim.SGD, lr=0.1),
        feature_dim=32,
        num_classes=10,
        knn_k=7,
    )
    datamodule = TensorDataModule(splits, batch_size=8, eval_batch_size=EVAL_BATCH)
    trainer = _trainer(devices)
    out: dict[str, Any] = {}
    for knn_k, key in ((7, "val/knn_top1"), (0, "val/map_at_r")):  # closed set, then retrieval
        pipeline.knn_k = knn_k
        trainer.validate(pipeline, datamodule=datamodule, verbose=False)
        out[key] = float(trainer.callback_metrics[key])
    out["features"] = pipeline.last_features
    out["labels"] = {"train": splits.train.labels, "test": splits.test.labels}
    return out


def test_validation_on_two_processes_equals_one_process(two_ranks: list[dict[str, Any]]) -> None:
    """kNN top-1, MAP@R and ``last_features`` (order included) equal the single-process ones."""
    ref = _validate(1)
    assert len(ref["features"]["train"][0]) == NUM_BANK and len(ref["features"]["test"][0]) == NUM_TEST
    for out in (r["validate"] for r in two_ranks):
        assert out["val/knn_top1"] == ref["val/knn_top1"]
        assert out["val/map_at_r"] == ref["val/map_at_r"]
        for split in ("train", "test"):
            feats, labels = out["features"][split]
            assert torch.equal(labels, out["labels"][split])  # the data set's order
            assert torch.equal(feats, ref["features"][split][0])
            assert torch.equal(labels, ref["features"][split][1])


# --------------------------------------------------------------------------- checkpoint and resume


class _RestoredState(pl.Callback):
    """What this rank holds when the resumed training starts."""

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        params = [p for group in optimizer.param_groups for p in group["params"]]  # the checkpoint's order
        self.state = {
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "momentum": [optimizer.state[p]["momentum_buffer"].clone() for p in params],
            "weights": {k: v.clone() for k, v in module.state_dict().items()},
            "generator": module.generator.get_state(),
        }


def _fit_then_resume(devices: int, tmp_path: Path) -> tuple[dict[str, Any], Path]:
    """One epoch (2 steps, SGD with momentum) saving last.ckpt, then a fresh Trainer resuming from it."""
    splits = shapes(num_train=2 * PER_RANK * WORLD, num_test=4, size=16, seed=1)
    datamodule = TensorDataModule(splits, batch_size=PER_RANK * WORLD // devices, eval_batch_size=8, seed=3)
    directory = tmp_path / f"checkpoints_{devices}"
    last = ModelCheckpoint(
        dirpath=directory, save_last=True, save_top_k=0, every_n_epochs=1, save_on_train_epoch_end=True
    )
    _trainer(
        devices, max_epochs=1, limit_val_batches=0, precision="64-true", enable_checkpointing=True, callbacks=[last]
    ).fit(_simclr_without_bn(momentum=0.9), datamodule=datamodule)
    restored = _RestoredState()
    # Lightning loads the weights before "64-true" converts the module: a float32 module would
    # round them on the way in, so the module is float64 already
    _trainer(devices, max_epochs=2, limit_val_batches=0, precision="64-true", callbacks=[restored]).fit(
        _simclr_without_bn(momentum=0.9).double(), datamodule=datamodule, ckpt_path=directory / "last.ckpt"
    )
    return restored.state, directory


def test_resume_restores_every_rank(two_ranks: list[dict[str, Any]]) -> None:
    """Rank 0 wrote one last.ckpt; on resume each rank holds its step, weights, optimizer
    momentum and augmentation RNG (a rank that skipped the restore has no momentum)."""
    directory = two_ranks[0]["resume"][1]
    assert sorted(p.name for p in directory.iterdir()) == ["last.ckpt"]
    ckpt = torch.load(directory / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    momentum = [s["momentum_buffer"] for _, s in sorted(ckpt["optimizer_states"][0]["state"].items())]
    for state, _ in (out["resume"] for out in two_ranks):
        assert (state["epoch"], state["global_step"]) == (1, 2)
        assert state["weights"].keys() == ckpt["state_dict"].keys()
        for name, value in ckpt["state_dict"].items():
            assert torch.equal(state["weights"][name], value), name
        assert len(state["momentum"]) == len(momentum) == 11
        for restored, saved in zip(state["momentum"], momentum):
            assert torch.equal(restored, saved)
        assert torch.equal(state["generator"], ckpt["augment_generator"])


# --------------------------------------------------------------------------- MoCo's queue


class _MirrorMoCo(MoCo):
    """MoCo with the fixed views of :class:`_MirrorViews` (the augmentation RNG set aside)."""

    views = _MirrorViews.views


def _moco_steps(devices: int, symmetric: bool = False) -> dict[str, Tensor]:
    """Three MoCo steps (8 keys per step, 16 if symmetric, into a queue of 20, so it wraps); the queue and the
    weights."""
    splits = shapes(num_train=3 * 4 * WORLD, num_test=4, size=16, seed=4)
    datamodule = TensorDataModule(splits, batch_size=4 * WORLD // devices, eval_batch_size=8, seed=5)
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    moco = _MirrorMoCo(
        backbone=backbone,
        projector=nn.Linear(8, 6),
        loss=InfoNCE(temperature=0.2),
        queue_size=20,
        momentum=0.9,
        bn_splits=1,
        augment=Augment(size=16),
        optimizer=partial(torch.optim.SGD, lr=0.5),
        feature_dim=8,
        num_classes=10,
        online_probe=False,
        symmetric=symmetric,
    ).double()
    _trainer(devices, max_steps=3, limit_val_batches=0, precision="64-true").fit(moco, datamodule=datamodule)
    return {k: v.clone() for k, v in moco.state_dict().items()}


@pytest.mark.parametrize("symmetric", [False, True])
def test_moco_queue_is_the_same_on_every_rank_and_as_one_process(
    two_ranks: list[dict[str, Any]], symmetric: bool
) -> None:
    """Keys are gathered before the enqueue: after 3 steps (a wrap-around) every rank holds the
    queue, pointer, query and key encoders that one process holds on the global batch. The keys
    are shuffled across the ranks (one process, ``bn_splits=1``, does not shuffle); without BN
    each key depends on its own image only, so this also checks the un-shuffle. Symmetric: the
    queue receives all k1 then all k2, as one process (20 is no multiple of the 16 keys per step,
    so another order would overwrite other keys at the wrap)."""
    ref = _moco_steps(1, symmetric)
    assert int(ref["queue.ptr"]) == 3 * 4 * WORLD * (2 if symmetric else 1) % 20
    rank0, rank1 = (out["moco_symmetric" if symmetric else "moco"] for out in two_ranks)
    for name, value in ref.items():
        assert torch.equal(rank0[name], rank1[name]), name  # identical across ranks, bitwise
        torch.testing.assert_close(rank0[name], value, rtol=1e-10, atol=1e-12, msg=name)


# --------------------------------------------------------------------------- a NaN/Inf on one rank only


def _inf_on_rank_0_only() -> dict[str, Any]:
    """``finish_step`` with an infinite loss on rank 0 and a finite one on rank 1, under skip and raise."""
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    loss = torch.tensor(float("inf") if dist.get_rank() == 0 else 1.5)
    skip = _simclr_without_bn()
    skip.on_nonfinite = "skip"
    skip.print = lambda *args, **kwargs: None  # LightningModule.print needs a Trainer
    out: dict[str, Any] = {"skip": (float(skip.finish_step({"loss": loss})), skip.skipped_steps)}
    stop = _simclr_without_bn()
    stop.finish_step({"loss": loss})
    try:
        stop.raise_if_nonfinite()
        out["raise"] = None
    except NonFiniteLossError as e:
        out["raise"] = str(e)
    return out


class _InfAtSecondCall(NTXent):
    """NT-Xent whose second call gives inf on rank 0 only (a NaN/Inf one process alone sees)."""

    calls = 0

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        loss, self.calls = super().forward(z1, z2), self.calls + 1
        return loss + float("inf") if self.calls == 2 and rank() == 0 else loss


class _Weights(pl.Callback):
    """The parameters after every training step."""

    def __init__(self) -> None:
        self.after: list[dict[str, Tensor]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        self.after.append({n: p.detach().clone() for n, p in module.named_parameters()})


def _skip_fit(devices: int) -> dict[str, Any]:
    """Three steps through the Trainer with on_nonfinite=skip (SGD with momentum), the second non-finite."""
    splits = shapes(num_train=WORLD * PER_RANK, num_test=4, size=16, seed=1)
    datamodule = TensorDataModule(splits, batch_size=PER_RANK * WORLD // devices, eval_batch_size=8, seed=3)
    pipeline = _simclr_without_bn(momentum=0.9)
    pipeline.loss = _InfAtSecondCall(temperature=0.3, gather=True)
    pipeline.on_nonfinite = "skip"
    weights = _Weights()
    trainer = _trainer(devices, max_steps=3, limit_val_batches=0, precision="64-true", callbacks=[weights])
    trainer.fit(pipeline, datamodule=datamodule)
    return {"after": weights.after, "skipped": pipeline.skipped_steps, "global_step": trainer.global_step}


def test_a_skipped_step_under_ddp_updates_nothing_and_ends_as_one_process(two_ranks: list[dict[str, Any]]) -> None:
    """Lightning refuses a None loss under DDP: the run crashed at the first non-finite step."""
    ref = _skip_fit(1)
    assert ref["skipped"] == 1 and ref["global_step"] == 3
    for r, out in enumerate(two_ranks):
        got = out["skip_fit"]
        assert got["skipped"] == 1 and got["global_step"] == 3, r  # rank 1's finite loss is skipped too
        for name, value in got["after"][1].items():  # the skipped step moved nothing (momentum 0.9)
            assert torch.equal(value, got["after"][0][name]), (r, name)
        for name, value in ref["after"][2].items():
            torch.testing.assert_close(got["after"][2][name], value, rtol=1e-10, atol=1e-12, msg=name)


def test_a_nonfinite_loss_on_one_rank_is_skipped_or_raised_on_every_rank(two_ranks: list[dict[str, Any]]) -> None:
    """One rank alone skipping (or stopping) would leave the other waiting in DDP's all-reduce."""
    for r, out in enumerate(two_ranks):
        assert out["nonfinite"]["skip"] == (0.0, 1), r  # a zero loss on every rank: the backward stays paired
        assert out["nonfinite"]["raise"] is not None, r
        assert (
            f"loss={'inf' if r == 0 else '1.5'} (this process's value; non-finite on at least one of the 2 "
            "processes)" in out["nonfinite"]["raise"]
        ), r


def test_every_softmax_loss_config_gathers_across_processes(config) -> None:  # type: ignore[no-untyped-def]
    """In-batch negatives from all processes: nt_xent, info_nce and sup_con all set gather: true."""
    from hydra.utils import instantiate

    for loss in ("nt_xent", "info_nce", "sup_con"):
        assert instantiate(config("train", [f"loss={loss}"]).loss).gather is True, loss


def test_moco_with_sync_batchnorm_and_uneven_ddp_batches_are_refused(config, run_checks) -> None:  # type: ignore[no-untyped-def]
    from contrastive.cli import ConfigError
    from contrastive.cli.checks import check_config

    check_config(config("train", ["experiment=moco_shapes", "trainer=ddp"]))  # the experiment keeps split BN
    for overrides in (
        ["experiment=moco_shapes", "trainer=ddp", "trainer.sync_batchnorm=true"],
        ["pipeline=moco", "loss=info_nce", "trainer=ddp"],
    ):
        with pytest.raises(ConfigError, match="trainer.sync_batchnorm=true would replace MoCo's shuffle-BN"):
            run_checks(config("train", overrides), shapes(num_train=200, num_test=8, size=32), world=1)
    cfg = config("train", ["sampler.drop_last=false", "data.batch_size=8", "data.image_size=8"])
    splits = shapes(num_train=40, num_test=8, size=8)
    run_checks(cfg, splits, world=1)  # one process: a smaller last batch is fine
    with pytest.raises(ConfigError, match="sampler.drop_last=false under 2 processes"):
        run_checks(cfg, splits, world=2)


# --------------------------------------------------------------------------- MoCo's shuffle-BN across ranks

KEYS_PER_RANK, KEY_SPLITS = 8, 2


def _bn_moco() -> MoCo:
    """A float64 MoCo in train mode whose key encoder has BN (split in ``KEY_SPLITS`` groups) in both parts."""
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    projector = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 6))
    return (
        MoCo(
            backbone=backbone,
            projector=projector,
            loss=InfoNCE(temperature=0.2),
            queue_size=32,
            bn_splits=KEY_SPLITS,
            augment=Augment(size=8),
            optimizer=partial(torch.optim.SGD, lr=0.1),
            feature_dim=8,
            online_probe=False,
        )
        .double()
        .train()
    )


def _key_views() -> Tensor:
    """The global batch of key views (W*B, 3, 8, 8), float64, rank r holding rows [rB, (r+1)B)."""
    g = torch.Generator().manual_seed(6)
    return torch.randn(WORLD * KEYS_PER_RANK, 3, 8, 8, generator=g, dtype=torch.float64)


def _shuffle_bn_keys() -> dict[str, Tensor]:
    """This rank's keys (B, D) of its rows of :func:`_key_views`, and the generator's state after."""
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    r, moco = dist.get_rank(), _bn_moco()
    keys = moco.keys(_key_views()[r * KEYS_PER_RANK : (r + 1) * KEYS_PER_RANK])
    return {"keys": keys, "generator": moco.generator.get_state()}


@torch.no_grad()
def _chunked_reference(moco: MoCo, x: Tensor) -> tuple[Tensor, Tensor]:
    """One process: permute the global batch, key-encode each of the W per-rank chunks
    separately (train-mode BN per chunk), concatenate, un-permute. Keys (W*B, D) and the permutation."""
    perm = torch.randperm(len(x), generator=moco.generator)  # what every rank draws
    shuffled = torch.cat([moco.key_projector(moco.key_backbone(chunk)) for chunk in x[perm].chunk(WORLD)])
    keys = torch.empty_like(shuffled)
    keys[perm] = shuffled
    return keys, perm


def test_shuffle_bn_across_ranks_equals_one_process_encoding_the_chunks(two_ranks: list[dict[str, Any]]) -> None:
    """The ranks' keys, in rank order, are one process's keys of the global batch under the same
    global permutation and BN grouping; every rank's generator ends where that process's does."""
    moco = _bn_moco()
    ref, perm = _chunked_reference(moco, _key_views())
    for chunk in perm.chunk(WORLD):  # each rank's slice holds images of both ranks: the mix is global
        assert set((chunk // KEYS_PER_RANK).tolist()) == set(range(WORLD))
    keys = torch.cat([out["shuffle_bn"]["keys"] for out in two_ranks])
    assert keys.shape == ref.shape == (WORLD * KEYS_PER_RANK, 6) and keys.dtype == torch.float64
    torch.testing.assert_close(keys, ref, rtol=1e-10, atol=1e-12)
    for out in two_ranks:
        assert torch.equal(out["shuffle_bn"]["generator"], moco.generator.get_state())


def test_shuffle_bn_statistics_come_from_other_ranks_images(two_ranks: list[dict[str, Any]]) -> None:
    """A rank that shuffled only its own batch (the former behaviour, one process on its rows)
    gets other keys: BN statistics over its own images, not a mix of both ranks'."""
    x = _key_views()
    for r, out in enumerate(two_ranks):
        local = _bn_moco().keys(x[r * KEYS_PER_RANK : (r + 1) * KEYS_PER_RANK])  # (B, D)
        assert (out["shuffle_bn"]["keys"] - local).abs().max() > 1e-2


# --------------------------------------------------------------------------- the CLI under DDP

SHRINK = [
    "data.source.num_train=200",
    "data.source.num_test=100",
    "data.batch_size=25",
    "trainer.enable_progress_bar=false",
    "probe.epochs=5",
    "eval.every_n_epochs=1",
    "hydra.run.dir=run",
]


def test_cli_trains_and_resumes_on_two_cpu_processes(cli, tmp_path: Path) -> None:
    """``contrastive-train trainer=ddp_cpu``: Lightning re-runs the console script for rank 1
    in the same Hydra run directory; rank 0 alone writes metrics.json and checkpoints."""
    out = cli("contrastive-train", "trainer=ddp_cpu", "trainer.max_epochs=1", *SHRINK, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "Starting with 2 processes" in log and log.count("test split, percent  ") == 1
    assert "sync_dist=True" not in log  # no Lightning warning that a logged metric is not synced
    run = tmp_path / "run"
    first = json.loads((run / "metrics.json").read_text())
    assert first["epochs"] == 1
    assert (run / "train_ddp_process_1.log").is_file()  # rank 1 ran in the same run directory
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4  # 200 images, 25 per process x 2 processes: 4 steps
    assert ckpt["contrastive_config"]["trainer"]["devices"] == 2

    again = cli("contrastive-train", "trainer=ddp_cpu", "trainer.max_epochs=2", *SHRINK, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert "Restored all states from the checkpoint" in log and log.count("test split, percent  ") == 1
    second = json.loads((run / "metrics.json").read_text())
    assert second["epochs"] == 2
    # the untrained figures are measured with the seed's initial weights on every run
    assert {k: v for k, v in second.items() if k.endswith("_untrained")} == {
        k: v for k, v in first.items() if k.endswith("_untrained")
    }
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 8  # epoch 2 on top of the restored 4 steps
    metrics_csv = (run / "logs" / "metrics.csv").read_text()
    assert metrics_csv.count("val/knn_top1") == 1  # one header: one logger (rank 0)


def _two_node_commands(launcher: str, bin_dir: Path, overrides: list[str], port: str) -> list[tuple[list[str], dict]]:
    """(command, extra environment) of each of two "nodes" on this machine, one process each."""
    if launcher == "torchrun":
        return [
            (
                [
                    str(bin_dir / "torchrun"),
                    "--nnodes=2",
                    "--nproc-per-node=1",
                    f"--node-rank={node}",
                    "--master-addr=127.0.0.1",
                    f"--master-port={port}",
                    "-m",
                    "contrastive.cli",
                    *overrides,
                ],
                {},
            )
            for node in (1, 0)
        ]
    # what srun sets for a job of 2 nodes x 1 task (Lightning's SLURMEnvironment reads it)
    slurm = {
        "SLURM_NTASKS": "2",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_JOB_NAME": "contrastive",
        "SLURM_JOB_ID": "4242",
        "SLURM_NODELIST": "127.0.0.1",
        "MASTER_PORT": port,
    }
    return [
        (
            [str(bin_dir / "contrastive-train"), *overrides],
            {**slurm, "SLURM_PROCID": str(node), "SLURM_NODEID": str(node), "SLURM_LOCALID": "0"},
        )
        for node in (1, 0)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_two_nodes_equal_one_node_with_two_processes(launcher: str, tmp_path: Path, free_port) -> None:  # type: ignore[no-untyped-def]
    """The multi-node settings: ``trainer.num_nodes=2 trainer.devices=1`` on two "nodes" (torchrun with
    a static rendezvous on 127.0.0.1, or the SLURM variables srun sets), from a shared run directory,
    trains bitwise the same weights and metrics as ``trainer.devices=2`` on one node. One thread per
    process in both, so that the float reductions inside the layers are the same."""
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    shrink = ["trainer=ddp_cpu", "trainer.max_epochs=1", *SHRINK]
    (tmp_path / "one").mkdir()
    one = subprocess.run(
        [str(bin_dir / "contrastive-train"), *shrink],
        cwd=tmp_path / "one",
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]

    (tmp_path / "two").mkdir()
    commands = _two_node_commands(
        launcher, bin_dir, [*shrink, "trainer.devices=1", "trainer.num_nodes=2"], str(free_port())
    )
    nodes = [
        subprocess.Popen(
            command, cwd=tmp_path / "two", env=env | extra, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for command, extra in commands
    ]
    logs = [p.communicate(timeout=600)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), logs[1][-3000:] + logs[0][-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in logs[0] and "GLOBAL_RANK: 0, MEMBER: 1/2" in logs[1]

    runs = [tmp_path / name / "run" for name in ("one", "two")]
    metrics = [json.loads((r / "metrics.json").read_text()) for r in runs]
    assert all(m.pop("train_seconds") > 0 for m in metrics)  # the one figure that may differ: wall-clock
    assert metrics[0] == metrics[1]
    ckpts = [torch.load(r / "checkpoints" / "last.ckpt", weights_only=False) for r in runs]
    assert ckpts[0]["global_step"] == ckpts[1]["global_step"] == 4
    for key, value in ckpts[0]["state_dict"].items():
        assert torch.equal(value, ckpts[1]["state_dict"][key]), key
