"""CIFAR-10 and CIFAR-100 read from the python-pickle batches, in torchvision's on-disk layout.

``root/cifar-10-batches-py/`` holds ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and
``batches.meta``; ``root/cifar-100-python/`` holds ``train``, ``test`` and ``meta``. Each batch is
a pickled dict: ``data``, uint8 (n, 3072) holding the R, G, B planes of 32 x 32 images, and
``labels`` (CIFAR-100: ``fine_labels``); the meta file names the classes (``label_names`` /
``fine_label_names``). The folder, file names and md5 sums are torchvision's public class
attributes; torchvision itself only downloads. A copy whose md5 sums differ from the official
archive's (a rebuilt one) is read as is, with a warning.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from contrastive.data.tensors import DOWNLOAD_HINT, DataError, DataWarning, ImageTensors, Splits

if TYPE_CHECKING:
    from torchvision.datasets import CIFAR10


def cifar10(root: str = "./data", download: bool = False) -> Splits:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (torchvision's layout)."""
    from torchvision.datasets import CIFAR10

    return _cifar(CIFAR10, Path(root).expanduser(), download, "data.root")


def cifar100(root: str = "./data", download: bool = False) -> Splits:
    """CIFAR-100 from ``root/cifar-100-python`` (torchvision's layout)."""
    from torchvision.datasets import CIFAR100

    return _cifar(CIFAR100, Path(root).expanduser(), download, "data.root")


def _cifar(cls: type[CIFAR10], root: Path, download: bool, override: str) -> Splits:
    """The data set that torchvision's ``cls`` (``CIFAR10``, ``CIFAR100``) downloads into ``root``, read
    from its batch files; md5 sums that differ from the archive's give a :class:`DataWarning`, not an error."""
    from torchvision.datasets.utils import check_integrity

    folder = cls.base_folder
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

    batches = cls.train_list + cls.test_list  # [file name, md5]
    missing = [str(base / name) for name, _ in batches if not (base / name).is_file()]
    if missing:
        raise DataError(f"{cls.__name__} under {base} is incomplete: missing {missing}")
    if not all(check_integrity(str(base / name), md5) for name, md5 in batches):  # a rebuilt copy's sums differ
        warnings.warn(
            f"{base}: checksums differ from the official archive; using this copy as is", DataWarning, stacklevel=3
        )
    loaded = {}
    for name in [name for name, _ in batches] + [cls.meta["filename"]]:
        try:
            with open(base / name, "rb") as f:
                loaded[name] = pickle.load(f, encoding="latin1")  # Python 2 pickles: str keys, numpy arrays
        except Exception as e:
            raise DataError(
                f"cannot read {base / name} ({type(e).__name__}: {e}): the file is damaged; "
                f"replace it, or {folder}/, with a fresh copy"
            ) from None
    try:  # every file unpickles: a wrong key or shape is a damaged copy too
        names = [str(c) for c in loaded[cls.meta["filename"]][cls.meta["key"]]]
        train, test = (
            _images_and_labels([loaded[name] for name, _ in part]) for part in (cls.train_list, cls.test_list)
        )
    except Exception as e:
        raise DataError(
            f"cannot read {cls.__name__} under {base} ({type(e).__name__}: {e}): replace {folder}/ with a fresh copy"
        ) from None
    return Splits(*(ImageTensors(images, labels, len(names), names) for images, labels in (train, test)))


def _images_and_labels(entries: list[dict[str, Any]]) -> tuple[Tensor, Tensor]:
    """The images (uint8 (N, 3, 32, 32)) and labels (N,) of unpickled batches, in order."""
    data, labels = [], []
    for entry in entries:
        data.append(entry["data"])  # (n, 3072): the R, G, B planes of each image
        labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
    return torch.from_numpy(np.vstack(data).reshape(-1, 3, 32, 32)), torch.as_tensor(labels)
