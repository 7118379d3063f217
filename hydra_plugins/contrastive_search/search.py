"""``hydra/sweeper=search``: hyper-parameter search of a sweep's objective with Optuna (``pip install
"contrastive[search]"``).

A thin sweeper over Optuna's ask/tell API, not hydra-optuna-sweeper: its last release (1.3.0) pins
``optuna>=2.10,<3``, which would downgrade a current Optuna (4.x/5.x) in the user's environment, and Optuna 2.10's
storage predates SQLAlchemy 2. The search space is written as Hydra's own sweep syntax, on the command line or
in ``hydra.sweeper.params``:

- ``interval(0.05, 1.0)``: a float, uniform; ``tag(log, interval(1e-3, 1))``: log-uniform; ``tag(int, interval(1,
  8))``: an integer;
- ``a,b,c``, ``choice(a, b)``, ``range(1, 5)``: one of these values.

Each trial is one job of the sweep (any launcher: ``hydra/launcher=submitit_slurm`` runs ``n_jobs`` trials at
once); its value is ``optimize`` in the job's ``metrics.json`` (e.g. ``knn_top1``, or ``map_at_r`` for metric
learning), to ``direction`` (``maximize``). A job that failed, or whose figure is missing or not finite, is a
failed trial. The best trial is logged and written to ``<sweep folder>/best_trial.yaml``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from contrastive.cli.shell import ConfigError  # one line and exit status 2

log = logging.getLogger("contrastive")


def suggestion(override: Override) -> Callable[[Any], str]:
    """``trial -> value`` (as override text) for one dimension of the search space, from Hydra's sweep syntax."""
    key, value = override.get_key_element(), override.value()
    if isinstance(value, IntervalSweep):
        low, high, log_scale = value.start, value.end, "log" in value.tags
        if "int" in value.tags:
            return lambda trial: str(trial.suggest_int(key, int(low), int(high), log=log_scale))  # type: ignore[arg-type]
        return lambda trial: repr(trial.suggest_float(key, float(low), float(high), log=log_scale))  # type: ignore[arg-type]
    if override.is_sweep_override():  # a,b / choice(...) / range(...)
        choices = list(override.sweep_string_iterator())
        return lambda trial: str(trial.suggest_categorical(key, choices))
    raise ConfigError(f"{key}={override.get_value_element_as_str()} is one value, not a search space")


class SearchSweeper(Sweeper):
    """Hyper-parameter search: ``n_trials`` jobs in batches of ``n_jobs``, each asked of an Optuna study."""

    def __init__(
        self,
        optimize: str,
        direction: str,
        n_trials: int,
        n_jobs: int,
        seed: int,
        study_name: str,
        storage: str | None = None,
        params: dict[str, str] | None = None,
    ) -> None:
        if importlib.util.find_spec("optuna") is None:
            raise ConfigError(
                'hydra/sweeper=search needs Optuna, which is not installed: pip install "contrastive[search]"'
            )
        if direction not in ("maximize", "minimize"):
            raise ConfigError(f"hydra.sweeper.direction={direction!r} is invalid: it must be maximize or minimize")
        if n_trials < 1 or n_jobs < 1:
            raise ConfigError("hydra.sweeper.n_trials and hydra.sweeper.n_jobs must be positive integers")
        self.optimize, self.direction, self.seed = optimize, direction, seed
        self.n_trials, self.n_jobs = n_trials, n_jobs
        self.study_name, self.storage, self.params = study_name, storage, dict(params or {})
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        import optuna

        assert self.config is not None and self.launcher is not None
        parser = OverridesParser.create()
        given = parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        space = {o.get_key_element(): suggestion(o) for o in given if o.is_sweep_override()}
        fixed = [str(o.input_line) for o in given if not o.is_sweep_override() and o.get_key_element() not in space]
        if not space:
            raise ConfigError(
                "nothing to search: give each hyper-parameter a range, e.g. 'loss.temperature=interval(0.05,1.0)' "
                "'optimizer.lr=tag(log,interval(0.01,1.0))' (or hydra.sweeper.params)"
            )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(
            study_name=self.study_name,
            storage=self.storage,
            direction="maximize" if self.direction == "maximize" else "minimize",
            sampler=optuna.samplers.TPESampler(seed=self.seed),
            load_if_exists=self.storage is not None,
        )
        log.info("search: %d trials of %s (%s) over %s", self.n_trials, self.optimize, self.direction, ", ".join(space))
        done = 0
        while done < self.n_trials:
            trials = [study.ask() for _ in range(min(self.n_jobs, self.n_trials - done))]
            overrides = [[*fixed, *(f"{key}={suggest(trial)}" for key, suggest in space.items())] for trial in trials]
            for trial, result in zip(trials, self.launcher.launch(overrides, initial_job_idx=done)):
                assert result.hydra_cfg is not None  # the job's own, also from a cluster launcher
                value = self._objective(Path(str(result.hydra_cfg.hydra.runtime.output_dir)))
                if value is None:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                else:
                    study.tell(trial, value)
            done += len(trials)
        self._report(study, sweep_dir)

    def _objective(self, run_dir: Path) -> float | None:
        """``optimize`` of the job's ``metrics.json``; None for a failed job or a missing or non-finite figure."""
        metrics_file = run_dir / "metrics.json"
        if (run_dir / "error.txt").is_file() or not metrics_file.is_file():
            return None
        value = json.loads(metrics_file.read_text()).get(self.optimize)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            log.warning("search: %s has no finite %s; the trial counts as failed", metrics_file, self.optimize)
            return None
        return float(value)

    def _report(self, study: Any, sweep_dir: Path) -> None:
        import optuna

        finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not finished:
            log.error("search: no trial of %d gave %s (see each job's error.txt)", len(study.trials), self.optimize)
            return
        best = study.best_trial
        report = {
            "optimize": self.optimize,
            "direction": self.direction,
            "value": best.value,
            "trial": best.number,
            "params": best.params,
            "trials": len(study.trials),
            "failed": len(study.trials) - len(finished),
        }
        (sweep_dir / "best_trial.yaml").write_text(OmegaConf.to_yaml(report))
        log.info(
            "search: best trial #%d of %d: %s=%g with %s (%s)",
            best.number,
            len(study.trials),
            self.optimize,
            best.value,
            " ".join(f"{k}={v}" for k, v in best.params.items()),
            sweep_dir / "best_trial.yaml",
        )
