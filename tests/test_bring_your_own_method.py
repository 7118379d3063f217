"""A method the package does not ship (examples/align_uniform: its pipeline, loss and YAML outside
``contrastive/``) trains through ``contrastive-train`` with no package file edited."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BIN, REPO

EXAMPLE = REPO / "examples" / "align_uniform"


def _user_folder(tmp_path: Path) -> Path:
    """The example copied where a user keeps their own code (outside the repository)."""
    folder = tmp_path / "my_method"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("outputs", "__pycache__"))
    return folder


def _train(folder: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(folder), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [str(BIN / "contrastive-train"), f"hydra.searchpath=[file://{folder / 'configs'}]", *overrides],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_example_loss_equals_its_formula_in_float64() -> None:
    sys.path.insert(0, str(EXAMPLE))
    try:
        from align_uniform import AlignUniformLoss
    finally:
        sys.path.remove(str(EXAMPLE))
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    u, v = z1 / z1.norm(dim=1, keepdim=True), z2 / z2.norm(dim=1, keepdim=True)
    align = sum(float(((u[i] - v[i]) ** 2).sum()) for i in range(6)) / 6

    def uniformity(x: torch.Tensor) -> float:
        pairs = [float(torch.exp(-2 * ((x[i] - x[j]) ** 2).sum())) for i in range(6) for j in range(i + 1, 6)]
        return float(torch.tensor(sum(pairs) / len(pairs)).log())

    expected = align + 0.5 * (uniformity(u) + uniformity(v))
    assert float(AlignUniformLoss()(z1, z2)) == pytest.approx(expected, rel=1e-5)  # computed in float32


def test_a_loss_of_another_form_is_refused_by_the_users_pipeline(tmp_path: Path) -> None:
    result = _train(_user_folder(tmp_path), "experiment=align_uniform_shapes", "loss=triplet")
    assert result.returncode == 2, result.stderr
    assert (
        "error: loss TripletMargin does not fit the AlignUniform pipeline: it calls loss(z1, z2) on two views; "
        "use loss=align_uniform or loss=nt_xent"
    ) in result.stderr


@pytest.mark.slow
def test_a_method_from_outside_the_package_trains_and_learns(tmp_path: Path) -> None:
    folder = _user_folder(tmp_path)
    result = _train(
        folder,
        "experiment=align_uniform_shapes",
        "data.source.num_train=1000",
        "data.source.num_test=500",
        "trainer.max_epochs=4",
        "eval.every_n_epochs=4",
        "eval.final_probe=false",
        "trainer.enable_progress_bar=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics_file,) = (folder / "outputs" / "align_uniform_shapes").glob("*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["epochs"] == 4
    assert metrics["knn_top1"] > metrics["knn_top1_untrained"] + 10  # 19.0 -> 34.4 on 2 CPU cores, 2026-12-06
    assert (metrics_file.parent / "checkpoints" / "last.ckpt").is_file()
    assert not list((REPO / "contrastive").rglob("align_uniform*"))  # nothing of it inside the package
