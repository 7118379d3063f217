"""Run mechanics: the objects a config describes, the Trainer, resume and checkpoints, the sweep summary."""

from __future__ import annotations

import itertools
import logging
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, LearningRateMonitor
from pytorch_lightning.loggers import Logger, WandbLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from contrastive.cli.checks import check_feature_dim, unseen_test_classes_warning
from contrastive.cli.console import EpochLines
from contrastive.cli.shell import ConfigError, warn_once
from contrastive.data import ImageTensors, Splits
from contrastive.evaluation import check_finite, feature_metrics
from contrastive.io import (
    AtomicCheckpointIO,
    CheckpointError,
    EpochCheckpoint,
    LastCheckpoint,
    ResumableCSVLogger,
    SaveRunConfig,
    load_checkpoint,
    state_dict_mismatch,
)
from contrastive.pipelines import Pipeline

log = logging.getLogger("contrastive")


def build_splits(data_cfg: DictConfig, seed: int) -> Splits:
    """The data set of ``data_cfg``, capped by ``subset`` / ``test_subset``."""
    splits: Splits = instantiate(data_cfg.source)
    train, test = splits.train, splits.test
    chosen = data_cfg.train_classes is not None or data_cfg.test_classes is not None  # the warning's advice
    if chosen and not splits.labelled:
        raise ConfigError(
            "data.train_classes / data.test_classes pick classes of labelled training data, but these training "
            "images are unlabelled: leave them out"
        )
    if splits.labelled and not chosen and (warning := unseen_test_classes_warning(splits)):
        warn_once(warning)
    if data_cfg.train_classes is not None:
        train = train.select_classes(list(data_cfg.train_classes))
    if data_cfg.test_classes is not None:
        test = test.select_classes(list(data_cfg.test_classes))
    test_subset = data_cfg.test_subset if splits.evaluated else None  # else test is the monitors' fixed sample
    return replace(splits, train=train.subset(data_cfg.subset, seed), test=test.subset(test_subset, seed))


def report_skipped(run_dir: Path, skipped: list[str]) -> None:
    """List the image files that could not be read (``"<path>: <why>"``) in ``run_dir/unreadable_files.txt``,
    and say so in one warning line."""
    from contrastive.io import write_bytes_atomic

    if skipped:
        listing = write_bytes_atomic(run_dir / "unreadable_files.txt", "".join(f"{s}\n" for s in skipped).encode())
        warn_once(f"{len(skipped)} image file(s) could not be read and were skipped; the list: {listing}")


def monitor_sample(splits: Splits, n: int, image_size: int, seed: int) -> ImageTensors | None:
    """The fixed sample of training images the label-free monitors read (``n`` of them, seeded), at the
    training size; None for ``n=0``, or where the test split already is that sample (no evaluation set)."""
    if n <= 0 or not splits.evaluated:
        return None
    sample = splits.train.subset(n, seed)
    if sample.images.shape[-1] != image_size:  # unlabelled images stored larger than the training size
        from torchvision.transforms.v2.functional import resize

        images = resize(sample.images, [image_size, image_size], antialias=True)
        sample = ImageTensors(images, sample.labels, sample.num_classes, sample.class_names)
    return sample


def build_pipeline(cfg: DictConfig) -> Pipeline:
    """Instantiate every part of the run and pass the finished objects to the pipeline."""
    model = cfg.model
    backbone = instantiate(model.backbone)
    check_feature_dim(backbone, model.feature_dim, cfg.data.image_size, model.backbone.get("in_channels", 3))
    if cfg.get("compile"):
        backbone.compile()  # in place: the state_dict keeps its keys (no "_orig_mod." prefix)
    parts: dict[str, Any] = {
        "backbone": backbone,
        "projector": instantiate(model.projector),
        "loss": instantiate(cfg.loss),
        "augment": instantiate(cfg.aug),
        "optimizer": instantiate(cfg.optimizer),
        "scheduler": instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
    }
    return instantiate(cfg.pipeline, **parts)


def resolve_accelerator(accelerator: str) -> str:
    """``auto`` never picks Apple's MPS, and ``mps`` is refused: MPS has no float64, which the losses'
    fixed temperature and the evaluation (kNN votes, retrieval sums) use. CUDA, else the CPU."""
    apple = not torch.cuda.is_available() and torch.backends.mps.is_available()
    if accelerator == "mps" or (accelerator == "gpu" and apple):  # Lightning's "gpu" is MPS on a Mac
        raise ConfigError(
            f"trainer.accelerator={accelerator}: Apple's GPU backend has no float64, which the losses "
            "and the evaluation use: use trainer.accelerator=cpu (or a CUDA GPU)"
        )
    if accelerator == "auto" and apple:
        log.info("Apple's MPS backend is visible but not used (it has no float64): training on the CPU")
        return "cpu"
    return accelerator


def resolve_precision(precision: Any, accelerator: str) -> Any:
    """``auto``: bf16 autocast when training on a GPU, fp32 otherwise."""
    if precision != "auto":
        return precision
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if gpu else "32-true"


#: Per logger class (``logger.<key>._target_``): its constructor's arguments for the run's name and for the
#: id of an existing run to continue (its Lightning ``version``), for the services that keep runs.
LOGGER_RUN_ARGUMENTS = {"WandbLogger": ("name", "version"), "MLFlowLogger": ("run_name", "run_id")}

#: The checkpoint's entry that holds, per ``logger.<key>``, the id of that logger's run (see :class:`LoggerRuns`).
LOGGER_RUNS_KEY = "logger_runs"


def make_loggers(
    cfg: DictConfig, run_dir: Path, resume_step: int | None = None, runs: dict[str, str] | None = None
) -> list[Logger]:
    """The loggers of ``cfg.logger`` (``logger=csv_tensorboard|wandb|mlflow``), in the run folder unless their
    config sets a ``save_dir``. W&B and MLflow runs are named after the run folder and, given their ids from
    the checkpoint the run resumes from (``runs``), continue those runs; the CSV log keeps its rows before
    ``resume_step``."""
    name = run_dir.name if run_dir.name == cfg.name else f"{cfg.name}/{run_dir.name}"
    loggers = []
    for key, spec in cfg.logger.items():
        given: dict[str, Any] = {} if "save_dir" in spec else {"save_dir": str(run_dir)}
        name_arg, id_arg = LOGGER_RUN_ARGUMENTS.get(str(spec._target_).rpartition(".")[2], (None, None))
        if name_arg and name_arg not in spec:
            given[name_arg] = name
        if id_arg and runs and str(key) in runs:
            given[id_arg] = runs[str(key)]
        logger = instantiate(spec, **given)
        if isinstance(logger, ResumableCSVLogger):
            logger.resume_step = resume_step
        loggers.append(logger)
    return loggers


class LoggerRuns(Callback):
    """Logs the composed config as hyper-parameters once the run passed its checks (a refused run leaves no
    logger files), except to the W&B / MLflow runs it continues (MLflow refuses a changed value, e.g. a larger
    ``trainer.max_time``); keeps the ids of those runs in every checkpoint, so that the run that resumes from
    it continues them (:func:`make_loggers`)."""

    def __init__(self, keys: list[str], config: dict[str, Any], continued: set[str]) -> None:
        self.keys = keys  # logger.<key> of each of trainer.loggers, in order
        self.config, self.continued = config, continued

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for key, logger in zip(self.keys, trainer.loggers):
            if key not in self.continued:
                logger.log_hyperparams(self.config)
        self.continued = set(self.keys)  # once per call (validate, fit, validate)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint[LOGGER_RUNS_KEY] = {
            key: str(logger.version)
            for key, logger in zip(self.keys, trainer.loggers)
            if type(logger).__name__ in LOGGER_RUN_ARGUMENTS
        }


def finish_loggers(trainer: pl.Trainer) -> None:
    """End the logger runs in the process that started them, once the run's last figures are logged: W&B's
    own exit hook, under Hydra, left its run unfinished (no summary, no config in the files)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:  # not started on the other ranks
            logger.experiment.finish()


def make_trainer(
    cfg: DictConfig, run_dir: Path, resume_step: int | None = None, logger_runs: dict[str, str] | None = None
) -> pl.Trainer:
    """The run's Lightning Trainer: last/periodic checkpoints, the loggers of ``cfg.logger``, atomic writes.

    ``resume_step``: the step of the checkpoint the run resumes from; ``metrics.csv`` keeps the rows
    logged before it; ``logger_runs``: that checkpoint's W&B / MLflow run ids (:func:`make_loggers`).
    The progress bar is shown only where the output is a terminal (in a file it is
    ``\\r``-joined frames); without it each epoch is one plain line (:class:`EpochLines`).
    """
    config = OmegaConf.to_container(cfg, resolve=True)
    callbacks: list[Callback] = [
        SaveRunConfig(config),  # type: ignore[arg-type]
        LoggerRuns([str(key) for key in cfg.logger], config, set(logger_runs or ())),  # type: ignore[arg-type]
        LastCheckpoint(run_dir / "checkpoints" / "last.ckpt"),
        EpochCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="epoch={epoch:04d}",
            auto_insert_metric_name=False,
            # save_on_train_epoch_end: at every epoch's end, not only after the (sparser) validations
            save_top_k=-1,
            every_n_epochs=cfg.checkpoint.every_n_epochs,
            save_on_train_epoch_end=True,
        ),
        LearningRateMonitor(logging_interval="step"),
    ]
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(trainer_args, dict)
    trainer_args = cast(dict[str, Any], trainer_args)  # a config group's keys are strings
    trainer_args["accelerator"] = resolve_accelerator(trainer_args["accelerator"])
    trainer_args["precision"] = resolve_precision(trainer_args["precision"], trainer_args["accelerator"])
    trainer_args["enable_progress_bar"] = bool(trainer_args.get("enable_progress_bar", True)) and sys.stdout.isatty()
    if not trainer_args["enable_progress_bar"]:
        callbacks.append(EpochLines())
    try:
        return pl.Trainer(
            **trainer_args,
            default_root_dir=run_dir,
            callbacks=callbacks,
            logger=make_loggers(cfg, run_dir, resume_step, logger_runs),
            plugins=[AtomicCheckpointIO()],
            check_val_every_n_epoch=cfg.eval.every_n_epochs,
            num_sanity_val_steps=0,
            use_distributed_sampler=False,
        )
    except TypeError as e:  # +trainer.max_epoch=1: a key the Trainer does not take
        raise ConfigError(f"{e}: trainer.* keys are the arguments of pytorch_lightning.Trainer") from None
    except (MisconfigurationException, ValueError) as e:  # a value it refuses, e.g. precision=abc or a GPU where
        where = " ".join(str(e).lower().split())  # there is none (the accelerator's errors get the hint)
        hint = (
            "use trainer.accelerator=auto, or trainer=cpu"
            if re.search(r"accelerator|device|gpu|cuda|mps|tpu", where)
            else "trainer.* values are the arguments of pytorch_lightning.Trainer"
        )
        raise ConfigError(
            f"{e} (trainer.accelerator={trainer_args['accelerator']}, "
            f"trainer.devices={trainer_args['devices']}): {hint}"
        ) from None


def resume_checkpoint(resume: Any, run_dir: Path) -> tuple[str, dict[str, Any]] | None:
    """The checkpoint a run continues from, as (path, memory-mapped contents), or None.

    ``auto``: the run directory's ``last.ckpt`` if there is one; ``never``/null: none; else a
    path, which starts the run: once the run has its own ``last.ckpt`` it continues from that
    (a path inside the run directory, e.g. an earlier ``epoch=*.ckpt``, still rolls it back).
    Read now, so that a missing, truncated or foreign file is a clear error before any work.
    """
    if resume in (None, "never", False):
        return None
    own = run_dir / "checkpoints" / "last.ckpt"
    path = own if resume == "auto" else Path(str(resume)).expanduser()
    if resume == "auto" and not path.is_file():
        return None
    if resume != "auto" and own.is_file() and not path.resolve().is_relative_to(run_dir.resolve()):
        # the same command again after an interruption: continue this run, not from PATH again
        log.info("resume=%s started this run; it continues from its own %s", path, own)
        path = own
    return str(path), load_checkpoint(path, key="resume", mmap=True)


def set_aside_later_checkpoints(ckpt_dir: Path, epoch: int, source: str | None) -> Path | None:
    """Move the checkpoints of a branch the run abandons into ``ckpt_dir/set_aside_<time>/``.

    A run that starts over (``resume=never``: ``epoch=-1``) or rolls back to a checkpoint of epoch
    ``epoch`` would otherwise leave the old ``epoch=NNNN.ckpt`` of later epochs under the names the
    new run's are looked up by (Lightning names its own ``epoch=NNNN-v1.ckpt``), and ``last.ckpt``
    for the next plain call to continue. Nothing is deleted. Returns the folder, or None if nothing moved.
    """
    if not ckpt_dir.is_dir():
        return None
    later = [
        p
        for p in ckpt_dir.glob("epoch=*.ckpt")
        if (m := re.fullmatch(r"epoch=(\d+)(-v\d+)?\.ckpt", p.name)) and int(m[1]) > epoch
    ]
    last = ckpt_dir / "last.ckpt"
    if last.is_file() and (source is None or not last.samefile(source)):
        later.append(last)
    if not later:
        return None
    stamp = time.strftime("set_aside_%Y%m%d-%H%M%S")
    dest = next(d for i in itertools.count() if not (d := ckpt_dir / (stamp + (f"-{i}" if i else ""))).exists())
    dest.mkdir()
    for p in later:
        p.rename(dest / p.name)
    return dest


def check_resumable(ckpt_path: str, ckpt: dict[str, Any], pipeline: Pipeline) -> None:
    """Refuse, before any work, a checkpoint whose weights do not fit ``pipeline`` (another experiment's)."""
    mismatch = state_dict_mismatch(ckpt["state_dict"], pipeline)
    if mismatch:
        name = ckpt["contrastive_config"].get("name", "?")
        raise CheckpointError(
            f"cannot resume from {ckpt_path}: it was written by another model or pipeline (run {name!r}; {mismatch}). "
            "Pass resume=never to start over, or resume=PATH to a checkpoint of this experiment."
        )


def final_metrics(
    features: dict[str, tuple[torch.Tensor, torch.Tensor]], *args: Any, **kwargs: Any
) -> dict[str, float]:
    """:func:`contrastive.evaluation.feature_metrics` of a trained network (same arguments); features
    holding NaN/Inf are a diverged run's: one :class:`CheckpointError` saying what to evaluate instead."""
    for split, (x, _) in features.items():
        try:
            check_finite(x, f"the network's features of the {split} images")
        except ValueError as e:
            raise CheckpointError(
                f"{e}, so no metric would mean anything: its weights or BatchNorm statistics hold NaN/Inf "
                "(a diverged run). Evaluate an earlier checkpoint (checkpoints/epoch=NNNN.ckpt)."
            ) from None
    return feature_metrics(features, *args, **kwargs)
