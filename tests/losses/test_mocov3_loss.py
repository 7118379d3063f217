"""MoCo v3's loss: 2T x in-batch InfoNCE, against a float64 loop of the authors' Algorithm 1."""

from __future__ import annotations

import math

import pytest
import torch
from naive_losses import dot, log_softmax_at, rows
from torch import Tensor

from contrastive.losses import InfoNCE, MoCoV3Loss, info_nce, input_forms, mocov3_loss


def _naive(q: Tensor, k: Tensor, t: float) -> float:
    """``ctr(q, k) = CrossEntropy(q k^T / T, arange(N)) * 2T`` on unit vectors, one query at a time (python floats)."""
    qs, ks = rows(q), rows(k)
    return 2 * t * sum(-log_softmax_at([dot(qs[i], kj) / t for kj in ks], i) for i in range(len(qs))) / len(qs)


def _naive_torch(q: Tensor, k: Tensor, t: float) -> Tensor:
    """The same loop in float64 torch scalars, literal exp and log, so that autograd gives its gradient."""
    total = q.new_zeros(())
    for i in range(len(q)):
        qi = q[i] / q[i].norm()
        logits = torch.stack([qi @ (kj / kj.norm()) / t for kj in k])  # (N,)
        total = total - (logits[i] - torch.log(torch.exp(logits).sum()))
    return 2 * t * total / len(q)


def _pair(n: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)


@pytest.mark.parametrize(("n", "d", "t"), [(1, 3, 0.2), (5, 4, 0.2), (8, 16, 1.0), (13, 7, 0.07)])
def test_mocov3_loss_matches_the_loop(n: int, d: int, t: float) -> None:
    q, k = _pair(n, d, seed=n)
    assert mocov3_loss(q, k, t).item() == pytest.approx(_naive(q, k, t), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize(("n", "d", "t"), [(4, 3, 0.2), (7, 5, 1.0), (6, 8, 0.1)])
def test_mocov3_gradients_match_the_loop(n: int, d: int, t: float) -> None:
    """Gradients with respect to query and key (a key with gradient is the general case; MoCo v3's have none)."""
    q, k = _pair(n, d, seed=10 + n)
    grads = []
    for fn in (lambda a, b: mocov3_loss(a, b, t), lambda a, b: _naive_torch(a, b, t)):
        a, b = q.clone().requires_grad_(), k.clone().requires_grad_()
        fn(a, b).backward()
        grads.append((a.grad, b.grad))
    for ours, loop in zip(*grads):
        torch.testing.assert_close(ours, loop, rtol=1e-10, atol=1e-12)
    assert grads[0][0].abs().sum() > 0


def test_gradcheck() -> None:
    q, k = _pair(5, 4, seed=3)
    q.requires_grad_(), k.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: mocov3_loss(a, b, 0.3), (q, k))
    assert torch.autograd.gradcheck(lambda a, b: mocov3_loss(a, b, 0.3, chunk_size=2), (q, k))


def test_it_is_info_nce_times_2t_and_keys_without_gradient_get_none() -> None:
    q, k = _pair(9, 6, seed=4)
    for t in (0.2, 1.0, torch.tensor(0.5, dtype=torch.float64)):
        assert torch.equal(mocov3_loss(q, k, t), info_nce(q, k, None, t) * (2 * t))
    a = q.clone().requires_grad_()
    loss = mocov3_loss(a, k, 0.2)  # k has no gradient, as the momentum encoder's keys
    loss.backward()
    assert a.grad is not None and k.grad is None


@pytest.mark.parametrize("n", [2, 4, 6])
def test_orthonormal_identical_views_have_the_closed_form(n: int) -> None:
    """q_i = k_i orthonormal: logits I / T, so the loss is 2T [log(e^{1/T} + N - 1) - 1/T]."""
    t = 0.2
    q = torch.eye(8, dtype=torch.float64)[:n] * 3.0  # scale is normalised away
    expected = 2 * t * (math.log(math.exp(1 / t) + n - 1) - 1 / t)
    assert mocov3_loss(q, q, t).item() == pytest.approx(expected, rel=1e-13)


def test_one_pair_is_a_zero_with_a_finite_gradient() -> None:
    """N = 1: the query's only key is its positive; softmax over one logit is 1, the loss 0."""
    q, k = _pair(1, 5, seed=5)
    a = q.clone().requires_grad_()
    loss = mocov3_loss(a, k, 0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-15) and torch.isfinite(a.grad).all()


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_chunked_equals_plain(chunk: int) -> None:
    q, k = _pair(11, 6, seed=6)
    values = []
    for chunk_size in (None, chunk):
        a = q.clone().requires_grad_()
        loss = mocov3_loss(a, k, 0.2, chunk_size=chunk_size)
        loss.backward()
        values.append((loss.detach(), a.grad))
    for plain, chunked in zip(*values):
        torch.testing.assert_close(chunked, plain, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32_and_stays_finite(dtype: torch.dtype) -> None:
    q, k = _pair(16, 8, seed=7, dtype=torch.float32)
    q, k = (q * 300).to(dtype), (k * 300).to(dtype)  # large values: exp would overflow in half precision
    a = q.clone().requires_grad_()
    loss = MoCoV3Loss(temperature=0.05)(a, k)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(a.grad).all()
    reference = mocov3_loss(q.double(), k.double(), 0.05).item()
    assert loss.item() == pytest.approx(reference, rel=1e-5)


def test_module_matches_the_function_declares_two_views_and_keeps_float32() -> None:
    q, k = _pair(6, 4, seed=8, dtype=torch.float32)
    module = MoCoV3Loss(temperature=0.2)
    loss = module(q, k)
    assert loss.dtype == torch.float32  # the fixed T is a float64 buffer: it must not promote the loss
    assert torch.equal(loss, mocov3_loss(q, k, module.temperature()))
    assert loss.item() == pytest.approx(mocov3_loss(q, k, 0.2).item(), rel=1e-6)
    assert input_forms(MoCoV3Loss()) == frozenset({"two_views"})
    assert MoCoV3Loss().temperature().item() == 1.0  # the authors' ResNet default


def test_learnable_temperature_gets_the_gradient_of_both_factors() -> None:
    """T enters twice, in 1/T inside and in 2T outside; its gradient is that of the loop's, by finite differences."""
    q, k = _pair(6, 4, seed=9)
    module = MoCoV3Loss(temperature=0.3, learnable=True).double()
    module(q, k).backward()
    grad_log_scale = module.temperature.log_scale.grad.item()  # T = exp(-s): dL/ds = -T dL/dT
    eps, t = 1e-6, 0.3
    d_dt = (_naive(q, k, t + eps) - _naive(q, k, t - eps)) / (2 * eps)
    assert grad_log_scale == pytest.approx(-t * d_dt, rel=1e-6)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: MoCoV3Loss(temperature=0.0), "temperature must be a number > 0"),
        (lambda: MoCoV3Loss(chunk_size=0), "chunk_size must be None"),
        (lambda: mocov3_loss(torch.ones(3, 2), torch.ones(4, 2)), r"query and key must both be \(N, D\)"),
        (lambda: mocov3_loss(torch.ones(3, 2), torch.ones(3, 2), -1.0), "temperature must be a number > 0"),
    ],
)
def test_bad_arguments_are_one_value_error(make, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        make()


def test_info_nce_is_the_unscaled_form_the_pipeline_also_takes() -> None:
    """loss=info_nce in pipeline=mocov3: the same direction without 2T (declared two_views too)."""
    q, k = _pair(5, 3, seed=11)
    torch.testing.assert_close(MoCoV3Loss(0.2)(q, k), 0.4 * InfoNCE(0.2)(q, k), rtol=1e-14, atol=0)
