"""Data sets held as uint8 tensors, batches drawn by index.

Every data set is an :class:`ImageTensors`: all images as one ``uint8`` tensor
``(N, C, H, W)`` and labels ``(N,)``. The data module puts the tensors on the
training device once; batches are index gathers, so no DataLoader workers are
needed and augmentation runs batched on that device (``contrastive.augment``).

- ``tensors``: :class:`ImageTensors`, :class:`Splits`, the errors and warnings.
- ``cifar``: CIFAR-10 / CIFAR-100 from torchvision's on-disk layout.
- ``stl10``: STL-10 from torchvision's binary layout (train + unlabeled for training).
- ``folders``: any ``root/{train,test}/<class>/<image>`` set, decoded once and cached.
- ``unlabelled``: every image under a folder, unlabelled, in a memory-mapped cache with a file index.
- ``synthetic``: *shapes*, the built-in generated set.
- ``batching``: the batch iterables (shuffled, P x K) and :class:`TensorDataModule`.

Configs name the sources and samplers by their names here (``contrastive.data.cifar10``,
``contrastive.data.PKBatches``), as do the configs stored in older checkpoints.
"""

from contrastive.data.batching import (
    EpochBatches,
    IndexBatches,
    MonitorBatches,
    PKBatches,
    SamplerError,
    TensorDataModule,
    class_rows,
    epoch_seed,
    pk_epoch,
    schedule_classes,
)
from contrastive.data.cifar import cifar10, cifar100
from contrastive.data.folders import IMAGE_SUFFIXES, image_folder
from contrastive.data.stl10 import stl10
from contrastive.data.synthetic import SHAPE_NAMES, shapes
from contrastive.data.tensors import DOWNLOAD_HINT, DataError, DataWarning, ImageTensors, Splits, seeded_indices
from contrastive.data.unlabelled import FolderImages, stored_image, unlabelled_folder, unlabelled_splits

__all__ = [
    "DOWNLOAD_HINT",
    "DataError",
    "DataWarning",
    "EpochBatches",
    "FolderImages",
    "IMAGE_SUFFIXES",
    "ImageTensors",
    "IndexBatches",
    "MonitorBatches",
    "PKBatches",
    "SHAPE_NAMES",
    "SamplerError",
    "Splits",
    "TensorDataModule",
    "cifar10",
    "cifar100",
    "class_rows",
    "epoch_seed",
    "image_folder",
    "pk_epoch",
    "schedule_classes",
    "seeded_indices",
    "shapes",
    "stl10",
    "stored_image",
    "unlabelled_folder",
    "unlabelled_splits",
]
