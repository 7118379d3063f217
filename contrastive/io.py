"""Atomic file writes, checkpoint reading with clear errors, and the Lightning I/O: checkpoint IO and
callbacks, the resumable CSV logger."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, cast

import pytorch_lightning as pl
import torch
from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.callbacks import Callback, Checkpoint, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.plugins.io import TorchCheckpointIO

log = logging.getLogger("contrastive")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or was not written by ``contrastive``."""


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename over it.

    A reader (or a run killed half-way) sees either the old file or the new one,
    never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _plain(obj: Any) -> Any:
    """Floats that JSON can hold: NaN/Inf become None (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        obj = obj.item() if obj.numel() == 1 else obj.tolist()
        return _plain(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """``json.dump`` through :func:`write_bytes_atomic`, sorted keys, indented."""
    text = json.dumps(_plain(obj), indent=2, sort_keys=True) + "\n"
    return write_bytes_atomic(path, text.encode())


def save_torch_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through :func:`write_bytes_atomic`."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes_atomic(path, buf.getvalue())


def check_checkpoint_file(path: str | Path, key: str = "checkpoint") -> Path:
    """``path`` as a Path if it is a file, else a :class:`CheckpointError` naming it and the
    config ``key`` that takes a checkpoint."""
    path = Path(path).expanduser()
    if path.is_dir():
        inside = path / "checkpoints" / "last.ckpt" if (path / "checkpoints").is_dir() else path / "last.ckpt"
        raise CheckpointError(f"{path} is a folder, not a checkpoint: pass {key}={inside} (or an epoch*.ckpt)")
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint not found: {path}; pass {key}=RUN_DIR/checkpoints/last.ckpt "
            "(or an epoch*.ckpt) of a contrastive-train run"
        )
    return path


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", key: str = "checkpoint", mmap: bool = False
) -> dict[str, Any]:
    """Load a Lightning checkpoint written by ``contrastive``, or raise :class:`CheckpointError`.

    The checkpoint must hold ``state_dict`` and the run's ``config`` (added by the
    CLI); anything else is called foreign rather than half-loaded. ``mmap``: map the
    tensors instead of reading them (a cheap check of a large file).
    """
    path = check_checkpoint_file(path, key)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as e:  # truncated zip, pickle error, not a torch file
        what, fix = (
            ("cannot resume from", " or resume=never to start over")
            if key == "resume"
            else ("cannot read checkpoint", "")
        )
        raise CheckpointError(
            f"{what} {path}: it is truncated or not a PyTorch file ({type(e).__name__}: {e}). "
            f"Pass {key}=<another checkpoint of the run> (checkpoints/last.ckpt or an epoch=*.ckpt){fix}."
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "contrastive_config" not in ckpt:
        raise CheckpointError(
            f"{path} is not a contrastive training checkpoint (no state_dict or run config in it); "
            "pass a .ckpt written by contrastive-train"
        )
    return ckpt


def state_dict_mismatch(saved: dict[str, torch.Tensor], module: torch.nn.Module) -> str | None:
    """What keeps ``module.load_state_dict(saved)`` (strict) from working, in words; None if it fits.

    Missing and unexpected entries are counted per top-level submodule (``queue.* (2)``),
    entries of another shape are named.
    """
    expected = module.state_dict()

    def per_module(keys: list[str]) -> str:
        counts: dict[str, int] = {}
        for key in keys:
            counts[key.split(".")[0]] = counts.get(key.split(".")[0], 0) + 1
        return ", ".join(f"{name}.* ({n})" for name, n in counts.items())

    problems = []
    if missing := [k for k in expected if k not in saved]:
        problems.append(f"missing {per_module(missing)}")
    if unexpected := [k for k in saved if k not in expected]:
        problems.append(f"unexpected {per_module(unexpected)}")
    if reshaped := [k for k in expected if k in saved and tuple(saved[k].shape) != tuple(expected[k].shape)]:
        problems.append(
            "of another shape "
            + ", ".join(f"{k} {tuple(saved[k].shape)} vs {tuple(expected[k].shape)}" for k in reshaped[:3])
            + (f" and {len(reshaped) - 3} more" if len(reshaped) > 3 else "")
        )
    return "; ".join(problems) or None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that never leaves a partial ``.ckpt`` behind."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        save_torch_atomic(checkpoint, path)


class ResumableCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger``, except that a resumed run keeps the rows logged before its checkpoint.

    Lightning deletes an existing ``metrics.csv`` (its logger cannot know that the run resumes),
    so the curves of an interrupted run would start at the interruption. With ``resume_step``
    (the checkpoint's step) the file is cut, atomically, to its rows with ``step < resume_step``,
    and the resumed run appends from that step on. Rows after the checkpoint came from the lost
    part of the interrupted epoch and are logged again; the resumed run's repeat of the
    pre-training measurement (step 0) is not written twice.
    """

    def __init__(self, *args: Any, resume_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumedWriter(self.log_dir, self.resume_step)
        return cast(ExperimentWriter, self._experiment)  # set only here: a _ResumedWriter (fabric's type says less)


class _ResumedWriter(ExperimentWriter):
    """``ExperimentWriter`` that keeps, rather than deletes, the rows before ``resume_step``."""

    def __init__(self, log_dir: str, resume_step: int | None) -> None:
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # Lightning's hook: deletes metrics.csv
        path = Path(self.metrics_file_path)
        if self.resume_step is None or not path.is_file():
            return super()._check_log_dir_exists()
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [row for row in reader if float(row.get("step") or 0) < self.resume_step]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
        write_bytes_atomic(path, text.getvalue().encode())
        self.metrics_keys = header  # appended rows with new columns make Lightning rewrite the header

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        if self.resume_step is not None and step is not None and step < self.resume_step:
            return  # already in the file, from the call that wrote the checkpoint
        super().log_metrics(metrics_dict, step)


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
            log.warning(
                "training stopped after %d of %d steps of epoch %d; %s stays at the end of the last "
                "whole epoch, from which the command continues (with trainer.max_time, give it time "
                "for more than one epoch, or leave it out)",
                done,
                trainer.num_training_batches,
                trainer.current_epoch,
                self.path.name,
            )
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # the full state: resume needs it


class EpochCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that does not save an epoch cut short under that epoch's name, nor warns that
    its folder holds checkpoints: in a run of the CLI it does so only when the run resumes (starting
    over or rolling back sets later checkpoints aside first), where the warning told of nothing wrong."""

    def _ModelCheckpoint__warn_if_dir_not_empty(self, dirpath: Any) -> None:  # Lightning's private check
        pass

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _steps_of_cut_epoch(trainer) is None:
            super().on_train_epoch_end(trainer, pl_module)
