"""DINO's loss against a float64 loop of the paper's pseudocode; its centre update on one and two processes."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from naive_losses import log_softmax_at
from torch import Tensor

from contrastive.losses import DINOLoss, dino_center_update, dino_loss, input_forms


def _softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    e = [math.exp(v - top) for v in logits]
    return [v / sum(e) for v in e]


def _naive(s: Tensor, t: Tensor, c: Tensor, ts: float, tt: float) -> float:
    """Algorithm 1 of the paper, one pair (teacher view g, student view v != g) and one image at a time."""
    s_, t_, c_ = s.double().tolist(), t.double().tolist(), c.double().tolist()
    pairs, total = 0, 0.0
    for g in range(len(t_)):
        for v in range(len(s_)):
            if v == g:
                continue
            pairs += 1
            per_image = 0.0
            for n in range(len(s_[v])):
                target = _softmax([(x - ck) / tt for x, ck in zip(t_[g][n], c_)])
                logits = [x / ts for x in s_[v][n]]
                per_image -= sum(target[k] * log_softmax_at(logits, k) for k in range(len(logits)))
            total += per_image / len(s_[v])
    return total / pairs


def _naive_torch(s: Tensor, t: Tensor, c: Tensor, ts: float, tt: float) -> Tensor:
    """The same loop in float64 torch, literal exp and log, so that autograd gives its gradient."""
    total, pairs = s.new_zeros(()), 0
    for g in range(len(t)):
        for v in range(len(s)):
            if v != g:
                e = torch.exp((t[g] - c) / tt)
                target = e / e.sum(-1, keepdim=True)
                log_p = s[v] / ts - torch.log(torch.exp(s[v] / ts).sum(-1, keepdim=True))
                total, pairs = total - (target * log_p).sum(-1).mean(), pairs + 1
    return total / pairs


def _outputs(g: int, v: int, n: int, k: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(v, n, k, generator=gen, dtype=torch.float64) * 2
    t = torch.randn(g, n, k, generator=gen, dtype=torch.float64) * 2
    return s, t, torch.randn(k, generator=gen, dtype=torch.float64) * 0.5


CASES = [(1, 2, 3, 3, 0.1, 0.04), (2, 2, 4, 5, 0.1, 0.04), (2, 8, 3, 7, 0.1, 0.07), (3, 5, 2, 4, 0.5, 1.0)]


@pytest.mark.parametrize(("g", "v", "n", "k", "ts", "tt"), CASES)
def test_dino_loss_matches_the_loop(g: int, v: int, n: int, k: int, ts: float, tt: float) -> None:
    s, t, c = _outputs(g, v, n, k, seed=g * 10 + v)
    assert dino_loss(s, t, c, ts, tt).item() == pytest.approx(_naive(s, t, c, ts, tt), rel=1e-12, abs=1e-12)
    loss32 = dino_loss(s.float(), t.float(), c.float(), ts, tt)
    assert loss32.dtype == torch.float32
    assert loss32.item() == pytest.approx(_naive(s, t, c, ts, tt), rel=1e-5)


@pytest.mark.parametrize(("g", "v", "n", "k", "ts", "tt"), CASES)
def test_gradients_match_the_loop_and_reach_only_the_student(
    g: int, v: int, n: int, k: int, ts: float, tt: float
) -> None:
    s, t, c = _outputs(g, v, n, k, seed=100 + v)
    grads = []
    for fn in (dino_loss, _naive_torch):
        a = s.clone().requires_grad_()
        b, cc = t.clone().requires_grad_(), c.clone().requires_grad_()
        loss = fn(a, b, cc, ts, tt)
        if fn is dino_loss:  # the teacher side is a constant target: nothing flows back to it
            grad_t, grad_c = torch.autograd.grad(loss, (b, cc), retain_graph=True, allow_unused=True)
            assert grad_t is None and grad_c is None
        (grad_s,) = torch.autograd.grad(loss, (a,))
        grads.append(grad_s)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_a_uniform_student_costs_log_k_whatever_the_teacher() -> None:
    """Closed form: log_softmax of equal logits is -log K, and each target sums to 1."""
    _, t, c = _outputs(2, 6, 5, 9)
    assert dino_loss(torch.zeros(6, 5, 9, dtype=torch.float64), t, c).item() == pytest.approx(math.log(9), rel=1e-14)


def test_the_centre_and_the_temperatures_change_the_loss_as_the_formula_says() -> None:
    """A constant centre shifts every teacher logit alike (no change); a sharper teacher changes the targets."""
    s, t, c = _outputs(2, 4, 3, 6, seed=5)
    base = dino_loss(s, t, c)
    torch.testing.assert_close(dino_loss(s, t + 3.0, c + 3.0), base, rtol=1e-12, atol=0)
    assert not torch.allclose(dino_loss(s, t, c, teacher_temperature=0.5), base)
    assert not torch.allclose(dino_loss(s, t, torch.zeros_like(c)), base)


@pytest.mark.parametrize(("dtype", "big"), [(torch.float16, torch.finfo(torch.float16).max), (torch.bfloat16, 1e30)])
def test_finite_in_half_precision_at_extreme_logits(dtype: torch.dtype, big: float) -> None:
    """Logits of +-big at T_t = 0.04, upcast before any division: fp16's largest finite value; bf16 at 1e30
    (its largest, 3.4e38, divided by a temperature leaves float32's range, as a float32 input would)."""
    s = torch.tensor([[[big, -big, 0.0]], [[-big, big, 1.0]], [[0.0, 0.0, big]]], dtype=dtype).requires_grad_()
    t = torch.tensor([[[big, -big, 0.0]], [[-big, 0.0, big]]], dtype=dtype)
    c = torch.tensor([0.0, big, -big], dtype=dtype)
    loss = dino_loss(s, t, c)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast cannot pull the loss into bf16
        assert dino_loss(s.float(), t.float(), c.float()).dtype == torch.float32


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        (((2, 4, 5), (2, 4, 5), (6,)), "must share N images and K outputs"),
        (((2, 4, 5), (2, 3, 5), (5,)), "must share N images and K outputs"),
        (((2, 4, 5), (3, 4, 5), (5,)), "1 <= G <= V global views among V >= 2"),
        (((1, 4, 5), (1, 4, 5), (5,)), "one view leaves no pair"),
        (((8, 5), (8, 5), (5,)), r"stack the views along a first dimension"),
    ],
)
def test_bad_shapes_are_one_value_error(shapes: tuple[tuple[int, ...], ...], match: str) -> None:
    s, t, c = (torch.zeros(shape) for shape in shapes)
    with pytest.raises(ValueError, match=match):
        dino_loss(s, t, c)


def test_the_module_holds_the_temperatures_and_declares_its_form() -> None:
    loss = DINOLoss(student_temperature=0.2, teacher_temperature=0.07, warmup_teacher_temperature=0.04)
    assert input_forms(loss) == {"student_teacher_center"}
    assert not list(loss.parameters()) and not list(loss.buffers())
    s, t, c = _outputs(2, 3, 4, 5)
    torch.testing.assert_close(loss(s, t, c), dino_loss(s, t, c, 0.2, 0.07), rtol=0, atol=0)
    torch.testing.assert_close(loss(s, t, c, teacher_temperature=0.04), dino_loss(s, t, c, 0.2, 0.04), rtol=0, atol=0)
    assert DINOLoss(teacher_temperature=0.05).warmup_teacher_temperature == 0.05  # no warm-up by default
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        DINOLoss(student_temperature=0.0)


# --------------------------------------------------------------------------- the centre


def test_the_centre_update_is_its_formula() -> None:
    _, t, c = _outputs(2, 2, 6, 5, seed=3)
    new = dino_center_update(c, t, momentum=0.9)
    expected = 0.9 * c + 0.1 * t.reshape(-1, 5).mean(0)
    torch.testing.assert_close(new, expected, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(dino_center_update(c, t, momentum=1.0), c, rtol=0, atol=0)
    assert not dino_center_update(c, t.requires_grad_()).requires_grad
    assert dino_center_update(c.float(), t.half()).dtype == torch.float32
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        dino_center_update(c, t, momentum=1.5)


WORLD = 2


def _centre_worker(r: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=r, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        _, t, c = _outputs(2, 2, 4 * WORLD, 5, seed=7)
        local = t[:, r * 4 : (r + 1) * 4]  # (G, N / W, K): this rank's images
        torch.save(dino_center_update(c, local, 0.9), Path(out_dir) / f"rank{r}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_processes_update_the_centre_as_one_process_with_both_batches(tmp_path: Path, free_port) -> None:  # type: ignore[no-untyped-def]
    mp.start_processes(_centre_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    _, t, c = _outputs(2, 2, 4 * WORLD, 5, seed=7)
    assert torch.equal(ranks[0], ranks[1])  # every process holds the same centre
    torch.testing.assert_close(ranks[0], dino_center_update(c, t, 0.9), rtol=1e-15, atol=1e-15)
