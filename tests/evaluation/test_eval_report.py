"""Sweep report from fake Hydra multirun job folders."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from matplotlib.image import imread

from contrastive.evaluation.report import parse_override, read_run, summarize_runs


def _fake_run(root: Path, name: str, overrides: list[str], metrics: dict[str, float | None]) -> Path:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    # Hydra writes overrides.yaml as a YAML list of the job's command-line overrides
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_parse_override_prefixes() -> None:
    assert parse_override("loss.temperature=0.2") == ("loss.temperature", "0.2")
    assert parse_override("+trainer.max_epochs=5") == ("trainer.max_epochs", "5")
    assert parse_override("++a.b=x=y") == ("a.b", "x=y")
    assert parse_override("~model.head") == ("model.head", "~")


def test_two_runs_give_both_rows_with_their_values(tmp_path: Path) -> None:
    a = _fake_run(tmp_path / "multirun", "0", ["loss.temperature=0.1", "seed=0"], {"knn_top1": 81.25, "linear_top1": 85.5})
    b = _fake_run(tmp_path / "multirun", "1", ["loss.temperature=0.5", "seed=0"], {"knn_top1": 77.0, "linear_top1": 83.125})
    md = summarize_runs([a, b], tmp_path / "report")
    assert md == tmp_path / "report" / "summary.md"

    with open(tmp_path / "report" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["0", "1"]
    assert list(rows[0]) == ["run", "loss.temperature", "seed", "knn_top1", "linear_top1"]
    assert [r["loss.temperature"] for r in rows] == ["0.1", "0.5"]
    assert [float(r["knn_top1"]) for r in rows] == [81.25, 77.0]
    assert [float(r["linear_top1"]) for r in rows] == [85.5, 83.125]

    text = md.read_text()
    assert "| run | loss.temperature | seed | knn_top1 | linear_top1 |" in text
    assert "| 0 | 0.1 | 0 | 81.25 | 85.50 |" in text
    assert "| 1 | 0.5 | 0 | 77.00 | 83.12 |" in text
    assert "over seeds" not in text  # one run per configuration: nothing to average

    image = imread(tmp_path / "report" / "summary.png")
    assert image.shape[:2] == (360, 900)  # two metric panels of 4.5 x 3.6 inches at 100 dpi


def test_seed_table_and_missing_metrics(tmp_path: Path) -> None:
    runs = [
        _fake_run(tmp_path, "0", ["lr=0.1", "seed=0"], {"knn_top1": 80.0}),
        _fake_run(tmp_path, "1", ["lr=0.1", "seed=1"], {"knn_top1": 82.0}),
        _fake_run(tmp_path, "2", ["lr=0.3", "seed=0"], {"knn_top1": None}),  # NaN written as null
    ]
    assert math.isnan(read_run(runs[2]).metrics["knn_top1"])
    (runs[2] / "metrics.json").unlink()  # a crashed job: still a row, empty metric cells
    assert read_run(runs[2]).metrics == {}
    md = summarize_runs(runs, tmp_path / "out", params=["lr"])
    text = md.read_text()
    assert "| 2 | 0.3 |  |" in text
    assert "| lr | n | knn_top1 |" in text
    assert "| 0.1 | 2 | 81.00 ± 1.41 |" in text  # mean and sample std of 80 and 82
    rows = list(csv.DictReader(open(tmp_path / "out" / "summary.csv", newline="")))
    assert rows[2] == {"run": "2", "lr": "0.3", "knn_top1": ""}


def test_a_job_whose_last_attempt_failed_has_no_metrics(tmp_path: Path) -> None:
    """An earlier attempt's metrics.json showed as the failed job's results in the sweep summary."""
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- loss.temperature=0.1\n")
    (tmp_path / "metrics.json").write_text(json.dumps({"knn_top1": 7.0}))
    assert read_run(tmp_path).metrics == {"knn_top1": 7.0}
    (tmp_path / "error.txt").write_text("error: something\n")
    run = read_run(tmp_path)
    assert run.metrics == {} and run.overrides == {"loss.temperature": "0.1"}
