"""Batches drawn by index from device-resident tensors, and the data module that serves them.

:class:`TensorDataModule` puts the tensors on the training device once; batches are index
gathers, so no DataLoader workers are needed and augmentation runs batched on that device
(``contrastive.augment``). Every batch iterable is an :class:`EpochBatches`: epoch ``e``'s
batches come from ``(seed, e)`` only. :class:`IndexBatches` shuffles the whole set;
:class:`PKBatches` draws P classes x K images of each.

P x K batches for metric learning: batch-hard triplet mining (Hermans, Beyer & Leibe 2017,
"In Defense of the Triplet Loss") needs every anchor to have positives and negatives in its
batch; a batch of P classes x K samples guarantees K - 1 positives and (P - 1) K negatives per
anchor.

An *epoch* is one pass over every class's samples: each class's indices are shuffled
and cut into rows of K (the last row completed with other samples of the same
class), and every row is used exactly once. Batches take one row from each of
P distinct classes, the classes with the most rows left first (random among ties),
so the classes run out together; when fewer than P classes have rows left, the
remaining slots are filled with K random samples of other classes. So every sample
is seen at least once per epoch, and the epoch has
``L = max(ceil(rows / P), max_c rows_c)`` batches, a number fixed by the labels alone.

With ``W`` processes the global batch holds ``W * P`` distinct classes and rank ``r``
takes the ``r``-th P of them: every rank gets a full P x K batch (the triplet loss
is computed per rank, so each rank's batch must be one), no image appears twice in a
global batch, and all ranks yield the same number of batches. The schedule of epoch
``e`` comes from ``(seed, e)`` only, so it is the same on every rank and after a resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from functools import partial

import pytorch_lightning as pl
import torch
from torch import Tensor

from contrastive.data.tensors import DataError, ImageTensors, Splits
from contrastive.distributed import rank as dist_rank
from contrastive.distributed import world_size as dist_world_size


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

    def __init__(
        self, data: ImageTensors, seed: int = 0, epoch_source: Callable[[], int] | None = None, world: int | None = None
    ) -> None:
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
        idx = (
            torch.randperm(n, generator=self.generator()).to(device) if self.shuffle else torch.arange(n, device=device)
        )
        global_batch = self.batch_size * self.world
        mine = []
        for b in range(len(self)):
            chunk = idx[b * global_batch : (b + 1) * global_batch]
            per = math.ceil(len(chunk) / self.world)
            mine.append(chunk[self.rank * per : (self.rank + 1) * per])
        return mine


class MonitorBatches(IndexBatches):
    """The fixed sample of training images the label-free monitors read, in order, as a validation loader
    (:class:`IndexBatches` without shuffling); its type tells the pipeline which loader it is."""

    def __init__(self, data: ImageTensors, batch_size: int) -> None:
        super().__init__(data, batch_size, shuffle=False, drop_last=False)


# --------------------------------------------------------------------------- P x K


class SamplerError(DataError, ValueError):
    """The P x K sampler cannot be built from these settings (a ValueError and a DataError)."""


def class_rows(labels: Tensor, counts: Tensor, k: int, generator: torch.Generator) -> list[Tensor]:
    """Each class's indices shuffled and cut into rows of ``k``.

    The last row of a class whose count is not a multiple of ``k`` is completed with
    randomly chosen *other* samples of the class, so no row repeats an image.

    Args:
        labels: (N,) int64 on the CPU.
        counts: (C,) samples per class; every non-zero count must be >= ``k``.
        k: samples per row (K).
        generator: CPU generator.

    Returns:
        C tensors of shape (ceil(n_c / k), k) holding indices into ``labels``.
    """
    order = torch.argsort(labels, stable=True)  # indices grouped by class
    starts = torch.cumsum(counts, 0) - counts
    rows = []
    for c, n in enumerate(counts.tolist()):
        members = order[int(starts[c]) : int(starts[c]) + n]
        members = members[torch.randperm(n, generator=generator)]
        short = -n % k  # samples missing from the last row
        if short:
            done = n - (k - short)  # members in full rows
            extra = members[:done][torch.randperm(done, generator=generator)[:short]]
            members = torch.cat([members, extra])
        rows.append(members.view(-1, k))
    return rows


def schedule_classes(rows_per_class: Tensor, slots: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Which class fills each slot of each batch: largest remaining row count first.

    Taking the ``slots`` classes with the most rows left keeps ``max_c left_c <= batches
    left`` and ``sum_c left_c <= slots * batches left``, so all rows fit in
    ``L = max(ceil(sum / slots), max)`` batches. Ties (and the order of the chosen
    classes within a batch) are random; classes with no samples are never chosen.

    Args:
        rows_per_class: (C,) int64 rows of each class (0 for an absent class).
        slots: classes per global batch; at most the number of present classes.
        generator: CPU generator.

    Returns:
        ``classes`` (L, slots) int64 and ``fresh`` (L, slots) bool: whether the slot
        takes the class's next row (True) or is a filler of random samples (False).
    """
    left = rows_per_class.clone()
    present = rows_per_class > 0
    total = int(left.sum())
    length = max(math.ceil(total / slots), int(left.max()))
    classes, fresh = [], []
    for _ in range(length):
        score = left + torch.rand(len(left), generator=generator, dtype=torch.float64)  # ties broken at random
        score[~present] = -1.0
        chosen = torch.topk(score, slots).indices
        chosen = chosen[torch.randperm(slots, generator=generator)]  # random class -> rank assignment
        classes.append(chosen)
        fresh.append(left[chosen] > 0)
        left[chosen] = (left[chosen] - 1).clamp_min(0)
    return torch.stack(classes), torch.stack(fresh)


def pk_epoch(labels: Tensor, slots: int, k: int, generator: torch.Generator) -> Tensor:
    """Indices of one epoch of global P x K batches.

    Args:
        labels: (N,) int64 on the CPU; each present class has >= ``k`` samples.
        slots: classes per global batch (``W * P``).
        k: samples per class (K).
        generator: CPU generator.

    Returns:
        (L, slots, k) int64: batch ``b``, slot ``s`` holds ``k`` samples of one class.
    """
    counts = torch.bincount(labels)
    rows = class_rows(labels, counts, k, generator)
    rows_per_class = torch.tensor([len(r) for r in rows])
    classes, fresh = schedule_classes(rows_per_class, slots, generator)
    table = torch.cat(rows)  # (sum rows, k), grouped by class
    flat_classes, flat_fresh = classes.flatten(), fresh.flatten()
    # every row is used once, in order: the j-th fresh slot of class c (in batch order)
    # takes c's j-th row, i.e. the fresh slots sorted stably by class enumerate the table
    fresh_classes = flat_classes[flat_fresh]
    row_ids = torch.empty_like(fresh_classes)
    row_ids[torch.argsort(fresh_classes, stable=True)] = torch.arange(len(fresh_classes))
    out = torch.empty(len(flat_classes), k, dtype=torch.long)
    out[flat_fresh] = table[row_ids]
    for i in (~flat_fresh).nonzero().flatten().tolist():  # fillers: k random samples of the class
        members = rows[int(flat_classes[i])].flatten().unique()
        out[i] = members[torch.randperm(len(members), generator=generator)[:k]]
    return out.view(len(classes), slots, k)


class PKBatches(EpochBatches):
    """Batches of P classes x K samples from device-resident tensors (module docstring).

    An iterable Lightning accepts, built by the data module as
    ``PKBatches(data, batch_size=, seed=, epoch_source=)`` (``configs/sampler/pk.yaml``).
    Every batch is grouped by class: P blocks of K.

    Args:
        data: the images and labels (on the device batches should be on).
        batch_size: the per-process batch size; must equal P * K.
        classes_per_batch: P, classes per process batch (>= 2: negatives).
        samples_per_class: K, samples of each class (>= 2: positives). A class with
            fewer than K samples is an error rather than sampled with replacement:
            a repeated image is a zero-distance positive that teaches nothing.
        seed, epoch_source, world: as :class:`EpochBatches`.
    """

    def __init__(
        self,
        data: ImageTensors,
        batch_size: int,
        classes_per_batch: int,
        samples_per_class: int,
        seed: int = 0,
        epoch_source: Callable[[], int] | None = None,
        world: int | None = None,
    ) -> None:
        p, k = classes_per_batch, samples_per_class
        if p * k != batch_size:
            raise SamplerError(
                f"sampler.classes_per_batch={p} x sampler.samples_per_class={k} = {p * k} must equal "
                f"data.batch_size={batch_size}: set data.batch_size={p * k} or change P / K"
            )
        if p < 2 or k < 2:
            raise SamplerError(
                f"sampler.classes_per_batch={p} and sampler.samples_per_class={k} must both be >= 2 "
                "(every anchor needs a positive and a negative)"
            )
        super().__init__(data, seed, epoch_source, world)
        self.labels = data.labels.cpu()
        counts = torch.bincount(self.labels, minlength=data.num_classes)
        present = int((counts > 0).sum())
        if p * self.world > present:
            raise SamplerError(
                f"sampler.classes_per_batch={p} x {self.world} process(es) needs {p * self.world} distinct classes "
                f"per global batch, but the training data has {present}: lower sampler.classes_per_batch"
            )
        small = ((counts > 0) & (counts < k)).nonzero().flatten().tolist()
        if small:
            detail = ", ".join(f"class {c}: {int(counts[c])}" for c in small[:5])
            raise SamplerError(
                f"sampler.samples_per_class={k} but some classes have fewer samples ({detail}): "
                "lower sampler.samples_per_class (or raise data.subset where it caps the data)"
            )
        self.p, self.k = p, k
        rows = (counts + k - 1) // k
        self.length = max(math.ceil(int(rows.sum()) / (p * self.world)), int(rows.max()))

    def __len__(self) -> int:
        return self.length

    def batches(self) -> Tensor:
        """This rank's indices for the epoch, (L, P * K), on the data's device."""
        batches = pk_epoch(self.labels, self.p * self.world, self.k, self.generator())  # (L, W*P, K)
        mine = batches[:, self.rank * self.p : (self.rank + 1) * self.p]  # (L, P, K)
        return mine.reshape(len(batches), -1).to(self.data.images.device)


class TensorDataModule(pl.LightningDataModule):
    """Serves :class:`Splits` from tensors on the training device.

    ``train_dataloader`` yields shuffled uint8 batches for the pipeline's
    augmentation; ``val_dataloader`` yields the kNN memory bank (the train split, or the evaluation
    set's ``bank`` when training on unlabelled images) and the test split in order, unaugmented, then
    ``monitor`` (a fixed sample of training images for the label-free monitors) if given. Without
    labels to evaluate on (:attr:`Splits.evaluated`) it yields the test split alone: that sample.
    """

    def __init__(
        self,
        splits: Splits,
        batch_size: int,
        eval_batch_size: int = 1024,
        on_device: bool = True,
        seed: int = 0,
        train_batches: Callable[..., Iterable[tuple[Tensor, Tensor]]] | None = None,
        monitor: ImageTensors | None = None,
    ) -> None:
        super().__init__()
        self.splits = splits
        self.monitor = monitor
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.on_device = on_device
        self.seed = seed
        # train_batches(data, batch_size=, seed=, epoch_source=) -> iterable of (images, labels)
        self.train_batches = train_batches or partial(IndexBatches, shuffle=True, drop_last=True)

    def setup(self, stage: str | None = None) -> None:
        if self.on_device and self.trainer is not None:
            device = self.trainer.strategy.root_device
            splits = self.splits
            bank = None if splits.bank is None else splits.bank.to(device)
            self.splits = replace(splits, train=splits.train.to(device), test=splits.test.to(device), bank=bank)
            self.monitor = None if self.monitor is None else self.monitor.to(device)

    def train_dataloader(self) -> Iterable[tuple[Tensor, Tensor]]:
        trainer = self.trainer
        epoch_source = (lambda: trainer.current_epoch) if trainer is not None else None
        return self.train_batches(
            self.splits.train, batch_size=self.batch_size, seed=self.seed, epoch_source=epoch_source
        )

    def val_dataloader(self) -> list[IndexBatches]:
        splits, size = self.splits, self.eval_batch_size
        if not splits.evaluated:
            return [MonitorBatches(splits.test, size)]
        monitor = [MonitorBatches(self.monitor, size)] if self.monitor is not None else []
        bank = IndexBatches(splits.bank or splits.train, size, False, False)
        return [bank, IndexBatches(splits.test, size, False, False), *monitor]
