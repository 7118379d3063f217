"""Sweep reports: one table (CSV + Markdown) and one figure over the runs of a Hydra multirun."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from contrastive.evaluation.plots import new_figure, save_figure

SEED_KEYS = ("seed",)  # overrides that repeat a configuration rather than change it
JOB_ERROR_FILE = "error.txt"  # in a sweep job's folder: why its last attempt failed (written by the CLI)


@dataclass
class Run:
    """One run of a sweep: its folder, Hydra overrides (key -> text) and metrics (name -> value)."""

    path: Path
    overrides: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def parse_override(text: str) -> tuple[str, str]:
    """Split a Hydra override ``[+|++|~]key=value`` into ``(key, value)``.

    A deletion ``~key`` (or ``~key=value``) gives the value ``"~"``.
    """
    deleted = text.startswith("~")
    key, _, value = text.lstrip("~+").partition("=")
    return key.strip(), "~" if deleted else value.strip()


def read_run(run_dir: str | Path) -> Run:
    """Read ``metrics.json`` (flat name -> number) and ``.hydra/overrides.yaml`` of one run.

    Missing files give empty dicts (a crashed job still gets its row), and so does a job whose
    last attempt failed (its ``error.txt``), whatever ``metrics.json`` an earlier attempt left;
    non-numeric metric values are skipped and JSON ``null`` reads as ``nan``.

    Args:
        run_dir: the job's output folder.

    Returns:
        The :class:`Run`.
    """
    import yaml

    path = Path(run_dir)
    run = Run(path)
    overrides_file = path / ".hydra" / "overrides.yaml"
    if overrides_file.is_file():
        for item in yaml.safe_load(overrides_file.read_text()) or []:
            key, value = parse_override(str(item))
            run.overrides[key] = value
    metrics_file = path / "metrics.json"
    if metrics_file.is_file() and not (path / JOB_ERROR_FILE).is_file():  # else an earlier attempt's metrics
        for name, value in json.loads(metrics_file.read_text()).items():
            if value is None:
                run.metrics[name] = math.nan
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                run.metrics[name] = float(value)
    return run


def _union(keys: Sequence[Sequence[str]]) -> list[str]:
    """Keys in order of first appearance."""
    return list(dict.fromkeys(k for ks in keys for k in ks))


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _fmt(value: float | None) -> str:
    """Two decimals (percentages read aligned), 4 significant digits below 1; '' if missing."""
    if value is None or math.isnan(value):
        return ""
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.4g}"


def _run_labels(runs: Sequence[Run]) -> list[str]:
    """Folder names, or the last two path parts where names repeat (several sweeps)."""
    names = [r.path.name for r in runs]
    if len(set(names)) == len(names):
        return names
    return ["/".join(r.path.parts[-2:]) for r in runs]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (``|`` in cells escaped), ending in a newline."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def seed_table(runs: Sequence[Run], params: Sequence[str], metrics: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Mean ± sample std of each metric over runs that differ only in a seed override.

    Args:
        runs: the runs.
        params: override columns; those in :data:`SEED_KEYS` are averaged over.
        metrics: metric columns.

    Returns:
        header and rows (``n`` = runs in the group); no rows when no group has two runs.
    """
    keys = [p for p in params if p not in SEED_KEYS]
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(run.overrides.get(k, "") for k in keys), []).append(run)
    if all(len(g) < 2 for g in groups.values()):
        return [], []
    rows = []
    for config, members in groups.items():
        cells = []
        for m in metrics:
            values = [r.metrics[m] for r in members if not math.isnan(r.metrics.get(m, math.nan))]
            std = statistics.stdev(values) if len(values) > 1 else math.nan
            cells.append(f"{_fmt(statistics.fmean(values))} ± {_fmt(std) or '-'}" if values else "")
        rows.append([*config, str(len(members)), *cells])
    return [*keys, "n", *metrics], rows


#: Metrics that differ between any two runs by noise (wall-clock time): plotted only where the largest is at
#: least this many times the smallest (a batch-size sweep's times, not a temperature sweep's).
NOISY_METRICS = {"train_seconds": 1.25}


def varying_metrics(runs: Sequence[Run], metrics: Sequence[str]) -> list[str]:
    """The metrics whose values differ between the runs (as ``summary.md`` shows them, 2 decimals), in order.

    A sweep's untrained figures, ``epochs`` and the like are equal in every run and say nothing about
    the swept setting; :data:`NOISY_METRICS` differ by noise and count only beyond their ratio.
    """
    varying = []
    for metric in metrics:
        values = [v for r in runs if not math.isnan(v := r.metrics.get(metric, math.nan))]
        if metric in NOISY_METRICS:
            if values and min(values) > 0 and max(values) / min(values) >= NOISY_METRICS[metric]:
                varying.append(metric)
        elif len({_fmt(v) for v in values}) > 1:
            varying.append(metric)
    return varying


def _plot_summary(
    runs: Sequence[Run], labels: Sequence[str], params: Sequence[str], metrics: Sequence[str], out_path: Path, dpi: int
) -> Path:
    """Each metric against the one swept parameter (seeds aside), or a bar per run when several vary."""
    varying = [p for p in params if p not in SEED_KEYS and len({r.overrides.get(p, "") for r in runs}) > 1]
    cols = max(1, min(3, len(metrics)))
    rows = max(1, math.ceil(len(metrics) / cols))
    fig = new_figure((4.5 * cols, 3.6 * rows), dpi)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(metrics) :]:
        ax.set_axis_off()
    for ax, metric in zip(axes, metrics):
        ys = [r.metrics.get(metric, math.nan) for r in runs]
        if len(varying) == 1:  # every run as a dot, the mean over repeats (seeds) as a line
            param = varying[0]
            texts = [r.overrides.get(param, "") for r in runs]
            numbers = [_as_number(t) for t in texts]
            numeric = all(n is not None for n in numbers)
            levels = sorted(set(texts), key=lambda t: _as_number(t) or 0.0) if numeric else list(dict.fromkeys(texts))
            xs = [float(t) for t in levels] if numeric else list(range(len(levels)))
            position = dict(zip(levels, xs))
            by_level: dict[str, list[float]] = {level: [] for level in levels}
            for t, y in zip(texts, ys):
                if not math.isnan(y):
                    by_level[t].append(y)
            means = [statistics.fmean(v) if v else math.nan for v in by_level.values()]
            ax.plot([position[t] for t in texts], ys, "o", color="tab:blue", alpha=0.5, markersize=4)
            ax.plot(xs, means, "-", color="tab:blue")
            if numeric and min(xs) > 0 and max(xs) / min(xs) >= 100:
                ax.set_xscale("log")
            if not numeric:
                ax.set_xticks(xs, levels, rotation=30, ha="right", fontsize=8)
            ax.set_xlabel(param)
        else:
            differing = [p for p in params if len({r.overrides.get(p, "") for r in runs}) > 1]
            names = [", ".join(r.overrides.get(p, "") for p in differing) for r in runs] if differing else labels
            ax.bar(range(len(runs)), ys, color="tab:blue")
            ax.set_xticks(range(len(runs)), names, rotation=30, ha="right", fontsize=8)
            ax.set_xlabel(", ".join(differing) if differing else "run")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    if not metrics:
        axes[0].text(0.5, 0.5, "no metric differs between these runs\n(summary.md lists them all)", ha="center")
    return save_figure(fig, out_path)


def summarize_runs(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    params: Sequence[str] | None = None,
    dpi: int = 100,
) -> Path:
    """Tabulate and plot the metrics of several runs (e.g. one Hydra multirun sweep).

    Reads each run's ``metrics.json`` and ``.hydra/overrides.yaml`` (see :func:`read_run`)
    and writes into ``out_dir``:

    - ``summary.csv``: one row per run, in the order given: ``run``, the override
      columns, then the metric columns (full precision; empty cell = missing);
    - ``summary.md``: the same as a Markdown table (2 decimals, 4 significant digits below 1), followed,
      when runs differ only in ``seed``, by a table of mean ± std over seeds;
    - ``summary.png``: one panel per metric that differs between the runs (:func:`varying_metrics`;
      the untrained figures and ``epochs`` of a sweep are equal in every run). When exactly one
      override other than ``seed`` varies, each run is a dot against it and the mean over seeds a line
      (log x when numeric values span 100x); otherwise a bar per run.

    Args:
        run_dirs: run folders.
        out_dir: where the three files go (created if needed).
        params: override keys to show, in this order; ``None`` shows every key that
            appears in any run, in order of first appearance.
        dpi: of the PNG.

    Returns:
        the path of ``summary.md``.
    """
    from contrastive.io import write_bytes_atomic

    if not run_dirs:
        raise ValueError("no run folders given")
    runs = [read_run(d) for d in run_dirs]
    out = Path(out_dir)
    keys = list(params) if params is not None else _union([list(r.overrides) for r in runs])
    metrics = _union([list(r.metrics) for r in runs])
    labels = _run_labels(runs)

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["run", *keys, *metrics])
    for label, run in zip(labels, runs):
        values = [run.metrics.get(m) for m in metrics]
        writer.writerow(
            [
                label,
                *(run.overrides.get(k, "") for k in keys),
                *("" if v is None or math.isnan(v) else repr(v) for v in values),
            ]
        )
    write_bytes_atomic(out / "summary.csv", buf.getvalue().encode())

    table = [
        [label, *(run.overrides.get(k, "") for k in keys), *(_fmt(run.metrics.get(m)) for m in metrics)]
        for label, run in zip(labels, runs)
    ]
    text = f"# Sweep summary ({len(runs)} runs)\n\n" + markdown_table(["run", *keys, *metrics], table)
    header, rows = seed_table(runs, keys, metrics)
    if rows:
        text += "\n## Mean ± std over seeds\n\n" + markdown_table(header, rows)
    md_path = write_bytes_atomic(out / "summary.md", text.encode())
    _plot_summary(runs, labels, keys, varying_metrics(runs, metrics), out / "summary.png", dpi)
    return md_path
