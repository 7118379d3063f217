"""Atomic writes, strict-JSON metrics, checkpoint refusal messages and the resumable CSV log."""

from __future__ import annotations

import csv
import json
import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import contrastive.io
from contrastive.io import (
    CheckpointError,
    ResumableCSVLogger,
    load_checkpoint,
    state_dict_mismatch,
    write_bytes_atomic,
    write_json_atomic,
)


@pytest.fixture
def umask_022() -> Iterator[None]:
    """Run the test under the common umask 022, then restore the caller's."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_json_writes_every_non_finite_float_as_null(tmp_path: Path) -> None:
    """+inf and -inf (not only NaN), as floats or 0-d tensors, become null: strict JSON has no Infinity."""
    values = {
        "nan": math.nan,
        "pos_inf": math.inf,
        "neg_inf": -math.inf,
        "t_nan": torch.tensor(math.nan),
        "t_pos_inf": torch.tensor(math.inf),
        "t_neg_inf": torch.tensor(-math.inf),
        "nested": [math.inf, {"x": -math.inf}],
        "finite": 1.5,
        "t_finite": torch.tensor(2.0),
    }
    path = write_json_atomic(tmp_path / "metrics.json", values)
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text) == {
        "finite": 1.5,
        "nan": None,
        "neg_inf": None,
        "nested": [None, {"x": None}],
        "pos_inf": None,
        "t_finite": 2.0,
        "t_nan": None,
        "t_neg_inf": None,
        "t_pos_inf": None,
    }


def test_atomic_file_gets_the_umask_permissions_not_mkstemps_0600(tmp_path: Path, umask_022: None) -> None:
    """mkstemp creates 0600 files; the chmod gives them 0666 & ~umask like an ordinary open() would."""
    path = write_bytes_atomic(tmp_path / "out.bin", b"data")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    os.umask(0o027)
    other = write_bytes_atomic(tmp_path / "other.bin", b"data")
    assert stat.S_IMODE(other.stat().st_mode) == 0o640


def test_failed_rename_propagates_and_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the final os.replace fails, the error reaches the caller, the old file stays and no .tmp is left."""
    target = tmp_path / "metrics.json"
    target.write_text("old\n")

    def refuse(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(contrastive.io.os, "replace", refuse)
    with pytest.raises(OSError, match="^disk gone$"):
        write_bytes_atomic(target, b"new\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    assert target.read_text() == "old\n"


def test_checkpoint_with_state_dict_but_no_run_config_is_refused(tmp_path: Path) -> None:
    """A state_dict alone (e.g. a plain torch.save) is not a contrastive checkpoint: the run config must be there
    too."""
    foreign = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(foreign)
    assert str(info.value) == (
        f"{foreign} is not a contrastive training checkpoint (no state_dict or run config in it); "
        "pass a .ckpt written by contrastive-train"
    )
    ours = tmp_path / "ours.ckpt"
    torch.save({"state_dict": {}, "contrastive_config": {"seed": 0}}, ours)
    assert load_checkpoint(ours) == {"state_dict": {}, "contrastive_config": {"seed": 0}}


def test_shape_mismatch_names_three_entries_then_counts_the_rest() -> None:
    """With 4 tensors of another shape the message names the first 3 and ends 'and 1 more'."""
    module = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    saved = {
        "0.weight": torch.zeros(4, 2),
        "0.bias": torch.zeros(4),
        "1.weight": torch.zeros(1, 4),
        "1.bias": torch.zeros(2),
    }
    assert state_dict_mismatch(saved, module) == (
        "of another shape 0.weight (4, 2) vs (3, 2), 0.bias (4,) vs (3,), 1.weight (1, 4) vs (1, 3) and 1 more"
    )
    saved["1.bias"] = torch.zeros(1)  # three mismatches: all named, no count
    assert state_dict_mismatch(saved, module) == (
        "of another shape 0.weight (4, 2) vs (3, 2), 0.bias (4,) vs (3,), 1.weight (1, 4) vs (1, 3)"
    )


def test_resumed_log_writes_the_row_at_the_resume_step_itself(tmp_path: Path) -> None:
    """File rows at step >= S are cut and log calls below S skipped, but a call at exactly S is written."""
    (tmp_path / "logs").mkdir()
    metrics = tmp_path / "logs" / "metrics.csv"
    metrics.write_text("epoch,step,train/loss\n0,7,3.9\n1,15,3.5\n1,16,3.4\n")
    logger = ResumableCSVLogger(tmp_path, name="logs", version="", resume_step=16)
    logger.log_metrics({"train/loss": 9.0, "epoch": 1}, step=15)  # already in the file: skipped
    logger.log_metrics({"train/loss": 3.3, "epoch": 1}, step=16)
    logger.save()
    assert _csv_rows(metrics) == [
        {"epoch": "0", "step": "7", "train/loss": "3.9"},
        {"epoch": "1", "step": "15", "train/loss": "3.5"},
        {"epoch": "1", "step": "16", "train/loss": "3.3"},
    ]


def test_resuming_before_any_metrics_csv_exists_writes_rows_normally(tmp_path: Path) -> None:
    """A resume whose run never saved metrics.csv (killed before the first log) must not fail reading it."""
    logger = ResumableCSVLogger(tmp_path, name="logs", version="", resume_step=8)
    logger.log_metrics({"train/loss": 2.5, "epoch": 1}, step=8)
    logger.log_metrics({"train/loss": 2.25, "epoch": 1}, step=9)
    logger.save()
    metrics = tmp_path / "logs" / "metrics.csv"
    assert metrics.read_text().splitlines() == ["epoch,step,train/loss", "1,8,2.5", "1,9,2.25"]
