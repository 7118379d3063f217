"""Two gloo processes on CPU reproduce the single-process loss and gradients exactly."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from contrastive.distributed import gather_with_grad, rank, world_size
from contrastive.losses import contrastive_margin, dcl, info_nce, nt_xent, sup_con, triplet_margin

WORLD = 2
N, D_IN, D_OUT = 6, 5, 4  # per-rank rows


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "x1": torch.randn(WORLD * N, D_IN, generator=g, dtype=torch.float64),
        "x2": torch.randn(WORLD * N, D_IN, generator=g, dtype=torch.float64),
        "queue": torch.randn(7, D_OUT, generator=g, dtype=torch.float64),
        "labels": torch.randint(0, 4, (2 * WORLD * N,), generator=g),
    }


def _losses(
    net: nn.Module, x1: torch.Tensor, x2: torch.Tensor, labels: torch.Tensor, queue: torch.Tensor, gather: bool
):  # type: ignore[no-untyped-def]
    """Each case maps (local x1, local x2, local labels of the stacked views) to a loss."""
    z1, z2 = net(x1), net(x2)
    return {
        "nt_xent": nt_xent(z1, z2, 0.2, gather=gather),
        "nt_xent_chunked": nt_xent(z1, z2, 0.2, gather=gather, chunk_size=5),
        "info_nce": info_nce(z1, z2, None, 0.1, gather=gather),
        "info_nce_queue": info_nce(z1, z2, queue, 0.1, gather=gather),
        "sup_con": sup_con(torch.cat([z1, z2]), labels, 0.1, gather=gather),
        "sup_con_chunked": sup_con(torch.cat([z1, z2]), labels, 0.1, gather=gather, chunk_size=4),
        "dcl": dcl(z1, z2, 0.2, gather=gather),
        "dcl_chunked": dcl(z1, z2, 0.2, gather=gather, chunk_size=5),
        # DCLW's weight is a softmax over the global batch: per-rank weights fail this test
        "dclw": dcl(z1, z2, 0.2, 0.5, gather=gather),
        "dclw_chunked": dcl(z1, z2, 0.2, 0.5, gather=gather, chunk_size=4),
        # metric losses: margins large enough that most terms are active; "all" averages the
        # non-zero triplets, a count that differs between ranks
        **{
            f"triplet_{mining}": triplet_margin(torch.cat([z1, z2]), labels, 0.5, mining, gather=gather)
            for mining in ("all", "batch_hard", "semi_hard")
        },
        "triplet_raw_squared": triplet_margin(
            torch.cat([z1, z2]), labels, 1.0, "batch_hard", squared=True, normalize=False, gather=gather
        ),
        "contrastive_margin": contrastive_margin(torch.cat([z1, z2]), labels, 0.2, 1.2, gather=gather),
    }


def _make_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Linear(D_IN, D_OUT).double()


def _local_labels(labels: torch.Tensor, r: int) -> torch.Tensor:
    """Labels of (view-1 rows, view-2 rows) of rank r: the global label vector is laid out
    as [view 1 of all ranks, view 2 of all ranks] in the reference, and gathered per rank
    as [rank 0: (v1, v2), rank 1: (v1, v2)], so each rank holds its own rows of both views."""
    first, second = labels[: WORLD * N], labels[WORLD * N :]
    return torch.cat([first[r * N : (r + 1) * N], second[r * N : (r + 1) * N]])


def _worker(r: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=r, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        data = _data()
        rows = slice(r * N, (r + 1) * N)
        results = {}
        for name in _losses(_make_net(), data["x1"][:1], data["x2"][:1], data["labels"][:2], data["queue"], False):
            net = DistributedDataParallel(_make_net())
            loss = _losses(
                net, data["x1"][rows], data["x2"][rows], _local_labels(data["labels"], r), data["queue"], True
            )[name]
            loss.backward()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            results[name] = (mean_loss / WORLD, [p.grad.clone() for p in net.parameters()])
        gathered = gather_with_grad(torch.full((2,), float(r)))
        # autograd hands the add's gradient to both operands: the gather must not all-reduce it in place
        x, bias, c = torch.ones(2, 3, requires_grad=True), torch.zeros(4, 3, requires_grad=True), torch.rand(4, 3)
        doubled = bias * 2  # recorded before the gather, so its backward runs after the gather's
        ((gather_with_grad(x) + doubled) * c).sum().backward()
        results["shared_grad"] = (bias.grad, c)
        torch.save((r, results, world_size(), rank(), gathered), os.path.join(out_dir, f"rank{r}.pt"))
    finally:
        dist.barrier()  # no rank tears gloo down while its peer still talks (SIGABRT otherwise)
        dist.destroy_process_group()


def test_gather_is_identity_without_process_group() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x and world_size() == 1 and rank() == 0


def test_two_processes_equal_one_process(tmp_path, free_port) -> None:  # type: ignore[no-untyped-def]
    data = _data()
    # the reference: one process, global batch; labels for cat([z1_all, z2_all]) must be
    # reordered to match, which _local_labels does per rank
    reference = {}
    names = list(_losses(_make_net(), data["x1"], data["x2"], data["labels"], data["queue"], False))
    for name in names:
        net = _make_net()
        loss = _losses(net, data["x1"], data["x2"], data["labels"], data["queue"], False)[name]
        loss.backward()
        reference[name] = (loss.detach(), [p.grad for p in net.parameters()])

    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    reports = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for r, results, size, reported_rank, gathered in reports:
        assert (size, reported_rank) == (WORLD, r)
        assert torch.equal(gathered, torch.tensor([0.0, 0.0, 1.0, 1.0]))
        bias_grad, c = results.pop("shared_grad")
        torch.testing.assert_close(bias_grad, 2 * c, rtol=0, atol=0)  # not 2 * WORLD * c
        assert set(results) == set(names)
        for name in names:
            loss, grads = results[name]
            ref_loss, ref_grads = reference[name]
            torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0, msg=name)
            for g, ref in zip(grads, ref_grads):
                torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-14, msg=name)
