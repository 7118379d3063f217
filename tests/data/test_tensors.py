"""contrastive.data.tensors and the built-in shapes set: validation, subsets, class selection, warnings."""

from __future__ import annotations

import pytest
import torch

from contrastive.data import DataError, ImageTensors, Splits, shapes


def test_shapes_is_balanced_deterministic_uint8() -> None:
    a, b = shapes(num_train=200, num_test=100, seed=3), shapes(num_train=200, num_test=100, seed=3)
    assert a.train.images.dtype == torch.uint8 and a.train.images.shape == (200, 3, 32, 32)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert a.train.labels.bincount().tolist() == [20] * 10
    assert not torch.equal(a.train.images, shapes(num_train=200, num_test=100, seed=4).train.images)


def test_labels_out_of_range_name_the_index() -> None:
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(DataError, match="label 7 at index 2"):
        ImageTensors(images, torch.tensor([0, 1, 7, 1]), num_classes=3)
    with pytest.raises(DataError, match="uint8"):
        ImageTensors(images.float(), torch.tensor([0, 1, 2, 1]), num_classes=3)


def test_subset_is_seeded_and_capped() -> None:
    data = shapes(num_train=100, num_test=10).train
    s1, s2 = data.subset(30, seed=1), data.subset(30, seed=1)
    assert len(s1) == 30 and torch.equal(s1.images, s2.images)
    assert data.subset(None) is data and data.subset(1000) is data


def test_select_classes_relabels() -> None:
    s: Splits = shapes(num_train=100, num_test=10)
    part = s.train.select_classes([5, 6, 7])
    assert part.num_classes == 3 and set(part.labels.tolist()) == {0, 1, 2}
    assert len(part) == 30 and part.class_names == ["triangle", "x", "frame"]


def test_the_cli_logs_data_warnings_as_one_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import warnings

    from contrastive.cli.shell import log_data_warnings
    from contrastive.data import DataWarning

    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, category, *a, **k: shown.append(category))
    log_data_warnings()
    with caplog.at_level("WARNING", logger="contrastive"):
        warnings.showwarning(DataWarning("test/ holds 2 class folder(s) that train/ lacks"), DataWarning, "f.py", 1)
        warnings.showwarning(RuntimeWarning("something else"), RuntimeWarning, "f.py", 1)
    assert [r.getMessage() for r in caplog.records] == ["test/ holds 2 class folder(s) that train/ lacks"]
    assert shown == [RuntimeWarning]  # other warnings as Python shows them
