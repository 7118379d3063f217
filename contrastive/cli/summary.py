"""``contrastive-summary MULTIRUN_DIR``: a sweep's summary on demand, e.g. while its jobs still run on a cluster
(the sweep itself writes it when its jobs end)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from contrastive.cli.callbacks import write_sweep_summary
from contrastive.cli.shell import ConfigError, exit_with, wants_help

USAGE = """\
usage: contrastive-summary MULTIRUN_DIR

Writes summary.{csv,md,png} into MULTIRUN_DIR (the folder a `contrastive-train -m` sweep writes, e.g.
multirun/simclr_shapes) from every job folder in it (<job>/.hydra/overrides.yaml), earlier sweeps' included:
one row per job, with its metrics.json where the job has finished; a job still running, or one that failed
(its error.txt), has a row without metrics.
"""


def summary() -> None:
    """``contrastive-summary MULTIRUN_DIR``."""
    argv = sys.argv[1:]
    if wants_help(argv):
        print(USAGE, end="")
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if len(argv) != 1:
        exit_with(ConfigError(f"expected one sweep folder, got {len(argv)} arguments: {USAGE.splitlines()[0]}"))
    sweep = Path(argv[0])
    runs = sorted(p.parent.parent for p in sweep.glob("*/.hydra/overrides.yaml"))
    if not runs:
        exit_with(
            ConfigError(
                f"{sweep} holds no job folders of a sweep (<job>/.hydra/overrides.yaml): pass the folder that "
                "`contrastive-train -m` wrote, e.g. multirun/simclr_shapes"
            )
        )
    failed = write_sweep_summary(sweep, runs)
    finished = sum((run / "metrics.json").is_file() for run in runs) - failed
    print(f"{finished} of {len(runs)} jobs finished, {failed} failed: {sweep / 'summary.md'}")
