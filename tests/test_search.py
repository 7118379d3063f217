"""hydra/sweeper=search: hyper-parameter search over Optuna's ask/tell API, from Hydra's sweep syntax."""

from __future__ import annotations

import csv
from pathlib import Path

import optuna
import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from contrastive.cli.shell import ConfigError
from hydra_plugins.contrastive_search.search import SearchSweeper, suggestion

SHRINK = "data.source.num_train=400 data.source.num_test=200 data.batch_size=50 trainer.max_epochs=2".split() + [
    "scheduler.warmup_epochs=0",
    "eval.final_probe=false",
    "eval.monitor_samples=0",
]
SETTINGS = dict(optimize="knn_top1", direction="maximize", n_trials=3, n_jobs=1, seed=0, study_name="s")


def _suggest(text: str, trials: int = 20) -> tuple[list[object], optuna.distributions.BaseDistribution]:
    """What ``trials`` asked trials get for one override, and the distribution Optuna recorded."""
    suggest = suggestion(OverridesParser.create().parse_override(text))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    values = []
    for _ in range(trials):
        trial = study.ask()
        values.append(suggest(trial))
        study.tell(trial, 0.0)
    return values, study.trials[0].distributions[text.split("=")[0]]


def test_hydras_sweep_syntax_is_the_search_space() -> None:
    values, dist = _suggest("loss.temperature=tag(log,interval(0.05,1.0))")
    assert isinstance(dist, optuna.distributions.FloatDistribution) and dist.log
    assert all(0.05 <= float(v) <= 1.0 for v in values) and len(set(values)) == len(values)
    values, dist = _suggest("optimizer.lr=interval(0.1,0.3)")
    assert not dist.log and all(0.1 <= float(v) <= 0.3 for v in values)  # type: ignore[attr-defined]
    values, dist = _suggest("data.batch_size=tag(int,interval(2,8))")
    assert isinstance(dist, optuna.distributions.IntDistribution) and {int(v) for v in values} <= set(range(2, 9))
    for text in ("loss=nt_xent,info_nce", "loss=choice(nt_xent,info_nce)"):
        values, dist = _suggest(text)
        assert set(values) == {"nt_xent", "info_nce"}
    values, _ = _suggest("trainer.max_epochs=range(1,4)")
    assert set(values) == {"1", "2", "3"}
    with pytest.raises(ConfigError, match=r"seed=3 is one value, not a search space"):
        suggestion(OverridesParser.create().parse_override("seed=3"))


def test_bad_search_settings_and_a_missing_optuna_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"hydra.sweeper.direction='max' is invalid: it must be maximize or minimize"):
        SearchSweeper(**{**SETTINGS, "direction": "max"})  # type: ignore[arg-type]
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else find_spec(name, *a))
    with pytest.raises(ConfigError) as refused:
        SearchSweeper(**SETTINGS)  # type: ignore[arg-type]
    assert str(refused.value) == (
        'hydra/sweeper=search needs Optuna, which is not installed: pip install "contrastive[search]"'
    )


def test_a_search_without_a_range_says_how_to_give_one(cli, tmp_path: Path) -> None:
    out = cli("contrastive-train", "-m", "hydra/sweeper=search", "seed=1", cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
        "error: nothing to search: give each hyper-parameter a range, e.g. 'loss.temperature=interval(0.05,1.0)' "
        "'optimizer.lr=tag(log,interval(0.01,1.0))' (or hydra.sweeper.params)"
    ), out.stderr[-2000:]


@pytest.mark.slow
def test_three_trials_of_the_example_search_on_the_shapes_demo_report_the_best(cli, tmp_path: Path) -> None:
    """The shipped example (hydra/sweeper=temperature_lr: temperature and learning rate, log-uniform) for
    three trials: each a job with its own values in the ranges, the best one reported and written."""
    search = ["-m", "hydra/sweeper=temperature_lr", "hydra.sweeper.n_trials=3"]
    out = cli("contrastive-train", *search, *SHRINK, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = tmp_path / "multirun" / "simclr_shapes"
    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and len({r["loss.temperature"] for r in rows}) == 3
    assert all(0.05 <= float(r["loss.temperature"]) <= 1 and 0.03 <= float(r["optimizer.lr"]) <= 3 for r in rows)
    best = max(rows, key=lambda r: float(r["knn_top1"]))
    report = yaml.safe_load((sweep / "best_trial.yaml").read_text())
    assert report["optimize"] == "knn_top1" and report["direction"] == "maximize" and report["trials"] == 3
    assert report["value"] == pytest.approx(float(best["knn_top1"]))
    assert report["params"]["loss.temperature"] == pytest.approx(float(best["loss.temperature"]))
    line = f"search: best trial #{report['trial']} of 3: knn_top1={report['value']:g} with loss.temperature="
    assert line in out.stdout + out.stderr
