"""Sweep report from fake Hydra multirun job folders."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

from contrastive.evaluation.report import _fmt, markdown_table, parse_override, read_run, summarize_runs


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
    a = _fake_run(
        tmp_path / "multirun", "0", ["loss.temperature=0.1", "seed=0"], {"knn_top1": 81.25, "linear_top1": 85.5}
    )
    b = _fake_run(
        tmp_path / "multirun", "1", ["loss.temperature=0.5", "seed=0"], {"knn_top1": 77.0, "linear_top1": 83.125}
    )
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


@pytest.fixture
def saved_figures(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """The figures summarize_runs saves (still written to disk by the real save_figure)."""
    import contrastive.evaluation.report as report

    figures: list[Figure] = []
    real_save = report.save_figure

    def record(fig: Figure, out_path: str | Path) -> Path:
        figures.append(fig)
        return real_save(fig, out_path)

    monkeypatch.setattr(report, "save_figure", record)
    return figures


def test_a_sweep_through_zero_is_plotted_on_a_linear_axis(tmp_path: Path, saved_figures: list[Figure]) -> None:
    """weight_decay 0 and 0.001: the log-axis test max/min must not divide by the 0 (min(xs) > 0 guard)."""
    runs = [
        _fake_run(tmp_path, str(i), [f"optimizer.weight_decay={wd}"], {"knn_top1": y})
        for i, (wd, y) in enumerate([("0", 70.0), ("0.001", 75.0)])
    ]
    summarize_runs(runs, tmp_path / "out")
    (ax,) = saved_figures[0].axes
    assert ax.get_xscale() == "linear"
    assert list(ax.lines[1].get_xdata()) == [0.0, 0.001]
    assert (tmp_path / "out" / "summary.png").is_file()


def test_booleans_in_metrics_json_are_not_metrics(tmp_path: Path) -> None:
    """JSON true/false are ints to Python; a flag such as 'converged' must not become a 1.0/0.0 column."""
    run = _fake_run(tmp_path, "0", [], {"knn_top1": 80.0, "converged": True, "diverged": False, "epochs": 3})  # type: ignore[dict-item]
    assert read_run(run).metrics == {"knn_top1": 80.0, "epochs": 3.0}


def test_number_format_switches_to_two_decimals_at_magnitude_one() -> None:
    """|v| >= 1 (1.0 itself and negatives included) gets 2 decimals, smaller values 4 significant digits."""
    assert _fmt(1.0) == "1.00"
    assert _fmt(-1.0) == "-1.00"
    assert _fmt(-12.5) == "-12.50"
    assert _fmt(0.999) == "0.999"
    assert _fmt(-0.5) == "-0.5"
    assert _fmt(0.123456) == "0.1235"
    assert _fmt(None) == "" and _fmt(math.nan) == ""


def test_same_job_number_in_two_sweeps_gets_distinct_run_names(tmp_path: Path) -> None:
    """Jobs a/0 and b/0 (two multirun folders) are labelled by their last two path parts, not both '0'."""
    a = _fake_run(tmp_path / "a", "0", ["lr=0.1"], {"knn_top1": 80.0})
    b = _fake_run(tmp_path / "b", "0", ["lr=0.2"], {"knn_top1": 81.0})
    md = summarize_runs([a, b], tmp_path / "out")
    rows = list(csv.DictReader(open(tmp_path / "out" / "summary.csv", newline="")))
    assert [r["run"] for r in rows] == ["a/0", "b/0"]
    assert "| a/0 | 0.1 | 80.00 |" in md.read_text()


def test_pipe_in_a_markdown_cell_is_escaped() -> None:
    """A '|' in a cell (e.g. an override value) would otherwise split the cell into two columns."""
    assert markdown_table(["run", "model"], [["0", "a|b"]]) == "| run | model |\n| --- | --- |\n| 0 | a\\|b |\n"


def test_no_runs_is_refused(tmp_path: Path) -> None:
    """An empty sweep (a glob that matched nothing) is an error, not an empty report."""
    with pytest.raises(ValueError, match="^no run folders given$"):
        summarize_runs([], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_three_metrics_give_three_panels_in_one_row(tmp_path: Path, saved_figures: list[Figure]) -> None:
    """One panel per metric, up to 3 per row: 3 metrics make a 1 x 3 figure of 13.5 x 3.6 inches."""
    runs = [
        _fake_run(tmp_path, str(i), [f"lr={lr}"], {"knn_top1": 80.0 + i, "linear_top1": 85.0 - i, "loss": 0.5 + i})
        for i, lr in enumerate(["0.1", "0.2"])
    ]
    summarize_runs(runs, tmp_path / "out")
    (fig,) = saved_figures
    assert [ax.get_title() for ax in fig.axes] == ["knn_top1", "linear_top1", "loss"]
    assert tuple(fig.get_size_inches()) == (13.5, 3.6)


def test_parse_override_strips_whitespace_around_key_and_value() -> None:
    """'lr = 0.1 ' must give the same column and level as 'lr=0.1'."""
    assert parse_override("lr = 0.1 ") == ("lr", "0.1")
    assert parse_override("+seed= 3") == ("seed", "3")


def test_numeric_levels_are_plotted_in_numeric_order(tmp_path: Path, saved_figures: list[Figure]) -> None:
    """Levels 10, 2, 1 give a mean line through x = 1, 2, 10 (not run order, not text order 1, 10, 2)."""
    runs = [
        _fake_run(tmp_path, str(i), [f"pipeline.knn_k={k}"], {"knn_top1": y})
        for i, (k, y) in enumerate([("10", 70.0), ("2", 72.0), ("1", 74.0)])
    ]
    summarize_runs(runs, tmp_path / "out")
    (ax,) = saved_figures[0].axes
    dots, means = ax.lines
    assert list(dots.get_xdata()) == [10.0, 2.0, 1.0]
    assert list(means.get_xdata()) == [1.0, 2.0, 10.0]
    assert list(means.get_ydata()) == [74.0, 72.0, 70.0]


def test_summary_png_shows_only_the_metrics_that_differ(tmp_path: Path, saved_figures: list[Figure]) -> None:
    """A temperature sweep's summary.png had 22 panels, 11 of which cannot vary: the untrained figures
    (same seed, same initial network), epochs, and train_seconds (wall-clock noise). summary.csv keeps all."""
    runs = [
        _fake_run(
            tmp_path,
            str(i),
            [f"loss.temperature={t}"],
            {
                "knn_top1": 70.0 + i,
                "knn_top1_untrained": 24.7,
                "map_at_r": 30.0 + 2 * i,
                "epochs": 25.0,
                "train_seconds": 60.0 + i,
                "linear_top1": 90.001,
            },
        )
        for i, t in enumerate(["0.1", "0.2", "0.5"])
    ]
    summarize_runs(runs, tmp_path / "out")
    (fig,) = saved_figures
    assert [ax.get_title() for ax in fig.axes if ax.axison] == ["knn_top1", "map_at_r"]
    header = (tmp_path / "out" / "summary.csv").read_text().splitlines()[0].split(",")
    assert header[2:] == ["knn_top1", "knn_top1_untrained", "map_at_r", "epochs", "train_seconds", "linear_top1"]
    # a sweep whose cost differs (a batch-size sweep): the time is a result, and shown
    slow = [
        _fake_run(tmp_path / "b", str(i), [f"data.batch_size={b}"], {"train_seconds": s})
        for i, (b, s) in enumerate([("64", 100.0), ("512", 40.0)])
    ]
    summarize_runs(slow, tmp_path / "b" / "out")
    assert [ax.get_title() for ax in saved_figures[1].axes if ax.axison] == ["train_seconds"]
