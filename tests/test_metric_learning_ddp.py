"""Two gloo processes on the CPU give what one process gives on the global batch: the Siamese pipeline with a
cross-batch memory (each loss that takes one), and Proxy-Anchor's gathered loss.

The harness is tests/test_ddp.py's: real Lightning ``Trainer(strategy="ddp", devices=2)`` workers started the
way torchrun starts them, against the same Trainer with one device in this process.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from test_ddp import WORLD, _on_two_ranks, _trainer
from torch import Tensor, nn

from contrastive.augment import Augment, normalize_uint8
from contrastive.data import TensorDataModule, shapes
from contrastive.losses import ContrastiveMargin, ProxyAnchor, SupCon, TripletMargin
from contrastive.models import mlp
from contrastive.pipelines import Siamese

PER_RANK, STEPS, MEMORY = 6, 4, 10  # the memory of 10 wraps at every step of 12 images


class _PlainViews(Siamese):
    """Siamese whose one view is the image itself: the comparison isolates what DDP changes (sharding,
    gathering, gradient averaging, the memory's writes) from the augmentation RNG."""

    def views(self, images: Tensor, n: int = 1) -> list[Tensor]:
        return [normalize_uint8(images, self.augment.mean, self.augment.std).to(self.dtype)] * n


LOSSES = {
    "triplet_batch_hard": lambda: TripletMargin(0.5, "batch_hard", gather=True),
    "triplet_all": lambda: TripletMargin(0.5, "all", gather=True),
    "triplet_semi_hard": lambda: TripletMargin(0.5, "semi_hard", gather=True),
    "contrastive_margin": lambda: ContrastiveMargin(0.2, 1.2, gather=True),
    "sup_con": lambda: SupCon(0.2, gather=True),
    "proxy_anchor": lambda: ProxyAnchor(8, 10, gather=True),  # no memory: its gathered loss alone
}


def _siamese(loss: str) -> Siamese:
    """A BN-free network (per-process BatchNorm statistics differ from global ones)."""
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip
    memory = {} if loss == "proxy_anchor" else {"memory_size": MEMORY, "memory_start": 1, "embed_dim": 8}
    return _PlainViews(
        projector=mlp(16, 32, 8, batchnorm=False),
        loss=LOSSES[loss](),
        backbone=backbone,
        augment=Augment(size=16),
        optimizer=partial(torch.optim.SGD, lr=0.1),
        feature_dim=16,
        num_classes=10,
        knn_k=5,
        online_probe=False,
        **memory,
    )


class _EveryStep(pl.Callback):
    """Each step's loss and (DDP-averaged) gradients."""

    def __init__(self) -> None:
        self.losses: list[Tensor] = []
        self.grads: list[dict[str, Tensor]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule, optimizer: Any) -> None:
        self.grads.append({n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None})

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        self.losses.append(outputs["loss"].detach().clone())


def _steps(devices: int, loss: str) -> dict[str, Any]:
    splits = shapes(num_train=STEPS * PER_RANK * WORLD, num_test=4, size=16, seed=1)
    datamodule = TensorDataModule(splits, batch_size=PER_RANK * WORLD // devices, eval_batch_size=8, seed=3)
    capture = _EveryStep()
    pipeline = _siamese(loss)
    _trainer(devices, max_steps=STEPS, limit_val_batches=0, precision="64-true", callbacks=[capture]).fit(
        pipeline, datamodule=datamodule
    )
    memory = {k: v.clone() for k, v in pipeline.memory.state_dict().items()} if pipeline.memory else {}
    return {"losses": capture.losses, "grads": capture.grads, "memory": memory}


def _every_loss(tmp_path: Path) -> dict[str, Any]:
    return {loss: _steps(WORLD, loss) for loss in LOSSES}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory, free_port) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    return _on_two_ranks(_every_loss, tmp_path_factory.mktemp("ddp_metric"), free_port())


@pytest.mark.parametrize("loss", list(LOSSES))
def test_two_processes_equal_one_process_step_by_step(two_ranks: list[dict[str, Any]], loss: str) -> None:
    """Four steps: the memory joins at step 1 and wraps at every step; loss (mean over ranks) and every
    gradient at every step equal one process's on the global batch, and both ranks hold its memory."""
    reference = _steps(1, loss)
    ranks = [out[loss] for out in two_ranks]
    assert len(reference["losses"]) == len(reference["grads"]) == STEPS
    for step in range(STEPS):
        mean = sum(r["losses"][step] for r in ranks) / WORLD
        torch.testing.assert_close(mean, reference["losses"][step], rtol=1e-10, atol=0, msg=f"step {step}")
        for r in ranks:
            assert r["grads"][step].keys() == reference["grads"][step].keys()
            for name, ref in reference["grads"][step].items():
                torch.testing.assert_close(r["grads"][step][name], ref, rtol=1e-10, atol=1e-15, msg=f"{step} {name}")
    if loss == "proxy_anchor":
        assert not ranks[0]["memory"] and "proxies" in str(list(reference["grads"][0]))
        return
    assert int(reference["memory"]["filled"]) == MEMORY and int(reference["memory"]["ptr"]) == STEPS * 12 % MEMORY
    for name, value in reference["memory"].items():
        assert torch.equal(ranks[0]["memory"][name], ranks[1]["memory"][name]), name  # the same on both ranks
        torch.testing.assert_close(ranks[0]["memory"][name], value, rtol=1e-10, atol=1e-15, msg=name)
