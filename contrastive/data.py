"""Data sets held as uint8 tensors, batches drawn by index.

Every data set is an :class:`ImageTensors`: all images as one ``uint8`` tensor
``(N, C, H, W)`` and labels ``(N,)``. The data module puts the tensors on the
training device once; batches are index gathers, so no DataLoader workers are
needed and augmentation runs batched on that device (``contrastive.augment``).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from functools import partial
from typing import Callable, Iterable, Iterator

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from contrastive.distributed import rank as dist_rank
from contrastive.distributed import world_size as dist_world_size

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """A data set is missing, empty or malformed; the message says what to do."""


DOWNLOAD_HINT = " Or add data.download=true to download it there."  # cut by contrastive-eval, which cannot download


class DataWarning(UserWarning):
    """A data set loads, but not quite as given (the message says how and what to do)."""


def seeded_indices(n: int, k: int, seed: int) -> Tensor:
    """Sorted indices of ``min(n, k)`` of ``range(n)`` drawn without replacement from ``seed``
    (all of them, in order, when ``k >= n``): the first ``k`` of a seeded permutation."""
    if k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


@dataclass
class ImageTensors:
    """A labelled image set held as tensors.

    Attributes:
        images: ``uint8`` (N, C, H, W).
        labels: ``int64`` (N,), values in ``[0, num_classes)``.
        num_classes: number of classes.
        class_names: optional names, ``len == num_classes``.
    """

    images: Tensor
    labels: Tensor
    num_classes: int
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError(
                f"images must be a uint8 tensor (N, C, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.ndim != 1 or len(self.labels) != len(self.images):
            raise DataError(
                f"labels must be (N,) with N = {len(self.images)} images, got {tuple(self.labels.shape)}"
            )
        if len(self.images) == 0:
            raise DataError("the data set is empty: it holds no images")
        if self.labels.is_floating_point() and not bool((self.labels == self.labels.round()).all()):
            raise DataError("labels must be integer class ids, got fractional values: pass them as an integer tensor")
        self.labels = self.labels.long()
        bad = ((self.labels < 0) | (self.labels >= self.num_classes)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise DataError(
                f"label {int(self.labels[i])} at index {i} is outside [0, {self.num_classes}); "
                "check data.num_classes or the label file"
            )

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, n: int | None, seed: int = 0) -> ImageTensors:
        """The first ``n`` images of a seeded permutation (all when ``n`` is None or >= N)."""
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise DataError(f"a subset must hold at least one image, got data.subset={n}")
        idx = seeded_indices(len(self), n, seed)
        return ImageTensors(self.images[idx], self.labels[idx], self.num_classes, self.class_names)

    def select_classes(self, classes: list[int]) -> ImageTensors:
        """Only the images of ``classes``, relabelled ``0..len(classes)-1`` in the given order."""
        if len(set(classes)) != len(classes) or not all(0 <= c < self.num_classes for c in classes):
            raise DataError(f"classes must be distinct class ids in [0, {self.num_classes}), got {list(classes)}")
        mapping = torch.full((self.num_classes,), -1, dtype=torch.long)
        mapping[torch.as_tensor(list(classes))] = torch.arange(len(classes))
        keep = mapping[self.labels] >= 0
        names = [self.class_names[c] for c in classes] if self.class_names else []
        return ImageTensors(self.images[keep], mapping[self.labels[keep]], len(classes), names)

    def to(self, device: torch.device | str) -> ImageTensors:
        return ImageTensors(self.images.to(device), self.labels.to(device), self.num_classes, self.class_names)


@dataclass
class Splits:
    """Train and held-out (test) splits of one data set."""

    train: ImageTensors
    test: ImageTensors

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


# --------------------------------------------------------------------------- sources


def _torchvision_cifar(cls: type, root: Path, download: bool, folder: str, override: str) -> Splits:
    """Load a torchvision CIFAR data set, accepting copies whose md5 sums differ."""
    base = root / folder
    if not base.is_dir():
        if not download:
            raise DataError(
                f"{cls.__name__} not found: expected the folder {base}. Point {override} at the "
                f"folder that contains {folder}/ (e.g. {override}=/path/to/data).{DOWNLOAD_HINT}"
            )
        root.mkdir(parents=True, exist_ok=True)
        try:
            cls(str(root), train=True, download=True)
        except OSError as e:  # URLError included: no network, a proxy, a full disk
            raise DataError(
                f"could not download {cls.__name__} into {root} ({e}): check the network, or put {folder}/ "
                f"under {override} yourself and drop data.download=true"
            ) from None

    class _Lenient(cls):  # type: ignore[misc, valid-type]
        def _check_integrity(self) -> bool:  # md5 of a rebuilt copy differs from the archive's
            files = [base / name for name, _ in self.train_list + self.test_list]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise DataError(f"{cls.__name__} under {base} is incomplete: missing {missing}")
            if not super()._check_integrity():
                warnings.warn(
                    f"{base}: checksums differ from the official archive; using this copy as is",
                    DataWarning, stacklevel=2,
                )
            return True

        def _load_meta(self) -> None:  # the parent checks the meta file's md5 too
            import pickle

            with open(base / self.meta["filename"], "rb") as f:
                meta = pickle.load(f, encoding="latin1")
            self.classes = [str(c) for c in meta[self.meta["key"]]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def damaged(error: Exception) -> DataError:
        """The first file that does not unpickle, named (torchvision's error names none)."""
        import pickle

        for name in [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]:
            try:
                with open(base / name, "rb") as f:
                    pickle.load(f, encoding="latin1")
            except Exception as e:
                return DataError(f"cannot read {base / name} ({type(e).__name__}: {e}): the file is damaged; "
                                 f"replace it, or {folder}/, with a fresh copy")
        return DataError(f"cannot read {cls.__name__} under {base} ({type(error).__name__}: {error}): replace "
                         f"{folder}/ with a fresh copy")

    parts = []
    for train in (True, False):
        try:
            ds = _Lenient(str(root), train=train, download=False)
        except DataError:
            raise
        except Exception as e:  # a truncated or overwritten batch file
            raise damaged(e) from None
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        parts.append(ImageTensors(images, torch.as_tensor(ds.targets), len(ds.classes), list(ds.classes)))
    return Splits(*parts)


def cifar10(root: str = "./data", download: bool = False) -> Splits:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (torchvision's layout)."""
    from torchvision.datasets import CIFAR10

    return _torchvision_cifar(CIFAR10, Path(root).expanduser(), download, "cifar-10-batches-py", "data.root")


def cifar100(root: str = "./data", download: bool = False) -> Splits:
    """CIFAR-100 from ``root/cifar-100-python`` (torchvision's layout)."""
    from torchvision.datasets import CIFAR100

    return _torchvision_cifar(CIFAR100, Path(root).expanduser(), download, "cifar-100-python", "data.root")


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
        raise ValueError(f"image_folder: workers must be >= 1, or None (null in a config) for every core, got {workers}")
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


def image_folder(root: str, size: int = 32, train: str = "train", test: str = "test", cache: bool = True,
                 workers: int | None = None) -> Splits:
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
            DataWarning, stacklevel=2,
        )
    cache_file = base / f".contrastive_cache_{size}.pt"

    def decode() -> tuple[ImageTensors, ImageTensors]:
        train_set = _decode_folder(base / train, size, names, workers)
        counts = torch.bincount(train_set.labels, minlength=len(names))
        if empty := [n for i, n in enumerate(train_names) if counts[i] == 0]:  # a class that no image can teach
            raise DataError(f"{len(empty)} class folder(s) of {base / train} hold no images ({', '.join(empty[:5])}"
                            f"{', ...' if len(empty) > 5 else ''}): remove them or add images")
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
                return Splits(*(ImageTensors(s["images"], s["labels"], len(saved["names"]), saved["names"])
                                for s in (saved["train"], saved["test"])))
        train_set, test_set = decode()
        from contrastive.io import save_torch_atomic

        try:
            save_torch_atomic({"fingerprint": fingerprint, "names": names,
                               "train": {"images": train_set.images, "labels": train_set.labels},
                               "test": {"images": test_set.images, "labels": test_set.labels}}, cache_file)
        except OSError as e:  # a read-only or shared data folder: train anyway, decode again next time
            warnings.warn(f"could not write the decoded-image cache {cache_file} ({e}); the images will be "
                          "decoded again next run. Pass data.source.cache=false to skip the cache.", DataWarning,
                          stacklevel=2)
    return Splits(train_set, test_set)


@contextmanager
def _cache_lock(cache_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<cache_file>.lock`` (none where the folder cannot be written).

    Several processes that build the same cache at once (every rank under torchrun) would each
    decode the whole folder on every core; with the lock the first decodes and writes the cache,
    the others wait and then load it. The OS releases the lock of a process that dies.
    """
    from filelock import FileLock, Timeout

    lock: FileLock | None = FileLock(f"{cache_file}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:  # an OSError too, so caught first: another process holds the lock
        log.info("another process is decoding into %s: waiting for it", cache_file)
        lock.acquire()
    except OSError:  # a read-only folder: no lock (image_folder warns when it cannot write the cache)
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


SHAPE_NAMES = [
    "disk", "square", "diamond", "ring", "plus", "triangle", "x", "frame", "two-dots", "half-disk",
]


def _shape_masks(kind: Tensor, dx: Tensor, dy: Tensor, radius: Tensor) -> Tensor:
    """Boolean masks (N, H, W) of shape ``kind`` centred at offsets ``dx, dy`` (N, H, W)."""
    r = radius[:, None, None]
    ax, ay = dx.abs(), dy.abs()
    dist = (dx**2 + dy**2).sqrt()
    cheb = torch.maximum(ax, ay)
    masks = torch.stack(
        [
            dist < r,
            cheb < 0.8 * r,
            ax + ay < r,
            (dist < r) & (dist > 0.55 * r),
            ((ax < r / 3) & (ay < r)) | ((ay < r / 3) & (ax < r)),
            (dy < 0.8 * r) & (ax < (dy + r) / 2),
            (((dx - dy).abs() < r / 3) | ((dx + dy).abs() < r / 3)) & (cheb < 0.8 * r),
            (cheb < 0.85 * r) & (cheb > 0.5 * r),
            ((dx - r / 2) ** 2 + dy**2 < (r / 2.2) ** 2) | ((dx + r / 2) ** 2 + dy**2 < (r / 2.2) ** 2),
            (dist < r) & (dy < 0),
        ]
    )  # (10, N, H, W)
    return masks.gather(0, kind[None, :, None, None].expand(1, *dx.shape)).squeeze(0)


def _make_shapes(n: int, size: int, generator: torch.Generator) -> ImageTensors:
    g = generator
    kind = torch.arange(n) % len(SHAPE_NAMES)
    kind = kind[torch.randperm(n, generator=g)]
    radius = size * (0.22 + 0.16 * torch.rand(n, generator=g))
    centre = size / 2 + (torch.rand(n, 2, generator=g) - 0.5) * size * 0.3
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dy = coords[None, :, None] - centre[:, 1, None, None]
    dx = coords[None, None, :] - centre[:, 0, None, None]
    dx, dy = torch.broadcast_tensors(dx, dy)
    mask = _shape_masks(kind, dx, dy, radius)[:, None]  # (N, 1, H, W)
    # Colours from a small palette, dark on light or light on dark: many images share a
    # colour pair, so colour cannot tell instances apart and contrastive training must use shape.
    dark = torch.tensor([[0.1, 0.1, 0.5], [0.5, 0.1, 0.1], [0.1, 0.4, 0.1], [0.2, 0.2, 0.2]])
    light = torch.tensor([[0.95, 0.85, 0.3], [0.5, 0.85, 0.95], [0.95, 0.6, 0.8], [0.85, 0.85, 0.85]])
    pick = torch.randint(0, 4, (2, n), generator=g)
    dark_fg = torch.rand(n, generator=g) < 0.5
    fg = torch.where(dark_fg[:, None], dark[pick[0]], light[pick[0]])[:, :, None, None]
    bg = torch.where(dark_fg[:, None], light[pick[1]], dark[pick[1]])[:, :, None, None]
    noise = 0.04 * torch.randn(n, 3, size, size, generator=g)
    img = torch.where(mask, fg, bg) + noise
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageTensors(images, kind, len(SHAPE_NAMES), list(SHAPE_NAMES))


def shapes(num_train: int = 2000, num_test: int = 1000, size: int = 32, seed: int = 0) -> Splits:
    """The built-in data set: ten classes of coloured shapes, generated (no download).

    Each image is one shape (disk, square, ring, ...) of random size and position in
    one of a few colours on a contrasting background with pixel noise; the class is
    the shape. Colour and position are nuisances, so a network must learn shape to
    classify it: a small stand-in for CIFAR that trains in a minute or two on a CPU.
    """
    g = torch.Generator().manual_seed(seed)
    return Splits(_make_shapes(num_train, size, g), _make_shapes(num_test, size, g))


# --------------------------------------------------------------------------- batching


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of epoch ``epoch`` of a run seeded ``seed``:
    ``(epoch + seed * 0x9E3779B9) mod 2**32`` (torch's CPU generator keeps only 32 bits of a seed).

    ``seed + epoch`` gave run 1's epoch 0 the order of run 0's epoch 1, so a seed sweep saw shifted
    copies of one order; with the golden-ratio step, seeds up to 1000 apart share no epoch order
    below 1.8 million epochs. Seed 0's epochs keep their old seeds.
    """
    return (epoch + seed * 0x9E3779B9) % 2**32


class EpochBatches:
    """Base of the batch iterables Lightning accepts: epoch ``e``'s batches come from ``(seed, e)``.

    So the batches are the same on every process and after a resume. Subclasses give
    :meth:`batches`, this rank's index tensors for the epoch; iterating yields
    ``(images[idx], labels[idx])`` for each.

    Args:
        data: the images and labels (on the device batches should be on).
        seed: base seed; epoch ``e`` draws from :func:`epoch_seed` ``(seed, e)``.
        epoch_source: returns the current epoch (the trainer's), read at each
            ``iter``; without it the epoch counts the passes started (a pass
            stopped early, e.g. by ``limit_train_batches``, still moves on).
        world: the number of processes; None: the process group's (1 without one). Given
            only to check the settings before the processes exist.
    """

    def __init__(self, data: ImageTensors, seed: int = 0, epoch_source: Callable[[], int] | None = None,
                 world: int | None = None) -> None:
        self.data, self.seed, self.epoch, self.epoch_source = data, seed, 0, epoch_source
        self.world, self.rank = dist_world_size() if world is None else world, dist_rank()

    def generator(self) -> torch.Generator:
        """A CPU generator seeded for the current epoch (:func:`epoch_seed`)."""
        return torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))

    def batches(self) -> Iterable[Tensor]:
        """This rank's index tensors for the current epoch, on the data's device."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.epoch_source is not None:
            self.epoch = self.epoch_source()
        batches = self.batches()
        if self.epoch_source is None:
            self.epoch += 1  # now, not after the last batch: a pass stopped early must not repeat its batches
        for idx in batches:
            yield self.data.images[idx], self.data.labels[idx]


class IndexBatches(EpochBatches):
    """Batches of a uint8 image tensor drawn by index (:class:`EpochBatches`).

    Epoch ``e`` is a permutation drawn from ``(seed, e)``. With ``W`` processes each rank
    takes its own contiguous slice of every global batch (no overlap, no DataLoader sampler).

    Args:
        data, seed, epoch_source, world: as :class:`EpochBatches`.
        batch_size: the per-process batch size.
        shuffle: draw a fresh permutation per epoch (else the natural order).
        drop_last: drop the last incomplete global batch.
    """

    def __init__(
        self,
        data: ImageTensors,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        epoch_source: Callable[[], int] | None = None,
        world: int | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
        super().__init__(data, seed, epoch_source, world)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        global_batch = batch_size * self.world
        if drop_last and global_batch > len(data):
            raise DataError(
                f"the batch ({batch_size} x {self.world} processes) is larger than the data set "
                f"({len(data)} images): lower data.batch_size (or raise data.subset where it caps the data)"
            )

    def __len__(self) -> int:
        global_batch = self.batch_size * self.world
        n = len(self.data)
        if self.drop_last:
            return n // global_batch
        return math.ceil(n / global_batch)

    def batches(self) -> list[Tensor]:
        n, device = len(self.data), self.data.images.device
        idx = torch.randperm(n, generator=self.generator()).to(device) if self.shuffle else torch.arange(n, device=device)
        global_batch = self.batch_size * self.world
        mine = []
        for b in range(len(self)):
            chunk = idx[b * global_batch : (b + 1) * global_batch]
            per = math.ceil(len(chunk) / self.world)
            mine.append(chunk[self.rank * per : (self.rank + 1) * per])
        return mine


class TensorDataModule(pl.LightningDataModule):
    """Serves :class:`Splits` from tensors on the training device.

    ``train_dataloader`` yields shuffled uint8 batches for the pipeline's
    augmentation; ``val_dataloader`` yields the train split (the kNN memory bank)
    and the test split in order, unaugmented.
    """

    def __init__(
        self,
        splits: Splits,
        batch_size: int,
        eval_batch_size: int = 1024,
        on_device: bool = True,
        seed: int = 0,
        train_batches: Callable[..., Iterable[tuple[Tensor, Tensor]]] | None = None,
    ) -> None:
        super().__init__()
        self.splits = splits
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.on_device = on_device
        self.seed = seed
        # train_batches(data, batch_size=, seed=, epoch_source=) -> iterable of (images, labels)
        self.train_batches = train_batches or partial(IndexBatches, shuffle=True, drop_last=True)

    def setup(self, stage: str | None = None) -> None:
        if self.on_device and self.trainer is not None:
            device = self.trainer.strategy.root_device
            self.splits = Splits(self.splits.train.to(device), self.splits.test.to(device))

    def train_dataloader(self) -> Iterable[tuple[Tensor, Tensor]]:
        trainer = self.trainer
        epoch_source = (lambda: trainer.current_epoch) if trainer is not None else None
        return self.train_batches(
            self.splits.train, batch_size=self.batch_size, seed=self.seed, epoch_source=epoch_source
        )

    def val_dataloader(self) -> list[IndexBatches]:
        return [
            IndexBatches(self.splits.train, self.eval_batch_size, False, False),
            IndexBatches(self.splits.test, self.eval_batch_size, False, False),
        ]
