"""Unlabelled image folders: listing, the stored size rule, unreadable files, and the cache's file index."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from contrastive.data import DataError, unlabelled_folder, unlabelled_splits
from contrastive.data import folders as folders_module
from contrastive.data import unlabelled as unlabelled_module


def _solid(path: Path, size: tuple[int, int], colour: tuple[int, ...] | int, mode: str = "RGB", **save: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, **save)  # type: ignore[arg-type]


def _write_mixed(root: Path) -> dict[str, tuple[int, int, int]]:
    """A nested folder of every kind of file; returns each readable image's expected stored colour."""
    expected = {
        "a.png": (200, 10, 10),
        "sub/b.jpg": (10, 200, 10),
        "sub/deeper/c.bmp": (10, 10, 200),
        "sub/deeper/d.tif": (90, 90, 30),
        "e.webp": (120, 60, 30),
        "grey.png": (77, 77, 77),
        "rgba.png": (30, 60, 90),
        "grey16.png": (128, 128, 128),
    }
    _solid(root / "a.png", (40, 30), (200, 10, 10))
    _solid(root / "sub" / "b.jpg", (17, 64), (10, 200, 10), quality=100)
    _solid(root / "sub" / "deeper" / "c.bmp", (12, 12), (10, 10, 200))
    _solid(root / "sub" / "deeper" / "d.tif", (50, 8), (90, 90, 30))
    _solid(root / "e.webp", (33, 21), (120, 60, 30), lossless=True)
    _solid(root / "grey.png", (20, 25), 77, mode="L")
    _solid(root / "rgba.png", (20, 20), (30, 60, 90, 128), mode="RGBA")
    Image.fromarray(np.full((9, 11), 32768, np.uint16)).save(root / "grey16.png")  # 16-bit: 128, not 255
    # unreadable: a JPEG cut short, text under an image suffix; ignored: hidden files and folders, other suffixes
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    noise.save(root / "sub" / "full.jpg", quality=95)
    data = (root / "sub" / "full.jpg").read_bytes()
    (root / "sub" / "full.jpg").unlink()
    (root / "sub" / "cut.jpg").write_bytes(data[: len(data) // 3])
    (root / "notes.png").write_text("not an image")
    (root / "readme.txt").write_text("ignored: not an image suffix")
    _solid(root / ".hidden.png", (8, 8), (1, 2, 3))
    _solid(root / ".thumbnails" / "x.png", (8, 8), (1, 2, 3))
    _solid(root / "sub" / "._b.jpg", (8, 8), (1, 2, 3))
    return expected


def test_every_image_nested_any_format_in_the_stored_size(tmp_path: Path) -> None:
    expected = _write_mixed(tmp_path)
    got = unlabelled_folder(str(tmp_path), size=8, progress=False)
    assert got.paths == sorted(expected)
    assert got.images.dtype == torch.uint8 and got.images.shape == (len(expected), 3, 8, 8)
    for path, image in zip(got.paths, got.images):
        assert image.float().mean((1, 2)).round().tolist() == pytest.approx(expected[path], abs=2), path
    assert [s.split(": ")[0] for s in got.skipped] == ["notes.png", "sub/cut.jpg"]
    assert "not an image" in got.skipped[0] and "truncated JPEG" in got.skipped[1]
    # the cache is the same images, memory-mapped
    cache = tmp_path / ".contrastive_unlabelled_8"
    index = json.loads((cache / "index.json").read_text())
    rows = np.load(cache / index["images"], mmap_mode="r")
    assert isinstance(rows, np.memmap) and np.array_equal(rows[: len(got.paths)], got.images.numpy())
    assert torch.equal(unlabelled_folder(str(tmp_path), size=8, cache=False, progress=False).images, got.images)


def test_stored_size_rule_shorter_side_then_centre_crop(tmp_path: Path) -> None:
    bands = np.zeros((20, 100, 3), np.uint8)  # wide: red | green (the middle 40 columns) | blue
    bands[:, :30, 0] = bands[:, 30:70, 1] = bands[:, 70:, 2] = 255
    Image.fromarray(bands).save(tmp_path / "wide.png")
    Image.fromarray(bands.transpose(1, 0, 2).copy()).save(tmp_path / "tall.png")  # red / green / blue from the top
    got = unlabelled_folder(str(tmp_path), size=10, progress=False)
    # shorter side 20 -> 10, the other 100 -> 50, green at 15..35; the centre 10 x 10 (20..30) is all green.
    # Squashed to 10 x 10 instead, the image would keep its red and blue.
    for image in got.images:
        assert image[1].min() >= 250 and image[0].max() <= 5 and image[2].max() <= 5


def test_second_start_lists_nothing_and_a_changed_file_is_noticed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_mixed(tmp_path)
    first = unlabelled_folder(str(tmp_path), size=8, progress=False)
    reads: list[str] = []
    real_read = folders_module._read_rgb

    def counted_read(file: Path) -> torch.Tensor:
        reads.append(Path(file).name)
        return real_read(file)

    monkeypatch.setattr(folders_module, "_read_rgb", counted_read)

    def no_listing(*args: object) -> list[Path]:
        raise AssertionError("listed the folder although nothing changed")

    monkeypatch.setattr(unlabelled_module, "_image_files", no_listing)
    again = unlabelled_folder(str(tmp_path), size=8, progress=False)
    assert again.paths == first.paths and torch.equal(again.images, first.images) and again.skipped == first.skipped
    assert reads == []
    monkeypatch.undo()
    monkeypatch.setattr(folders_module, "_read_rgb", counted_read)
    # rewrite one image (same folder: the folder's mtime need not move) with a new colour and mtime
    target = tmp_path / "sub" / "deeper" / "c.bmp"
    _solid(target, (12, 12), (250, 250, 0))
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = unlabelled_folder(str(tmp_path), size=8, progress=False)
    assert reads == ["c.bmp"]  # only the changed file is decoded again
    row = changed.paths.index("sub/deeper/c.bmp")
    assert changed.images[row].float().mean((1, 2)).round().tolist() == [250, 250, 0]
    others = [i for i in range(len(changed.paths)) if i != row]
    assert torch.equal(changed.images[others], first.images[others])
    # a file added to a folder moves that folder's mtime: listed again, only the new file decoded
    reads.clear()
    _solid(tmp_path / "sub" / "new.png", (9, 9), (5, 6, 7))
    os.utime(tmp_path / "sub", ns=(0, (tmp_path / "sub").stat().st_mtime_ns + 10**9))
    added = unlabelled_folder(str(tmp_path), size=8, progress=False)
    assert reads == ["new.png"] and "sub/new.png" in added.paths and len(added.paths) == len(first.paths) + 1
    assert len(list((tmp_path / ".contrastive_unlabelled_8").glob("images-*.npy"))) == 1  # the old rows are gone


def test_empty_or_unreadable_roots_are_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        unlabelled_folder(str(tmp_path / "missing"), progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="holds no image files"):
        unlabelled_folder(str(tmp_path / "empty"), progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"none of the 1 image files .* can be read .*x.jpg: an empty file"):
        unlabelled_folder(str(tmp_path / "bad"), progress=False)


def test_unlabelled_splits_sizes_no_classifier_by_image_count(tmp_path: Path) -> None:
    from contrastive.data import shapes

    for i in range(5):
        _solid(tmp_path / f"{i}.png", (30, 20), (i * 40, 0, 0))
    images = unlabelled_folder(str(tmp_path), size=12, progress=False)
    alone = unlabelled_splits(images, None, image_size=8)
    assert not alone.labelled and not alone.evaluated and alone.num_classes == 1
    assert alone.train.images.shape == (5, 3, 12, 12) and alone.test.images.shape == (5, 3, 8, 8)  # monitor sample
    labelled = shapes(num_train=30, num_test=10, size=16)
    evaluated = unlabelled_splits(images, labelled, image_size=8)
    assert evaluated.evaluated and evaluated.num_classes == 10 and evaluated.bank is not None
    assert evaluated.bank.images.shape == (30, 3, 8, 8) and evaluated.test.images.shape == (10, 3, 8, 8)
    with pytest.raises(DataError, match="data.stored_size >= data.image_size"):
        unlabelled_splits(images, None, image_size=16)


def test_listing_counts_the_files_it_finds_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The walk has no total: a bar counting files, shown on a terminal only (as the decode bar)."""
    from contrastive.data.folders import _image_files

    for i, sub in enumerate(["a", "a/b", "c"]):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
        (tmp_path / sub / f"{i}.png").write_bytes(b"")
    (tmp_path / "c" / "notes.txt").write_text("not an image")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, shown in [(Terminal(), True), (io.StringIO(), False)]:
        monkeypatch.setattr(sys, "stderr", stream)
        assert len(_image_files(tmp_path, progress="list")) == 3
        assert ("list: 3file" in stream.getvalue()) == shown, stream.getvalue()
