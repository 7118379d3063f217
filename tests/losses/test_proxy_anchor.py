"""Proxy-Anchor: a loop reference written from the paper, gradients, degenerate batches, half precision."""

from __future__ import annotations

import math

import pytest
import torch

from contrastive.losses import ProxyAnchor, proxy_anchor

F64 = torch.float64


def unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v] if norm else v


def naive(e: torch.Tensor, y: torch.Tensor, proxies: torch.Tensor, margin: float, alpha: float) -> float:
    """Kim et al. 2020, eq. 4, literally:
    1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} e^{-a (s(x,p) - d)})
    + 1/|P| sum_{p in P} log(1 + sum_{x in X_p-} e^{a (s(x,p) + d)}).
    """
    xs, ps, labels = [unit(r) for r in e.tolist()], [unit(r) for r in proxies.tolist()], y.tolist()

    def s(x: list[float], p: list[float]) -> float:
        return sum(a * b for a, b in zip(x, p))

    with_positive = [c for c in range(len(ps)) if c in labels]
    pull = sum(
        math.log(1 + sum(math.exp(-alpha * (s(x, ps[c]) - margin)) for x, lab in zip(xs, labels) if lab == c))
        for c in with_positive
    )
    push = sum(
        math.log(1 + sum(math.exp(alpha * (s(x, ps[c]) + margin)) for x, lab in zip(xs, labels) if lab != c))
        for c in range(len(ps))
    )
    return pull / len(with_positive) + push / len(ps)


def data(n: int, c: int, d: int, classes_present: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    e, p = torch.randn(n, d, generator=g, dtype=F64) * 2, torch.randn(c, d, generator=g, dtype=F64)
    return e, torch.arange(n) % classes_present, p


CASES = [(8, 4, 5, 4, 0.1, 32.0), (9, 6, 3, 3, 0.1, 32.0), (5, 3, 4, 2, 0.0, 8.0), (12, 5, 6, 5, 0.3, 16.0)]


@pytest.mark.parametrize(("n", "c", "d", "present", "margin", "alpha"), CASES)
def test_matches_the_papers_loop(n: int, c: int, d: int, present: int, margin: float, alpha: float) -> None:
    e, y, p = data(n, c, d, present, seed=n + c)
    got = proxy_anchor(e, y, p, margin, alpha)
    assert got.dtype == F64 and got.item() == pytest.approx(naive(e, y, p, margin, alpha), rel=1e-12)


def test_gradients_match_the_loop() -> None:
    """d/d embeddings and d/d proxies by central differences of the loop; gradcheck on both."""
    e, y, p = data(6, 4, 3, 3, seed=3)  # proxy 3 has no positive in the batch
    x, q = e.clone().requires_grad_(), p.clone().requires_grad_()
    proxy_anchor(x, y, q, 0.1, 4.0).backward()
    assert x.grad is not None and q.grad is not None
    for tensor, grad, which in ((e, x.grad, 0), (p, q.grad, 1)):
        numeric = torch.zeros_like(tensor)
        for i in range(tensor.numel()):
            plus, minus = tensor.clone(), tensor.clone()
            plus.view(-1)[i] += 1e-6
            minus.view(-1)[i] -= 1e-6
            args = [(plus, p), (e, plus)][which], [(minus, p), (e, minus)][which]
            numeric.view(-1)[i] = (
                naive(args[0][0], y, args[0][1], 0.1, 4.0) - naive(args[1][0], y, args[1][1], 0.1, 4.0)
            ) / 2e-6
        torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-9)
    inputs = (e.clone().requires_grad_(), p.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: proxy_anchor(a, y, b, 0.1, 4.0), inputs)


def test_degenerate_batches_are_finite_and_match_the_loop() -> None:
    """One sample, one class, a zero embedding, and a large alpha: finite values and gradients equal to the loop's.
    Proxy-Anchor has a loss for every batch (the other proxies' negatives), so none of these is zero."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(3, 4, generator=g, dtype=F64)
    cases = [
        (torch.randn(1, 4, generator=g, dtype=F64), torch.tensor([1])),  # one sample
        (torch.randn(5, 4, generator=g, dtype=F64), torch.zeros(5, dtype=torch.long)),  # one class
        (torch.zeros(2, 4, dtype=F64), torch.tensor([0, 2])),  # zero embeddings
    ]
    for e, y in cases:
        x = e.clone().requires_grad_()
        loss = proxy_anchor(x, y, p)
        loss.backward()
        assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and torch.isfinite(loss)
        assert loss.item() == pytest.approx(naive(e, y, p, 0.1, 32.0), rel=1e-12)
    big = proxy_anchor(cases[1][0], cases[1][1], p, 0.1, 1000.0)  # exp(1100) overflows a plain sum
    assert torch.isfinite(big) and big.item() > 0


def test_a_perfect_embedding_costs_only_log_two_per_term_at_most() -> None:
    """Every embedding on its proxy, proxies orthogonal: each pull term is log(1 + K e^{-a(1-d)}) and each
    push term log(1 + (N-K) e^{a d}), in closed form."""
    p = torch.eye(3, dtype=F64)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    e = p[y]
    alpha, margin = 32.0, 0.1
    expected = math.log1p(2 * math.exp(-alpha * (1 - margin))) + math.log1p(4 * math.exp(alpha * margin))
    assert proxy_anchor(e, y, p, margin, alpha).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype: torch.dtype) -> None:
    e, y, p = data(32, 8, 16, 8, seed=4)
    low = proxy_anchor(e.to(dtype), y, p.to(dtype))
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(proxy_anchor(e.to(dtype).double(), y, p.to(dtype).double()).item(), rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert proxy_anchor(e.float(), y, p.float()).dtype == torch.float32


def test_module_holds_the_proxies_and_validates() -> None:
    torch.manual_seed(0)
    loss = ProxyAnchor(embed_dim=64, num_classes=100)
    assert loss.input_forms == frozenset({"embeddings_labels"}) and loss.proxies.shape == (100, 64)
    assert (loss.margin, loss.alpha, loss.lr_scale) == (0.1, 32.0, 100.0)  # the paper's
    assert loss.proxies.std().item() == pytest.approx(math.sqrt(2 / 100), rel=0.05)  # Kaiming normal, fan-out
    e, y = torch.randn(10, 64), torch.arange(10)
    value = loss(e, y)
    assert value.item() == pytest.approx(naive(e.double(), y, loss.proxies.detach().double(), 0.1, 32.0), rel=1e-5)
    value.backward()
    assert loss.proxies.grad is not None and loss.proxies.grad.abs().sum() > 0
    for kwargs, message in [
        (dict(margin=-0.1), r"margin must be >= 0, got -0.1"),
        (dict(alpha=0.0), r"alpha must be > 0, got 0.0"),
        (dict(lr_scale=0.0), r"lr_scale must be a finite number > 0, got 0.0"),
        (dict(num_classes=1), r"need embed_dim >= 1 and num_classes >= 2, got 64 and 1\."),
    ]:
        with pytest.raises(ValueError, match=message):
            ProxyAnchor(**({"embed_dim": 64, "num_classes": 3} | kwargs))
    with pytest.raises(ValueError, match=r"proxies must be \(C, 64\), got \(3, 5\)"):
        proxy_anchor(e, y, torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"embeddings must be \(N, D\), N >= 1"):
        proxy_anchor(e[:0], y[:0], loss.proxies)


def test_learns_separable_classes() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 10, generator=g) * 2
    y = torch.arange(4).repeat_interleave(16)
    x = centres[y] + torch.randn(64, 10, generator=g)
    torch.manual_seed(0)
    net, loss = torch.nn.Linear(10, 8), ProxyAnchor(8, 4)
    optimiser = torch.optim.Adam([{"params": net.parameters()}, {"params": loss.parameters(), "lr": 1e-1}], lr=1e-2)
    first = loss(net(x), y).item()
    for _ in range(100):
        optimiser.zero_grad()
        loss(net(x), y).backward()
        optimiser.step()
    with torch.no_grad():
        cos = torch.nn.functional.normalize(net(x)) @ torch.nn.functional.normalize(loss.proxies).T
    assert loss(net(x), y).item() < 0.3 * first
    assert (cos.argmax(1) == y).float().mean().item() == 1.0
