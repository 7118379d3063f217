"""What a run prints for its user: one plain line per epoch, and the results table at the end.

A batch job's output is a file, where a progress bar is ``\\r``-joined frames: there (and wherever the
bar is switched off) :class:`EpochLines` prints one line per epoch instead. :func:`results_table`
puts the untrained and the trained figures side by side with the gain.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.trainer.states import TrainerFn

log = logging.getLogger("contrastive")

#: The figures of ``metrics.json`` in the table's order, with the names a user reads them by.
RESULT_NAMES = {
    "knn_top1": "kNN top-1",
    "linear_top1": "linear probe top-1",
    "linear_train_top1": "linear probe top-1 (train split)",
    "precision_at_1": "P@1",
    "r_precision": "R-Precision",
    "map_at_r": "MAP@R",
}
#: The monitor logged during training (``val/...``), as the epoch lines name it.
MONITOR_NAMES = {"val/knn_top1": "kNN top-1", "val/map_at_r": "MAP@R"}


def result_name(key: str) -> str:
    """The name a user reads a metric by: ``knn_top1`` -> ``kNN top-1``, ``recall_at_4`` -> ``Recall@4``."""
    if key in RESULT_NAMES:
        return RESULT_NAMES[key]
    found = re.fullmatch(r"recall_at_(\d+)", key)
    return f"Recall@{found[1]}" if found else key


def _order(key: str) -> tuple[int, int, str]:
    names = list(RESULT_NAMES)
    if key in names:
        return (0, names.index(key), key)
    found = re.fullmatch(r"recall_at_(\d+)", key)
    return (1, int(found[1]), key) if found else (2, 0, key)


def format_seconds(seconds: float) -> str:
    """``62.3 s``, ``4 min 05 s``, ``2 h 03 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def results_table(metrics: dict[str, float], max_epochs: int | None = None) -> str:
    """The figures of ``metrics`` (``metrics.json``'s keys) as a table: untrained, trained, gain (percent points).

    One row per figure that has an ``_untrained`` twin, in the order of :data:`RESULT_NAMES` then
    Recall@K by K; below it the epochs trained (of ``max_epochs``) and the training time. Figures
    without an untrained twin (``contrastive-eval``'s) get one column, ``value``. The label-free
    monitors (:func:`is_monitor`), not percentages, follow in a table of their own.
    """
    monitors = {k: v for k, v in metrics.items() if is_monitor(k.removesuffix("_untrained"))}
    metrics = {k: v for k, v in metrics.items() if k not in monitors}
    title = "test split, percent"
    if monitors and not any(k not in ("epochs", "train_seconds") for k in metrics):  # no evaluation set
        lines = []
    elif paired := sorted((k for k in metrics if f"{k}_untrained" in metrics), key=_order):
        width = max(len(title), *(len(result_name(k)) for k in paired))
        lines = [f"{title:<{width}}  untrained  trained    gain"]
        for key in paired:
            before, after = metrics[f"{key}_untrained"], metrics[key]
            gain = after - before if math.isfinite(after) and math.isfinite(before) else math.nan
            lines.append(f"{result_name(key):<{width}}  {before:9.2f}  {after:7.2f}  {gain:+6.2f}")
    else:
        keys = sorted((k for k in metrics if k not in ("epochs", "train_seconds")), key=_order)
        width = max(len(title), *(len(result_name(k)) for k in keys)) if keys else len(title)
        lines = [f"{title:<{width}}  value"] + [f"{result_name(k):<{width}}  {metrics[k]:5.2f}" for k in keys]
    if "epochs" in metrics:
        of = f" of {max_epochs}" if max_epochs is not None and max_epochs >= 0 else ""
        took = f" in {format_seconds(metrics['train_seconds'])}" if "train_seconds" in metrics else ""
        lines.append(f"trained {metrics['epochs']:g}{of} epochs{took}")
    if paired_monitors := sorted(k for k in monitors if f"{k}_untrained" in monitors):
        heading = "label-free monitors, training sample"
        width = max(len(heading), *(len(k) for k in paired_monitors))
        lines.append(f"{heading:<{width}}  untrained   trained")
        lines += [f"{k:<{width}}  {monitors[f'{k}_untrained']:9.4f}  {monitors[k]:8.4f}" for k in paired_monitors]
    return "\n".join(lines)


def is_monitor(key: str) -> bool:
    """Whether a ``metrics.json`` key is a label-free monitor (``rank_me_backbone``): not a percentage."""
    return bool(re.fullmatch(r"(embedding_std|rank_me|alignment|uniformity)_(backbone|projector)", key))


class EpochLines(Checkpoint):
    """One plain log line per training epoch: epoch, mean loss, learning rate, images/s, and the kNN top-1
    (MAP@R for class-disjoint runs) in the epochs it was measured.

    For runs without a progress bar (switched off, or output that is not a terminal: a batch job's log
    file, where the bar is ``\\r``-joined frames). A :class:`Checkpoint` only because Lightning calls those
    after the LightningModule's own ``on_train_epoch_end``, which logs images/s; it saves nothing.
    """

    def __init__(self) -> None:
        self._measured = False

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._measured = False

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._measured = self._measured or trainer.state.fn == TrainerFn.FITTING

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        of = f"/{trainer.max_epochs}" if trainer.max_epochs is not None and trainer.max_epochs >= 0 else ""
        parts = [f"epoch {trainer.current_epoch + 1}{of}"]
        if (loss := metrics.get("train/loss_epoch")) is not None:
            parts.append(f"loss {float(loss):.4f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.4g}")
        if (speed := metrics.get("train/images_per_s")) is not None:
            parts.append(f"{float(speed):.0f} images/s")
        if self._measured:
            parts += [f"{name} {float(metrics[key]):.2f}" for key, name in MONITOR_NAMES.items() if key in metrics]
        done, steps = trainer.fit_loop.epoch_loop.batch_progress.current.completed, trainer.num_training_batches
        if done < steps:
            parts.append(f"(cut short after {done} of {steps} steps)")
        log.info("%s", ", ".join(parts))

    def state_dict(self) -> dict[str, Any]:
        return {}
