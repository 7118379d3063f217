"""Hydra callbacks of the entry points: the run folder a refused run takes back, the sweep summary.

Hydra builds them before the job starts, so this module imports neither torch nor Lightning: a
configuration error is answered without either (the sweep summary imports its plots when it runs).
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("contrastive")

#: The outermost folder this call creates for its run (the run folder, or an ancestor that did not exist
#: either), recorded before Hydra creates it; None when the run folder existed (a resumed run) or in a sweep.
created_run_folder: Path | None = None


class RunFolder(HydraCallback):
    """Records which folders Hydra is about to create for a single run, so that a run refused before
    any work takes them back (:func:`remove_refused_run_folder`): it leaves nothing behind."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        global created_run_folder
        created_run_folder = None
        folder = Path(str(OmegaConf.select(config, "hydra.run.dir"))).absolute()
        while not folder.exists() and folder.parent != folder:
            created_run_folder, folder = folder, folder.parent


def remove_refused_run_folder() -> bool:
    """Remove the folders this call created for its run if they hold nothing but Hydra's record
    (``.hydra/``) and ``cli.log``: a run refused before any work. A folder that held anything before
    the call, or that holds anything the run wrote (checkpoints, logs, metrics), is kept."""
    folder = created_run_folder
    if folder is None or not folder.is_dir():
        return False
    for path in folder.rglob("*"):
        if path.is_file() and path.name != "cli.log" and ".hydra" not in path.relative_to(folder).parts:
            return False
    root = logging.getLogger()
    for handler in list(root.handlers):  # cli.log: closed and detached, or a later line would recreate it
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_relative_to(folder):
            root.removeHandler(handler)
            handler.close()
    shutil.rmtree(folder, ignore_errors=True)
    return True


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
        from contrastive.evaluation.report import JOB_ERROR_FILE

        sweep = Path(config.hydra.sweep.dir)
        runs = sorted(
            p.parent.parent for p in sweep.glob("*/.hydra/overrides.yaml") if p.stat().st_mtime >= self.started - 1
        )  # 1 s: file systems with coarse timestamps
        if not runs:
            return
        failed = write_sweep_summary(sweep, runs)
        if failed:
            print(
                f"error: {failed} of {len(runs)} jobs failed (listed above, and in each job's "
                f"{JOB_ERROR_FILE}); the summary has their rows without metrics",
                file=sys.stderr,
            )
            sys.exit(2)


def write_sweep_summary(sweep: Path, runs: list[Path]) -> int:
    """``summary.{csv,md,png}`` of the job folders ``runs`` in ``sweep``; the failed jobs' errors logged.
    Returns how many failed."""
    from contrastive.evaluation import summarize_runs
    from contrastive.evaluation.report import JOB_ERROR_FILE

    log.info("sweep summary: %s", summarize_runs(runs, sweep))
    failed = [(run, (run / JOB_ERROR_FILE).read_text().strip()) for run in runs if (run / JOB_ERROR_FILE).is_file()]
    for run, message in failed:
        log.error("job %s failed: %s", " ".join(OmegaConf.load(run / ".hydra" / "overrides.yaml")), message)
    return len(failed)
