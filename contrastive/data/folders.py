"""Any labelled image set laid out as ``root/{train,test}/<class>/<image>``, decoded once and cached.

:func:`image_folder` decodes every image (threads; torchvision, Pillow for the other formats),
resizes it and caches the uint8 tensors beside the images with a fingerprint of the files, under
a lock so that processes started together decode once.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from contrastive.data.tensors import DataError, DataWarning, ImageTensors, Splits

log = logging.getLogger(__name__)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# torchvision.io.decode_image reads these; the other IMAGE_SUFFIXES are decoded with Pillow.
_TORCHVISION_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp")


def _class_dirs(folder: Path) -> list[str]:
    """Names of the class folders of ``folder``, sorted; hidden folders skipped."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(class_dir: Path) -> list[Path]:
    """Image files anywhere under one class folder, sorted (subfolders included, as torchvision's
    ``ImageFolder``); hidden files and folders (macOS ``._name``, ``.thumbnails/``) skipped."""
    files = []
    for parent, subdirs, names in os.walk(class_dir, followlinks=True):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]  # hidden folders are not walked
        files += [Path(parent, n) for n in names if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(f for f in files if f.is_file())


def _read_rgb(file: Path) -> Tensor:
    """One image file as RGB ``uint8`` (3, H, W), or a :class:`DataError` naming the file.

    16-bit images are scaled to 8 bits (v -> v >> 8, as torchvision's ``to_dtype``), not clipped; an
    animated GIF or WebP gives its first frame, as Pillow and torchvision's ``ImageFolder`` do.
    """
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import pil_to_tensor, to_dtype

    try:
        if file.suffix.lower() in _TORCHVISION_SUFFIXES:
            img = decode_image(str(file), mode=ImageReadMode.RGB)  # uint16 for a 16-bit PNG
        else:
            from PIL import Image

            with Image.open(file) as im:
                if im.mode.startswith("I;16"):  # 16-bit grey (TIFF): convert("RGB") would clip to 255
                    im = Image.fromarray((np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8))
                img = pil_to_tensor(im.convert("RGB"))
        if img.ndim == 4:  # (frames, 3, H, W)
            img = img[0]
        return to_dtype(img, torch.uint8, scale=True)
    except Exception as e:
        raise DataError(f"cannot read image {file}: {e}. Remove or replace the file.") from None


def _folder_classes(folder: Path) -> list[str]:
    """The class folder names of one split, or a :class:`DataError` saying how to lay it out."""
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder} (expected {folder}/<class name>/<image files>)")
    names = _class_dirs(folder)
    if not names:
        raise DataError(f"{folder} holds no class folders: put the images in {folder}/<class name>/")
    return names


def _usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a SLURM or container limit)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _decode_folder(folder: Path, size: int, names: list[str], workers: int | None = None) -> ImageTensors:
    """Every image of ``folder/<name>/`` decoded, resized to ``size x size`` (RGB, uint8), labelled by
    the name's index in ``names`` (class folders of ``folder`` not in ``names`` are not read).

    ``workers`` threads decode at once (None: every usable core; decoding and resizing release the
    GIL); the result does not depend on it. An unreadable file raises the first one's
    :class:`DataError`, in file order.
    """
    from concurrent.futures import ThreadPoolExecutor

    from torchvision.transforms.v2.functional import resize

    files = [(file, label) for label, name in enumerate(names) for file in _image_files(folder / name)]
    if not files:
        raise DataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")

    def load(file: Path) -> Tensor:
        return resize(_read_rgb(file), [size, size], antialias=True)

    workers = _usable_cpus() if workers is None else workers
    if workers < 1:
        raise ValueError(
            f"image_folder: workers must be >= 1, or None (null in a config) for every core, got {workers}"
        )
    with ThreadPoolExecutor(max_workers=min(workers, len(files))) as pool:
        images = list(pool.map(load, (file for file, _ in files)))  # in file order
    labels = torch.tensor([label for _, label in files])
    return ImageTensors(torch.stack(images), labels, len(names), names)


def _folder_fingerprint(base: Path, classes: dict[str, list[str]]) -> str:
    """SHA-256 over the class folders and image files (relative path, size, mtime_ns) of each split.

    ``classes``: split folder name -> its class folders. Files are listed with the same rule as
    :func:`_decode_folder`, so adding, deleting, renaming, moving or rewriting an image or class
    folder changes it.
    """
    import hashlib

    h = hashlib.sha256(b"v2\n")  # v2: nested files, 16-bit images, test-only classes (v1 caches rebuilt)
    for split, names in classes.items():
        folder = base / split
        for name in names:
            h.update(f"{split}/{name}/\n".encode())
            for file in _image_files(folder / name):
                st = file.stat()
                h.update(f"{file.relative_to(base).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def image_folder(
    root: str, size: int = 32, train: str = "train", test: str = "test", cache: bool = True, workers: int | None = None
) -> Splits:
    """Any labelled image set laid out as ``root/{train,test}/<class>/<image>``, decoded once.

    Images are decoded, converted to RGB and resized to ``size x size`` once; hidden
    files and folders are skipped. The uint8 tensors are cached in
    ``root/.contrastive_cache_<size>.pt`` (written atomically) together with a
    fingerprint of the files they came from (relative paths, sizes, mtimes); the
    cache is reused only while that fingerprint matches, else rebuilt (and skipped, with a
    warning, where ``root`` cannot be written). Processes building it at once (the ranks
    under torchrun) take turns through ``<cache>.lock``: one decodes, the others load its cache.

    Labels index the sorted train class folders, then (with a warning that says how to
    set up class-disjoint retrieval) the test class folders that train lacks. ``workers``
    threads decode at once (None: every core this process may use).
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"image folder not found: {base}. Point data.root at a folder holding {train}/ and {test}/.")
    train_names = _folder_classes(base / train)
    test_names = _folder_classes(base / test)
    extra = [n for n in test_names if n not in train_names]
    names = train_names + extra
    if extra:
        test_labels = sorted(names.index(n) for n in test_names)
        warnings.warn(
            f"{base / test} holds {len(extra)} class folder(s) that {base / train} lacks ({', '.join(extra[:5])}"
            f"{', ...' if len(extra) > 5 else ''}): they are labelled {len(train_names)}..{len(names) - 1}, after the "
            f"training classes, so the data set has {len(names)} classes. For class-disjoint retrieval pass "
            f"data.train_classes=[{','.join(map(str, range(len(train_names))))}] "
            f"data.test_classes=[{','.join(map(str, test_labels))}] data.num_classes={len(train_names)} eval.knn_k=0",
            DataWarning,
            stacklevel=2,
        )
    cache_file = base / f".contrastive_cache_{size}.pt"

    def decode() -> tuple[ImageTensors, ImageTensors]:
        train_set = _decode_folder(base / train, size, names, workers)
        counts = torch.bincount(train_set.labels, minlength=len(names))
        if empty := [n for i, n in enumerate(train_names) if counts[i] == 0]:  # a class that no image can teach
            raise DataError(
                f"{len(empty)} class folder(s) of {base / train} hold no images ({', '.join(empty[:5])}"
                f"{', ...' if len(empty) > 5 else ''}): remove them or add images"
            )
        return train_set, _decode_folder(base / test, size, names, workers)

    if not cache:
        return Splits(*decode())
    fingerprint = _folder_fingerprint(base, {train: train_names, test: test_names})
    with _cache_lock(cache_file):  # processes started together (torchrun): one decodes, the others load its cache
        if cache_file.is_file():
            try:
                saved = torch.load(cache_file, weights_only=True)
            except Exception:  # a cache cut short (a killed write of an older version): rebuild it
                saved = {}
            if saved.get("fingerprint") == fingerprint:  # a cache without one predates fingerprints: rebuild
                return Splits(
                    *(
                        ImageTensors(s["images"], s["labels"], len(saved["names"]), saved["names"])
                        for s in (saved["train"], saved["test"])
                    )
                )
        train_set, test_set = decode()
        from contrastive.io import save_torch_atomic

        try:
            save_torch_atomic(
                {
                    "fingerprint": fingerprint,
                    "names": names,
                    "train": {"images": train_set.images, "labels": train_set.labels},
                    "test": {"images": test_set.images, "labels": test_set.labels},
                },
                cache_file,
            )
        except OSError as e:  # a read-only or shared data folder: train anyway, decode again next time
            warnings.warn(
                f"could not write the decoded-image cache {cache_file} ({e}); the images will be "
                "decoded again next run. Pass data.source.cache=false to skip the cache.",
                DataWarning,
                stacklevel=2,
            )
    return Splits(train_set, test_set)


@contextmanager
def _cache_lock(cache_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<cache_file>.lock`` (none where the folder cannot be written).

    Several processes that build the same cache at once (every rank under torchrun) would each
    decode the whole folder on every core; with the lock the first decodes and writes the cache,
    the others wait and then load it. The OS releases the lock of a process that dies.
    """
    from filelock import FileLock, Timeout

    lock = FileLock(f"{cache_file}.lock")
    held = True
    try:
        lock.acquire(timeout=0)
    except Timeout:  # an OSError too, so caught first: another process holds the lock
        log.info("another process is decoding into %s: waiting for it", cache_file)
        lock.acquire()
    except OSError:  # a read-only folder: no lock (image_folder warns when it cannot write the cache)
        held = False
    try:
        yield
    finally:
        if held:
            lock.release()
