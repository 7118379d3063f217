"""Training on unlabelled images: evaluated on a labelled folder, or with the label-free monitors only;
and contrastive-embed on the checkpoint."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from contrastive.evaluation.plots import _curve_panels

REPO = Path(__file__).resolve().parents[1]
MONITORS = [
    f"{m}_{p}" for m in ("embedding_std", "rank_me", "alignment", "uniformity") for p in ("backbone", "projector")
]


def _demo_folders(out: Path, unlabelled: int, train: int, test: int) -> None:
    spec = importlib.util.spec_from_file_location("demo_folders", REPO / "scripts" / "demo_folders.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_demo_folders(out, unlabelled, train, test)


def train_without_eval_set(cli, tmp_path: Path, root: Path, epochs: int):  # type: ignore[no-untyped-def]
    """``contrastive-train`` of the demo experiment on the unlabelled folder ``root``, into ``tmp_path/run``."""
    return cli(
        "contrastive-train",
        "experiment=simclr_unlabelled_demo",
        f"data.root={root}",
        "eval_data=none",
        "data.batch_size=32",
        f"trainer.max_epochs={epochs}",
        "eval.every_n_epochs=1",
        "trainer.enable_progress_bar=false",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )


def test_results_table_keeps_the_monitors_apart_from_the_percentages() -> None:
    from contrastive.cli.console import results_table

    monitors = {"rank_me_backbone": 25.0512, "rank_me_backbone_untrained": 19.6809}
    both = results_table({"knn_top1": 14.5, "knn_top1_untrained": 11.0, "epochs": 2.0, **monitors}, 2)
    assert both.splitlines() == [
        "test split, percent  untrained  trained    gain",
        "kNN top-1                11.00    14.50   +3.50",
        "trained 2 of 2 epochs",
        "label-free monitors, training sample  untrained   trained",
        "rank_me_backbone                        19.6809   25.0512",
    ]
    assert results_table({"epochs": 2.0, **monitors}, 2).splitlines()[0] == "trained 2 of 2 epochs"


def test_curves_plot_has_the_monitor_panels() -> None:
    columns = ["train/loss_step", "val/knn_top1", "val/rank_me_backbone", "val/embedding_std_projector"]
    panels = dict(_curve_panels(columns))
    assert panels["effective rank (RankMe)"] == ["val/rank_me_backbone"]
    assert panels["label-free monitors"] == ["val/embedding_std_projector"]


@pytest.mark.slow
def test_unlabelled_folder_demo_is_evaluated_on_the_labelled_folder(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """experiment=simclr_unlabelled_demo as shipped (8 epochs, grey views, k = 20) on the folders
    scripts/demo_folders.py writes by default: SimCLR on 1,000 unlabelled shape images of varying sizes and
    formats, kNN against the labelled folder (bank 500, queries 300) before and after.

    kNN beats the untrained network by 20 points (measured 26.3 -> 70.3) and the label-free monitors rise
    from the start (embedding_std and RankMe by half at least).
    """
    _demo_folders(tmp_path / "demo", unlabelled=1000, train=500, test=300)
    out = cli(
        "contrastive-train",
        "experiment=simclr_unlabelled_demo",
        f"data.root={tmp_path / 'demo' / 'unlabelled'}",
        f"eval_data.root={tmp_path / 'demo' / 'labelled'}",
        "eval.final_probe=false",
        "trainer.enable_progress_bar=false",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for name in ("embedding_std_backbone", "embedding_std_projector", "rank_me_projector"):
        assert metrics[name] > 1.5 * metrics[f"{name}_untrained"], (name, metrics)
    assert metrics["epochs"] == 8 and metrics["knn_top1"] >= metrics["knn_top1_untrained"] + 20, metrics
    # kNN over the labelled folder's 10 classes (300 queries: multiples of 1/3)
    assert all(round(metrics[k] * 3, 6) == round(metrics[k] * 3) for k in ("knn_top1", "knn_top1_untrained"))
    assert "online_probe_top1" not in (tmp_path / "run" / "logs" / "metrics.csv").read_text()
    # contrastive-eval of the checkpoint measures the same kNN: the evaluation folder's train split is the bank
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = cli("contrastive-eval", f"checkpoint={checkpoint}", "knn_k=20", "linear_probe=false", "plots=false",
              "export=false", "hydra.run.dir=eval", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["knn_top1"] == metrics["knn_top1"]


@pytest.mark.slow
def test_no_evaluation_set_logs_the_monitors_and_builds_no_classifier(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """eval_data=none: two short epochs; the monitors in metrics.json and metrics.csv, no kNN, no class head;
    an unreadable file listed in the run folder."""
    root = tmp_path / "demo" / "unlabelled"
    _demo_folders(tmp_path / "demo", unlabelled=96, train=0, test=0)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    out = train_without_eval_set(cli, tmp_path, root, epochs=2)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {*MONITORS, *(f"{m}_untrained" for m in MONITORS), "epochs", "train_seconds"}
    # measured, and of the trained network: two epochs of 96 images need not raise them (the demo test checks that)
    assert all(metrics[m] != metrics[f"{m}_untrained"] for m in MONITORS if not m.startswith("alignment")), metrics
    assert all(0 < metrics[m] < 1 for m in MONITORS if m.startswith("embedding_std")), metrics
    assert all(1 <= metrics[m] <= 128 for m in MONITORS if m.startswith("rank_me")), metrics  # <= min(n, d)
    assert (run / "unreadable_files.txt").read_text().startswith("broken.jpg: a damaged or truncated JPEG image")
    assert (out.stdout + out.stderr).count("could not be read and were skipped") == 1
    with (run / "logs" / "metrics.csv").open() as f:
        columns = next(csv.reader(f))
    assert {f"val/{m}" for m in MONITORS} <= set(columns) and "val/knn_top1" not in columns
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert not any(k.startswith("online_head") for k in state)  # no classifier, least of all one per image
    out = cli("contrastive-eval", f"checkpoint={run / 'checkpoints' / 'last.ckpt'}", cwd=tmp_path)
    assert out.returncode == 2 and "without an evaluation set (eval_data=none): there are no labels" in out.stderr
