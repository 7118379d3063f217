"""``contrastive-train``: config -> data, pipeline and Trainer -> fit -> metrics.json."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from contrastive.cli.checks import check_against_data, check_config, knn_k_warning, warmup_warning
from contrastive.cli.run import (
    build_pipeline,
    build_splits,
    check_resumable,
    final_metrics,
    make_trainer,
    resume_checkpoint,
    set_aside_later_checkpoints,
)
from contrastive.cli.shell import (
    fit_interruptible,
    log_data_warnings,
    quiet_library_notices,
    quote_paths,
    register_resolvers,
    run_guarded,
    run_hydra,
)
from contrastive.data import TensorDataModule
from contrastive.io import write_json_atomic
from contrastive.pipelines.base import steps_per_epoch

log = logging.getLogger("contrastive")


def run_training(cfg: DictConfig) -> dict[str, float]:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    check_config(cfg)
    if warning := warmup_warning(cfg):
        log.warning("%s", warning)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    ckpt_path, ckpt = resume_checkpoint(cfg.resume, run_dir) or (None, None)
    # before the data: the Trainer knows the number of processes (SLURM)
    trainer = make_trainer(cfg, run_dir, None if ckpt is None else int(ckpt["global_step"]))
    splits = build_splits(cfg.data, cfg.seed)
    pipeline = build_pipeline(cfg)
    check_against_data(cfg, splits, trainer.world_size, pipeline)
    if warning := knn_k_warning("eval.knn_k", cfg.eval.knn_k, len(splits.train)):
        log.warning("%s", warning)
    train_batches = instantiate(cfg.sampler)
    # bad settings fail before any work, for the processes the Trainer will start
    train_batches(splits.train, batch_size=cfg.data.batch_size, seed=cfg.seed, world=trainer.world_size)
    datamodule = TensorDataModule(
        splits,
        cfg.data.batch_size,
        cfg.data.eval_batch_size,
        cfg.data.on_device,
        cfg.seed,
        train_batches=train_batches,
    )
    start_epoch = -1
    if ckpt is not None:
        assert ckpt_path is not None  # resume_checkpoint gives both or neither
        check_resumable(ckpt_path, ckpt, pipeline)
        start_epoch = int(ckpt["epoch"])
        del ckpt  # memory-mapped; Lightning reads the checkpoint itself in fit
    if trainer.is_global_zero and (
        moved := set_aside_later_checkpoints(run_dir / "checkpoints", start_epoch, ckpt_path)
    ):
        log.warning(
            "this run starts %s: the checkpoints of the abandoned later epochs were moved to %s",
            "over" if ckpt_path is None else f"from {ckpt_path}",
            moved,
        )

    # The same seed gives the same initial weights, so this is the untrained figure also on resume.
    def measure() -> dict[str, float]:
        trainer.validate(pipeline, datamodule=datamodule, verbose=False)
        return final_metrics(
            pipeline.last_features,
            cfg.data.num_classes,
            closed_set,
            cfg.eval.knn_k,
            cfg.eval.knn_temperature,
            instantiate(cfg.probe) if cfg.eval.final_probe else None,
            pipeline.retrieval_metric,
        )

    closed_set = cfg.data.train_classes == cfg.data.test_classes
    metrics = {f"{k}_untrained": v for k, v in measure().items()}
    fit_interruptible(trainer, pipeline, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics |= measure()
    metrics["epochs"] = trainer.global_step / steps_per_epoch(trainer)  # fractional if stopped early
    metrics["train_seconds"] = pipeline.train_seconds  # summed over every call of a resumed run
    if trainer.is_global_zero:
        write_json_atomic(run_dir / "metrics.json", metrics)
        log.info("metrics: %s", {k: round(v, 2) for k, v in metrics.items()})
        log.info("run directory: %s", run_dir)
        if (last := run_dir / "checkpoints" / "last.ckpt").is_file():
            log.info("checkpoint: %s (for contrastive-eval checkpoint=...)", last)
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://contrastive.configs", config_name="train")
@run_guarded
def _train_main(cfg: DictConfig) -> float | None:
    return run_training(cfg).get("knn_top1")


def train() -> None:
    """``contrastive-train [overrides]``."""
    register_resolvers()
    log_data_warnings()
    quiet_library_notices()
    sys.argv[1:] = quote_paths(sys.argv[1:], ("resume", "data.root"))
    run_hydra(_train_main, "train")
