"""Cross-batch memory (XBM): the metric losses with a memory against loops over batch + memory, the empty
memory, degenerate batches, half precision, and the FIFO of embeddings and labels."""

from __future__ import annotations

import math

import pytest
import torch

from contrastive.losses import ContrastiveMargin, SupCon, TripletMargin, contrastive_margin, sup_con, triplet_margin
from contrastive.memory import CrossBatchMemory

F64 = torch.float64
MINING = ["all", "batch_hard", "semi_hard"]


def rows(x: torch.Tensor, normalize: bool = True) -> list[list[float]]:
    out = []
    for row in x.double().tolist():
        norm = math.sqrt(sum(v * v for v in row))
        out.append([v / norm for v in row] if normalize and norm else row)
    return out


def naive_triplet(x, y, mem, mem_y, margin, mining, normalize=True) -> float:  # type: ignore[no-untyped-def]
    """Anchors: the batch rows. Candidates: batch + memory, the anchor's own batch row left out."""
    anchors, cands = rows(x, normalize), rows(torch.cat([x, mem]), normalize)
    labels = y.tolist() + mem_y.tolist()
    losses = []
    for a, va in enumerate(anchors):
        d = [math.dist(va, c) for c in cands]
        pos = [p for p in range(len(cands)) if p != a and labels[p] == labels[a]]
        neg = [k for k in range(len(cands)) if labels[k] != labels[a]]
        if not pos or not neg:
            continue
        if mining == "all":
            losses += [v for p in pos for k in neg if (v := max(0.0, d[p] - d[k] + margin)) > 0]
        elif mining == "batch_hard":
            losses.append(max(0.0, max(d[p] for p in pos) - min(d[k] for k in neg) + margin))
        else:
            for p in pos:
                farther = [d[k] for k in neg if d[k] > d[p]]
                losses.append(max(0.0, d[p] - (min(farther) if farther else max(d[k] for k in neg)) + margin))
    return sum(losses) / len(losses) if losses else 0.0


def naive_pairs(x, y, mem, mem_y, pos_margin, neg_margin) -> float:  # type: ignore[no-untyped-def]
    anchors, cands = rows(x), rows(torch.cat([x, mem]))
    labels = y.tolist() + mem_y.tolist()
    pull, push = [], []
    for a, va in enumerate(anchors):
        for j, c in enumerate(cands):
            if j == a:
                continue
            d = math.dist(va, c)
            if labels[j] == labels[a]:
                pull.append(0.5 * max(0.0, d - pos_margin) ** 2)
            else:
                push.append(0.5 * max(0.0, neg_margin - d) ** 2)
    return (sum(pull) / len(pull) if pull else 0.0) + (sum(push) / len(push) if push else 0.0)


def naive_sup_con(x, y, mem, mem_y, t) -> float:  # type: ignore[no-untyped-def]
    anchors, cands = rows(x), rows(torch.cat([x, mem]))
    labels = y.tolist() + mem_y.tolist()
    per_anchor = []
    for a, va in enumerate(anchors):
        others = [j for j in range(len(cands)) if j != a]
        positives = [p for p in others if labels[p] == labels[a]]
        if not positives:
            continue
        logits = {j: sum(u * v for u, v in zip(va, cands[j])) / t for j in others}
        top = max(logits.values())
        lse = top + math.log(sum(math.exp(v - top) for v in logits.values()))
        per_anchor.append(-sum(logits[p] - lse for p in positives) / len(positives))
    return sum(per_anchor) / len(per_anchor) if per_anchor else 0.0


def batch_and_memory(n: int = 8, m: int = 11, d: int = 5, classes: int = 4, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    x, mem = torch.randn(n, d, generator=g, dtype=F64), torch.randn(m, d, generator=g, dtype=F64)
    return x, torch.arange(n) % classes, mem, torch.randint(0, classes + 1, (m,), generator=g)  # a class only in memory


def losses_with(memory: tuple[torch.Tensor, ...]):  # type: ignore[no-untyped-def]
    """Each loss as a function of the batch, with ``memory`` = () or (memory, memory_labels)."""
    kw = dict(zip(("memory", "memory_labels"), memory))
    return {
        **{
            f"triplet_{mining}": (lambda x, y, mining=mining: triplet_margin(x, y, 0.5, mining, **kw))
            for mining in MINING
        },
        "triplet_raw": lambda x, y: triplet_margin(x, y, 1.0, "batch_hard", normalize=False, **kw),
        "contrastive_margin": lambda x, y: contrastive_margin(x, y, 0.1, 1.2, **kw),
        "sup_con": lambda x, y: sup_con(x, y, 0.2, **kw),
        "sup_con_chunked": lambda x, y: sup_con(x, y, 0.2, chunk_size=3, **kw),
    }


@pytest.mark.parametrize("mining", MINING)
@pytest.mark.parametrize("seed", [0, 1])
def test_triplet_with_memory_is_the_batch_against_batch_plus_memory(mining: str, seed: int) -> None:
    x, y, mem, mem_y = batch_and_memory(seed=seed)
    got = triplet_margin(x, y, 0.5, mining, memory=mem, memory_labels=mem_y)
    expected = naive_triplet(x, y, mem, mem_y, 0.5, mining)
    assert expected > 0 and got.item() == pytest.approx(expected, rel=1e-12)
    assert got.item() != pytest.approx(triplet_margin(x, y, 0.5, mining).item(), rel=1e-6)  # the memory counts
    raw = triplet_margin(x, y, 1.0, mining, normalize=False, memory=mem, memory_labels=mem_y)
    assert raw.item() == pytest.approx(naive_triplet(x, y, mem, mem_y, 1.0, mining, normalize=False), rel=1e-12)


def test_pairs_and_sup_con_with_memory_are_the_batch_against_batch_plus_memory() -> None:
    x, y, mem, mem_y = batch_and_memory(seed=2)
    got = contrastive_margin(x, y, 0.1, 1.2, memory=mem, memory_labels=mem_y)
    assert got.item() == pytest.approx(naive_pairs(x, y, mem, mem_y, 0.1, 1.2), rel=1e-12)
    for chunk in (None, 3):
        got = sup_con(x, y, 0.2, chunk_size=chunk, memory=mem, memory_labels=mem_y)
        assert got.item() == pytest.approx(naive_sup_con(x, y, mem, mem_y, 0.2), rel=1e-12)


def test_an_empty_memory_is_the_plain_loss_bitwise() -> None:
    x, y, _, _ = batch_and_memory(seed=3)
    empty = (torch.zeros(0, 5, dtype=F64), torch.zeros(0, dtype=torch.long))
    for (name, plain), with_empty in zip(losses_with(()).items(), losses_with(empty).values()):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        value, value_empty = plain(a, y), with_empty(b, y)
        value.backward()
        value_empty.backward()
        assert torch.equal(value, value_empty), name
        assert a.grad is not None and b.grad is not None and torch.equal(a.grad, b.grad), name


def test_gradients_reach_the_batch_only() -> None:
    """gradcheck through the batch with a memory; the memory is a constant of the loss (detached rows)."""
    x, y, mem, mem_y = batch_and_memory(n=6, m=5, d=3, seed=4)
    for name, fn in losses_with((mem, mem_y)).items():
        assert torch.autograd.gradcheck(lambda e, fn=fn: fn(e, y), (x.clone().requires_grad_(),)), name
    stored = mem.clone().requires_grad_()
    triplet_margin(x.requires_grad_(), y, 0.5, memory=stored.detach(), memory_labels=mem_y).backward()
    assert stored.grad is None and x.grad is not None


def test_degenerate_batches_with_a_memory() -> None:
    """One sample whose class the memory lacks, and one class everywhere: no valid triplet or pair, a
    graph-connected zero; one sample with a same-class row in memory: a finite loss equal to the loop's."""
    g = torch.Generator().manual_seed(5)
    mem = torch.randn(4, 3, generator=g, dtype=F64)
    for x, y, mem_y in [
        (torch.randn(1, 3, generator=g, dtype=F64), torch.tensor([7]), torch.tensor([0, 1, 2, 3])),  # no positive
        (torch.randn(3, 3, generator=g, dtype=F64), torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long)),
    ]:
        for name, fn in losses_with((mem, mem_y)).items():
            e = x.clone().requires_grad_()
            value = fn(e, y)
            if name.startswith("triplet"):
                assert value.item() == 0.0, name
            value.backward()
            assert e.grad is not None and bool(torch.isfinite(e.grad).all()) and torch.isfinite(value), name
    x, y, mem_y = torch.randn(1, 3, generator=g, dtype=F64), torch.tensor([1]), torch.tensor([0, 1, 2, 1])
    assert triplet_margin(x, y, 0.5, "batch_hard", memory=mem, memory_labels=mem_y).item() == pytest.approx(
        naive_triplet(x, y, mem, mem_y, 0.5, "batch_hard"), rel=1e-12
    )
    assert sup_con(x, y, 0.2, memory=mem, memory_labels=mem_y).item() == pytest.approx(
        naive_sup_con(x, y, mem, mem_y, 0.2), rel=1e-12
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_batch_and_memory(dtype: torch.dtype) -> None:
    x, y, mem, mem_y = batch_and_memory(n=12, m=20, d=8, seed=6)
    for name, fn in losses_with((mem.to(dtype), mem_y)).items():
        value = fn(x.to(dtype), y)
        assert value.dtype == torch.float32, name
        exact = losses_with((mem.to(dtype).double(), mem_y))[name](x.to(dtype).double(), y)
        assert value.item() == pytest.approx(exact.item(), rel=1e-5, abs=1e-6), name


def test_modules_pass_the_memory_and_refuse_half_of_it() -> None:
    x, y, mem, mem_y = batch_and_memory(seed=7)
    for module, fn in [
        (TripletMargin(0.3, "semi_hard"), lambda **kw: triplet_margin(x, y, 0.3, "semi_hard", **kw)),
        (ContrastiveMargin(0.1, 1.2), lambda **kw: contrastive_margin(x, y, 0.1, 1.2, **kw)),
        (SupCon(0.2), lambda **kw: sup_con(x, y, 0.2, **kw)),
    ]:
        assert "embeddings_labels_memory" in module.input_forms
        assert torch.equal(module(x, y, mem, mem_y), fn(memory=mem, memory_labels=mem_y))
    with pytest.raises(ValueError, match="give memory and memory_labels together"):
        triplet_margin(x, y, memory=mem)
    with pytest.raises(
        ValueError, match=r"memory must be \(M, 5\) with memory_labels \(M,\), got \(11, 5\) and \(10,\)"
    ):
        sup_con(x, y, memory=mem, memory_labels=mem_y[:10])


# --------------------------------------------------------------------------- the memory itself


def test_memory_fills_then_wraps_keeping_the_newest_rows() -> None:
    memory = CrossBatchMemory(size=5, dim=2)
    e, labels = memory()
    assert e.shape == (0, 2) and labels.shape == (0,)
    memory.enqueue(torch.ones(3, 2), torch.tensor([1, 2, 3]))
    e, labels = memory()
    assert torch.equal(labels, torch.tensor([1, 2, 3])) and (int(memory.filled), int(memory.ptr)) == (3, 3)
    memory.enqueue(torch.full((4, 2), 2.0), torch.tensor([4, 5, 6, 7]))  # wraps: slots 3, 4, 0, 1
    e, labels = memory()
    assert torch.equal(labels, torch.tensor([6, 7, 3, 4, 5])) and (int(memory.filled), int(memory.ptr)) == (5, 2)
    assert torch.equal(e[:, 0], torch.tensor([2.0, 2.0, 1.0, 2.0, 2.0]))
    memory.enqueue(torch.arange(14.0).view(7, 2), torch.arange(7))  # more than M rows: the newest 5 stay
    one_by_one = CrossBatchMemory(size=5, dim=2)
    for start, n in ((0, 3), (3, 4)):
        one_by_one.enqueue(torch.ones(n, 2) * (1 + (start > 0)), torch.arange(start + 1, start + n + 1))
    for i in range(7):
        one_by_one.enqueue(torch.arange(14.0).view(7, 2)[i : i + 1], torch.tensor([i]))
    for name, buffer in memory.state_dict().items():
        assert torch.equal(buffer, one_by_one.state_dict()[name]), name


def test_memory_rows_are_detached_copies_in_its_dtype() -> None:
    memory = CrossBatchMemory(size=4, dim=3)
    e = torch.randn(2, 3, dtype=F64, requires_grad=True)
    memory.enqueue(e * 2, torch.tensor([0, 1]))
    stored, _ = memory()
    assert stored.dtype == torch.float32 and not stored.requires_grad
    stored += 1  # a copy: the buffer is untouched
    assert torch.equal(memory()[0], (e * 2).detach().float())
    assert set(memory.state_dict()) == {"embeddings", "labels", "ptr", "filled"}  # checkpointed
    with pytest.raises(ValueError, match=r"the memory takes embeddings \(n, 3\) and labels \(n,\), got \(2, 4\)"):
        memory.enqueue(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="memory size and dim must be >= 1, got size=0, dim=3"):
        CrossBatchMemory(0, 3)
    full = CrossBatchMemory(size=2, dim=3)
    full.enqueue(torch.zeros(2, 3), torch.tensor([0, 1]))
    assert len(full()[0]) == 2
    full.load_state_dict(CrossBatchMemory(size=2, dim=3).state_dict())  # a checkpoint of an empty memory
    assert len(full()[0]) == 0
