"""STL-10 read from torchvision's on-disk layout (``root/stl10_binary/``).

Each ``*_X.bin`` holds uint8 images of 3 x 96 x 96, every channel stored column-major (so a plain
reshape gives (N, 3, W, H): rows and columns are swapped back here, as torchvision does); each
``*_y.bin`` one uint8 label per image, 1..10; ``class_names.txt`` one name per line. The unlabelled
file (100,000 images, 2.8 GB) is memory-mapped, not read into memory; the folder, file names and md5
sums are torchvision's public class attributes, and torchvision downloads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from contrastive.data.tensors import DOWNLOAD_HINT, DataError, ImageTensors, Splits

SIDE = 96


def _images(file: Path) -> Tensor:
    """uint8 (N, 3, 96, 96) of one ``*_X.bin`` (memory-mapped; rows and columns swapped back, a view)."""
    size = file.stat().st_size
    if size == 0 or size % (3 * SIDE * SIDE):
        raise DataError(
            f"{file} is not an STL-10 image file: its {size} bytes are not a whole number of 3 x 96 x 96 images; "
            "replace stl10_binary/ with a fresh copy"
        )
    rows = np.memmap(file, dtype=np.uint8, mode="c").reshape(
        -1, 3, SIDE, SIDE
    )  # copy-on-write: torch wants it writable
    return torch.from_numpy(rows).transpose(2, 3)  # (N, 3, H, W)


def _labels(file: Path, n: int) -> Tensor:
    labels = torch.from_numpy(np.fromfile(file, dtype=np.uint8).astype(np.int64)) - 1  # 1..10 -> 0..9
    if len(labels) != n or (len(labels) and (labels.min() < 0 or labels.max() > 9)):
        raise DataError(f"{file} must hold {n} labels in 1..10, one byte each: replace stl10_binary/ with a fresh copy")
    return labels


def stl10(root: str = "./data", download: bool = False, unlabelled: bool = True) -> Splits:
    """STL-10 from ``root/stl10_binary`` (torchvision's layout).

    ``unlabelled=True``: training on train + unlabeled (105,000 images, their labels unused), evaluated with
    the labelled train split (5,000) as kNN memory bank and probe training set and the test split (8,000) as
    queries. ``unlabelled=False``: the labelled train and test splits alone.
    """
    from torchvision.datasets import STL10

    base = Path(root).expanduser() / STL10.base_folder
    if not base.is_dir() and download:
        base.parent.mkdir(parents=True, exist_ok=True)
        try:
            STL10(str(base.parent), split="train+unlabeled" if unlabelled else "train", download=True)
        except OSError as e:
            raise DataError(f"could not download STL-10 into {base.parent} ({e}): check the network") from None
    needed = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "class_names.txt"]
    needed += ["unlabeled_X.bin"] if unlabelled else []
    if missing := [name for name in needed if not (base / name).is_file()]:
        raise DataError(
            f"STL-10 not found: {base} lacks {', '.join(missing)}. Point data.root at the folder that contains "
            f"stl10_binary/.{DOWNLOAD_HINT}"
        )
    names = (base / "class_names.txt").read_text().split()
    train_images, test_images = _images(base / "train_X.bin"), _images(base / "test_X.bin")
    train = ImageTensors(train_images, _labels(base / "train_y.bin", len(train_images)), len(names), names)
    test = ImageTensors(test_images, _labels(base / "test_y.bin", len(test_images)), len(names), names)
    if not unlabelled:
        return Splits(train, test)
    pool = torch.cat([train.images, _images(base / "unlabeled_X.bin")])  # (105000, 3, 96, 96): one copy, contiguous
    placeholder = torch.zeros(len(pool), dtype=torch.long)
    return Splits(ImageTensors(pool, placeholder, 1), test, bank=train, labelled=False)
