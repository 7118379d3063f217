"""Diagnostic plots written as PNG files: training curves, 2-D embeddings, similarity
histograms and confusion matrices.

matplotlib (its object API with the Agg renderer; pyplot's global state is never
touched), numpy and scikit-learn are imported inside the functions. Every file is
written atomically (a temporary file beside it, then ``os.replace``) and its path
returned. Image size in pixels is ``figsize * dpi`` exactly (no tight bounding box).
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CURVE_PANEL_SIZE = (4.5, 3.6)  # inches per panel of plot_training_curves
EMBEDDING_SIZE = (7.5, 6.0)
HISTOGRAM_SIZE = (6.5, 4.0)
CONFUSION_SIZE = (7.0, 6.0)


def new_figure(size: tuple[float, float], dpi: int) -> Figure:
    """A pyplot-free figure of ``size`` inches at ``dpi`` with constrained layout."""
    from matplotlib.figure import Figure

    return Figure(figsize=size, dpi=dpi, layout="constrained")


def save_figure(fig: Figure, out_path: str | Path) -> Path:
    """Render ``fig`` to PNG bytes and write them atomically."""
    from contrastive.io import write_bytes_atomic

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return write_bytes_atomic(out_path, buf.getvalue())


def _class_colors(num_classes: int) -> list[tuple[float, float, float, float]]:
    """Distinct colours: tab10 / tab20 up to 20 classes, a sampled continuous map beyond."""
    from matplotlib import colormaps

    if num_classes <= 10:
        return [colormaps["tab10"](i) for i in range(num_classes)]
    if num_classes <= 20:
        return [colormaps["tab20"](i) for i in range(num_classes)]
    return [colormaps["turbo"](i / max(num_classes - 1, 1)) for i in range(num_classes)]


def read_metrics_csv(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """Read a Lightning ``CSVLogger`` ``metrics.csv`` into ``{column: [(step, value), ...]}``.

    Rows are sparse (each row holds what was logged at that step); empty and non-finite
    cells are skipped. The x value is the ``step`` column, or the row number without one.

    Args:
        path: the CSV file.

    Returns:
        one list of (step, value) per column other than ``step``, in file order.
    """
    series: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="") as f:
        for row_number, row in enumerate(csv.DictReader(f)):
            x = _number(row.get("step"))
            x = float(row_number) if x is None else x
            for column, cell in row.items():
                value = _number(cell)
                if column != "step" and column is not None and value is not None:
                    series.setdefault(column, []).append((x, value))
    return series


def _number(cell: str | None) -> float | None:
    try:
        value = float(cell)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _curve_panels(columns: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Group metric names into (title, columns) panels: loss (and the Siamese loss terms
    ``metric`` and ``ce``), learning rate, accuracy and MAP@R (the class-disjoint monitor).
    The third panel is titled by what it holds: top-1, MAP@R, or both."""

    def is_lr(c: str) -> bool:
        name = c.rsplit("/", 1)[-1]
        return name == "lr" or name.startswith("lr-") or c.startswith("lr-")

    def is_loss(c: str) -> bool:
        term = c.rsplit("/", 1)[-1].removesuffix("_step").removesuffix("_epoch")
        return "loss" in c or (c.startswith("train/") and term in ("metric", "ce"))

    loss = [c for c in columns if is_loss(c)]
    lr = [c for c in columns if is_lr(c) and c not in loss]
    acc = [c for c in columns if any(t in c for t in ("knn", "top1", "acc", "map_at_r")) and c not in loss + lr]
    has_map = any("map_at_r" in c for c in acc)
    accuracy = "top-1 / MAP@R (%)" if has_map and len(acc) > 1 else ("MAP@R (%)" if has_map else "top-1 (%)")
    rank = [c for c in columns if c.startswith("val/rank_me")]
    spread = [c for c in columns if any(c.startswith(f"val/{m}") for m in ("embedding_std", "alignment", "uniformity"))]
    panels = (
        ("loss", loss),
        ("learning rate", lr),
        (accuracy, acc),
        ("effective rank (RankMe)", rank),
        ("label-free monitors", spread),
    )
    return [(title, cols) for title, cols in panels if cols]


#: Logged names (``train/<name>_step`` / ``_epoch``, ``val/<name>``) as the curves' legends say them.
CURVE_NAMES = {
    "loss": "loss",
    "metric": "metric-learning loss",
    "ce": "softmax-CE loss",
    "ce_acc": "softmax-CE head top-1 (training batches)",
    "online_probe_top1": "online linear probe top-1 (training batches)",
    "knn_top1": "kNN top-1 (test split)",
    "map_at_r": "MAP@R (test split)",
} | {
    f"{monitor}_{part}": f"{monitor} ({part})"
    for monitor in ("embedding_std", "rank_me", "alignment", "uniformity")
    for part in ("backbone", "projector")
}


def curve_label(column: str) -> str:
    """The legend of a ``metrics.csv`` column in a user's words: ``train/loss_step`` -> ``loss, per step``,
    ``val/knn_top1`` -> ``kNN top-1 (test split)``, ``lr-SGD/pg2`` -> ``learning rate (SGD, group 2)``;
    a column it does not know keeps its name."""
    lr = re.fullmatch(r"lr-(\w+)(?:/pg(\d+))?", column)
    if lr:
        return f"learning rate ({lr[1]}{f', group {lr[2]}' if lr[2] else ''})"
    name = column.rsplit("/", 1)[-1]
    for suffix, when in (("_step", ", per step"), ("_epoch", ", epoch mean")):
        term = name.removesuffix(suffix)
        if name.endswith(suffix) and term in CURVE_NAMES:
            return CURVE_NAMES[term] + (when if "loss" in CURVE_NAMES[term] else "")
    return CURVE_NAMES.get(name, column)


def _legends(series: dict[str, list[tuple[float, float]]], columns: list[str]) -> dict[str, str]:
    """``column -> legend`` for the columns to draw: learning-rate groups of one optimiser that hold the
    same values throughout (weights and biases under one schedule) are one line, named without the group."""
    shown: dict[str, str] = {}
    for column in columns:
        optimizer = column.split("/")[0]
        twin = next((c for c in shown if c.split("/")[0] == optimizer and series[c] == series[column]), None)
        if twin is not None and column.startswith("lr-"):
            shown[twin] = curve_label(optimizer)
            continue
        shown[column] = curve_label(column)
    return shown


def plot_training_curves(metrics_csv_path: str | Path, out_path: str | Path, dpi: int = 100) -> Path:
    """Loss, learning-rate and kNN/accuracy panels from a Lightning ``metrics.csv``.

    Columns whose name contains ``loss`` (and the Siamese terms ``train/metric``,
    ``train/ce``) go to the first panel; ``lr``, ``*/lr`` and ``lr-*`` (Lightning's
    ``LearningRateMonitor``) to the second; names containing ``knn``, ``top1``,
    ``acc`` or ``map_at_r`` to the third; the label-free monitors (``val/rank_me_*``, then
    ``val/embedding_std_*``, ``val/alignment_*``, ``val/uniformity_*``) to two more. Panels
    without columns are left out;
    the image is ``4.5 * panels x 3.6`` inches at ``dpi``. The x axis is ``step``.

    Args:
        metrics_csv_path: the CSVLogger file.
        out_path: PNG to write.
        dpi: pixels per inch.

    Returns:
        ``out_path`` as a ``Path``.

    Raises:
        ValueError: the file has no loss, learning-rate or accuracy column with values.
    """
    series = read_metrics_csv(metrics_csv_path)
    panels = _curve_panels(list(series))
    if not panels:
        raise ValueError(f"{metrics_csv_path}: no loss, learning-rate or accuracy values to plot")
    width, height = CURVE_PANEL_SIZE
    fig = new_figure((width * len(panels), height), dpi)
    for ax, (title, columns) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for column, label in _legends(series, columns).items():
            xs, ys = zip(*series[column])
            ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, linewidth=1.2, label=label)
        if title not in ("loss", "learning rate"):
            last_column = max(columns, key=lambda c: series[c][-1][1])
            ax.margins(y=0.2)  # room above the highest point: its label stays inside, below the title
            ax.annotate(
                f"{series[last_column][-1][1]:.2f}",
                series[last_column][-1],
                fontsize=8,
                textcoords="offset points",
                xytext=(-10, 4),
                ha="right",
            )
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, out_path)


def plot_embedding_2d(
    features: Tensor,
    labels: Tensor,
    out_path: str | Path,
    method: Literal["tsne", "pca"] = "tsne",
    max_points: int = 2000,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
    dpi: int = 100,
) -> Path:
    """Scatter of a 2-D projection of the features, coloured by label.

    ``tsne``: scikit-learn t-SNE (van der Maaten & Hinton 2008) of the L2-normalised
    features, PCA initialisation, perplexity ``min(30, (n - 1) / 3)``, ``random_state=seed``.
    ``pca``: the top two principal components (centred SVD). At most ``max_points``
    points, drawn without replacement from ``seed``, so the picture is reproducible.
    Identical features (a collapsed network: unit features within 1e-6 of their mean) are drawn by PCA, titled so, as
    t-SNE is undefined for them; so are 1-D features, on a line. A legend is drawn for up to 20 classes. Image
    ``7.5 x 6`` inches at ``dpi``.

    Args:
        features: (N, D) features.
        labels: (N,) integer labels.
        out_path: PNG to write.
        method: ``"tsne"`` or ``"pca"``.
        max_points: subsample size.
        class_names: names indexed by label, for the legend.
        seed: subsampling and t-SNE seed.
        dpi: pixels per inch.

    Returns:
        ``out_path`` as a ``Path``.
    """
    if method not in ("tsne", "pca"):
        raise ValueError(f"method must be 'tsne' or 'pca', got {method!r}")
    if features.shape[0] < 3:
        raise ValueError("need at least 3 points")
    from contrastive.data import seeded_indices  # here: contrastive.data imports Lightning (2 s)

    keep = seeded_indices(features.shape[0], max_points, seed)
    x = F.normalize(features.detach()[keep.to(features.device)].double(), dim=1).cpu()  # (n, D)
    y = labels.detach().cpu()[keep]  # (n,)
    centred = x - x.mean(0)
    if method == "tsne" and float(centred.abs().max()) < 1e-6:  # (nearly) equal unit features, a collapsed
        method = "pca"  # network: t-SNE's affinities and PCA start are 0/0 there (scikit-learn segfaults)
    if x.shape[1] == 1:  # 1-D features: t-SNE and a second component do not exist; drawn on a line
        method = "pca"
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (len(x) - 1) / 3)
        xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x.numpy())  # (n, 2)
    else:
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        projected = centred @ vh[:2].T  # (n, min(2, D))
        xy = F.pad(projected, (0, 2 - projected.shape[1])).numpy()  # (n, 2)

    classes = sorted(set(y.tolist()))
    colors = _class_colors(max(classes) + 1)
    fig = new_figure(EMBEDDING_SIZE, dpi)
    ax = fig.subplots()
    for c in classes:
        sel = (y == c).numpy()
        name = class_names[c] if class_names is not None else str(c)
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, color=colors[c], alpha=0.8, linewidths=0, label=name)
    if len(classes) <= 20:
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=2.5, frameon=False)
    ax.set_title(f"{'t-SNE' if method == 'tsne' else 'PCA'} of {len(x)} features, {len(classes)} classes")
    ax.set_xticks([])
    ax.set_yticks([])
    return save_figure(fig, out_path)


def sample_pairs(labels: Tensor, max_pairs: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Index pairs ``i != j`` of equal labels (positives) and of different labels (negatives).

    All unordered pairs when there are at most ``max_pairs`` of them; otherwise up to
    ``max_pairs`` positives (anchor uniform over items of classes with >= 2 members,
    partner uniform over its other class members) and ``max_pairs`` negatives (uniform
    pairs with different labels), drawn from ``seed``.

    Args:
        labels: (N,) integer labels on the CPU.
        max_pairs: cap per kind.
        seed: generator seed.

    Returns:
        positives (P, 2) and negatives (M, 2) int64 index pairs.
    """
    n = labels.shape[0]
    if n * (n - 1) // 2 <= max_pairs:
        pairs = torch.triu_indices(n, n, offset=1).T  # (n(n-1)/2, 2)
        same = labels[pairs[:, 0]] == labels[pairs[:, 1]]
        return pairs[same], pairs[~same]
    g = torch.Generator().manual_seed(seed)
    order = labels.argsort(stable=True)  # items grouped by class
    _, inverse, counts = torch.unique(labels[order], return_inverse=True, return_counts=True)
    starts = counts.cumsum(0) - counts  # first sorted position of each class
    anchors_ok = (counts[inverse] >= 2).nonzero().squeeze(1)  # sorted positions with a partner
    positives = torch.empty(0, 2, dtype=torch.long)
    if len(anchors_ok):
        a = anchors_ok[torch.randint(len(anchors_ok), (max_pairs,), generator=g)]  # (P,) sorted positions
        cls = inverse[a]
        offset = (torch.rand(max_pairs, generator=g) * (counts[cls] - 1)).long()  # uniform over the others
        b = starts[cls] + offset
        b = b + (b >= a).long()  # skip the anchor itself
        positives = torch.stack([order[a], order[b]], 1)
    i = torch.randint(n, (4 * max_pairs,), generator=g)
    j = torch.randint(n, (4 * max_pairs,), generator=g)
    negatives = torch.stack([i, j], 1)[labels[i] != labels[j]][:max_pairs]
    return positives, negatives


def plot_similarity_histograms(
    features: Tensor,
    labels: Tensor,
    out_path: str | Path,
    max_pairs: int = 200_000,
    bins: int = 100,
    seed: int = 0,
    dpi: int = 100,
) -> Path:
    """Density histograms of cosine similarity for same-label vs different-label pairs.

    A good embedding separates the two; the title gives each mean and the pair counts.
    Pairs are those of :func:`sample_pairs`. Image ``6.5 x 4`` inches at ``dpi``.

    Args:
        features: (N, D) features.
        labels: (N,) integer labels.
        out_path: PNG to write.
        max_pairs: pairs per kind at most.
        bins: histogram bins over [-1, 1].
        seed: pair sampling seed.
        dpi: pixels per inch.

    Returns:
        ``out_path`` as a ``Path``.
    """
    x = F.normalize(features.detach().float(), dim=1)
    positives, negatives = sample_pairs(labels.detach().cpu(), max_pairs, seed)
    fig = new_figure(HISTOGRAM_SIZE, dpi)
    ax = fig.subplots()
    means = []
    for name, pairs, color in (("same label", positives, "tab:blue"), ("different label", negatives, "tab:orange")):
        pairs = pairs.to(x.device)
        sims = (x[pairs[:, 0]] * x[pairs[:, 1]]).sum(1).clamp(-1, 1).cpu().numpy()  # (P,)
        if len(sims):
            ax.hist(
                sims, bins=bins, range=(-1, 1), density=True, alpha=0.55, color=color, label=f"{name} (n={len(sims)})"
            )
            ax.axvline(float(sims.mean()), color=color, linestyle="--", linewidth=1)
            means.append(f"{name} {sims.mean():.3f}")
    ax.set_xlim(-1, 1)
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.set_title("mean: " + ", ".join(means) if means else "no pairs", fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, out_path)


def confusion_matrix(true: Tensor, pred: Tensor, num_classes: int) -> Tensor:
    """``M[t, p]`` = number of items of true class ``t`` predicted as ``p``.

    Args:
        true: (N,) integer labels in [0, num_classes).
        pred: (N,) integer predictions in [0, num_classes).
        num_classes: C.

    Returns:
        (C, C) int64 counts.
    """
    from torchmetrics.functional.classification import (
        multiclass_confusion_matrix,  # here: torchmetrics loads matplotlib (2 s)
    )

    return multiclass_confusion_matrix(pred.long().cpu(), true.long().cpu(), num_classes, validate_args=False)


def plot_confusion_matrix(
    true: Tensor,
    pred: Tensor,
    num_classes: int,
    out_path: str | Path,
    class_names: Sequence[str] | None = None,
    normalize: bool = True,
    dpi: int = 100,
) -> Path:
    """Confusion matrix as an image, rows = true class, columns = prediction.

    With ``normalize`` each row is divided by its count (the diagonal is per-class
    recall, in percent); cells are annotated up to 20 classes and ticks named up to 40.
    Image ``7 x 6`` inches at ``dpi``.

    Args:
        true: (N,) true labels.
        pred: (N,) predicted labels.
        num_classes: C.
        out_path: PNG to write.
        class_names: names indexed by class.
        normalize: row-normalise to percent.
        dpi: pixels per inch.

    Returns:
        ``out_path`` as a ``Path``.
    """
    counts = confusion_matrix(true, pred, num_classes).double()  # (C, C)
    shown = 100 * counts / counts.sum(1, keepdim=True).clamp_min(1) if normalize else counts
    fig = new_figure(CONFUSION_SIZE, dpi)
    ax = fig.subplots()
    image = ax.imshow(shown.numpy(), cmap="Blues", vmin=0, vmax=100 if normalize else None)
    fig.colorbar(image, ax=ax, label="% of true class" if normalize else "count", shrink=0.85)
    if num_classes <= 20:
        threshold = float(shown.max()) / 2
        for t in range(num_classes):
            for p in range(num_classes):
                v = float(shown[t, p])
                ax.text(
                    p,
                    t,
                    f"{v:.0f}",
                    ha="center",
                    va="center",
                    fontsize=7 if num_classes > 10 else 8,
                    color="white" if v > threshold else "black",
                )
    if num_classes <= 40:
        names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
        ax.set_xticks(
            range(num_classes),
            names,
            rotation=45 if class_names is not None else 0,
            ha="right" if class_names is not None else "center",
            fontsize=8,
        )
        ax.set_yticks(range(num_classes), names, fontsize=8)
    accuracy = 100 * float(counts.diag().sum() / counts.sum().clamp_min(1))
    ax.set_title(f"confusion matrix (top-1 {accuracy:.2f}%)")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return save_figure(fig, out_path)
