"""Helpers of the pipeline tests (imported as ``from pipeline_helpers import ...``; tests/ is on the path)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn


class StopAfterEpoch(pl.Callback):
    """Stops the run at the end of epoch ``epoch`` (0-based): a run to resume from its checkpoint."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


class Steps(pl.Callback):
    """The loss of every step and the (DDP-averaged) gradients of the first."""

    def __init__(self) -> None:
        self.losses: list[Tensor] = []
        self.grads: dict[str, Tensor] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule, optimizer: Any) -> None:
        if not self.grads:
            self.grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        self.losses.append(outputs["loss"].detach().clone())


class Inputs(nn.Module):
    """Wraps a network and records what it is given."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.seen = net, []  # type: ignore[var-annotated]

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(x.detach().clone())
        return self.net(x)


def join_as_torchrun(rank: int, port: int, world: int) -> None:
    """The environment torchrun sets for process ``rank`` of ``world``: Lightning then joins instead of launching."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    os.environ["NODE_RANK"] = "0"


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar, summary or validation; ``kwargs`` add to it."""
    args: dict[str, Any] = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**(args | kwargs))


def float64_steps(model: pl.LightningModule, splits: Any, batch_size: int, devices: int, steps: int = 3) -> dict:
    """``steps`` float64 optimiser steps of ``model`` through the Trainer (DDP on ``devices`` gloo processes, each
    taking ``batch_size`` images a step, unsharded by Lightning); the loss of every step, the gradients of the
    first and the state after them."""
    from contrastive.data import TensorDataModule

    datamodule = TensorDataModule(splits, batch_size=batch_size, eval_batch_size=8, seed=3)
    recorder = Steps()
    trainer = quiet_trainer(
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=steps,
        precision="64-true",
        use_distributed_sampler=False,
        callbacks=[recorder],
    )
    trainer.fit(model, datamodule=datamodule)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return {"losses": recorder.losses, "grads": recorder.grads, "state": state}


def run_as_rank(rank: int, port: int, out_dir: str, world: int, fn: Callable[[int], Any]) -> None:
    """Process ``rank`` of ``world`` (``torch.multiprocessing.start_processes``): joins as torchrun would, saves
    ``fn(world)`` to ``out_dir/rank{rank}.pt`` and leaves the process group cleanly."""
    join_as_torchrun(rank, port, world)
    torch.set_num_threads(1)
    torch.save(fn(world), os.path.join(out_dir, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()  # no rank tears gloo down while its peer still talks
        dist.destroy_process_group()


#: A one-epoch run of 200 training images in batches of 40, evaluated, in the folder ``run``.
SHRINK = [
    "data.source.num_train=200",
    "data.source.num_test=100",
    "data.batch_size=40",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "eval.every_n_epochs=1",
    "probe.epochs=5",
    "hydra.run.dir=run",
]


def shrunk_run(cli: Callable[..., Any], experiment: str, cwd: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``contrastive-train experiment=<experiment>`` shrunk by :data:`SHRINK` in ``cwd``: its metrics.json (every
    figure checked to be a percentage, one epoch) and its last checkpoint (five steps)."""
    out = cli("contrastive-train", f"experiment={experiment}", *SHRINK, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((cwd / "run" / "metrics.json").read_text())
    for key in ("knn_top1", "knn_top1_untrained", "linear_top1", "map_at_r"):
        assert 0.0 <= metrics[key] <= 100.0, key
    assert metrics["epochs"] == 1
    ckpt = torch.load(cwd / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 200 // 40
    return metrics, ckpt


def demo_run(cli: Callable[..., Any], experiment: str, cwd: Path) -> dict[str, Any]:
    """``contrastive-train experiment=<experiment>`` as shipped (a CPU demo) in ``cwd``: its metrics.json."""
    out = cli(
        "contrastive-train",
        f"experiment={experiment}",
        "trainer.enable_progress_bar=false",
        "hydra.run.dir=run",
        cwd=cwd,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((cwd / "run" / "metrics.json").read_text())
