"""Any labelled image set laid out as ``root/{train,test}/<class>/<image>``, decoded once and cached.

:func:`image_folder` decodes every image (threads; torchvision, Pillow for the other formats),
resizes it and caches the uint8 tensors beside the images with a fingerprint of the files, under
a lock so that processes started together decode once.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import NoReturn, cast

import numpy as np
import torch
from torch import Tensor

from contrastive.data.tensors import DataError, DataWarning, ImageTensors, Splits

log = logging.getLogger(__name__)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# torchvision.io.decode_image reads these; the other IMAGE_SUFFIXES are decoded with Pillow.
_TORCHVISION_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp")
UNREADABLE_LIST = ".contrastive_unreadable.txt"  # in an image folder's root: every file that could not be read


def _class_dirs(folder: Path) -> list[str]:
    """Names of the class folders of ``folder``, sorted; hidden folders skipped."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(class_dir: Path, folders: list[Path] | None = None, progress: str | None = None) -> list[Path]:
    """Image files anywhere under one class folder, sorted (subfolders included, as torchvision's
    ``ImageFolder``); hidden files and folders (macOS ``._name``, ``.thumbnails/``) skipped.

    ``folders``, if given, receives every folder walked (``class_dir`` included): a file added to or
    removed from one of them changes that folder's mtime, which is how a cache notices it unlisted.
    ``progress``: the label of a bar counting the files found (on a terminal only; the walk has no total).
    """
    from tqdm import tqdm

    files = []
    with tqdm(desc=progress, unit="file", disable=None if progress else True) as bar:
        for parent, subdirs, names in os.walk(class_dir, followlinks=True):
            subdirs[:] = [d for d in subdirs if not d.startswith(".")]  # hidden folders are not walked
            if folders is not None:
                folders.append(Path(parent))
            found = [Path(parent, n) for n in names if not n.startswith(".")]
            found = [f for f in found if f.suffix.lower() in IMAGE_SUFFIXES]
            files += found
            bar.update(len(found))
    return sorted(f for f in files if f.is_file())


def _read_rgb(file: Path) -> Tensor:
    """One image file as RGB ``uint8`` (3, H, W), or a :class:`DataError` naming the file and, in words,
    what is wrong with it (:func:`_unreadable_reason`).

    16-bit images are scaled to 8 bits (v -> v >> 8, as torchvision's ``to_dtype``), not clipped; an
    animated GIF or WebP gives its first frame, as Pillow and torchvision's ``ImageFolder`` do. A file
    torchvision cannot decode is given to Pillow (e.g. a BMP saved under ``.jpg``).
    """
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import to_dtype

    img = None
    if file.suffix.lower() in _TORCHVISION_SUFFIXES:
        try:
            img = decode_image(str(file), mode=ImageReadMode.RGB)  # uint16 for a 16-bit PNG
        except Exception:  # another format under this suffix, or damaged: Pillow reads more, and says why
            pass
    if img is None:
        try:
            img = _read_with_pillow(file)
        except Exception as e:
            raise DataError(f"cannot read image {file}: {_unreadable_reason(file, e)}") from None
    if img.ndim == 4:  # (frames, 3, H, W)
        img = img[0]
    return to_dtype(img, torch.uint8, scale=True)


def _read_with_pillow(file: Path) -> Tensor:
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor

    with Image.open(file) as im:
        if im.mode.startswith("I;16"):  # 16-bit grey (TIFF): convert("RGB") would clip to 255
            im = Image.fromarray((np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8))
        return pil_to_tensor(im.convert("RGB"))


_SIGNATURES = (
    (b"\x89PNG", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _unreadable_reason(file: Path, error: Exception) -> str:
    """Why Pillow could not read ``file``, in this project's words (torchvision's messages carry its C++
    source path and name only the formats it decodes itself)."""
    with open(file, "rb") as f:
        head = f.read(12)
    if not head:
        return "an empty file (0 bytes)"
    kind = next((name for magic, name in _SIGNATURES if head.startswith(magic)), None)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        kind = "WebP"
    if kind is None:
        return "not an image in a format read here (JPEG, PNG, WebP, GIF, BMP, TIFF)"
    from PIL import UnidentifiedImageError

    detail = "" if isinstance(error, UnidentifiedImageError) else f" ({error})"  # that one repeats the path
    return f"a damaged or truncated {kind} image{detail}"


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


def _decode_folder(
    folder: Path, size: int, names: list[str], workers: int | None = None, unreadable: list[str] | None = None
) -> ImageTensors | None:
    """Every image of ``folder/<name>/`` decoded, resized to ``size x size`` (RGB, uint8), labelled by
    the name's index in ``names`` (class folders of ``folder`` not in ``names`` are not read).

    ``workers`` threads decode at once (None: every usable core; decoding and resizing release the
    GIL); the result does not depend on it. Every file that cannot be read is listed, in file order, as
    ``<path>: <why>`` in ``unreadable`` (None: the first one raises its :class:`DataError`); the
    result is then None, so that one pass over the data set names all of them.
    """
    from torchvision.transforms.v2.functional import resize

    files = [(file, label) for label, name in enumerate(names) for file in _image_files(folder / name)]
    if not files:
        raise DataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    squash = partial(resize, size=[size, size], antialias=True)
    images = list(decode_files([file for file, _ in files], squash, workers, unreadable is not None))
    failed = [image for image in images if isinstance(image, str)]
    if unreadable is not None and failed:
        unreadable += failed
        return None
    labels = torch.tensor([label for _, label in files])
    return ImageTensors(torch.stack(cast(list[Tensor], images)), labels, len(names), names)


def decode_files(
    files: list[Path],
    transform: Callable[[Tensor], Tensor],
    workers: int | None = None,
    keep_going: bool = True,
    progress: str | None = None,
) -> Iterator[Tensor | str]:
    """Each file read as RGB uint8 (:func:`_read_rgb`) and passed through ``transform``, in file order.

    ``workers`` threads decode at once (None: every usable core; decoding and resizing release the
    GIL); the result does not depend on it. A file that cannot be read gives ``"<path>: <why>"`` in its
    place (``keep_going=False``: its :class:`DataError`). ``progress``: the label of a progress bar
    (shown where stderr is a terminal).
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    def load(file: Path) -> Tensor | str:
        try:
            return transform(_read_rgb(file))
        except DataError as e:
            if not keep_going:
                raise
            return str(e).removeprefix("cannot read image ")

    workers = _usable_cpus() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, or None (null in a config) for every core, got {workers}")
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(files)))) as pool:
        # disable=None: no bar where stderr is not a terminal (a batch job's log would get its frames)
        shown = None if progress else True
        yield from tqdm(pool.map(load, files), total=len(files), desc=progress, disable=shown, unit="img")


def _refuse_unreadable(base: Path, unreadable: list[str], total: int) -> NoReturn:
    """One :class:`DataError` for every unreadable file of both splits: the first few in the message, all
    of them in ``base/.contrastive_unreadable.txt`` (a temporary file where ``base`` is read-only)."""
    from contrastive.io import write_bytes_atomic

    text = "".join(f"{line}\n" for line in unreadable).encode()
    try:
        listing = write_bytes_atomic(base / UNREADABLE_LIST, text)
    except OSError:
        import hashlib
        import tempfile

        digest = hashlib.sha1(str(base.resolve()).encode()).hexdigest()[:10]
        listing = write_bytes_atomic(Path(tempfile.gettempdir()) / f"contrastive_unreadable_{digest}.txt", text)
    shown = "; ".join(unreadable[:3]) + (f"; and {len(unreadable) - 3} more" if len(unreadable) > 3 else "")
    raise DataError(
        f"cannot read image files: {len(unreadable)} of the {total} under {base}: {shown}. The full list is in "
        f"{listing}: remove or replace those files, then run again"
    )


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

    Labels index the sorted train class folders, then the test class folders that train lacks
    (``contrastive-train`` says how to set up class-disjoint retrieval for them). ``workers``
    threads decode at once (None: every core this process may use). Files that cannot be read are
    all named in one :class:`DataError` and listed in ``root/.contrastive_unreadable.txt``.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"image folder not found: {base}. Point data.root at a folder holding {train}/ and {test}/.")
    train_names = _folder_classes(base / train)
    test_names = _folder_classes(base / test)
    names = train_names + [n for n in test_names if n not in train_names]
    cache_file = base / f".contrastive_cache_{size}.pt"

    def decode() -> tuple[ImageTensors, ImageTensors]:
        unreadable: list[str] = []
        splits = [_decode_folder(base / split, size, names, workers, unreadable) for split in (train, test)]
        train_set, test_set = splits
        if train_set is None or test_set is None:
            total = sum(len(_image_files(base / split / name)) for split in (train, test) for name in names)
            _refuse_unreadable(base, unreadable, total)
        with suppress(OSError):  # an earlier run's list, now stale (kept where root is read-only)
            (base / UNREADABLE_LIST).unlink(missing_ok=True)
        counts = torch.bincount(train_set.labels, minlength=len(names))
        if empty := [n for i, n in enumerate(train_names) if counts[i] == 0]:  # a class that no image can teach
            raise DataError(
                f"{len(empty)} class folder(s) of {base / train} hold no images ({', '.join(empty[:5])}"
                f"{', ...' if len(empty) > 5 else ''}): remove them or add images"
            )
        return train_set, test_set

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
    """Hold an exclusive lock on ``<cache_file>.lock`` (none where the folder cannot be written), and
    remove that file after use: it is not left in the user's data folder.

    Several processes that build the same cache at once (every rank under torchrun) would each
    decode the whole folder on every core; with the lock the first decodes and writes the cache,
    the others wait and then load it. The OS releases the lock of a process that dies (its file then
    stays, and is reused). The holder removes the file before it unlocks, so a process that waited on
    the removed file finds it gone and locks the path anew (else two processes could hold "the" lock).
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): filelock, whose Windows lock removes its file itself
        from filelock import FileLock

        with FileLock(f"{cache_file}.lock"):
            yield
        return
    path = Path(f"{cache_file}.lock")
    waited = False
    while True:
        fd = _open_lock(path)
        if fd is None:  # a read-only folder: no lock (image_folder warns when it cannot write the cache)
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not waited:
                log.info("another process is decoding into %s: waiting for it", cache_file)
            waited = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
            break
        os.close(fd)  # the file this process locked was removed by its last holder: lock the path anew
    try:
        yield
    finally:
        with suppress(OSError):
            path.unlink()  # while still holding the lock (see above)
        os.close(fd)


def _open_lock(path: Path) -> int | None:
    """A descriptor of the lock file ``path`` (created if needed), or None where it cannot be made."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        return None
