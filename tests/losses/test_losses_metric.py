"""Triplet and contrastive margin losses: loop references, gradients, dtypes, degenerate batches."""

from __future__ import annotations

import naive_losses as naive
import pytest
import torch

from contrastive.losses import ContrastiveMargin, TripletMargin, contrastive_margin, pairwise_distance, triplet_margin

F64 = torch.float64
MINING = ["all", "batch_hard", "semi_hard"]


def batch(n: int, d: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    return x, torch.arange(n) % classes


CASES = [
    (6, 3, 2, 0.2, False, True),
    (10, 5, 3, 0.5, True, True),
    (12, 4, 4, 0.1, False, False),
    (16, 8, 5, 1.0, True, False),
]


@pytest.mark.parametrize("mining", MINING)
@pytest.mark.parametrize(("n", "d", "classes", "margin", "squared", "normalize"), CASES)
def test_triplet_matches_loop(
    mining: str, n: int, d: int, classes: int, margin: float, squared: bool, normalize: bool
) -> None:
    x, y = batch(n, d, classes, seed=n + d)
    expected = naive.triplet(x, y, margin, mining, squared, normalize)
    assert expected > 0  # the cases exercise active triplets
    got = triplet_margin(x, y, margin, mining, squared, normalize)
    assert got.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("mining", MINING)
@pytest.mark.parametrize("margin", [0.0, 0.3])
def test_soft_margin_triplet_matches_loop(mining: str, margin: float) -> None:
    """softplus(d_ap - d_an + margin) (Hermans et al. 2017 with margin 0); 'all' averages every valid triplet."""
    x, y = batch(10, 5, 3, seed=4)
    got = triplet_margin(x, y, margin, mining, soft=True)
    assert got.item() == pytest.approx(naive.triplet(x, y, margin, mining, False, True, soft=True), rel=1e-12)
    assert got.item() > triplet_margin(x, y, margin, mining).item()  # softplus(v) > max(0, v)
    assert TripletMargin(margin, mining, soft=True)(x, y).item() == got.item()
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: triplet_margin(e, y, margin, mining, soft=True), (x,))


def test_semi_hard_fallback_uses_farthest_negative() -> None:
    # anchor 0 at origin-ish; its positive farther than every negative -> no semi-hard negative
    x = torch.tensor([[0.0, 0.0], [3.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=F64)
    y = torch.tensor([0, 0, 1, 1])
    loss = triplet_margin(x, y, margin=0.5, mining="semi_hard", normalize=False)
    assert loss.item() == pytest.approx(naive.triplet(x, y, 0.5, "semi_hard", False, False), rel=1e-12)
    # pair (0,1): d_ap=3, negatives 1 and 2 -> fallback to 2 -> 3 - 2 + .5 = 1.5 contributes
    assert loss.item() > 0.3


@pytest.mark.parametrize(
    ("n", "classes", "pos_margin", "neg_margin", "squared", "normalize"),
    [
        (6, 2, 0.0, 1.0, False, True),
        (10, 3, 0.2, 1.5, True, True),
        (9, 4, 0.5, 4.0, False, False),
    ],
)
def test_contrastive_matches_loop(
    n: int, classes: int, pos_margin: float, neg_margin: float, squared: bool, normalize: bool
) -> None:
    x, y = batch(n, 5, classes, seed=n)
    expected = naive.contrastive(x, y, pos_margin, neg_margin, squared, normalize)
    got = contrastive_margin(x, y, pos_margin, neg_margin, squared, normalize)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_pairwise_distance_exact_and_scale_safe() -> None:
    x, _ = batch(7, 4, 2, seed=0)
    expected = torch.tensor([[naive.dist(a, b) for b in x.tolist()] for a in x.tolist()], dtype=F64)
    torch.testing.assert_close(pairwise_distance(x), expected, rtol=1e-14, atol=0)
    assert torch.equal(pairwise_distance(x).diagonal(), torch.zeros(7, dtype=F64))
    big = pairwise_distance(x.float() * 1e30)
    assert torch.isfinite(big).all()
    torch.testing.assert_close(big / 1e30, expected.float(), rtol=1e-5, atol=0)


def test_gradcheck_metric_losses() -> None:
    x, y = batch(8, 3, 3, seed=4)
    x.requires_grad_()
    for mining in MINING:
        for squared in (False, True):
            assert torch.autograd.gradcheck(
                lambda e, mining=mining, squared=squared: triplet_margin(e, y, 0.3, mining, squared), (x,)
            )
    assert torch.autograd.gradcheck(lambda e: contrastive_margin(e, y, 0.1, 1.2), (x,))
    assert torch.autograd.gradcheck(lambda e: contrastive_margin(e, y, 0.0, 3.0, normalize=False), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype: torch.dtype) -> None:
    x, y = batch(12, 8, 3, seed=5)
    low = x.to(dtype)
    for fn in [lambda e, m=m: triplet_margin(e, y, 0.3, m) for m in MINING] + [lambda e: contrastive_margin(e, y)]:
        value = fn(low)
        assert value.dtype == torch.float32
        assert value.item() == pytest.approx(fn(low.double()).item(), rel=1e-5)


def _zero_with_graph(loss: torch.Tensor, leaf: torch.Tensor) -> None:
    assert loss.item() == 0.0 and loss.requires_grad
    (grad,) = torch.autograd.grad(loss, leaf)
    assert torch.equal(grad, torch.zeros_like(leaf))


def test_degenerate_batches() -> None:
    x, _ = batch(5, 3, 1, seed=6)
    x.requires_grad_()
    for labels in (torch.zeros(5, dtype=torch.long), torch.arange(5)):  # no negative / no positive
        for mining in MINING:
            _zero_with_graph(triplet_margin(x, labels, mining=mining), x)
    _zero_with_graph(triplet_margin(x[:1], torch.tensor([0]), mining="semi_hard"), x)
    _zero_with_graph(contrastive_margin(x[:1], torch.tensor([0])), x)
    # all labels equal: only the pull term, equal to the reference
    same = torch.zeros(5, dtype=torch.long)
    assert contrastive_margin(x, same).item() == pytest.approx(naive.contrastive(x.detach(), same, 0, 1, False, True))
    # identical embeddings: zero distance, finite (zero) gradient
    dup = x[:1].detach().repeat(4, 1).requires_grad_()
    loss = triplet_margin(dup, torch.tensor([0, 0, 1, 1]), margin=0.2)
    assert loss.item() == pytest.approx(0.2)
    assert torch.isfinite(torch.autograd.grad(loss, dup)[0]).all()


def test_modules_and_validation() -> None:
    x, y = batch(9, 4, 3, seed=7)
    assert TripletMargin(0.3, "semi_hard")(x, y).item() == triplet_margin(x, y, 0.3, "semi_hard").item()
    assert ContrastiveMargin(0.1, 0.9)(x, y).item() == contrastive_margin(x, y, 0.1, 0.9).item()
    with pytest.raises(ValueError, match="margin must be >= 0"):
        TripletMargin(margin=-0.1)
    with pytest.raises(ValueError, match="mining must be one of"):
        TripletMargin(mining="hard")
    with pytest.raises(ValueError, match="larger than pos_margin"):
        ContrastiveMargin(pos_margin=1.0, neg_margin=0.5)
    with pytest.raises(ValueError, match="labels"):
        triplet_margin(x, y[:3])


@pytest.mark.parametrize(
    "loss",
    [
        TripletMargin(0.5, "all", gather=True),
        TripletMargin(0.5, "semi_hard", gather=True),
        ContrastiveMargin(0.1, 1.0, gather=True),
    ],
)
def test_gather_is_the_identity_in_one_process(loss: torch.nn.Module) -> None:
    """The configs set gather: true; without a process group the value and gradient are bitwise unchanged."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(10, 4, generator=g, dtype=F64), torch.randint(0, 3, (10,), generator=g)
    results = []
    for gather in (True, False):
        loss.gather = gather
        e = x.clone().requires_grad_()
        value = loss(e, y)
        value.backward()
        results.append((value.detach(), e.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert results[0][0] > 0


def test_semi_hard_takes_only_strictly_farther_negatives() -> None:
    """FaceNet's semi-hard negative has d(a, p) < d(a, n): one exactly as far as the positive is not one."""
    x = torch.tensor([[0.0], [1.0], [-1.0], [1.5]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    loss = triplet_margin(x, y, margin=1.0, mining="semi_hard", normalize=False)
    # (anchor, positive): chosen negative -> [d_ap - d_an + 1]_+
    # (0, 1) d_ap 1: negatives at 1 (tie, not farther) and 1.5 -> 1.5: 0.5 (the tie taken: 1)
    # (1, 0) d_ap 1: negatives at 2 and 0.5 -> 2: 0
    # (2, 3) d_ap 2.5: none farther -> the farthest, 2: 1.5;  (3, 2) d_ap 2.5: farthest 1.5: 2
    assert loss.item() == pytest.approx((0.5 + 0 + 1.5 + 2) / 4, abs=1e-12)


@pytest.mark.parametrize("margins", [(0.5, 0.5), (0.7, 0.5)])
def test_pair_margins_must_be_ordered_strictly(margins: tuple[float, float]) -> None:
    pos, neg = margins
    x, y = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="must be larger than pos_margin"):
        contrastive_margin(x, y, pos_margin=pos, neg_margin=neg)
    with pytest.raises(ValueError, match="must be larger than pos_margin"):
        ContrastiveMargin(pos_margin=pos, neg_margin=neg)
