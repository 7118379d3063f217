"""contrastive.data.cifar: the CIFAR pickle batches read bitwise, md5 sums, missing and damaged files."""

from __future__ import annotations

import hashlib
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from contrastive.data import DataError, DataWarning, cifar10, cifar100


def test_cifar10_missing_names_path_and_override(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        cifar10(str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in msg
    assert "data.root=" in msg and "data.download=true" in msg


def test_cifar10_copy_with_other_checksums_loads_with_warning(tmp_path: Path, fake_cifar10) -> None:
    fake_cifar10(tmp_path, n_train=50, n_test=20)
    with pytest.warns(UserWarning, match="checksums differ"):
        splits = cifar10(str(tmp_path))
    assert splits.train.images.shape == (50, 3, 32, 32) and len(splits.test) == 20
    assert splits.num_classes == 10 and splits.train.class_names[0] == "airplane"


def test_cifar10_incomplete_folder(tmp_path: Path, fake_cifar10) -> None:
    fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with warnings.catch_warnings(), pytest.raises(DataError, match="data_batch_3"):
        warnings.simplefilter("ignore")
        cifar10(str(tmp_path))


@pytest.mark.parametrize("name", ["data_batch_3", "batches.meta", "test_batch"])
def test_a_damaged_cifar10_file_is_named(tmp_path: Path, fake_cifar10, name: str) -> None:
    """A truncated batch said only 'pickle data was truncated', garbage meta 'invalid literal for int()'."""
    fake_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / name
    path.write_bytes(path.read_bytes()[:100] if name != "batches.meta" else b"garbage\n")
    with warnings.catch_warnings(), pytest.raises(DataError) as error:
        warnings.simplefilter("ignore")
        cifar10(str(tmp_path))
    assert str(error.value).startswith(f"cannot read {path} (")
    assert str(error.value).endswith("): the file is damaged; replace it, or cifar-10-batches-py/, with a fresh copy")


def _write_cifar(root: Path, layout: dict[str, int], meta: tuple[str, str], label_key: str, seed: int = 0) -> dict:
    """Pickled batches named and sized by ``layout`` (file -> images) with random pixels and labels in
    torchvision's layout under ``root``; returns what each file holds."""
    rng = np.random.default_rng(seed)
    written = {}
    for name, n in layout.items():
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: rng.integers(0, 10, n).tolist()}
        (root / name).write_bytes(pickle.dumps(batch))
        written[name] = batch
    names = [f"class{i}" for i in range(10)]
    (root / meta[0]).write_bytes(pickle.dumps({meta[1]: names, "num_vis": 3072}))
    return {"batches": written, "names": names}


def _expected(batches: list[dict], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Image ``i``, channel ``c``, pixel ``(y, x)`` is byte ``c * 1024 + y * 32 + x`` of row ``i``, by hand."""
    rows = np.concatenate([b["data"] for b in batches])
    images = torch.empty(len(rows), 3, 32, 32, dtype=torch.uint8)
    for c in range(3):
        for y in range(32):
            images[:, c, y] = torch.from_numpy(rows[:, c * 1024 + y * 32 : c * 1024 + (y + 1) * 32])
    return images, torch.tensor([label for b in batches for label in b[label_key]], dtype=torch.int64)


def test_cifar10_batches_are_read_bitwise_and_a_rebuilt_copy_warns_once(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    layout = {
        "data_batch_1": 7,
        "data_batch_2": 3,
        "data_batch_3": 5,
        "data_batch_4": 1,
        "data_batch_5": 4,
        "test_batch": 6,
    }
    made = _write_cifar(folder, layout, ("batches.meta", "label_names"), "labels")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = cifar10(str(tmp_path))
    assert [(w.category, str(w.message)) for w in caught] == [
        (DataWarning, f"{folder}: checksums differ from the official archive; using this copy as is")
    ]
    train = [made["batches"][f"data_batch_{i}"] for i in range(1, 6)]
    for part, batches in ((splits.train, train), (splits.test, [made["batches"]["test_batch"]])):
        images, labels = _expected(batches, "labels")
        assert part.images.dtype == torch.uint8 and part.images.is_contiguous()
        assert torch.equal(part.images, images) and part.labels.dtype == torch.int64
        assert torch.equal(part.labels, labels)
        assert part.num_classes == 10 and part.class_names == made["names"]


def test_cifar10_copy_with_the_official_checksums_loads_silently(
    tmp_path: Path, fake_cifar10, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision.datasets import CIFAR10

    fake_cifar10(tmp_path, n_train=10, n_test=4)
    folder = tmp_path / "cifar-10-batches-py"

    def md5s(files: list[list[str]]) -> list[list[str]]:  # these files' sums taken as the official ones
        return [[name, hashlib.md5((folder / name).read_bytes()).hexdigest()] for name, _ in files]

    monkeypatch.setattr(CIFAR10, "train_list", md5s(CIFAR10.train_list))
    monkeypatch.setattr(CIFAR10, "test_list", md5s(CIFAR10.test_list))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        splits = cifar10(str(tmp_path))
    assert len(splits.train) == 10 and len(splits.test) == 4


def test_cifar100_reads_its_fine_labels_and_names(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    made = _write_cifar(folder, {"train": 9, "test": 5}, ("meta", "fine_label_names"), "fine_labels", seed=1)
    with pytest.warns(DataWarning, match="checksums differ"):
        splits = cifar100(str(tmp_path))
    for part, name in ((splits.train, "train"), (splits.test, "test")):
        images, labels = _expected([made["batches"][name]], "fine_labels")
        assert torch.equal(part.images, images) and torch.equal(part.labels, labels)
        assert part.class_names == made["names"]
    with pytest.raises(DataError, match=r"CIFAR100 under .*cifar-100-python is incomplete: missing \[.*/test'\]"):
        (folder / "test").unlink()
        cifar100(str(tmp_path))


@pytest.mark.slow
def test_cifar10_matches_torchvisions_reader_on_the_shared_copy(
    cifar10_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rebuilt CIFAR-10 (Python 2 pickles, as the official files) as torchvision reads it, md5 check off."""
    import torchvision.datasets.cifar
    from torchvision.datasets import CIFAR10

    with pytest.warns(DataWarning, match="checksums differ"):
        splits = cifar10(str(cifar10_root))
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    for part, train in ((splits.train, True), (splits.test, False)):
        reference = CIFAR10(str(cifar10_root), train=train)
        assert torch.equal(part.images, torch.from_numpy(reference.data).permute(0, 3, 1, 2))
        assert part.labels.tolist() == reference.targets and part.class_names == reference.classes
