"""Unlabelled images: every image under a folder, recursively, decoded once into a memory-mapped cache.

Stored size rule: each image's shorter side is resized to ``S`` (antialiased), then its centre
``S x S`` is kept, so the aspect ratio is never distorted and random-resized crops of the stored image
see the detail of an ``S``-pixel shorter side. ``S`` (``data.stored_size``) must be at least the
training size (``data.image_size``); the augmentation crops and resizes to the training size.

The cache lives in ``root/.contrastive_unlabelled_<S>/``: ``images-<token>.npy`` (uint8
``(rows, 3, S, S)``, read with ``np.load(mmap_mode="c")``: pages come from the file as they are
touched, so loading makes no second copy in memory) and ``index.json``, which names that file and
lists every image's relative path, size and mtime, the folders walked with their mtimes, and the
files that could not be read. A second start stats the indexed files and folders and lists nothing;
a changed file, or a folder whose mtime moved (a file added, removed or renamed in it), makes it list
again and decode only the files that are new or changed.
"""

from __future__ import annotations

import json
import logging
import secrets
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from contrastive.data.folders import IMAGE_SUFFIXES, _cache_lock, _image_files, decode_files
from contrastive.data.tensors import DataError, DataWarning, ImageTensors, Splits, seeded_indices

log = logging.getLogger(__name__)

INDEX_VERSION = 1


@dataclass
class FolderImages:
    """The images of a folder, unlabelled, with the files they came from.

    Attributes:
        images: uint8 (N, 3, S, S), memory-mapped from the cache where there is one.
        paths: (N,) each image's path relative to ``root`` (POSIX separators), sorted.
        root: the folder.
        skipped: ``"<path>: <why>"`` for every file with an image suffix that could not be read.
    """

    images: Tensor
    paths: list[str]
    root: Path
    skipped: list[str] = field(default_factory=list)


def stored_image(image: Tensor, size: int) -> Tensor:
    """The stored form of a decoded image (3, H, W): shorter side resized to ``size``, centre ``size x size``."""
    from torchvision.transforms.v2.functional import center_crop, resize

    return center_crop(resize(image, size, antialias=True), [size, size])


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _index_is_current(base: Path, index: dict[str, Any]) -> bool:
    """Whether every indexed folder and file still has its recorded mtime (and size): no listing."""
    try:
        return all(_stat(base / d)[1] == m for d, m in index["folders"].items()) and all(
            _stat(base / p) == s for p, s in index["files"].items()
        )
    except (OSError, KeyError, TypeError):
        return False


def _load_cache(cache_dir: Path, size: int) -> tuple[dict[str, Any], np.ndarray] | None:
    """The index and the memory-mapped rows of a cache, or None where there is none or it is damaged."""
    try:
        index = json.loads((cache_dir / "index.json").read_text())
        if index.get("version") != INDEX_VERSION or index.get("size") != size:
            return None
        rows = np.load(cache_dir / index["images"], mmap_mode="c")  # copy-on-write: torch wants it writable
        if rows.dtype != np.uint8 or rows.shape[1:] != (3, size, size) or len(rows) < len(index["paths"]):
            return None
        return index, rows
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _as_images(base: Path, index: dict[str, Any], rows: np.ndarray) -> FolderImages:
    images = torch.from_numpy(rows[: len(index["paths"])])
    return FolderImages(images, list(index["paths"]), base, list(index["skipped"]))


def unlabelled_folder(
    root: str, size: int = 32, cache: bool = True, workers: int | None = None, progress: bool = True
) -> FolderImages:
    """Every image under ``root`` (subfolders included, hidden files and folders skipped), unlabelled.

    Files with an image suffix (``IMAGE_SUFFIXES``) are decoded by ``workers`` threads (None: every
    core this process may use) into the stored size (module docstring) and cached in
    ``root/.contrastive_unlabelled_<size>/`` (``cache=False``: decoded every time, held in memory).
    Files that cannot be read (truncated, not an image) are left out and listed in ``skipped``; a
    folder where no image can be read is a :class:`DataError`. ``progress``: bars for indexing and decoding
    (where stderr is a terminal) and a log line for the listing.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"image folder not found: {base}. Point data.root at the folder that holds your images.")
    if size < 1:
        raise DataError(f"the stored image size must be >= 1 pixel, got {size}")
    cache_dir = base / f".contrastive_unlabelled_{size}"
    if cache:
        try:  # before the listing: making it moves root's mtime, which the index records
            cache_dir.mkdir(exist_ok=True)
        except OSError as e:
            warnings.warn(
                f"could not make the decoded-image cache {cache_dir} ({e}); the images will be decoded again "
                "next run. Pass data.source.images.cache=false to skip the cache.",
                DataWarning,
                stacklevel=2,
            )
            cache = False
    if not cache:
        return _build(base, size, workers, progress, None, None)
    with _cache_lock(cache_dir / "images"):  # the lock file inside the cache: root's mtime stays
        old = _load_cache(cache_dir, size)
        if old is not None and _index_is_current(base, old[0]):
            return _as_images(base, *old)
        return _build(base, size, workers, progress, old, cache_dir)


def _build(
    base: Path,
    size: int,
    workers: int | None,
    progress: bool,
    old: tuple[dict[str, Any], np.ndarray] | None,
    cache_dir: Path | None,
) -> FolderImages:
    """List ``base``, decode what the old cache lacks (or has stale), and write the new cache."""
    from tqdm import tqdm

    folders: list[Path] = []
    files = _image_files(base, folders, "list" if progress else None)
    if progress:
        log.info("listed %d image files in %d folders under %s", len(files), len(folders), base)
    listed = tqdm(files, desc="index", disable=None if progress else True, unit="file")  # None: on a terminal only
    stats = {f.relative_to(base).as_posix(): _stat(f) for f in listed}
    reuse: dict[str, int] = {}  # relative path -> row of the old cache holding it
    known_bad: dict[str, str] = {}  # relative path -> why it could not be read, for files unchanged since
    if old is not None:
        index, _ = old
        reuse = {p: i for i, p in enumerate(index["paths"]) if index["files"].get(p) == stats.get(p)}
        bad = (line.split(": ", 1) for line in index["skipped"])
        known_bad = {p: why for p, why in bad if index["files"].get(p) == stats.get(p)}
    known = reuse.keys() | known_bad.keys()
    fresh = [f for f in files if f.relative_to(base).as_posix() not in known]
    if not files:
        raise DataError(
            f"{base} holds no image files ({', '.join(IMAGE_SUFFIXES)}), in it or its subfolders: "
            "point data.root at the folder of your images"
        )
    # rows: the reused ones copied, the fresh ones decoded; written straight into the cache file
    rows_file = cache_dir / f"images-{secrets.token_hex(4)}.npy" if cache_dir is not None else None
    total = len(reuse) + len(fresh)
    rows: np.ndarray
    if rows_file is not None:
        rows = np.lib.format.open_memmap(rows_file, mode="w+", dtype=np.uint8, shape=(total, 3, size, size))
    else:
        rows = np.empty((total, 3, size, size), dtype=np.uint8)
    decoded = iter(decode_files(fresh, partial(stored_image, size=size), workers, True, "decode" if progress else None))
    paths, skipped, n = [], [], 0
    for f in files:  # fresh is files' subsequence, decoded in its order: one pass, no decoded set held in memory
        rel = f.relative_to(base).as_posix()
        if rel in known_bad:
            skipped.append(f"{rel}: {known_bad[rel]}")
            continue
        if rel in reuse:
            assert old is not None
            rows[n] = old[1][reuse[rel]]
        else:
            image = next(decoded)
            if isinstance(image, str):  # "<full path>: <why>"
                skipped.append(f"{rel}: {image.removeprefix(f'{f}: ')}")
                continue
            rows[n] = image.numpy()
        paths.append(rel)
        n += 1
    if not paths:
        raise DataError(
            f"none of the {len(files)} image files under {base} can be read (e.g. {skipped[0]}): "
            "point data.root at a folder of readable images"
        )
    index = {
        "version": INDEX_VERSION,
        "size": size,
        "paths": paths,
        "files": stats,  # the unreadable files too: each is decoded (and refused) again only once it changes
        "folders": {d.relative_to(base).as_posix(): _stat(d)[1] for d in folders},
        "skipped": skipped,
    }
    if rows_file is None:
        return FolderImages(torch.from_numpy(rows[:n]), paths, base, index["skipped"])
    assert cache_dir is not None and isinstance(rows, np.memmap)
    rows.flush()
    del rows
    _write_index(cache_dir, index | {"images": rows_file.name})
    for stale in cache_dir.glob("images-*.npy"):  # the earlier rows (still mapped by no one here)
        if stale != rows_file:
            stale.unlink(missing_ok=True)
    loaded = _load_cache(cache_dir, size)
    assert loaded is not None
    return _as_images(base, *loaded)


def _write_index(cache_dir: Path, index: dict[str, Any]) -> None:
    from contrastive.io import write_bytes_atomic

    write_bytes_atomic(cache_dir / "index.json", json.dumps(index).encode())


def unlabelled_splits(
    images: FolderImages, eval_set: Splits | Mapping | None = None, image_size: int | None = None, seed: int = 0
) -> Splits:
    """Training on unlabelled ``images``, evaluated on the labelled ``eval_set`` (or on nothing).

    The training split holds the images with label 0 of one class (no classifier is sized by them);
    ``eval_set``'s train split is the kNN memory bank and the probe's training set, its test split the
    queries; both are resized to ``image_size`` where their size differs. Without an ``eval_set`` the
    test split is a seeded sample of at most 1024 training images (the label-free monitors' sample).
    """
    from torchvision.transforms.v2.functional import resize

    if eval_set is not None and not isinstance(eval_set, Splits):
        if len(eval_set):  # eval_data=none composes to an empty mapping
            raise DataError(f"eval_set must be a labelled data set (Splits) or None, got {type(eval_set).__name__}")
        eval_set = None
    if image_size is not None and images.images.shape[-1] < image_size:
        raise DataError(
            f"the stored size {images.images.shape[-1]} is smaller than the training size {image_size}: "
            f"set data.stored_size >= data.image_size"
        )
    train = ImageTensors(images.images, torch.zeros(len(images.images), dtype=torch.long), 1, [])

    def sized(part: ImageTensors) -> ImageTensors:
        if image_size is None or part.images.shape[-1] == image_size and part.images.shape[-2] == image_size:
            return part
        resized = resize(part.images, [image_size, image_size], antialias=True)
        return ImageTensors(resized, part.labels, part.num_classes, part.class_names)

    if eval_set is None:
        sample = seeded_indices(len(train), 1024, seed)
        monitored = ImageTensors(train.images[sample], train.labels[sample], 1)
        return Splits(train, sized(monitored), labelled=False, skipped=images.skipped)
    return Splits(train, sized(eval_set.test), bank=sized(eval_set.train), labelled=False, skipped=images.skipped)
