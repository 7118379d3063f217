"""STL-10's binary layout, on tiny files written as torchvision reads them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import STL10_NAMES as NAMES
from conftest import write_fake_stl10

from contrastive.data import DataError, stl10


def test_reads_what_torchvision_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import STL10

    written = write_fake_stl10(tmp_path)
    monkeypatch.setattr(STL10, "_check_integrity", lambda self: True)  # our tiny files lack the archive's md5 sums
    splits = stl10(str(tmp_path), unlabelled=False)
    assert splits.labelled and splits.train.class_names == NAMES and splits.num_classes == 10
    for ours, split in ((splits.train, "train"), (splits.test, "test")):
        reference = STL10(str(tmp_path), split=split)
        assert np.array_equal(ours.images.numpy(), reference.data)  # (N, 3, H, W), rows and columns right
        assert np.array_equal(ours.images.numpy(), written[split])
        assert ours.labels.tolist() == reference.labels.tolist() == written[f"{split}_y"].tolist()


def test_train_and_unlabeled_for_training_labelled_splits_for_evaluation(tmp_path: Path) -> None:
    written = write_fake_stl10(tmp_path)
    splits = stl10(str(tmp_path))
    assert not splits.labelled and splits.evaluated and splits.num_classes == 10
    assert splits.train.images.shape == (11, 3, 96, 96) and splits.train.num_classes == 1
    assert torch.equal(splits.train.images, torch.from_numpy(np.concatenate([written["train"], written["unlabeled"]])))
    assert splits.bank is not None and torch.equal(splits.bank.images, torch.from_numpy(written["train"]))
    assert splits.test.labels.tolist() == written["test_y"].tolist()


def test_missing_or_damaged_files_are_named(tmp_path: Path) -> None:
    write_fake_stl10(tmp_path)
    (tmp_path / "stl10_binary" / "unlabeled_X.bin").unlink()
    assert len(stl10(str(tmp_path), unlabelled=False).train) == 6  # not needed without the unlabelled images
    with pytest.raises(DataError, match=r"lacks unlabeled_X.bin.*data.download=true"):
        stl10(str(tmp_path))
    (tmp_path / "stl10_binary" / "test_X.bin").write_bytes(b"\x00" * 1000)
    with pytest.raises(DataError, match="not a whole number of 3 x 96 x 96 images"):
        stl10(str(tmp_path), unlabelled=False)
