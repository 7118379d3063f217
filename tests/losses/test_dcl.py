"""DCL and DCLW (Yeh et al. 2022): a float64 loop from the paper, gradients, degenerate batches, dtypes, chunking."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from contrastive.losses import DCL, dcl, input_forms, nt_xent

F64 = torch.float64


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64, scale: float = 1.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)


def naive_dcl(z1: Tensor, z2: Tensor, t: float | Tensor, sigma: float | None = None) -> Tensor:
    """The paper's eq. 6 (DCL) and 7 (DCLW), one anchor at a time, with torch scalars (so autograd
    gives the reference gradient too): for anchor i of the 2N views, positive pos(i) = i +- N,
    ``L_i = -w_i z_i . z_pos / T + log sum_{k not in {i, pos}} exp(z_i . z_k / T)``; L = mean over the 2N.
    DCLW: ``w_i = 2 - exp(z1_i . z2_i / sigma) / mean_j exp(z1_j . z2_j / sigma)``, held constant."""
    z = [row / row.norm() for row in torch.cat([z1, z2])]
    n = len(z1)
    weights = [1.0] * n
    if sigma is not None:
        e = [math.exp(float(z[j].detach() @ z[j + n].detach()) / sigma) for j in range(n)]
        weights = [2 - e[j] / (sum(e) / n) for j in range(n)]
    total = z1.new_zeros(())
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        negatives = [k for k in range(2 * n) if k not in (i, pos)]
        denominator = sum(torch.exp(z[i] @ z[k] / t) for k in negatives)
        total = total - weights[i % n] * (z[i] @ z[pos]) / t + torch.log(denominator)
    return total / (2 * n)


CASES = [
    (2, 3, 0.5, None),
    (2, 1, 0.1, 0.5),
    (5, 8, 0.07, None),
    (5, 8, 0.07, 0.5),
    (9, 33, 0.2, 2.0),
    (16, 4, 1.0, 0.1),
]


@pytest.mark.parametrize(("n", "d", "t", "sigma"), CASES)
def test_dcl_matches_the_paper_loop_in_value_and_gradient(n: int, d: int, t: float, sigma: float | None) -> None:
    z1, z2 = randn(n, d, seed=n).requires_grad_(), randn(n, d, seed=n + 100, scale=3.0).requires_grad_()
    loss = dcl(z1, z2, t, sigma)
    reference = naive_dcl(z1, z2, t, sigma)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-12, abs=1e-13)
    grads = torch.autograd.grad(loss, (z1, z2))
    reference_grads = torch.autograd.grad(reference, (z1, z2))
    for g, ref in zip(grads, reference_grads):
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-13)


def test_gradcheck_plain_and_chunked_with_a_tensor_temperature() -> None:
    """DCL only: DCLW's weight is held constant, which finite differences do not do (see the next test)."""
    z1, z2 = randn(4, 3, seed=1).requires_grad_(), randn(4, 3, seed=2).requires_grad_()
    t = torch.tensor(0.3, dtype=F64, requires_grad=True)
    for chunk in (None, 3):
        assert torch.autograd.gradcheck(lambda a, b, t, chunk=chunk: dcl(a, b, t, chunk_size=chunk), (z1, z2, t))


def test_the_dclw_weight_is_not_differentiated() -> None:
    """With w held constant the gradient is the loop's; a differentiated w would add a term and differ."""
    z1, z2 = randn(6, 5, seed=1).requires_grad_(), randn(6, 5, seed=2).requires_grad_()
    (grad,) = torch.autograd.grad(dcl(z1, z2, 0.2, 0.5), z1)
    (held,) = torch.autograd.grad(naive_dcl(z1, z2, 0.2, 0.5), z1)
    torch.testing.assert_close(grad, held, rtol=1e-10, atol=1e-13)

    def differentiated(a: Tensor, b: Tensor) -> Tensor:  # w = 2 - N softmax(s / sigma) with its gradient
        a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
        w = 2 - len(a) * torch.softmax((a * b).sum(1) / 0.5, dim=0)
        return dcl(a, b, 0.2) + ((1 - w) * (a * b).sum(1) / 0.2).mean()  # DCL's positive term times w

    assert differentiated(z1, z2).item() == pytest.approx(dcl(z1, z2, 0.2, 0.5).item(), rel=1e-12)
    (other,) = torch.autograd.grad(differentiated(z1, z2), z1)
    assert not torch.allclose(other, grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("n", [2, 3, 10])
def test_identical_embeddings_give_log_2n_minus_2(n: int) -> None:
    """Every similarity is 1/T: the positive cancels against one of the 2N - 2 equal negatives."""
    z = randn(1, 5).expand(n, 5)
    for sigma in (None, 0.5):  # equal positives: every DCLW weight is 1
        assert dcl(z, z, 0.3, sigma).item() == pytest.approx(math.log(2 * n - 2), rel=1e-13, abs=1e-15)


def test_identical_views_match_the_loop_and_dclw_equals_dcl() -> None:
    """z1 == z2: every positive similarity is 1, so DCLW's weights are all 1."""
    z = randn(7, 6, seed=4).requires_grad_()
    loss = dcl(z, z, 0.2)
    assert loss.item() == pytest.approx(naive_dcl(z, z, 0.2).item(), rel=1e-12)
    torch.testing.assert_close(dcl(z, z, 0.2, 0.5), loss, rtol=1e-13, atol=0)
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(grad).all()


def test_one_pair_is_a_zero_with_a_finite_gradient() -> None:
    """A batch of one pair has no negative (the sum is empty): a graph-connected zero, as sup_con's."""
    for chunk in (None, 1):
        for sigma in (None, 0.5):
            one, other = randn(1, 4).requires_grad_(), randn(1, 4, seed=1).requires_grad_()
            loss = dcl(one, other, 0.1, sigma, chunk_size=chunk)
            assert loss.item() == 0.0 and loss.requires_grad
            grads = torch.autograd.grad(loss, (one, other))
            assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_dcl_is_nt_xent_without_the_positive_in_the_denominator() -> None:
    """NT-Xent's row log-sum-exp is logaddexp(DCL's, positive), so DCL = NT-Xent - mean log(1 + e^(pos - lse))."""
    z1, z2 = randn(8, 5, seed=1), randn(8, 5, seed=2)
    t = 0.25
    a = torch.cat([z1, z2]) / torch.cat([z1, z2]).norm(dim=1, keepdim=True)
    positive = (a * a.roll(8, 0)).sum(1) / t  # (2N,)
    per_anchor_dcl = torch.stack(
        [
            torch.logsumexp(torch.stack([a[i] @ a[k] / t for k in range(16) if k not in (i, (i + 8) % 16)]), 0)
            for i in range(16)
        ]
    )
    gap = torch.log1p(torch.exp(positive - per_anchor_dcl)).mean()
    torch.testing.assert_close(dcl(z1, z2, t), nt_xent(z1, z2, t) - gap, rtol=1e-12, atol=0)
    assert dcl(z1, z2, t) < nt_xent(z1, z2, t)


def test_symmetric_in_the_views_and_scale_invariant() -> None:
    z1, z2 = randn(7, 5, seed=1), randn(7, 5, seed=2)
    for sigma in (None, 0.5):
        base = dcl(z1, z2, 0.2, sigma)
        torch.testing.assert_close(dcl(z2, z1, 0.2, sigma), base, rtol=1e-13, atol=0)
        torch.testing.assert_close(dcl(z1 * 1e6, z2 * 3e-7, 0.2, sigma), base, rtol=1e-12, atol=0)
    assert dcl(z1, z2, 0.2, 0.5).item() != pytest.approx(dcl(z1, z2, 0.2).item(), rel=1e-3)  # sigma matters


def _value_and_grads(fn, inputs):  # type: ignore[no-untyped-def]
    leaves = [x.clone().requires_grad_() for x in inputs]
    loss = fn(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
@pytest.mark.parametrize("sigma", [None, 0.5])
def test_chunked_equals_plain(chunk: int, sigma: float | None) -> None:
    z1, z2, t = randn(19, 8, seed=1), randn(19, 8, seed=2), torch.tensor(0.15, dtype=F64)
    plain, plain_grads = _value_and_grads(lambda a, b, t: dcl(a, b, t, sigma), (z1, z2, t))
    chunked, chunked_grads = _value_and_grads(lambda a, b, t: dcl(a, b, t, sigma, chunk_size=chunk), (z1, z2, t))
    torch.testing.assert_close(chunked, plain, rtol=1e-10, atol=0)
    for g_chunked, g_plain in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(g_chunked, g_plain, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_low_precision_inputs_are_computed_in_fp32(dtype: torch.dtype, tol: float) -> None:
    z1, z2 = randn(12, 16, seed=1), randn(12, 16, seed=2)
    for sigma in (None, 0.5):
        low = dcl(z1.to(dtype), z2.to(dtype), 0.1, sigma)
        assert low.dtype == torch.float32
        assert low.item() == pytest.approx(dcl(z1, z2, 0.1, sigma).item(), rel=tol)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = dcl(z1.float(), z2.float(), 0.1, 0.5)
    assert inside.dtype == torch.float32 and inside.item() == dcl(z1.float(), z2.float(), 0.1, 0.5).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_large_logits_stay_finite(dtype: torch.dtype) -> None:
    big = torch.finfo(dtype).max / 4
    z1, z2 = ((randn(8, 32, seed=s) * big).clamp(-4 * big, 4 * big).to(dtype) for s in (1, 2))
    z1.requires_grad_()
    for sigma in (None, 0.5):
        for chunk in (None, 3):
            loss = dcl(z1, z2, 0.01, sigma, chunk_size=chunk)
            assert torch.isfinite(loss)
            (grad,) = torch.autograd.grad(loss, z1)
            assert torch.isfinite(grad).all()


def test_module_matches_the_function_and_declares_two_views() -> None:
    z1, z2 = randn(6, 4, seed=1), randn(6, 4, seed=2)
    assert input_forms(DCL()) == frozenset({"two_views"})
    torch.testing.assert_close(DCL(0.2)(z1, z2), dcl(z1, z2, 0.2), rtol=0, atol=0)
    torch.testing.assert_close(DCL(0.2, 0.5, chunk_size=4)(z1, z2), dcl(z1, z2, 0.2, 0.5), rtol=1e-12, atol=0)
    learnable = DCL(0.2, learnable=True)
    learnable(z1.float(), z2.float()).backward()
    assert learnable.temperature.log_scale.grad is not None and learnable.temperature.log_scale.grad != 0
    assert "weight_sigma=0.5" in repr(DCL(weight_sigma=0.5))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: DCL(weight_sigma=0.0), r"weight_sigma must be None \(DCL\) or a number > 0"),
        (lambda: dcl(randn(3, 2), randn(3, 2), 0.1, -1.0), "weight_sigma must be"),
        (lambda: DCL(temperature=0.0), "temperature must be a number > 0"),
        (lambda: DCL(chunk_size=0), "chunk_size must be None"),
        (lambda: dcl(randn(3, 2), randn(4, 2)), r"z1 and z2 must both be \(N, D\)"),
    ],
)
def test_invalid_arguments_raise_one_line(call, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        call()


# Two gloo processes against one process holding the global batch (1e-10, DCL and DCLW, plain and chunked):
# tests/losses/test_distributed.py, with the other softmax losses (one spawn for all of them).
