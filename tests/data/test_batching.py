"""contrastive.data.batching: index batches (epochs, seeds, sharding) and the P x K sampler (batch
composition, epoch coverage, determinism, sharding, errors)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import contrastive.data.batching as data_mod
from contrastive.data import (
    DataError,
    ImageTensors,
    IndexBatches,
    PKBatches,
    SamplerError,
    pk_epoch,
    schedule_classes,
    shapes,
)


def test_index_batches_cover_epoch_and_reshuffle() -> None:
    data = ImageTensors(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.arange(10) % 2, 2)
    data.images[:, 0, 0, 0] = torch.arange(10, dtype=torch.uint8)
    epochs = []
    batches = IndexBatches(data, batch_size=3, shuffle=True, drop_last=True, seed=0)
    for _ in range(2):
        seen = torch.cat([x[:, 0, 0, 0] for x, _ in batches])
        assert len(batches) == 3 and len(seen) == 9 and len(set(seen.tolist())) == 9
        epochs.append(seen)
    assert not torch.equal(epochs[0], epochs[1])
    again = IndexBatches(data, batch_size=3, shuffle=True, drop_last=True, seed=0)
    assert torch.equal(torch.cat([x[:, 0, 0, 0] for x, _ in again]), epochs[0])
    ordered = torch.cat([x[:, 0, 0, 0] for x, _ in IndexBatches(data, 4, shuffle=False, drop_last=False)])
    assert ordered.tolist() == list(range(10))


def _numbered(n: int) -> ImageTensors:
    """n one-pixel images whose pixel is their index."""
    data = ImageTensors(torch.zeros(n, 1, 1, 1, dtype=torch.uint8), torch.zeros(n, dtype=torch.long), 1)
    data.images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return data


def _per_rank(monkeypatch: pytest.MonkeyPatch, world: int, make_batches) -> list[list[list[int]]]:  # type: ignore[no-untyped-def]
    """The image indices of each batch ``make_batches()`` gives on each of ``world`` ranks."""
    import contrastive.data.batching as data_mod

    monkeypatch.setattr(data_mod, "dist_world_size", lambda: world)
    out = []
    for r in range(world):
        monkeypatch.setattr(data_mod, "dist_rank", lambda r=r: r)
        out.append([x.flatten().tolist() for x, _ in make_batches()])
    return out


def test_runs_of_neighbouring_seeds_do_not_share_an_epoch_order() -> None:
    """With seed + epoch, seed 1's epoch 0 was seed 0's epoch 1: a seed sweep saw shifted copies of one order."""
    from contrastive.data import epoch_seed

    data = _numbered(200)

    def order(seed: int, epochs: int) -> list[list[int]]:
        batches = IndexBatches(data, 200, shuffle=True, drop_last=True, seed=seed)
        return [x.flatten().tolist() for _ in range(epochs) for x, _ in batches]

    runs = [order(seed, 3) for seed in range(3)]
    epochs = [tuple(e) for run in runs for e in run]
    assert len(set(epochs)) == 9
    assert order(0, 3) == runs[0]  # and each run stays reproducible
    assert len({epoch_seed(s, e) for s in range(1000) for e in range(1000)}) == 1000 * 1000
    assert [epoch_seed(0, e) for e in range(3)] == [0, 1, 2]  # the seed-0 figures in the docs still hold
    assert 0 <= epoch_seed(-1, 0) < 2**32 and epoch_seed(-1, 0) != epoch_seed(1, 0)


def test_index_batches_shard_without_overlap(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _numbered(16)
    shards = _per_rank(monkeypatch, 2, lambda: IndexBatches(data, 4, True, True, seed=5))
    assert [sum(map(len, s)) for s in shards] == [8, 8]
    assert sorted(i for s in shards for b in s for i in b) == list(range(16))


def test_index_batches_uneven_last_batch_is_split_without_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """drop_last=false under 2 processes (the evaluation batches): 11 images, global batch 4 -> 3 batches;
    the last 3 are split 2 + 1 (ceil per rank), so every image is seen exactly once."""
    data = _numbered(11)
    shards = _per_rank(monkeypatch, 2, lambda: IndexBatches(data, 2, shuffle=False, drop_last=False))
    assert shards == [[[0, 1], [4, 5], [8, 9]], [[2, 3], [6, 7], [10]]]


def test_batch_as_large_as_the_data_is_one_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    import contrastive.data.batching as data_mod

    data = _numbered(20)
    batches = list(IndexBatches(data, batch_size=20, shuffle=True, drop_last=True))
    assert len(batches) == 1 and sorted(batches[0][0].flatten().tolist()) == list(range(20))
    monkeypatch.setattr(data_mod, "dist_world_size", lambda: 2)
    assert len(IndexBatches(data, batch_size=10, shuffle=True, drop_last=True)) == 1
    with pytest.raises(DataError, match=r"\(11 x 2 processes\) is larger than the data set \(20 images\)"):
        IndexBatches(data, batch_size=11, shuffle=True, drop_last=True)


def test_batch_larger_than_data_is_refused() -> None:
    data = shapes(num_train=20, num_test=10).train
    with pytest.raises(DataError, match="larger than the data set"):
        IndexBatches(data, batch_size=32, shuffle=True, drop_last=True)


# imbalanced on purpose: 7, 5, 12, 4, 9 and 0 (absent) samples; class 5 never appears
COUNTS = [7, 5, 12, 4, 9, 0]


def labelled(counts: list[int]) -> ImageTensors:
    """Images whose single pixel value is the sample's index (so batches can be traced back)."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    n = len(labels)
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1)
    return ImageTensors(images, labels, len(counts))


def ids(images: torch.Tensor) -> list[int]:
    return images.flatten().tolist()


def assert_pk(labels: torch.Tensor, p: int, k: int) -> None:
    """P blocks of K equal labels, P distinct labels."""
    blocks = labels.view(p, k)
    assert (blocks == blocks[:, :1]).all(), labels
    assert len(set(blocks[:, 0].tolist())) == p, labels


def test_every_batch_is_p_classes_by_k_and_every_sample_is_seen() -> None:
    data = labelled(COUNTS)
    batches = list(PKBatches(data, batch_size=6, classes_per_batch=2, samples_per_class=3, seed=1))
    for images, labels in batches:
        assert images.shape == (6, 1, 1, 1)
        assert_pk(labels, 2, 3)
        assert (data.labels[images.flatten().long()] == labels).all()  # labels travel with their images
        assert len(set(ids(images))) == 6  # no image twice in a batch
    assert set(sum((ids(x) for x, _ in batches), [])) == set(range(len(data)))
    # rows: ceil(n/3) = 3, 2, 4, 2, 3 -> 14 rows, 2 per batch -> 7 batches (the largest class needs only 4)
    assert len(batches) == len(PKBatches(data, 6, 2, 3)) == 7


def test_epoch_length_is_set_by_the_largest_class_when_it_dominates() -> None:
    data = labelled([30, 3, 3])  # rows 10, 1, 1: one batch per row of class 0, the others refilled
    batches = list(PKBatches(data, batch_size=6, classes_per_batch=2, samples_per_class=3))
    assert len(batches) == 10
    assert all((y == 0).any() for _, y in batches)
    assert set(sum((ids(x) for x, _ in batches), [])) == set(range(36))


def test_same_seed_same_batches_other_epoch_other_batches() -> None:
    data = labelled(COUNTS)

    def epoch(seed: int, e: int) -> list[list[int]]:
        return [ids(x) for x, _ in PKBatches(data, 6, 2, 3, seed=seed, epoch_source=lambda: e)]

    assert epoch(3, 0) == epoch(3, 0)
    assert epoch(3, 0) != epoch(3, 1)
    assert epoch(3, 0) != epoch(4, 0)
    # epoch e is drawn from (seed, e): a resumed run at epoch 1 sees what an uninterrupted one sees
    sampler = PKBatches(data, 6, 2, 3, seed=3)
    list(sampler)
    assert [ids(x) for x, _ in sampler] == epoch(3, 1)


def test_two_ranks_split_each_global_batch_without_overlap(monkeypatch: pytest.MonkeyPatch) -> None:
    data = labelled(COUNTS)
    monkeypatch.setattr(data_mod, "dist_world_size", lambda: 2)
    per_rank = []
    for r in range(2):
        monkeypatch.setattr(data_mod, "dist_rank", lambda r=r: r)
        per_rank.append(list(PKBatches(data, batch_size=4, classes_per_batch=2, samples_per_class=2, seed=7)))
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    seen: set[int] = set()
    for (x0, y0), (x1, y1) in zip(*per_rank):
        assert_pk(y0, 2, 2)
        assert_pk(y1, 2, 2)
        assert not set(y0.tolist()) & set(y1.tolist())  # W * P distinct classes per global batch
        assert not set(ids(x0)) & set(ids(x1))
        seen |= set(ids(x0)) | set(ids(x1))
    assert seen == set(range(len(data)))
    # the global batch of the two ranks is the single-process batch with P = 4, split by classes
    monkeypatch.setattr(data_mod, "dist_world_size", lambda: 1)
    monkeypatch.setattr(data_mod, "dist_rank", lambda: 0)
    single = list(PKBatches(data, batch_size=8, classes_per_batch=4, samples_per_class=2, seed=7))
    assert [ids(x) for x, _ in single] == [ids(x0) + ids(x1) for (x0, _), (x1, _) in zip(*per_rank)]


def test_bad_settings_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    data = labelled(COUNTS)
    with pytest.raises(ValueError) as err:
        PKBatches(data, batch_size=64, classes_per_batch=8, samples_per_class=4)
    assert all(
        s in str(err.value) for s in ("sampler.classes_per_batch", "sampler.samples_per_class", "data.batch_size")
    )
    assert isinstance(err.value, DataError)  # the CLI prints DataErrors as one line, exit status 2
    with pytest.raises(SamplerError, match="has 5"):  # 5 classes present, 6 asked for
        PKBatches(data, batch_size=12, classes_per_batch=6, samples_per_class=2)
    with pytest.raises(SamplerError, match="class 1: 5, class 3: 4"):
        PKBatches(data, batch_size=12, classes_per_batch=2, samples_per_class=6)
    with pytest.raises(SamplerError, match=">= 2"):
        PKBatches(data, batch_size=5, classes_per_batch=5, samples_per_class=1)
    # the CLI checks for the processes the Trainer will start, before they exist (it failed inside fit,
    # after the untrained measurement)
    with pytest.raises(SamplerError, match="3 x 2 process"):
        PKBatches(data, batch_size=6, classes_per_batch=3, samples_per_class=2, world=2)
    with pytest.raises(DataError, match=r"the batch \(30 x 2 processes\) is larger than the data set \(37"):
        IndexBatches(data, batch_size=30, shuffle=True, drop_last=True, world=2)
    monkeypatch.setattr(data_mod, "dist_world_size", lambda: 2)
    with pytest.raises(SamplerError, match="2 process"):
        PKBatches(data, batch_size=6, classes_per_batch=3, samples_per_class=2)


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 25), min_size=2, max_size=9),
    k=st.integers(2, 4),
    slots=st.integers(2, 5),
    seed=st.integers(0, 2**16),
)
def test_pk_epoch_covers_every_sample_in_the_promised_number_of_batches(
    counts: list[int], k: int, slots: int, seed: int
) -> None:
    counts = [c if c == 0 or c >= k else k for c in counts]
    if sum(c > 0 for c in counts) < slots:
        return
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
    batches = pk_epoch(labels, slots, k, torch.Generator().manual_seed(seed))  # (L, slots, k)
    rows = [math.ceil(n / k) for n in counts]
    assert batches.shape == (max(math.ceil(sum(rows) / slots), max(rows)), slots, k)
    classes = labels[batches]
    assert (classes == classes[..., :1]).all()
    assert all(len(set(b.tolist())) == slots for b in classes[..., 0])
    assert all(len(set(b.flatten().tolist())) == slots * k for b in batches)
    assert set(batches.flatten().tolist()) == set(range(len(labels)))


def test_schedule_takes_the_fullest_classes_first() -> None:
    classes, fresh = schedule_classes(torch.tensor([3, 1, 1, 0]), 2, torch.Generator().manual_seed(0))
    assert classes.shape == (3, 2)
    assert (classes == 0).any(dim=1).all()  # class 0 (3 rows) is in every batch
    assert fresh.sum() == 5 and not (classes == 3).any()  # 5 rows, one filler slot; the empty class never


def test_len_with_two_ranks_is_the_number_of_batches_each_rank_yields(monkeypatch: pytest.MonkeyPatch) -> None:
    """With W ranks a global batch holds W * P rows, so ``len`` divides the rows by P * W, not by P."""
    monkeypatch.setattr(data_mod, "dist_world_size", lambda: 2)
    # K = 2. COUNTS: rows 4, 3, 6, 2, 5 = 20; 20 / (2 * 2) = 5 < 6 rows of class 2, so 6 batches.
    # [4] * 8: 2 rows each = 16; 16 / (2 * 2) = 4 batches per rank (16 / 2 would be 8).
    for counts, batches in ((COUNTS, 6), ([4] * 8, 4)):
        data = labelled(counts)
        for r in range(2):
            monkeypatch.setattr(data_mod, "dist_rank", lambda r=r: r)
            sampler = PKBatches(data, batch_size=4, classes_per_batch=2, samples_per_class=2, seed=7)
            assert len(sampler) == len(list(sampler)) == batches


def test_schedule_assigns_the_chosen_classes_to_slots_at_random() -> None:
    """The fullest class is not always in slot 0 (rank 0): the chosen classes are permuted, as the docstring says."""
    slots_of_fullest = set()
    for seed in range(20):
        classes, _ = schedule_classes(torch.tensor([4, 1, 1, 1]), 2, torch.Generator().manual_seed(seed))
        first = classes[0].tolist()  # class 0 (4 rows vs 1) is always chosen for the first batch
        assert 0 in first
        slots_of_fullest.add(first.index(0))
    assert slots_of_fullest == {0, 1}
