"""CosFace and ArcFace logits, their losses and their regulariser kinds: loop references from the papers,
gradients, the ArcFace fallback, degenerate batches, half precision, validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from contrastive.losses import ArcFace, CosFace, SoftmaxCERegularizer, arcface_logits, cosface_logits

F64 = torch.float64


def unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def naive_logits(e: torch.Tensor, w: torch.Tensor, y: torch.Tensor, kind: str, m: float, s: float) -> list[list[float]]:
    """The papers' logits, one python float at a time.

    CosFace (Wang et al. 2018, eq. 4): s (cos theta_ij - m) for j = y_i, s cos theta_ij otherwise.
    ArcFace (Deng et al. 2019, eq. 3): s cos(theta_ij + m) for j = y_i, with the authors' code's
    fallback cos theta - m sin m where theta > pi - m; s cos theta_ij otherwise.
    """
    out = []
    for row, label in zip(e.tolist(), y.tolist()):
        logits = []
        for j, wj in enumerate(w.tolist()):
            cos = sum(a * b for a, b in zip(unit(row), unit(wj)))
            if j != label:
                logits.append(s * cos)
            elif kind == "cosface":
                logits.append(s * (cos - m))
            else:
                theta = math.acos(max(-1.0, min(1.0, cos)))
                logits.append(s * (math.cos(theta + m) if theta <= math.pi - m else cos - m * math.sin(m)))
        out.append(logits)
    return out


def naive_loss(e: torch.Tensor, w: torch.Tensor, y: torch.Tensor, kind: str, m: float, s: float) -> float:
    total = 0.0
    for logits, label in zip(naive_logits(e, w, y, kind, m, s), y.tolist()):
        top = max(logits)
        total -= logits[label] - top - math.log(sum(math.exp(v - top) for v in logits))
    return total / len(y)


def naive_grad(e: torch.Tensor, w: torch.Tensor, y: torch.Tensor, kind: str, m: float, s: float) -> torch.Tensor:
    """d loss / d e by central differences of the loop (float64, step 1e-6)."""
    grad = torch.zeros_like(e)
    for idx in range(e.numel()):
        plus, minus = e.clone(), e.clone()
        plus.view(-1)[idx] += 1e-6
        minus.view(-1)[idx] -= 1e-6
        grad.view(-1)[idx] = (naive_loss(plus, w, y, kind, m, s) - naive_loss(minus, w, y, kind, m, s)) / 2e-6
    return grad


def data(n: int = 7, c: int = 4, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    e, w = torch.randn(n, d, generator=g, dtype=F64) * 3, torch.randn(c, d, generator=g, dtype=F64)
    return e, w, torch.randint(0, c, (n,), generator=g)


LOGITS = {"cosface": cosface_logits, "arcface": arcface_logits}
PARAMS = [("cosface", 0.35, 64.0), ("cosface", 0.48, 120.0), ("arcface", 0.5, 64.0), ("arcface", 0.365, 105.0)]


@pytest.mark.parametrize(("kind", "m", "s"), PARAMS)
def test_logits_and_loss_match_the_papers_loop(kind: str, m: float, s: float) -> None:
    e, w, y = data()
    logits = LOGITS[kind](e, w, y, m, s)
    assert logits.shape == (7, 4) and logits.dtype == F64
    torch.testing.assert_close(logits, torch.tensor(naive_logits(e, w, y, kind, m, s), dtype=F64), rtol=1e-12, atol=0)
    loss = F.cross_entropy(logits, y)
    assert loss.item() == pytest.approx(naive_loss(e, w, y, kind, m, s), rel=1e-12)


@pytest.mark.parametrize(("kind", "m", "s"), [("cosface", 0.4, 8.0), ("arcface", 0.4, 8.0)])
def test_gradient_matches_the_loop(kind: str, m: float, s: float) -> None:
    e, w, y = data(n=4, c=3, d=3, seed=1)
    x = e.clone().requires_grad_()
    F.cross_entropy(LOGITS[kind](x, w, y, m, s), y).backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, naive_grad(e, w, y, kind, m, s), rtol=1e-6, atol=1e-8)
    wx = w.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: F.cross_entropy(LOGITS[kind](a, b, y, m, s), y), (x.detach().requires_grad_(), wx)
    )


def test_arcface_falls_back_past_pi_minus_m_and_stays_monotone() -> None:
    """Target logit against the angle: cos(theta + m) up to pi - m, cos(theta) - m sin(m) beyond, never rising."""
    m, w = 0.5, torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    thetas = torch.linspace(0, math.pi, 401, dtype=F64)
    e = torch.stack([thetas.cos(), thetas.sin()], dim=1)  # angle theta to class 0's weight
    target = arcface_logits(e, w, torch.zeros(401, dtype=torch.long), m, 1.0)[:, 0]
    expected = torch.where(thetas <= math.pi - m, (thetas + m).cos(), thetas.cos() - m * math.sin(m))
    torch.testing.assert_close(target, expected, rtol=0, atol=1e-7)  # sin(theta) clamped at sqrt(eps) near 0 and pi
    assert bool((target[1:] <= target[:-1] + 1e-12).all())
    # the plain cos(theta + m) would rise again past pi - m: the fallback is lower there
    assert target[-1].item() == pytest.approx(-1 - m * math.sin(m)) and math.cos(math.pi + m) > target[-1].item()


@pytest.mark.parametrize("kind", ["cosface", "arcface"])
def test_degenerate_inputs_give_finite_values_and_gradients(kind: str) -> None:
    """One sample; an embedding exactly on its class weight (theta = 0, where d sin/d cos is infinite);
    one opposite to it (theta = pi); a zero embedding; one class in the batch."""
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=F64)
    e = torch.tensor([[2.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64, requires_grad=True)
    y = torch.zeros(3, dtype=torch.long)  # one class
    for rows in (slice(0, 1), slice(1, 2), slice(2, 3), slice(0, 3)):
        x = e[rows].detach().clone().requires_grad_()
        loss = F.cross_entropy(LOGITS[kind](x, w, y[rows], 0.5, 30.0), y[rows])
        loss.backward()
        assert x.grad is not None and torch.isfinite(loss) and bool(torch.isfinite(x.grad).all()), rows
    one = LOGITS[kind](e[:1], w, y[:1], 0.5, 30.0)
    assert one[0, 0].item() == pytest.approx(30.0 * (1 - 0.5 if kind == "cosface" else math.cos(0.5)), abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["cosface", "arcface"])
def test_half_precision_is_computed_in_float32(dtype: torch.dtype, kind: str) -> None:
    e, w, y = data(n=16, c=5, d=8, seed=2)
    low = LOGITS[kind](e.to(dtype), w.to(dtype), y, 0.4, 64.0)
    assert low.dtype == torch.float32
    exact = LOGITS[kind](e.to(dtype).double(), w.to(dtype).double(), y, 0.4, 64.0)
    torch.testing.assert_close(low.double(), exact, rtol=0, atol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert LOGITS[kind](e.float(), w.float(), y, 0.4, 64.0).dtype == torch.float32


def test_bad_arguments_are_one_clear_line() -> None:
    e, w, y = data()
    with pytest.raises(ValueError, match=r"margin must be in \[0, 3.14159\), got 3.5"):
        arcface_logits(e, w, y, 3.5, 64.0)
    with pytest.raises(ValueError, match=r"margin must be in \[0, inf\), got -0.1"):
        cosface_logits(e, w, y, -0.1, 64.0)
    with pytest.raises(ValueError, match=r"scale must be > 0, got 0.0"):
        cosface_logits(e, w, y, 0.3, 0.0)
    with pytest.raises(ValueError, match=r"embeddings must be \(N, D\) and weight \(C, D\), got \(7, 5\) and \(4, 3\)"):
        cosface_logits(e, w[:, :3], y, 0.3, 64.0)
    with pytest.raises(ValueError, match=r"labels must be \(N,\) = \(7,\), got \(6,\)"):
        arcface_logits(e, w, y[:6], 0.3, 64.0)


# --------------------------------------------------------------------------- the loss modules


@pytest.mark.parametrize(("cls", "kind"), [(CosFace, "cosface"), (ArcFace, "arcface")])
def test_loss_modules_hold_their_weights_and_equal_the_function(cls: type, kind: str) -> None:
    torch.manual_seed(0)
    loss = cls(embed_dim=5, num_classes=4, margin=0.3, scale=30.0).double()
    assert loss.input_forms == frozenset({"embeddings_labels"}) and loss.weight.shape == (4, 5)
    assert [name for name, _ in loss.named_parameters()] == ["weight"]
    e, _, y = data()
    value = loss(e, y)
    assert value.item() == pytest.approx(naive_loss(e, loss.weight.detach(), y, kind, 0.3, 30.0), rel=1e-12)
    value.backward()
    assert loss.weight.grad is not None and loss.weight.grad.abs().sum() > 0  # the weights train with the network
    assert (cls(4, 3).margin, cls(4, 3).scale) == ((0.35, 64.0) if kind == "cosface" else (0.5, 64.0))  # the papers'
    with pytest.raises(ValueError, match=r"need embed_dim >= 1 and num_classes >= 2, got 4 and 1\."):
        cls(4, 1)


@pytest.mark.parametrize("cls", [CosFace, ArcFace])
def test_loss_modules_learn_separable_classes(cls: type) -> None:
    """A linear embedding of four Gaussian blobs trained with the loss alone: the classes come apart."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 10, generator=g) * 2
    y = torch.arange(4).repeat_interleave(16)
    x = centres[y] + torch.randn(64, 10, generator=g)
    torch.manual_seed(0)
    net, loss = torch.nn.Linear(10, 8), cls(8, 4, margin=0.3, scale=16.0)
    optimiser = torch.optim.Adam([*net.parameters(), *loss.parameters()], lr=1e-2)
    first = loss(net(x), y).item()
    for _ in range(150):
        optimiser.zero_grad()
        loss(net(x), y).backward()
        optimiser.step()
    with torch.no_grad():
        cos = F.normalize(net(x)) @ F.normalize(loss.weight).T  # (64, 4)
    assert loss(net(x), y).item() < 0.3 * first
    assert (cos.argmax(1) == y).float().mean().item() == 1.0


# --------------------------------------------------------------------------- the regulariser kinds


@pytest.mark.parametrize(("kind", "m", "s"), [("cosface", 0.48, 120.0), ("arcface", 0.365, 105.0)])
def test_regulariser_kinds_are_the_margin_heads(kind: str, m: float, s: float) -> None:
    torch.manual_seed(0)
    reg = SoftmaxCERegularizer(5, 4, kind=kind, margin=m, scale=s, label_smoothing=0.1).double()
    assert reg.classifier.bias is None
    e, _, y = data()
    w = reg.classifier.weight.detach()
    torch.testing.assert_close(reg.logits(e, y), LOGITS[kind](e, w, y, m, s), rtol=1e-12, atol=0)
    plain = s * F.normalize(e) @ F.normalize(w).T  # (7, 4): the prediction, no margin
    torch.testing.assert_close(reg.logits(e), plain, rtol=1e-12, atol=1e-12)
    ce, accuracy = reg(e, y)
    assert ce.item() == pytest.approx(F.cross_entropy(LOGITS[kind](e, w, y, m, s), y, label_smoothing=0.1).item())
    assert accuracy.item() == pytest.approx(100 * (plain.argmax(1) == y).double().mean().item())
    assert f"kind='{kind}', margin={m}, scale={s}" in repr(reg)


def test_regulariser_margin_belongs_to_the_margin_kinds() -> None:
    with pytest.raises(ValueError, match=r"margin=0.3 belongs to kind cosface or arcface; kind 'cosine' has none"):
        SoftmaxCERegularizer(4, 2, kind="cosine", margin=0.3)
    with pytest.raises(ValueError, match=r"margin must be in \[0, 3.14159\)"):
        SoftmaxCERegularizer(4, 2, kind="arcface", margin=4.0)
    with pytest.raises(ValueError, match=r"scale must be > 0, got -1"):
        SoftmaxCERegularizer(4, 2, kind="cosface", scale=-1)
    with pytest.raises(ValueError, match=r"kind must be one of \('linear', 'cosine', 'cosface', 'arcface'\)"):
        SoftmaxCERegularizer(4, 2, kind="sphereface")
