"""contrastive.data.folders: image folders decoded, resized, cached, locked; errors that name the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from contrastive.data import DataError


def _write_folder(root: Path, classes: dict[str, int], size: int = 20) -> None:
    import torchvision

    for split in ("train", "test"):
        for i, (name, n) in enumerate(classes.items()):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for j in range(n):
                img = torch.full((3, size, size + 4), 40 * i + j, dtype=torch.uint8)
                torchvision.io.write_png(img, str(root / split / name / f"{j}.png"))


def test_image_folder_decodes_resizes_and_caches(tmp_path: Path) -> None:
    from contrastive.data import image_folder

    _write_folder(tmp_path, {"cat": 3, "dog": 2})
    splits = image_folder(str(tmp_path), size=16)
    assert splits.train.images.shape == (5, 3, 16, 16) and splits.train.class_names == ["cat", "dog"]
    assert splits.train.labels.tolist() == [0, 0, 0, 1, 1]
    assert int(splits.train.images[3, 0, 5, 5]) == 40  # first dog image, constant value kept by resize
    assert (tmp_path / ".contrastive_cache_16.pt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".contrastive_cache_16.pt", "test", "train"]  # no .lock
    again = image_folder(str(tmp_path), size=16)
    assert torch.equal(again.train.images, splits.train.images)


def test_image_folder_errors_name_the_problem(tmp_path: Path) -> None:
    from contrastive.data import image_folder

    with pytest.raises(DataError, match="image folder not found"):
        image_folder(str(tmp_path / "missing"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders"):
        image_folder(str(tmp_path / "empty"))
    (tmp_path / "empty" / "train" / "cat").mkdir()
    with pytest.raises(DataError, match="image folder not found: .*empty/test"):
        image_folder(str(tmp_path / "empty"))
    (tmp_path / "empty" / "test" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        image_folder(str(tmp_path / "empty"))
    _write_folder(tmp_path / "bad", {"cat": 2})
    (tmp_path / "bad" / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot read image .*broken.jpg"):
        image_folder(str(tmp_path / "bad"), cache=False)
    # an empty class folder of train/ was a class no image could teach (the num_classes hint then asked for it)
    _write_folder(tmp_path / "hollow", {"cat": 2, "dog": 1})
    (tmp_path / "hollow" / "train" / "emptyclass").mkdir()
    for cache in (False, True):
        with pytest.raises(DataError) as error:
            image_folder(str(tmp_path / "hollow"), cache=cache)
        assert str(error.value) == (
            f"1 class folder(s) of {tmp_path / 'hollow' / 'train'} hold no images "
            "(emptyclass): remove them or add images"
        )
    (tmp_path / "hollow" / "train" / "emptyclass").rmdir()
    assert image_folder(str(tmp_path / "hollow")).train.class_names == ["cat", "dog"]
    (tmp_path / "hollow" / "test" / "cat" / "0.png").unlink()  # a test split without one class's images is fine
    (tmp_path / "hollow" / "test" / "cat" / "1.png").unlink()
    assert image_folder(str(tmp_path / "hollow"), cache=False).test.labels.tolist() == [1]


def _write_noise_folder(root: Path, per_class: int) -> None:
    """Two classes of distinct random-noise PNGs (any mix-up of order or label shows)."""
    import torchvision

    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                img = torch.randint(0, 256, (3, 9, 11), dtype=torch.uint8, generator=g)
                torchvision.io.write_png(img, str(root / split / name / f"{j:02d}.png"))


def test_image_folder_threaded_decode_matches_one_file_at_a_time(tmp_path: Path) -> None:
    from torchvision.transforms.v2.functional import resize

    from contrastive.data.folders import _image_files, _read_rgb, image_folder

    _write_noise_folder(tmp_path, per_class=12)
    files = [f for name in ("a", "b") for f in _image_files(tmp_path / "train" / name)]
    expected = torch.stack([resize(_read_rgb(f), [6, 6], antialias=True) for f in files])
    for workers in (1, 4, None):
        splits = image_folder(str(tmp_path), size=6, cache=False, workers=workers)
        assert torch.equal(splits.train.images, expected), workers
        assert splits.train.labels.tolist() == [0] * 12 + [1] * 12
    with pytest.raises(ValueError, match="workers must be >= 1"):
        image_folder(str(tmp_path), size=6, cache=False, workers=0)


def test_image_folder_decodes_files_concurrently(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import contrastive.data.folders as data

    _write_noise_folder(tmp_path, per_class=2)
    barrier, read = threading.Barrier(2, timeout=10), data._read_rgb

    def read_in_pairs(file: Path) -> torch.Tensor:  # passes only when two files are read at once
        barrier.wait()
        return read(file)

    monkeypatch.setattr(data, "_read_rgb", read_in_pairs)
    assert len(data.image_folder(str(tmp_path), size=4, cache=False, workers=2).train) == 4


def test_image_folder_threaded_decode_names_the_first_unreadable_file(tmp_path: Path) -> None:
    from contrastive.data import image_folder

    _write_noise_folder(tmp_path, per_class=6)
    for name in ("a/03.png", "b/01.png"):
        (tmp_path / "train" / name).write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*train/a/03\.png.*train/b/01\.png"):
        image_folder(str(tmp_path), size=4, cache=False, workers=4)


def test_image_folder_decodes_bmp_and_tiff_like_png(tmp_path: Path) -> None:
    from PIL import Image

    from contrastive.data import image_folder

    pixels = torch.randint(0, 256, (13, 17, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for split in ("train", "test"):
        for suffix in ("png", "bmp", "tif", "tiff"):
            (tmp_path / split / suffix).mkdir(parents=True)
            Image.fromarray(pixels.numpy()).save(tmp_path / split / suffix / f"a.{suffix}")
    splits = image_folder(str(tmp_path), size=8, cache=False)
    assert splits.train.class_names == ["bmp", "png", "tif", "tiff"]
    png = splits.train.images[1]
    for i in (0, 2, 3):
        assert torch.equal(splits.train.images[i], png), splits.train.class_names[i]


def test_image_folder_skips_hidden_appledouble_files(tmp_path: Path) -> None:
    from contrastive.data import image_folder

    _write_folder(tmp_path, {"cat": 2, "dog": 1})
    junk = bytes(torch.randint(0, 256, (64,), dtype=torch.uint8).tolist())  # not an image
    for split in ("train", "test"):
        (tmp_path / split / "cat" / "._0.png").write_bytes(junk)
    splits = image_folder(str(tmp_path), size=8, cache=False)
    assert len(splits.train.images) == 3 and splits.train.labels.tolist() == [0, 0, 1]


def test_image_folder_cache_follows_deleted_classes_and_renamed_files(tmp_path: Path) -> None:
    import os
    import shutil

    from contrastive.data import image_folder

    _write_folder(tmp_path, {"cat": 2, "dog": 2, "owl": 1})
    cache_file = tmp_path / ".contrastive_cache_8.pt"
    assert image_folder(str(tmp_path), size=8).train.num_classes == 3
    for split in ("train", "test"):
        shutil.rmtree(tmp_path / split / "owl")
    splits = image_folder(str(tmp_path), size=8)
    assert splits.train.num_classes == 2 and splits.train.class_names == ["cat", "dog"]
    assert splits.test.labels.tolist() == [0, 0, 1, 1]
    assert torch.load(cache_file, weights_only=True)["names"] == ["cat", "dog"]  # rebuilt
    # Move a file to another class, mtimes untouched (and older than the cache): detected too.
    src, dst = tmp_path / "train" / "cat" / "0.png", tmp_path / "train" / "dog" / "9.png"
    st = src.stat()
    src.rename(dst)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert image_folder(str(tmp_path), size=8).train.labels.tolist() == [0, 1, 1, 1]


def test_image_folder_rebuilds_cache_without_fingerprint(tmp_path: Path) -> None:
    from contrastive.data import image_folder
    from contrastive.io import save_torch_atomic

    _write_folder(tmp_path, {"cat": 1, "dog": 1})
    stale = {"images": torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "labels": torch.zeros(1, dtype=torch.long)}
    save_torch_atomic({"names": ["old"], "train": stale, "test": stale}, tmp_path / ".contrastive_cache_8.pt")
    splits = image_folder(str(tmp_path), size=8)
    assert splits.train.class_names == ["cat", "dog"] and len(splits.train.images) == 2
    (tmp_path / ".contrastive_cache_8.pt").write_bytes(b"PK\x03\x04 cut short")  # unreadable: rebuilt too
    assert image_folder(str(tmp_path), size=8).train.class_names == ["cat", "dog"]


def test_image_folder_scales_16_bit_and_takes_first_gif_frame(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from contrastive.data import image_folder

    grey16 = np.full((6, 6), 32768, np.uint16)  # mid-grey at 16 bits: 128 at 8 bits, not clipped to 255
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(grey16).save(tmp_path / split / "a" / "grey16.png")
        Image.fromarray(grey16).save(tmp_path / split / "a" / "grey16.tif")
        Image.fromarray(np.full((6, 6, 3), 7, np.uint8)).save(tmp_path / split / "a" / "rgb8.png")
        frames = [Image.fromarray(np.full((6, 6, 3), v, np.uint8)) for v in (200, 30, 90)]
        frames[0].save(tmp_path / split / "a" / "anim.gif", save_all=True, append_images=frames[1:])
    splits = image_folder(str(tmp_path), size=4, cache=False)
    assert splits.train.images.dtype == torch.uint8 and splits.train.images.shape == (4, 3, 4, 4)
    # sorted: anim.gif, grey16.png, grey16.tif, rgb8.png
    assert [int(img.float().mean()) for img in splits.train.images] == [200, 128, 128, 7]


def test_image_folder_reads_nested_class_folders(tmp_path: Path) -> None:
    import torchvision

    from contrastive.data import image_folder

    _write_folder(tmp_path, {"cat": 1, "dog": 1})
    img = torch.full((3, 5, 5), 99, dtype=torch.uint8)
    for sub in ("2024/jan", ".thumbnails"):  # a subfolder is read (as ImageFolder does), a hidden one not
        (tmp_path / "train" / "cat" / sub).mkdir(parents=True)
        torchvision.io.write_png(img, str(tmp_path / "train" / "cat" / sub / "x.png"))
    splits = image_folder(str(tmp_path), size=4)
    assert splits.train.labels.tolist() == [0, 0, 1]
    assert int(splits.train.images[1].float().mean()) == 99  # cat/2024/jan/x.png sorts after cat/0.png
    (tmp_path / "train" / "cat" / "2024" / "jan" / "x.png").unlink()  # the cache follows nested files too
    assert image_folder(str(tmp_path), size=4).train.labels.tolist() == [0, 1]


def test_image_folder_labels_test_only_classes_after_the_training_classes(tmp_path: Path) -> None:
    import shutil

    from contrastive.data import image_folder

    _write_folder(tmp_path, {"cat": 1, "dog": 2, "ant": 1, "bee": 3})
    for name in ("ant", "bee"):  # class-disjoint layout: ant, bee only in test/, cat only in train/
        shutil.rmtree(tmp_path / "train" / name)
    shutil.rmtree(tmp_path / "test" / "cat")
    # contrastive-train says how to set up class-disjoint retrieval for them (tests/test_cli_output.py)
    splits = image_folder(str(tmp_path), size=4)
    assert splits.train.class_names == splits.test.class_names == ["cat", "dog", "ant", "bee"]
    assert splits.train.labels.tolist() == [0, 1, 1]
    assert splits.test.labels.tolist() == [1, 1, 2, 3, 3, 3]
    assert image_folder(str(tmp_path), size=4).test.labels.tolist() == [1, 1, 2, 3, 3, 3]  # from the cache
    test = splits.test.select_classes([1, 2, 3])
    assert test.class_names == ["dog", "ant", "bee"] and test.labels.tolist() == [0, 0, 1, 2, 2, 2]


def test_image_folder_trains_without_cache_when_root_is_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import contrastive.io
    from contrastive.data import image_folder

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / ".contrastive_cache_4.pt.tmp"))

    _write_folder(tmp_path, {"cat": 2})
    monkeypatch.setattr(contrastive.io, "save_torch_atomic", refuse)
    with pytest.warns(UserWarning, match="could not write the decoded-image cache .*Permission denied.*cache=false"):
        splits = image_folder(str(tmp_path), size=4)
    assert len(splits.train) == 2 and not (tmp_path / ".contrastive_cache_4.pt").exists()


def _decode_at_once(rank: int, root: str, scratch: str) -> None:
    """A process of :func:`test_processes_started_together_decode_the_folder_once`."""
    import time

    import contrastive.data.folders as data_mod

    decode = data_mod._decode_folder

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        with open(Path(scratch) / "decodes.log", "a") as f:
            f.write(f"{rank}\n")
        time.sleep(1.0)  # long enough for the other process to look for the cache meanwhile
        return decode(*args, **kwargs)

    data_mod._decode_folder = counted
    (Path(scratch) / f"ready{rank}").touch()
    while not all((Path(scratch) / f"ready{r}").exists() for r in range(2)):  # start together
        time.sleep(0.01)
    splits = data_mod.image_folder(root, size=8)
    torch.save(splits.train.images, Path(scratch) / f"train{rank}.pt")


@pytest.mark.slow
def test_processes_started_together_decode_the_folder_once(tmp_path: Path) -> None:
    """Two processes (two ranks under torchrun) load a new image folder at the same moment: one decodes
    (train and test: 2 calls) and writes the cache, the other waits for the lock and loads the cache."""
    import torch.multiprocessing as mp

    root, scratch = tmp_path / "data", tmp_path / "scratch"
    _write_folder(root, {"cat": 3, "dog": 2})
    scratch.mkdir()
    mp.start_processes(_decode_at_once, args=(str(root), str(scratch)), nprocs=2, join=True, start_method="spawn")
    decoders = (scratch / "decodes.log").read_text().split()
    assert len(decoders) == 2 and len(set(decoders)) == 1, decoders
    assert torch.equal(torch.load(scratch / "train0.pt"), torch.load(scratch / "train1.pt"))


def test_image_folder_works_where_the_lock_cannot_be_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import contrastive.data.folders as folders
    from contrastive.data import image_folder

    _write_folder(tmp_path, {"cat": 2})
    monkeypatch.setattr(folders, "_open_lock", lambda path: None)  # as where the folder is read-only
    assert len(image_folder(str(tmp_path), size=4).train) == 2
    assert (tmp_path / ".contrastive_cache_4.pt").is_file()


def test_one_pass_names_every_unreadable_file_in_the_projects_words(tmp_path: Path) -> None:
    """Bad files were reported one per run (fix, rerun, meet the next), in torchvision's words: its C++
    source path and "only jpeg, png, webp and gif", though BMP and TIFF are read."""
    import numpy as np
    from PIL import Image

    from contrastive.data import image_folder

    _write_folder(tmp_path, {"cat": 2, "dog": 2})
    png = (tmp_path / "train" / "cat" / "0.png").read_bytes()
    (tmp_path / "train" / "cat" / "cut.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "train" / "dog" / "empty.jpg").write_bytes(b"")
    (tmp_path / "test" / "dog" / "notes.tif").write_bytes(b"not an image")
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / "test" / "cat" / "bmp.jpg", format="BMP")
    with pytest.raises(DataError) as error:
        image_folder(str(tmp_path), size=4)
    listing = tmp_path / ".contrastive_unreadable.txt"
    assert listing.read_text().splitlines() == [
        f"{tmp_path}/train/cat/cut.png: a damaged or truncated PNG image",
        f"{tmp_path}/train/dog/empty.jpg: an empty file (0 bytes)",
        f"{tmp_path}/test/dog/notes.tif: not an image in a format read here (JPEG, PNG, WebP, GIF, BMP, TIFF)",
    ]  # the BMP saved as .jpg is read (Pillow, after torchvision)
    assert str(error.value) == (
        f"cannot read image files: 3 of the 12 under {tmp_path}: "
        + "; ".join(listing.read_text().splitlines())
        + f". The full list is in {listing}: remove or replace those files, then run again"
    )
    assert "csrc" not in str(error.value) and "only jpeg" not in str(error.value).lower()
    for name in ("train/cat/cut.png", "train/dog/empty.jpg", "test/dog/notes.tif"):
        (tmp_path / name).unlink()
    assert len(image_folder(str(tmp_path), size=4).test) == 5 and not listing.exists()  # the stale list goes


def test_the_cache_lock_excludes_and_leaves_no_file(tmp_path: Path) -> None:
    """The lock file is removed after use; a process that waited on the removed file locks the path anew,
    so two never hold it at once (threads here: flock locks are per open file, as between processes)."""
    import threading
    import time

    from contrastive.data.folders import _cache_lock

    cache = tmp_path / ".contrastive_cache_8.pt"
    inside, most, lock = [0], [0], threading.Lock()

    def take() -> None:
        for _ in range(20):
            with _cache_lock(cache):
                with lock:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                time.sleep(0.001)
                with lock:
                    inside[0] -= 1

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and list(tmp_path.iterdir()) == []
