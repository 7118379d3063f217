"""The Hydra entry points ``contrastive-train`` and ``contrastive-eval``.

This is the only module that touches Hydra / OmegaConf: it turns a config into
finished objects (data, networks, loss, augmentation, optimiser factory) and
hands them to a pipeline and a Lightning ``Trainer``.
"""

from __future__ import annotations

import difflib
import errno
import hashlib
import itertools
import logging
import os
import re
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NoReturn, get_args

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import QuotedString
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import (
    ConfigCompositionException, HydraException, InstantiationException, MissingConfigException, OverrideParseException,
)
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, Checkpoint, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException

from contrastive.data import DOWNLOAD_HINT, DataError, DataWarning, Splits, TensorDataModule
from contrastive.evaluation import check_finite, knn_top1, retrieval_metrics
from contrastive.evaluation.linear import Normalize, ProbeOptimizer
from contrastive.evaluation.neighbors import Metric
from contrastive.evaluation.report import JOB_ERROR_FILE
from contrastive.io import (
    AtomicCheckpointIO,
    CheckpointError,
    ResumableCSVLogger,
    load_checkpoint,
    save_torch_atomic,
    state_dict_mismatch,
    write_bytes_atomic,
    write_json_atomic,
)
from contrastive.pipelines import NonFiniteLossError, Pipeline
from contrastive.pipelines.base import channels_last, steps_per_epoch
from contrastive.pipelines.moco import queue_problem

log = logging.getLogger("contrastive")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, NonFiniteLossError, InstantiationException,
               MisconfigurationException)  # the last: Lightning's, e.g. trainer.accelerator=gpu without a GPU


def _user_message(error: Exception) -> str:
    """The message of ``error``; for a failed Hydra instantiation, the cause's own message and the
    config key that built it (Hydra's wrapper repeats the target's name and the exception's repr)."""
    key = None
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        found = re.search(r"full_key: (\S+)", str(error))
        key = found.group(1) if found else key
        error = error.__cause__  # type: ignore[assignment]
    return f"{error} (while building {key})" if key else str(error)




def _one_line(error: Exception) -> str:
    return " ".join(m.strip() for m in _user_message(error).strip().splitlines())


def _exit_with(error: Exception) -> NoReturn:
    """Print ``error`` as one line on stderr and exit with status 2."""
    print(f"error: {_one_line(error)}", file=sys.stderr)
    sys.exit(2)


def _log_data_warnings() -> None:
    """Show :class:`DataWarning` as a log line (on the console and in the run's ``cli.log``), not as
    Python's ``<file>:<line>: UserWarning`` pointing into Hydra's instantiate."""
    show = warnings.showwarning

    def showwarning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, DataWarning):
            log.warning("%s", message)
        else:
            show(message, category, *args, **kwargs)

    warnings.showwarning = showwarning


def _quiet_library_notices() -> None:
    """Drop two lines Lightning prints in every training run that no user of this CLI can act on:
    its advertisement for litlogger and a deprecation inside its own pytree code."""
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")  # batches come from tensors


def _config_keys(config_name: str, overrides: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Every dotted key of the shipped config ``config_name`` with ``overrides`` (e.g. ``experiment=...``),
    or with its defaults where those do not compose."""
    GlobalHydra.instance().clear()
    with initialize_config_module("contrastive.configs", version_base="1.3"):
        try:
            composed = compose(config_name, overrides=list(overrides))
        except Exception:  # another bad override, or a sweep's list
            composed = compose(config_name)
        tree = OmegaConf.to_container(composed, resolve=False)

    def walk(node: Any, prefix: str) -> list[str]:
        if not isinstance(node, dict):
            return [prefix]
        return [k for key, value in node.items() for k in walk(value, f"{prefix}.{key}" if prefix else str(key))]

    return walk(tree, "")


def _run_hydra(main: Callable[[], Any], config_name: str) -> None:
    """Run a ``@hydra.main`` entry point; a bad override is one line (exit status 2).

    Hydra printed several lines for a misspelt key, with a hint (``+key=``) that then failed inside the run.
    """
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # composition errors reach us instead of Hydra's printout
    try:
        main()
    except (MissingConfigException, OverrideParseException) as e:  # before its base class below
        _exit_with(ConfigError(str(e).split("Config search path")[0]))  # the options, not Hydra's search path
    except ConfigCompositionException as e:
        found = re.search(r"Could not override '([^']+)'", str(e))
        if found is None:
            _exit_with(ConfigError(str(e).split("Config search path")[0]))
        key = found.group(1)
        others = [a for a in sys.argv[1:] if not a.startswith("-") and a.partition("=")[0].lstrip("+~") != key]
        keys = [k for k in _config_keys(config_name, others) if not k.rpartition(".")[2].startswith("_")]  # no _target_
        close = [k for k in difflib.get_close_matches(key, keys, n=2) if k != key][:1]
        _exit_with(ConfigError(f"unknown config key {key}{f' (did you mean {close[0]}?)' if close else ''}: "
                               f"`--cfg job` lists the keys with their values"))
    except OSError as e:  # e.g. Hydra creating the run folder in a read-only place: one line, not three tracebacks
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM) or e.filename is None:
            raise
        _exit_with(ConfigError(
            f"cannot write {e.filename}: {e.strerror}. contrastive-train writes its run folder under the current "
            "folder, contrastive-eval beside the checkpoint: run from a folder you can write to, or pass "
            "hydra.run.dir=/a/writable/folder"))


def _stopped_by(signum: signal.Signals) -> NoReturn:
    """What to do after a stop by a signal; exit status 128 + its number, as a shell reports it."""
    name = "Ctrl-C" if signum == signal.SIGINT else signum.name
    print(f"error: stopped by {name}; checkpoints/last.ckpt keeps the last whole epoch: run the same "
          "command to continue", file=sys.stderr)
    sys.exit(128 + signum)


def fit_interruptible(trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
    """``trainer.fit``, with Ctrl-C raised as KeyboardInterrupt: Lightning ends its graceful shutdown
    with ``sys.exit(1)``, which says neither that the run was stopped nor how to continue it."""
    try:
        trainer.fit(*args, **kwargs)
    except SIGTERMException:  # a SystemExit too, after which the trainer is 'interrupted' as well
        raise
    except SystemExit:
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise


def _run_guarded(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Turn user errors into one clear line on stderr and exit status 2 (no traceback).

    In a sweep (``-m``) a job's error does not stop the sweep: the line (for an unforeseen error, the
    traceback) goes to stderr and to the job's ``error.txt``, the other jobs run, and
    :class:`SweepSummary` reports it.
    """

    def wrapper(cfg: DictConfig) -> Any:
        sweep_job = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
        error_file = Path(HydraConfig.get().runtime.output_dir) / JOB_ERROR_FILE if sweep_job else None
        if error_file is not None:
            error_file.unlink(missing_ok=True)  # from an earlier failed attempt of this job
        try:
            return fn(cfg)
        except SIGTERMException:  # Lightning's is a SystemExit without a code: a scheduler would read success
            _stopped_by(signal.SIGTERM)
        except KeyboardInterrupt:  # Ctrl-C (see fit_interruptible)
            _stopped_by(signal.SIGINT)
        except USER_ERRORS as e:
            if error_file is None:
                _exit_with(e)
            line = _one_line(e)
            print(f"error: {line}", file=sys.stderr)
            write_bytes_atomic(error_file, (line + "\n").encode())
            return None
        except Exception as e:  # a bug or an unforeseen failure: the traceback (a sweep's other jobs still run)
            if error_file is None:
                raise
            log.exception("job failed")  # the traceback, into the job's cli.log too
            write_bytes_atomic(error_file, f"{type(e).__name__}: {_one_line(e)} (traceback in the job's "
                                           "cli.log)\n".encode())
            return None

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _quote_paths(argv: list[str], keys: tuple[str, ...]) -> list[str]:
    """``argv`` with the path overrides of ``keys`` quoted for Hydra where its grammar cannot read them.

    Run folders are named after their overrides (``a=1,b=2``) and periodic checkpoints are
    ``epoch=0049.ckpt``, so ``checkpoint=<a path the CLI printed>`` is not a valid override
    as typed, nor is a path holding a comma (a sweep to Hydra) without ``-m``. With ``-m`` the
    commas are split into the existing paths they join into (:func:`_existing_paths`), each quoted.
    A value that parses as it is (or is quoted already) is left alone.
    """
    parser = OverridesParser.create()
    multirun = _is_multirun(argv)
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") in keys and value[:1] not in ("'", '"'):
            paths = _existing_paths(value) if multirun else None
            if paths is not None:
                out.append(key + "=" + ",".join("'" + p.replace("'", "\\'") + "'" for p in paths))
                continue
            try:  # a sweep (a path with a comma) is one path unless -m asks for a sweep
                quote = parser.parse_override(arg).is_sweep_override() and not multirun
            except HydraException:  # the grammar cannot read it as typed
                quote = True
            if quote:
                arg = f"{key}='" + value.replace("'", "\\'") + "'"
        out.append(arg)
    return out


def _existing_paths(value: str) -> list[str] | None:
    """``A,B,...`` read as existing paths whose own names may hold commas (run folders are named
    ``a=1,b=2``): from the left, the longest run of comma-separated pieces that exists is one path.
    None where some piece belongs to no existing path (Hydra then reads the value as typed)."""
    pieces, paths, i = value.split(","), [], 0
    while i < len(pieces):
        j = next((j for j in range(len(pieces), i, -1) if Path(",".join(pieces[i:j])).expanduser().exists()), None)
        if j is None:
            return None
        paths.append(",".join(pieces[i:j]))
        i = j
    return paths


def _is_multirun(argv: list[str]) -> bool:
    return any(arg in ("-m", "--multirun") for arg in argv)


def _override_paths(arg: str) -> list[str]:
    """The string values of one ``key=value`` override: one, or each of a sweep's (``-m key=A,B``)."""
    override = OverridesParser.create().parse_override(arg)
    values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
    # a quoted element of a sweep ('A','B') comes as a QuotedString, not unquoted as a lone value is
    return [v.text if isinstance(v, QuotedString) else v for v in values if isinstance(v, (str, QuotedString))]


def _run_dir_of(checkpoint: str) -> str:
    """The run directory of a checkpoint: the parent of its ``checkpoints/`` folder."""
    p = Path(checkpoint).expanduser().resolve()
    return str(p.parent.parent if p.parent.name == "checkpoints" else p.parent)


def _short_name(name: str, limit: int = 120) -> str:
    """One folder name from the overrides: ``/`` (e.g. of ``data.root=/data``) written as ``%2F`` so that
    the run is not nested folders, and cut and suffixed with a hash when too long for a file name."""
    name = name.replace("%", "%25").replace("/", "%2F")
    if len(name.encode()) <= limit:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return f"{name.encode()[: limit - 11].decode(errors='ignore')}_{digest}"


def _resolvers() -> None:
    resolvers = {"run_dir_of": _run_dir_of, "stem_of": lambda p: Path(p).stem, "short_name": _short_name}
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


# --------------------------------------------------------------------------- building blocks


def build_splits(data_cfg: DictConfig, seed: int) -> Splits:
    """The data set of ``data_cfg``, capped by ``subset`` / ``test_subset``."""
    splits: Splits = instantiate(data_cfg.source)
    train, test = splits.train, splits.test
    if data_cfg.train_classes is not None:
        train = train.select_classes(list(data_cfg.train_classes))
    if data_cfg.test_classes is not None:
        test = test.select_classes(list(data_cfg.test_classes))
    return Splits(train.subset(data_cfg.subset, seed), test.subset(data_cfg.test_subset, seed))


def check_feature_dim(backbone: torch.nn.Module, feature_dim: int, image_size: int, in_channels: int = 3) -> None:
    """``model.feature_dim`` (the heads' input width) against one forward pass of a blank image.

    A wrong value (e.g. after ``model.backbone.width=64`` or ``name=resnet50``) otherwise failed
    with a shape error at the first step, after the untrained measurement.
    """
    was_training = backbone.training
    with torch.no_grad():
        width = backbone.eval()(torch.zeros(1, in_channels, image_size, image_size)).shape[1:]
    backbone.train(was_training)
    if len(width) != 1:
        raise ConfigError(f"the backbone outputs shape {tuple(width)} per image, not a feature vector: end "
                          "model.backbone with a global pooling and a flatten (as the built-in backbones do)")
    if width[0] != feature_dim:
        raise ConfigError(f"model.feature_dim={feature_dim}, but the backbone outputs {width[0]} features per "
                          f"image: pass model.feature_dim={width[0]}")


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
        raise ConfigError(f"trainer.accelerator={accelerator}: Apple's GPU backend has no float64, which the losses "
                          "and the evaluation use: use trainer.accelerator=cpu (or a CUDA GPU)")
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


class SaveRunConfig(Callback):
    """Stores the resolved run config in every checkpoint, so a checkpoint is self-contained."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint["contrastive_config"] = self.config


def _steps_of_cut_epoch(trainer: pl.Trainer) -> int | None:
    """The steps done of the epoch now ending if training stopped inside it (``trainer.max_time``), else None.

    Lightning counts such an epoch as finished, so a checkpoint of it would make a resume
    skip the rest of the epoch: the checkpoint callbacks below do not save it.
    """
    done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
    return done if done < trainer.num_training_batches else None


class LastCheckpoint(Checkpoint):
    """Writes ``last.ckpt`` at the end of every whole training epoch.

    (``ModelCheckpoint(save_last=True)`` writes it only when it also saves a
    periodic checkpoint.) As a ``Checkpoint`` it runs after the LightningModule's
    ``on_train_epoch_end``, i.e. after the last step's non-finite check. After an
    epoch cut short it stays at the last whole one, from which the run resumes.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        done = _steps_of_cut_epoch(trainer)
        if done is not None:
            log.warning("training stopped after %d of %d steps of epoch %d; %s stays at the end of the last "
                        "whole epoch, from which the command continues (with trainer.max_time, give it time "
                        "for more than one epoch, or leave it out)",
                        done, trainer.num_training_batches, trainer.current_epoch, self.path.name)
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # the full state: resume needs it


class EpochCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that does not save an epoch cut short under that epoch's name."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _steps_of_cut_epoch(trainer) is None:
            super().on_train_epoch_end(trainer, pl_module)


class SweepSummary(HydraCallback):
    """At the end of a multirun: ``summary.{csv,md,png}`` of this sweep's jobs in the sweep folder.

    The sweep folder (``multirun/<name>``) also keeps the jobs of earlier sweeps; the summary
    holds the jobs launched by this one (their ``.hydra/`` is written at launch). If a job
    failed with a user error, the summary still gets its row, the errors are listed, and
    the command exits with status 2.
    """

    def __init__(self) -> None:
        self.started = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from contrastive.evaluation import summarize_runs

        sweep = Path(config.hydra.sweep.dir)
        runs = sorted(p.parent.parent for p in sweep.glob("*/.hydra/overrides.yaml")
                      if p.stat().st_mtime >= self.started - 1)  # 1 s: file systems with coarse timestamps
        if not runs:
            return
        log.info("sweep summary: %s", summarize_runs(runs, sweep))
        failed = [(run, (run / JOB_ERROR_FILE).read_text().strip()) for run in runs if (run / JOB_ERROR_FILE).is_file()]
        for run, message in failed:
            log.error("job %s failed: %s", " ".join(OmegaConf.load(run / ".hydra" / "overrides.yaml")), message)
        if failed:
            print(f"error: {len(failed)} of {len(runs)} jobs failed (listed above, and in each job's "
                  f"{JOB_ERROR_FILE}); the summary has their rows without metrics", file=sys.stderr)
            sys.exit(2)


def _check(cfg: DictConfig, key: str, kinds: tuple[type, ...], ok: Callable[[Any], bool], what: str) -> None:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, kinds) or not ok(value):
        raise ConfigError(f"{key}={value!r} is invalid: it must be {what}")


_POSITIVE_INT = (int,), lambda v: v >= 1, "a positive integer"
_NON_NEGATIVE = (int, float), lambda v: v >= 0, "a non-negative number"


def _check_optional(cfg: DictConfig, key: str, kinds: tuple[type, ...], ok: Callable[[Any], bool], what: str) -> None:
    """:func:`_check` where the key is set (a group option may not have it, e.g. AdamW has no momentum)."""
    if OmegaConf.select(cfg, key) is not None:
        _check(cfg, key, kinds, ok, what)


def check_probe_config(cfg: DictConfig) -> None:
    """The linear probe's settings (``probe.*``, a group of both train.yaml and eval.yaml), checked up front:
    the probe runs after training (or after feature extraction), too late to learn of a typo."""
    _check(cfg, "probe.epochs", *_POSITIVE_INT)
    _check(cfg, "probe.batch_size", *_POSITIVE_INT)
    _check_optional(cfg, "probe.lr", (int, float), lambda v: v > 0, "a positive number (or null for the default)")
    _check(cfg, "probe.weight_decay", *_NON_NEGATIVE)
    for key, choices in (("probe.optimizer", get_args(ProbeOptimizer)), ("probe.normalize", get_args(Normalize))):
        _check(cfg, key, (str,), lambda v: v in choices, ", ".join(choices[:-1]) + " or " + choices[-1])


def check_config(cfg: DictConfig) -> None:
    """Reject wrong types and invalid values before anything is built.

    Unknown keys are rejected earlier by Hydra's struct mode; hyper-parameters of
    losses, augmentations and pipelines are checked by their constructors.
    """
    _check(cfg, "data.batch_size", (int,), lambda v: v >= 2, "an integer >= 2 (a contrastive batch needs pairs)")
    _check(cfg, "data.eval_batch_size", *_POSITIVE_INT)
    _check(cfg, "trainer.max_epochs", (int,), lambda v: v >= 0, "a non-negative integer")
    _check(cfg, "eval.every_n_epochs", *_POSITIVE_INT)
    _check(cfg, "checkpoint.every_n_epochs", *_POSITIVE_INT)
    _check(cfg, "seed", (int,), lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)")
    _check_optional(cfg, "scheduler.warmup_epochs", *_NON_NEGATIVE)
    _check(cfg, "eval.knn_temperature", (int, float), lambda v: v > 0, "a positive number")
    max_time = OmegaConf.select(cfg, "trainer.max_time")
    if max_time is not None and not (isinstance(max_time, str) and re.fullmatch(r"\d+:\d\d:\d\d:\d\d", max_time)):
        raise ConfigError(f"trainer.max_time={max_time!r} is invalid: it must be DD:HH:MM:SS, e.g. "
                          "trainer.max_time=00:04:00:00 for four hours")
    _check(cfg, "data.num_classes", *_POSITIVE_INT)
    _check_optional(cfg, "optimizer.lr", (int, float), lambda v: v > 0, "a positive number")
    _check_optional(cfg, "optimizer.weight_decay", *_NON_NEGATIVE)
    _check_optional(cfg, "optimizer.momentum", (int, float), lambda v: 0 <= v < 1, "a number in [0, 1)")
    _check_optional(cfg, "scheduler.final_lr_fraction", (int, float), lambda v: 0 <= v <= 1,
                    "a number in [0, 1] (the final lr as a fraction of the peak)")
    if cfg.eval.final_probe:
        check_probe_config(cfg)
    for key in ("data.subset", "data.test_subset"):
        _check_optional(cfg, key, *_POSITIVE_INT)
    if cfg.data.train_classes != cfg.data.test_classes and cfg.eval.knn_k != 0:
        raise ConfigError(
            "data.train_classes and data.test_classes differ (class-disjoint retrieval), so a kNN classifier "
            "of the test images by the training classes means nothing: pass eval.knn_k=0 to monitor MAP@R "
            "among the test images instead"
        )
    regularizer = OmegaConf.select(cfg, "regularizer")
    if regularizer is not None and regularizer.head is None and regularizer.weight:
        raise ConfigError(
            f"regularizer.weight={regularizer.weight} has no effect without a classifier head (regularizer=none): "
            "add regularizer=softmax_ce (or cosine_softmax_ce) to train with the softmax-CE regulariser"
        )
    if str(OmegaConf.select(cfg, "pipeline._target_")).endswith(".MoCo") and OmegaConf.select(cfg, "trainer.sync_batchnorm"):
        raise ConfigError(
            "trainer.sync_batchnorm=true would replace MoCo's shuffle-BN by global BatchNorm statistics, through "
            "which the positive key leaks (docs/distributed.md): pass trainer.sync_batchnorm=false"
        )


def warmup_warning(cfg: DictConfig) -> str | None:
    """A line to log when the LR warm-up lasts the whole run (no decay at all), else None."""
    warmup, epochs = OmegaConf.select(cfg, "scheduler.warmup_epochs"), cfg.trainer.max_epochs
    if not warmup or epochs == 0 or warmup < epochs:
        return None
    return (f"scheduler.warmup_epochs={warmup} >= trainer.max_epochs={epochs}: the whole run is warm-up (the lr "
            f"rises to its peak and never decays); pass a shorter one, e.g. scheduler.warmup_epochs={epochs / 10:g} "
            "(a tenth of the run; fractions of an epoch are fine)")


def knn_k_warning(key: str, k: int, num_train: int) -> str | None:
    """A line to log when kNN's k exceeds the training images (the vote is then over all of them), else None."""
    if k <= num_train:
        return None
    return (f"{key}={k} is more than the {num_train} training images: the kNN votes over all of them (k = "
            f"{num_train}), which is not the k-NN figure asked for; pass a smaller {key}")


def check_eval_config(cfg: DictConfig) -> None:
    """``contrastive-eval``'s values, checked before the checkpoint is read."""
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={cfg.device!r} is invalid: it must be auto, cpu or cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda, but no CUDA GPU is visible here: use device=auto or device=cpu")
    for key in ("batch_size", "knn_k"):
        _check(cfg, key, *_POSITIVE_INT)
    if cfg.linear_probe:
        check_probe_config(cfg)
    _check(cfg, "knn_temperature", (int, float), lambda v: v > 0, "a positive number")
    for key in ("subset", "test_subset"):
        _check_optional(cfg, key, *_POSITIVE_INT)


def check_against_data(cfg: DictConfig, splits: Splits, world: int) -> None:
    """Checks that need the data set: batch vs set size, class count, queue vs keys per step.

    ``world`` is the number of training processes (the Trainer's: it resolves
    ``devices=auto``, torchrun and SLURM).
    """
    if cfg.data.batch_size * world > len(splits.train):
        capped = OmegaConf.select(cfg, "data.subset") == len(splits.train)  # else raising data.subset adds nothing
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} x {world} process(es) is larger than the training set "
            f"({len(splits.train)} images): lower data.batch_size{' or raise data.subset' if capped else ''}"
        )
    if cfg.data.num_classes != splits.num_classes:
        raise ConfigError(
            f"data.num_classes={cfg.data.num_classes} but the training split has {splits.num_classes} classes: "
            f"pass data.num_classes={splits.num_classes}"
        )
    height, width = splits.train.images.shape[-2:]
    if cfg.data.image_size != height or height != width:  # the views would be one size, kNN and probe another's
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} but the images are {height}x{width} (CIFAR's are 32x32; image "
            f"folders are resized to data.image_size): pass data.image_size={height}"
        )
    queue = OmegaConf.select(cfg, "pipeline.queue_size")
    keys = cfg.data.batch_size * world * (2 if OmegaConf.select(cfg, "pipeline.symmetric") else 1)
    if queue is not None and (problem := queue_problem(queue, keys)):
        raise ConfigError(problem)
    if world > 1 and OmegaConf.select(cfg, "sampler.drop_last") is False:
        raise ConfigError(
            f"sampler.drop_last=false under {world} processes would give the processes last batches of different "
            "sizes, which the gathered losses cannot pair up: use sampler.drop_last=true (the default)"
        )
    bn_splits = OmegaConf.select(cfg, "pipeline.bn_splits") or 1
    if cfg.data.batch_size % bn_splits:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is not a multiple of pipeline.bn_splits={bn_splits}"
        )
    if bn_splits > 1 and cfg.data.batch_size // bn_splits < 2:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} leaves one image per BatchNorm group (pipeline.bn_splits="
            f"{bn_splits}), whose statistics are undefined: raise data.batch_size or lower pipeline.bn_splits"
        )
    last = len(splits.train) % (cfg.data.batch_size * world)
    if OmegaConf.select(cfg, "sampler.drop_last") is False and last and (last % bn_splits or last // bn_splits < 2):
        groups = f"split into pipeline.bn_splits={bn_splits} BatchNorm groups of 2 or more" if bn_splits > 1 else \
            "normalise with BatchNorm (one image)"
        raise ConfigError(
            f"sampler.drop_last=false leaves a last batch of {last} image(s), which the network cannot {groups}: "
            "use sampler.drop_last=true (the default) or another data.batch_size"
        )


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
    later = [p for p in ckpt_dir.glob("epoch=*.ckpt")
             if (m := re.fullmatch(r"epoch=(\d+)(-v\d+)?\.ckpt", p.name)) and int(m[1]) > epoch]
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


def feature_metrics(
    features: dict[str, tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    closed_set: bool,
    knn_k: int,
    knn_temperature: float,
    probe: Callable[..., dict] | None,
    metric: Metric = "cosine",
) -> dict[str, float]:
    """Every figure of frozen features, under plain keys (percent).

    Closed set (test classes = train classes): weighted kNN top-1 (unless ``knn_k=0``) and,
    when ``probe`` is given, the linear probe's train/test top-1. Always: retrieval metrics of the
    test split against itself (leave-one-out), the measure for unseen classes, ranked by
    ``metric`` (the pipeline's ``retrieval_metric``: the geometry its loss trained).
    """
    (xtr, ytr), (xte, yte) = features["train"], features["test"]
    for split, x in (("train", xtr), ("test", xte)):
        try:
            check_finite(x, f"the network's features of the {split} images")
        except ValueError as e:
            raise CheckpointError(
                f"{e}, so no metric would mean anything: its weights or BatchNorm statistics hold NaN/Inf "
                "(a diverged run). Evaluate an earlier checkpoint (checkpoints/epoch=NNNN.ckpt)."
            ) from None
    out: dict[str, float] = {}
    if closed_set:
        if knn_k > 0:  # knn_k=0: the run monitors MAP@R instead
            out["knn_top1"] = knn_top1(xtr, ytr, xte, yte, num_classes, knn_k, knn_temperature)
        if probe is not None:
            result = probe(xtr, ytr, xte, yte, num_classes=num_classes)
            out |= {k: float(result[k]) for k in ("linear_top1", "linear_train_top1")}
    retrieval = retrieval_metrics(xte, yte, metric=metric)
    out |= {k: float(v) for k, v in retrieval.items() if not k.startswith("num_")}
    return out


# --------------------------------------------------------------------------- train


def _make_trainer(cfg: DictConfig, run_dir: Path, resume_step: int | None = None) -> pl.Trainer:
    """The run's Lightning Trainer: last/periodic checkpoints, CSV and TensorBoard logs, atomic writes.

    ``resume_step``: the step of the checkpoint the run resumes from; ``metrics.csv`` keeps the rows
    logged before it.
    """
    config = OmegaConf.to_container(cfg, resolve=True)
    callbacks: list[Callback] = [
        SaveRunConfig(config),  # type: ignore[arg-type]
        LastCheckpoint(run_dir / "checkpoints" / "last.ckpt"),
        EpochCheckpoint(
            dirpath=run_dir / "checkpoints", filename="epoch={epoch:04d}", auto_insert_metric_name=False,
            # save_on_train_epoch_end: at every epoch's end, not only after the (sparser) validations
            save_top_k=-1, every_n_epochs=cfg.checkpoint.every_n_epochs, save_on_train_epoch_end=True,
        ),
        LearningRateMonitor(logging_interval="step"),
    ]
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(trainer_args, dict)
    trainer_args["accelerator"] = resolve_accelerator(trainer_args["accelerator"])
    trainer_args["precision"] = resolve_precision(trainer_args["precision"], trainer_args["accelerator"])
    try:
        return pl.Trainer(
            **trainer_args,
            default_root_dir=run_dir,
            callbacks=callbacks,
            logger=[
                ResumableCSVLogger(run_dir, name="logs", version="", resume_step=resume_step),
                TensorBoardLogger(run_dir, name="tb", version=""),  # a new event file per call; TensorBoard joins them
            ],
            plugins=[AtomicCheckpointIO()],
            check_val_every_n_epoch=cfg.eval.every_n_epochs,
            num_sanity_val_steps=0,
            use_distributed_sampler=False,
        )
    except TypeError as e:  # +trainer.max_epoch=1: a key the Trainer does not take
        raise ConfigError(f"{e}: trainer.* keys are the arguments of pytorch_lightning.Trainer") from None
    except (MisconfigurationException, ValueError) as e:  # a value it refuses, e.g. precision=abc or a GPU where
        where = " ".join(str(e).lower().split())  # there is none (the accelerator's errors get the hint)
        hint = ("use trainer.accelerator=auto, or trainer=cpu" if re.search(r"accelerator|device|gpu|cuda|mps|tpu", where)
                else "trainer.* values are the arguments of pytorch_lightning.Trainer")
        raise ConfigError(
            f"{e} (trainer.accelerator={trainer_args['accelerator']}, trainer.devices={trainer_args['devices']}): {hint}"
        ) from None


def _train(cfg: DictConfig) -> dict[str, float]:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    check_config(cfg)
    if warning := warmup_warning(cfg):
        log.warning("%s", warning)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    ckpt_path, ckpt = resume_checkpoint(cfg.resume, run_dir) or (None, None)
    # before the data: the Trainer knows the number of processes (SLURM)
    trainer = _make_trainer(cfg, run_dir, None if ckpt is None else int(ckpt["global_step"]))
    splits = build_splits(cfg.data, cfg.seed)
    check_against_data(cfg, splits, trainer.world_size)
    if warning := knn_k_warning("eval.knn_k", cfg.eval.knn_k, len(splits.train)):
        log.warning("%s", warning)
    train_batches = instantiate(cfg.sampler)
    # bad settings fail before any work, for the processes the Trainer will start
    train_batches(splits.train, batch_size=cfg.data.batch_size, seed=cfg.seed, world=trainer.world_size)
    datamodule = TensorDataModule(
        splits, cfg.data.batch_size, cfg.data.eval_batch_size, cfg.data.on_device, cfg.seed,
        train_batches=train_batches,
    )
    pipeline = build_pipeline(cfg)
    start_epoch = -1
    if ckpt is not None:
        check_resumable(ckpt_path, ckpt, pipeline)
        start_epoch = int(ckpt["epoch"])
        del ckpt  # memory-mapped; Lightning reads the checkpoint itself in fit
    if trainer.is_global_zero and (moved := set_aside_later_checkpoints(run_dir / "checkpoints", start_epoch, ckpt_path)):
        log.warning("this run starts %s: the checkpoints of the abandoned later epochs were moved to %s",
                    "over" if ckpt_path is None else f"from {ckpt_path}", moved)

    # The same seed gives the same initial weights, so this is the untrained figure also on resume.
    def measure() -> dict[str, float]:
        trainer.validate(pipeline, datamodule=datamodule, verbose=False)
        return feature_metrics(
            pipeline.last_features, cfg.data.num_classes, closed_set, cfg.eval.knn_k, cfg.eval.knn_temperature,
            instantiate(cfg.probe) if cfg.eval.final_probe else None, pipeline.retrieval_metric,
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


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@_run_guarded
def _train_main(cfg: DictConfig) -> float | None:
    return _train(cfg).get("knn_top1")


def train() -> None:
    """``contrastive-train [overrides]``."""
    _resolvers()
    _log_data_warnings()
    _quiet_library_notices()
    sys.argv[1:] = _quote_paths(sys.argv[1:], ("resume", "data.root"))
    _run_hydra(_train_main, "train")


# --------------------------------------------------------------------------- eval


def _evaluate(cfg: DictConfig) -> dict[str, float]:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    check_eval_config(cfg)
    ckpt = load_checkpoint(cfg.checkpoint)
    run_cfg = OmegaConf.create(ckpt["contrastive_config"])
    run_cfg.compile = False  # a one-off compile would cost more than the few forward passes it speeds up
    if cfg.data_root is not None:
        if "root" not in run_cfg.data:
            raise ConfigError(f"data_root given, but the run's data set ({run_cfg.data.source._target_}) has no root")
        run_cfg.data.root = cfg.data_root
        run_cfg.data.source.root = cfg.data_root
    for key in ("subset", "test_subset"):
        if cfg[key] is not None:
            run_cfg.data[key] = cfg[key]
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))

    pipeline = build_pipeline(run_cfg)
    try:
        pipeline.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{cfg.checkpoint}: weights do not match the run's model: {e}") from None
    pipeline.to(device).eval()
    if channels_last(device):  # the layout the run trained and evaluated in
        pipeline.to(memory_format=torch.channels_last)
    try:
        splits = build_splits(run_cfg.data, int(run_cfg.seed))
    except InstantiationException as e:
        if not isinstance(e.__cause__, DataError):
            raise
        # the message names contrastive-train's keys; contrastive-eval's is data_root, and it does not download
        message = str(e.__cause__).replace(DOWNLOAD_HINT, "").replace("data.root", "data_root")
        raise DataError(message) from None
    check_eval_data(run_cfg, splits, cfg.data_root)
    if warning := knn_k_warning("knn_k", cfg.knn_k, len(splits.train)):
        log.warning("%s", warning)

    features = {}
    for split, data in (("train", splits.train), ("test", splits.test)):
        data = data.to(device)
        feats = [pipeline.features(data.images[i : i + cfg.batch_size]) for i in range(0, len(data), cfg.batch_size)]
        features[split] = (torch.cat(feats), data.labels)

    closed_set = run_cfg.data.train_classes == run_cfg.data.test_classes
    probe_out: dict[str, Any] = {}

    def probe(*args: Any, **kwargs: Any) -> dict[str, Any]:  # keep the classifier for plots and export
        probe_out.update(instantiate(cfg.probe)(*args, **kwargs))
        return probe_out

    metrics = feature_metrics(features, splits.num_classes, closed_set, cfg.knn_k, cfg.knn_temperature,
                              probe if cfg.linear_probe else None, pipeline.retrieval_metric)
    write_json_atomic(out_dir / "metrics.json", metrics)
    written = write_plots(out_dir, features, probe_out, splits, run_dir=Path(_run_dir_of(cfg.checkpoint))) \
        if cfg.plots else []
    if cfg.export:
        written.append(save_torch_atomic(export_backbone(pipeline, exportable_classifier(probe_out)),
                                         out_dir / "backbone_torchvision.pt"))
        log.info("backbone state dict written to %s", written[-1])
    for name in set(EVAL_OUTPUTS) - {p.name for p in written}:  # an earlier eval's, e.g. before linear_probe=false
        (out_dir / name).unlink(missing_ok=True)
    log.info("metrics: %s", {k: round(v, 2) for k, v in metrics.items()})
    log.info("written to %s", out_dir / "metrics.json")
    return metrics


def check_eval_data(run_cfg: DictConfig, splits: Splits, data_root: str | None) -> None:
    """The data set found has the run's number of classes (else kNN and the probe score another task)."""
    if splits.num_classes != run_cfg.data.num_classes:
        where = f"data_root={data_root}" if data_root is not None else f"data.root={run_cfg.data.get('root')}"
        raise ConfigError(f"the run trained on {run_cfg.data.num_classes} classes, but the data at {where} has "
                          f"{splits.num_classes}: point data_root at the data set the run trained on")


# What contrastive-eval writes beside metrics.json; a later eval of the same checkpoint removes those it
# did not write again, so the folder never mixes two evaluations.
EVAL_OUTPUTS = ("training_curves.png", "embedding_tsne.png", "similarity_histograms.png", "confusion_matrix.png",
                "backbone_torchvision.pt")


def write_plots(out_dir: Path, features: dict[str, tuple[torch.Tensor, torch.Tensor]], probe_out: dict[str, Any],
                splits: Splits, run_dir: Path) -> list[Path]:
    """Training curves, 2-D embedding, similarity histograms and the probe's confusion matrix as PNGs; their paths."""
    from contrastive.evaluation import (
        plot_confusion_matrix, plot_embedding_2d, plot_similarity_histograms, plot_training_curves,
    )

    xte, yte = (t.cpu() for t in features["test"])
    names = splits.test.class_names or None
    written = []
    curves = run_dir / "logs" / "metrics.csv"
    if curves.is_file():
        written.append(plot_training_curves(curves, out_dir / "training_curves.png"))
    if len(xte) >= 3:
        written.append(plot_embedding_2d(xte, yte, out_dir / "embedding_tsne.png", class_names=names))
    else:
        log.warning("embedding_tsne.png skipped: t-SNE needs at least 3 test images, there are %d", len(xte))
    written.append(plot_similarity_histograms(xte, yte, out_dir / "similarity_histograms.png"))
    if "test_predictions" in probe_out:
        written.append(plot_confusion_matrix(yte, probe_out["test_predictions"].cpu(), splits.test.num_classes,
                                             out_dir / "confusion_matrix.png", class_names=names))
    return written


def exportable_classifier(probe_out: dict[str, Any]) -> torch.nn.Linear | None:
    """The probe's classifier where it takes the raw features, as a ResNet's ``fc`` does; else None, logged.

    With ``probe.normalize=l2`` it takes unit-length features, and its bias makes the argmax depend on
    the features' length, so no ``fc`` on the raw features predicts as it does.
    """
    if probe_out.get("normalize") == "l2":
        log.warning("backbone_torchvision.pt holds no fc: the probe was trained on L2-normalised features "
                    "(probe.normalize=l2), which an fc on the raw features cannot reproduce; "
                    "probe.normalize=standardize (the default) exports it")
        return None
    return probe_out.get("classifier")


def export_backbone(pipeline: Pipeline, classifier: torch.nn.Linear | None) -> dict[str, torch.Tensor]:
    """The backbone's weights under torchvision's names, plus ``fc`` from the linear probe if given.

    ``fc`` is added only where the probe saw backbone features (not for pipelines whose
    evaluation features are an embedding head's output, such as Siamese).

    A ResNet from ``contrastive.models.resnet`` then loads into
    ``torchvision.models.resnet18(num_classes=C)`` (with the CIFAR stem) with ``strict=True``.
    """
    state = {k: v.detach().cpu().clone() for k, v in pipeline.backbone.state_dict().items()}
    probes_backbone = getattr(pipeline, "eval_features", "backbone") == "backbone"  # not a Siamese embedding
    headless = isinstance(getattr(pipeline.backbone, "fc", None), torch.nn.Identity)
    if probes_backbone and headless and classifier is not None:
        state["fc.weight"] = classifier.weight.detach().cpu().clone()
        state["fc.bias"] = classifier.bias.detach().cpu().clone()
    return state


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
@_run_guarded
def _eval_main(cfg: DictConfig) -> None:
    _evaluate(cfg)


def evaluate() -> None:
    """``contrastive-eval checkpoint=PATH [overrides]``."""
    _resolvers()
    _log_data_warnings()
    sys.argv[1:] = _quote_paths(sys.argv[1:], ("checkpoint", "data_root"))
    # Hydra creates the output folder (beside the checkpoint) before the job runs: check the
    # checkpoint first (memory-mapped, so cheap), so that a typo or a foreign or truncated file
    # leaves no eval_* folder (or parent folders) behind.
    paths = [p for arg in sys.argv[1:] if arg.startswith("checkpoint=") for p in _override_paths(arg)]
    if not paths and not any(arg.startswith("-") for arg in sys.argv[1:]):  # --help, --cfg job: no checkpoint needed
        _exit_with(ConfigError("contrastive-eval needs the checkpoint to evaluate: pass "
                               "checkpoint=RUN_DIR/checkpoints/last.ckpt (printed at the end of contrastive-train)"))
    for path in paths:
        try:
            load_checkpoint(path, mmap=True)
        except CheckpointError as e:
            several = "," in path and not Path(path).expanduser().exists() and not _is_multirun(sys.argv[1:])
            _exit_with(CheckpointError(f"{str(e).rstrip('.')}. To evaluate several checkpoints, add -m: contrastive-eval -m "
                                       "checkpoint=A,B") if several else e)
    _run_hydra(_eval_main, "eval")


if __name__ == "__main__":  # python -m contrastive.cli [overrides] == contrastive-train
    train()
