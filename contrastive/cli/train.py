"""``contrastive-train``: config -> data, pipeline and Trainer -> fit -> metrics.json."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any, cast

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from contrastive.cli.checks import check_against_data, check_config, knn_k_warning, warmup_warning
from contrastive.cli.shell import (
    EXIT_UNFINISHED,
    RUN_LOGS,
    fit_interruptible,
    log_data_warnings,
    quiet_library_notices,
    quote_paths,
    register_resolvers,
    run_guarded,
    run_hydra,
    say,
    wants_help,
    warn_once,
)

log = logging.getLogger("contrastive")


def run_training(cfg: DictConfig) -> dict[str, float]:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    RUN_LOGS[:] = [run_dir / "cli.log"]  # a resumed run's earlier calls wrote there too
    check_config(cfg)
    if warning := warmup_warning(cfg):
        warn_once(warning)
    # The settings passed: now torch and Lightning (seconds to import; --help and config errors go without)
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from contrastive.cli.console import results_table
    from contrastive.cli.run import (
        LOGGER_RUNS_KEY,
        LoggerRuns,
        build_pipeline,
        build_splits,
        check_resumable,
        final_metrics,
        finish_loggers,
        make_trainer,
        monitor_sample,
        report_skipped,
        resume_checkpoint,
        set_aside_later_checkpoints,
    )
    from contrastive.data import TensorDataModule
    from contrastive.io import SaveRunConfig, write_json_atomic
    from contrastive.pipelines.base import steps_per_epoch

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    ckpt_path, ckpt = resume_checkpoint(cfg.resume, run_dir) or (None, None)
    # before the data: the Trainer knows the number of processes (SLURM)
    trainer = make_trainer(
        cfg, run_dir, *((None, None) if ckpt is None else (int(ckpt["global_step"]), ckpt.get(LOGGER_RUNS_KEY)))
    )
    lightning = cast(Any, trainer)  # attributes Lightning sets but does not declare: callbacks, log_every_n_steps
    splits = build_splits(cfg.data, cfg.seed)
    if trainer.is_global_zero:
        report_skipped(run_dir, splits.skipped)
    counted = cfg.data.num_classes is None  # left out (data=image_folder): counted, before anything reads it
    if counted:
        cfg.data.num_classes = splits.num_classes
        log.info("data.num_classes=%d: counted from the data set", splits.num_classes)
    unlabelled = not splits.labelled and cfg.pipeline.get("online_probe", False)
    if unlabelled:  # it learns from the training batches' labels, which these images lack
        cfg.pipeline.online_probe = False
        log.info("pipeline.online_probe=false: the training images are unlabelled")
    if counted or unlabelled:
        for callback in lightning.callbacks:
            if isinstance(callback, (SaveRunConfig, LoggerRuns)):  # the checkpoints', loggers' copies: resolved before
                callback.config = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    if not splits.evaluated:
        log.info("no evaluation set (eval_data): the run logs the label-free monitors only")
    pipeline = build_pipeline(cfg)
    check_against_data(cfg, splits, trainer.world_size, pipeline)
    if splits.evaluated and (warning := knn_k_warning("eval.knn_k", cfg.eval.knn_k, len(splits.bank or splits.train))):
        warn_once(warning)
    train_batches = instantiate(cfg.sampler)
    # bad settings fail before any work, for the processes the Trainer will start
    epoch = train_batches(splits.train, batch_size=cfg.data.batch_size, seed=cfg.seed, world=trainer.world_size)
    steps = max(math.ceil(len(epoch) / trainer.accumulate_grad_batches), 1)  # optimiser steps per epoch
    # the lr and the per-step loss logged in every epoch, however few its steps (the quick CIFAR run has 9)
    if lightning.log_every_n_steps > 0:  # 0: the user's "never"
        lightning.log_every_n_steps = min(lightning.log_every_n_steps, steps)
    datamodule = TensorDataModule(
        splits,
        cfg.data.batch_size,
        cfg.data.eval_batch_size,
        cfg.data.on_device,
        cfg.seed,
        train_batches=train_batches,
        monitor=monitor_sample(splits, cfg.eval.monitor_samples, cfg.data.image_size, cfg.seed),
    )
    start_epoch, length = -1, run_length(cfg, steps)
    if ckpt is not None:
        assert ckpt_path is not None  # resume_checkpoint gives both or neither
        check_resumable(ckpt_path, ckpt, pipeline)
        start_epoch = int(ckpt["epoch"])
        if length is not None and int(ckpt["global_step"]) >= length and trainer.is_global_zero:
            log.info(
                "this run is complete: %s holds all of its %s, so nothing is trained; the untrained and the trained "
                "network are evaluated again, into metrics.json (raise trainer.max_epochs to train on, or pass "
                "resume=never to start over)",
                ckpt_path,
                f"{int(ckpt['global_step']) / steps:g} epoch(s)",
            )
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
    def measure(which: str) -> dict[str, float]:
        if trainer.is_global_zero:
            measured = "kNN, linear probe, retrieval" if splits.evaluated else "the label-free monitors"
            log.info("measuring the %s on the test split: %s", which, measured)
        bar = trainer.progress_bar_callback
        if bar is not None:  # its "Validation DataLoader 0/1" bars would not say what is measured
            bar.disable()
        try:
            trainer.validate(pipeline, datamodule=datamodule, verbose=False)
        finally:
            if bar is not None:
                bar.enable()
        if not splits.evaluated:
            return pipeline.last_monitors
        return pipeline.last_monitors | final_metrics(
            pipeline.last_features,
            cfg.data.num_classes,
            closed_set,
            cfg.eval.knn_k,
            cfg.eval.knn_temperature,
            instantiate(cfg.probe) if cfg.eval.final_probe else None,
            pipeline.retrieval_metric,
        )

    closed_set = cfg.data.train_classes == cfg.data.test_classes
    metrics = {f"{k}_untrained": v for k, v in measure("untrained network (the results table's baseline)").items()}
    fit_interruptible(trainer, pipeline, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics |= measure("trained network")
    metrics["epochs"] = trainer.global_step / steps_per_epoch(trainer)  # fractional if stopped early
    metrics["train_seconds"] = pipeline.train_seconds  # summed over every call of a resumed run
    if trainer.is_global_zero:
        write_json_atomic(run_dir / "metrics.json", metrics)
        say(results_table(metrics, cfg.trainer.max_epochs))
        log.info("metrics: %s", run_dir / "metrics.json")
        log.info("run directory: %s", run_dir)
        if (last := run_dir / "checkpoints" / "last.ckpt").is_file():
            log.info("checkpoint: %s (for contrastive-eval checkpoint=...)", last)
    finish_loggers(trainer)
    if cfg.trainer.max_time is not None and length is not None and trainer.global_step < length:
        sweep_job = HydraConfig.get().mode == RunMode.MULTIRUN  # its status is the sweep's: the others still run
        if trainer.is_global_zero:
            log.warning(
                "unfinished: trainer.max_time=%s stopped the run after %s of %s epochs (the figures above are of "
                "the unfinished network); checkpoints/last.ckpt keeps the last whole epoch. To continue, run the "
                "command again with a larger trainer.max_time, or without it (the limit counts over all the calls "
                "of a run).%s",
                cfg.trainer.max_time,
                f"{metrics['epochs']:g}",
                f"{length / steps:g}",
                "" if sweep_job else f" Exit status {EXIT_UNFINISHED} says so to a job script.",
            )
        if not sweep_job:
            sys.exit(EXIT_UNFINISHED)
    return metrics


def run_length(cfg: DictConfig, steps_per_epoch: int) -> int | None:
    """The optimiser steps of the whole run (``trainer.max_epochs``, or ``trainer.max_steps`` if sooner),
    or None for a run without either bound."""
    bounds = []
    if (epochs := cfg.trainer.max_epochs) is not None and epochs >= 0:
        bounds.append(epochs * steps_per_epoch)
    if (max_steps := cfg.trainer.get("max_steps")) is not None and max_steps >= 0:
        bounds.append(max_steps)
    return min(bounds) if bounds else None


@hydra.main(version_base="1.3", config_path="pkg://contrastive.configs", config_name="train")
@run_guarded
def _train_main(cfg: DictConfig) -> float | None:
    return run_training(cfg).get("knn_top1")


def train() -> None:
    """``contrastive-train [overrides]``."""
    if wants_help(sys.argv[1:]):
        from contrastive.cli.help import help_text

        print(help_text("train", sys.argv[1:]))
        return
    register_resolvers()
    log_data_warnings()
    quiet_library_notices()
    sys.argv[1:] = quote_paths(sys.argv[1:], ("resume", "data.root"))
    run_hydra(_train_main, "train")
