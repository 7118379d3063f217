"""Plots: the PNG exists with the promised pixel size; the numbers behind it are right."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from contrastive.evaluation.plots import (
    CONFUSION_SIZE,
    CURVE_PANEL_SIZE,
    EMBEDDING_SIZE,
    HISTOGRAM_SIZE,
    confusion_matrix,
    plot_confusion_matrix,
    plot_embedding_2d,
    plot_similarity_histograms,
    plot_training_curves,
    read_metrics_csv,
    sample_pairs,
)

DPI = 40


def _assert_png(path: Path, size: tuple[float, float], dpi: int = DPI) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    image = imread(path)  # (H, W, 4)
    assert image.shape[:2] == (round(size[1] * dpi), round(size[0] * dpi))
    assert image[..., :3].std() > 0.01  # something is drawn, not a blank canvas
    assert not list(path.parent.glob(".*.tmp"))  # the atomic write left no temporary behind


def _blobs(n: int = 300, c: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % c
    return torch.randn(c, 16, generator=g)[y] + 0.3 * torch.randn(n, 16, generator=g), y


def _write_metrics_csv(path: Path) -> None:
    # the shape Lightning's CSVLogger writes: one header, sparse rows, empty cells
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "lr-SGD", "step", "train/loss", "val/knn_top1"])
        for step in range(0, 40):
            w.writerow([step // 10, 0.1 * (1 - step / 40), step, 3 - step / 20, ""])
            if step % 10 == 9:
                w.writerow([step // 10, "", step, "", 20 + step])


def test_read_metrics_csv_skips_empty_cells(tmp_path: Path) -> None:
    _write_metrics_csv(tmp_path / "metrics.csv")
    series = read_metrics_csv(tmp_path / "metrics.csv")
    assert len(series["train/loss"]) == 40
    assert series["val/knn_top1"] == [(9.0, 29.0), (19.0, 39.0), (29.0, 49.0), (39.0, 59.0)]
    assert series["lr-SGD"][0] == (0.0, pytest.approx(0.1))


def test_training_curves_png(tmp_path: Path) -> None:
    _write_metrics_csv(tmp_path / "metrics.csv")
    out = plot_training_curves(tmp_path / "metrics.csv", tmp_path / "curves.png", dpi=DPI)
    _assert_png(out, (3 * CURVE_PANEL_SIZE[0], CURVE_PANEL_SIZE[1]))  # loss, lr and kNN panels


def test_training_curves_only_present_panels_and_empty_file_raises(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("step,train/loss\n0,2.0\n1,1.5\n")
    out = plot_training_curves(tmp_path / "m.csv", tmp_path / "loss.png", dpi=DPI)
    _assert_png(out, CURVE_PANEL_SIZE)
    (tmp_path / "none.csv").write_text("step,epoch\n0,0\n")
    with pytest.raises(ValueError):
        plot_training_curves(tmp_path / "none.csv", tmp_path / "none.png")


def test_siamese_loss_terms_share_the_loss_panel() -> None:
    from contrastive.evaluation.plots import _curve_panels

    columns = [
        "train/loss_step",
        "train/metric_step",
        "train/ce_epoch",
        "train/ce_acc_epoch",
        "lr-AdamW/pg1",
        "val/map_at_r",
        "val/knn_top1",
        "train/online_probe_top1",
    ]
    panels = dict(_curve_panels(columns))
    assert panels["loss"] == ["train/loss_step", "train/metric_step", "train/ce_epoch"]
    assert panels["top-1 / MAP@R (%)"] == [
        "train/ce_acc_epoch",
        "val/map_at_r",
        "val/knn_top1",
        "train/online_probe_top1",
    ]


@pytest.mark.parametrize("method", ["tsne", "pca"])
def test_embedding_png(tmp_path: Path, method: str) -> None:
    x, y = _blobs()
    out = plot_embedding_2d(
        x, y, tmp_path / f"{method}.png", method=method, max_points=150, class_names=["a", "b", "c", "d"], dpi=DPI
    )
    _assert_png(out, EMBEDDING_SIZE)


def test_embedding_subsample_is_deterministic(tmp_path: Path) -> None:
    x, y = _blobs()
    a = plot_embedding_2d(x, y, tmp_path / "a.png", method="pca", max_points=100, dpi=DPI).read_bytes()
    b = plot_embedding_2d(x, y, tmp_path / "b.png", method="pca", max_points=100, dpi=DPI).read_bytes()
    c = plot_embedding_2d(x, y, tmp_path / "c.png", method="pca", max_points=100, seed=1, dpi=DPI).read_bytes()
    assert a == b and a != c


@pytest.mark.parametrize("method", ["tsne", "pca"])
def test_one_dimensional_features_are_drawn_on_a_line(tmp_path: Path, method: str) -> None:
    """They crashed (PCA: no second component; t-SNE: scikit-learn refuses n_components=2 for 1-D)."""
    x, y = torch.randn(12, 1, generator=torch.Generator().manual_seed(0)), torch.arange(12) % 3
    _assert_png(plot_embedding_2d(x, y, tmp_path / "e.png", method=method, dpi=DPI), EMBEDDING_SIZE)


def test_similarity_histogram_png(tmp_path: Path) -> None:
    x, y = _blobs()
    _assert_png(plot_similarity_histograms(x, y, tmp_path / "h.png", max_pairs=2000, dpi=DPI), HISTOGRAM_SIZE)


@pytest.mark.parametrize("max_pairs", [10**6, 500])  # all pairs / sampled pairs
def test_sample_pairs_labels_and_distinct_items(max_pairs: int) -> None:
    y = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3] * 5)
    y[-1] = 7  # a class with one member can only appear in negatives
    pos, neg = sample_pairs(y, max_pairs)
    assert len(pos) > 0 and len(neg) > 0
    assert torch.equal(y[pos[:, 0]], y[pos[:, 1]]) and bool((pos[:, 0] != pos[:, 1]).all())
    assert bool((y[neg[:, 0]] != y[neg[:, 1]]).all())
    if max_pairs >= len(y) ** 2:  # exhaustive: every unordered pair exactly once
        counts = torch.bincount(y)
        assert len(pos) == int((counts * (counts - 1) // 2).sum())
        assert len(pos) + len(neg) == math.comb(len(y), 2)
    else:
        assert len(pos) == len(neg) == max_pairs


def test_confusion_matrix_counts_match_sklearn_and_png(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    true, pred = torch.randint(0, 6, (500,), generator=g), torch.randint(0, 6, (500,), generator=g)
    expected = sk_confusion_matrix(true.numpy(), pred.numpy(), labels=list(range(6)))
    assert confusion_matrix(true, pred, 6).tolist() == expected.tolist()
    _assert_png(plot_confusion_matrix(true, pred, 6, tmp_path / "cm.png", dpi=DPI), CONFUSION_SIZE)


def test_importing_the_evaluation_package_loads_no_plotting_or_training_library() -> None:
    """Its docstring's promise: matplotlib (via torchmetrics) and Lightning (via contrastive.data)
    cost 2 s on import and are loaded only by the functions that need them."""
    import subprocess
    import sys

    code = (
        "import sys, contrastive.evaluation, contrastive.losses; "
        "print(sorted(m for m in ('matplotlib', 'torchmetrics', 'pytorch_lightning', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_curve_panels_are_titled_by_what_they_hold_and_legends_read_as_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The third panel was "top-1 / MAP@R" with no MAP@R line, the LR legend read lr-SGD/pg1 (twice, one
    line per parameter group), and the label of the last (highest) kNN value hit the panel's title."""
    import contrastive.evaluation.plots as plots
    from contrastive.evaluation.plots import _curve_panels, curve_label

    assert [t for t, _ in _curve_panels(["train/loss_step", "val/knn_top1", "train/online_probe_top1"])] == [
        "loss",
        "top-1 (%)",
    ]
    assert [t for t, _ in _curve_panels(["val/map_at_r"])] == ["MAP@R (%)"]
    assert [t for t, _ in _curve_panels(["val/map_at_r", "val/knn_top1"])] == ["top-1 / MAP@R (%)"]
    assert [curve_label(c) for c in ("train/loss_step", "train/ce_epoch", "lr-SGD/pg2", "val/map_at_r", "x/y")] == [
        "loss, per step",
        "softmax-CE loss, epoch mean",
        "learning rate (SGD, group 2)",
        "MAP@R (test split)",
        "x/y",
    ]

    with open(tmp_path / "metrics.csv", "w", newline="") as f:  # as the CLI logs: two equal lr groups
        w = csv.writer(f)
        w.writerow(["epoch", "lr-SGD/pg1", "lr-SGD/pg2", "step", "train/loss_step", "val/knn_top1"])
        for step in range(40):
            lr = 0.1 * (1 - step / 40)
            w.writerow([step // 10, lr, lr, step, 3 - step / 20, 20 + step if step % 10 == 9 else ""])
    saved = []
    real_save = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: saved.append(fig) or real_save(fig, path))
    plot_training_curves(tmp_path / "metrics.csv", tmp_path / "curves.png", dpi=DPI)
    (fig,) = saved
    loss, lr, top1 = fig.axes
    assert [ax.get_title() for ax in fig.axes] == ["loss", "learning rate", "top-1 (%)"]
    assert [t.get_text() for t in lr.get_legend().get_texts()] == ["learning rate (SGD)"]
    assert [t.get_text() for t in top1.get_legend().get_texts()] == ["kNN top-1 (test split)"]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    (label,) = top1.texts
    assert label.get_text() == "59.00"
    box, inside, title = label.get_window_extent(renderer), top1.get_window_extent(renderer), top1.title
    assert inside.y0 <= box.y0 and box.y1 <= inside.y1 and not box.overlaps(title.get_window_extent(renderer))
