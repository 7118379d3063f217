"""The types every data set shares: :class:`ImageTensors`, :class:`Splits`, and the errors.

Every data set is an :class:`ImageTensors`: all images as one ``uint8`` tensor
``(N, C, H, W)`` and labels ``(N,)``.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field

import torch
from torch import Tensor


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
                f"images must be a uint8 tensor (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.ndim != 1 or len(self.labels) != len(self.images):
            raise DataError(f"labels must be (N,) with N = {len(self.images)} images, got {tuple(self.labels.shape)}")
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
    """Train and held-out (test) splits of one data set.

    Training on unlabelled images (``labelled=False``), ``train``'s labels are placeholders (all 0, one
    class) and the labelled evaluation set, if any, is ``bank`` (what kNN and the probe learn from)
    and ``test``; without one, ``test`` is a fixed sample of the training images, for the label-free
    monitors only. ``skipped``: the files that could not be read (``"<path>: <why>"``).
    """

    train: ImageTensors
    test: ImageTensors
    _: KW_ONLY
    bank: ImageTensors | None = None
    labelled: bool = True
    skipped: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return (self.bank or self.train).num_classes

    @property
    def evaluated(self) -> bool:
        """Whether there are labels to evaluate on (kNN, probe): labelled training data or an evaluation set."""
        return self.labelled or self.bank is not None
