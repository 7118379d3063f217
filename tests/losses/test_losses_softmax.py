"""NT-Xent, InfoNCE and SupCon: references, closed forms, gradients, dtypes, chunking."""

from __future__ import annotations

import math

import naive_losses as naive
import pytest
import torch

from contrastive.losses import InfoNCE, NTXent, SupCon, info_nce, nt_xent, sup_con

F64 = torch.float64


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)


CASES = [(1, 3, 0.5), (2, 2, 0.1), (5, 8, 0.07), (16, 4, 1.0), (9, 33, 0.2)]


@pytest.mark.parametrize(("n", "d", "t"), CASES)
def test_nt_xent_matches_loop(n: int, d: int, t: float) -> None:
    z1, z2 = randn(n, d, seed=n), randn(n, d, seed=n + 100, scale=3.0)
    assert nt_xent(z1, z2, t).item() == pytest.approx(naive.nt_xent(z1, z2, t), rel=1e-12)


@pytest.mark.parametrize(("n", "d", "t"), CASES)
def test_info_nce_matches_loop(n: int, d: int, t: float) -> None:
    q, k, neg = randn(n, d, seed=n), randn(n, d, seed=n + 1), randn(2 * n + 3, d, seed=n + 2)
    assert info_nce(q, k, None, t).item() == pytest.approx(naive.info_nce(q, k, None, t), rel=1e-12)
    assert info_nce(q, k, neg, t).item() == pytest.approx(naive.info_nce(q, k, neg, t), rel=1e-12)


@pytest.mark.parametrize(("m", "classes", "t"), [(2, 1, 0.1), (7, 3, 0.1), (12, 2, 0.5), (20, 6, 0.05), (10, 10, 0.3)])
def test_sup_con_matches_loop(m: int, classes: int, t: float) -> None:
    z = randn(m, 6, seed=m)
    labels = torch.randint(0, classes, (m,), generator=torch.Generator().manual_seed(m))
    assert sup_con(z, labels, t).item() == pytest.approx(naive.sup_con(z, labels, t), rel=1e-12, abs=1e-14)


def test_sup_con_equals_nt_xent_with_instance_labels() -> None:
    for n, t in [(1, 0.5), (6, 0.1), (32, 0.07)]:
        z1, z2 = randn(n, 16, seed=n), randn(n, 16, seed=n + 7)
        labels = torch.cat([torch.arange(n), torch.arange(n)])
        torch.testing.assert_close(sup_con(torch.cat([z1, z2]), labels, t), nt_xent(z1, z2, t), rtol=1e-13, atol=1e-15)


def test_sup_con_multi_view_matches_loop() -> None:
    views = randn(4, 5, 8, seed=3)  # 4 views of 5 instances
    labels = torch.arange(5).repeat(4)
    z = views.reshape(20, 8)
    assert sup_con(z, labels, 0.2).item() == pytest.approx(naive.sup_con(z, labels, 0.2), rel=1e-12)


@pytest.mark.parametrize("n", [1, 3, 10])
def test_nt_xent_identical_embeddings_give_log_2n_minus_1(n: int) -> None:
    z = randn(1, 5).expand(n, 5)
    assert nt_xent(z, z, 0.3).item() == pytest.approx(math.log(2 * n - 1), rel=1e-13, abs=1e-15)


def test_nt_xent_symmetric_and_scale_invariant() -> None:
    z1, z2 = randn(7, 5, seed=1), randn(7, 5, seed=2)
    base = nt_xent(z1, z2, 0.2)
    torch.testing.assert_close(nt_xent(z2, z1, 0.2), base, rtol=1e-13, atol=0)
    torch.testing.assert_close(nt_xent(z1 * 1e6, z2 * 3e-7, 0.2), base, rtol=1e-13, atol=0)
    assert base.item() != pytest.approx(nt_xent(z1, z2, 0.5).item(), rel=1e-3)  # T matters


def test_gradcheck_softmax_losses() -> None:
    z1, z2 = randn(4, 3, seed=1).requires_grad_(), randn(4, 3, seed=2).requires_grad_()
    neg = randn(5, 3, seed=3).requires_grad_()
    labels = torch.tensor([0, 1, 0, 2])
    t = torch.tensor(0.3, dtype=F64, requires_grad=True)
    for chunk in (None, 3):
        assert torch.autograd.gradcheck(lambda a, b, t, chunk=chunk: nt_xent(a, b, t, chunk_size=chunk), (z1, z2, t))
        assert torch.autograd.gradcheck(
            lambda a, b, t, chunk=chunk: info_nce(a, b, None, t, chunk_size=chunk), (z1, z2, t)
        )
        assert torch.autograd.gradcheck(
            lambda a, b, c, chunk=chunk: info_nce(a, b, c, 0.2, chunk_size=chunk), (z1, z2, neg)
        )
        assert torch.autograd.gradcheck(lambda a, t, chunk=chunk: sup_con(a, labels, t, chunk_size=chunk), (z1, t))


# float64 value of inputs rounded to the dtype: what fp32-inside computation must reach.
DTYPE_TOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
# against the unrounded float64 inputs, input rounding dominates.
DTYPE_TOL_UNROUNDED = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", list(DTYPE_TOL))
def test_low_precision_inputs_computed_in_fp32(dtype: torch.dtype) -> None:
    z1, z2, neg = randn(12, 16, seed=1), randn(12, 16, seed=2), randn(20, 16, seed=3)
    labels = torch.arange(6).repeat(4)
    losses = [
        lambda a, b, c: nt_xent(a, b, 0.1),
        lambda a, b, c: info_nce(a, b, None, 0.1),
        lambda a, b, c: info_nce(a, b, c, 0.1),
        lambda a, b, c: sup_con(torch.cat([a, b]), labels, 0.1),
    ]
    for loss in losses:
        low = loss(z1.to(dtype), z2.to(dtype), neg.to(dtype))
        assert low.dtype == torch.float32
        rounded = loss(z1.to(dtype).double(), z2.to(dtype).double(), neg.to(dtype).double())
        assert low.item() == pytest.approx(rounded.item(), rel=DTYPE_TOL[dtype])
        assert low.item() == pytest.approx(loss(z1, z2, neg).item(), rel=DTYPE_TOL_UNROUNDED[dtype])


def test_autocast_does_not_lower_the_precision() -> None:
    z1, z2 = randn(16, 32, seed=1, dtype=torch.float32), randn(16, 32, seed=2, dtype=torch.float32)
    labels = torch.arange(32) % 5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = [nt_xent(z1, z2, 0.1), info_nce(z1, z2, z2, 0.1), sup_con(torch.cat([z1, z2]), labels, 0.1)]
    outside = [nt_xent(z1, z2, 0.1), info_nce(z1, z2, z2, 0.1), sup_con(torch.cat([z1, z2]), labels, 0.1)]
    for a, b in zip(inside, outside):
        assert a.dtype == torch.float32 and a.item() == b.item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_large_logits_stay_finite(dtype: torch.dtype) -> None:
    big = torch.finfo(dtype).max / 4  # fp16: 1.6e4, bf16: 8e37
    z1, z2 = ((randn(8, 32, seed=s) * big).clamp(-4 * big, 4 * big).to(dtype) for s in (1, 2))
    assert torch.isfinite(z1).all() and z1.float().abs().max() > 1e4
    z1.requires_grad_()
    for loss in (
        nt_xent(z1, z2, 0.01),
        info_nce(z1, z2, z2, 0.01),
        sup_con(torch.cat([z1, z2]), torch.arange(16) % 4, 0.01),
    ):
        assert torch.isfinite(loss) and loss.item() > 0
        (grad,) = torch.autograd.grad(loss, z1)
        assert torch.isfinite(grad).all()


def _assert_zero_with_graph(loss: torch.Tensor, leaf: torch.Tensor) -> None:
    assert loss.item() == 0.0 and loss.requires_grad
    (grad,) = torch.autograd.grad(loss, leaf)
    assert torch.equal(grad, torch.zeros_like(leaf))


def test_degenerate_batches() -> None:
    one = randn(1, 4).requires_grad_()
    _assert_zero_with_graph(nt_xent(one, one * 2, 0.1), one)  # 2N-1 = 1 candidate: log 1
    _assert_zero_with_graph(sup_con(one, torch.tensor([3]), 0.1), one)
    _assert_zero_with_graph(info_nce(one, one * 2, None, 0.1), one)
    distinct = randn(6, 4).requires_grad_()
    _assert_zero_with_graph(sup_con(distinct, torch.arange(6), 0.1), distinct)
    _assert_zero_with_graph(sup_con(distinct, torch.arange(6), 0.1, chunk_size=4), distinct)
    same = torch.zeros(6, dtype=torch.long)  # every other sample is a positive
    loss = sup_con(distinct, same, 0.1)
    assert loss.item() == pytest.approx(naive.sup_con(distinct.detach(), same, 0.1), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, distinct)
    assert torch.isfinite(grad).all()


def _value_and_grads(loss_fn, inputs):  # type: ignore[no-untyped-def]
    leaves = [x.clone().requires_grad_() for x in inputs]
    loss = loss_fn(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_equals_plain(chunk: int) -> None:
    z1, z2, neg = randn(19, 8, seed=1), randn(19, 8, seed=2), randn(23, 8, seed=3)
    t = torch.tensor(0.15, dtype=F64)
    labels = torch.randint(0, 5, (38,), generator=torch.Generator().manual_seed(0))
    forms = [
        lambda a, b, c, t, k: nt_xent(a, b, t, chunk_size=k),
        lambda a, b, c, t, k: info_nce(a, b, None, t, chunk_size=k),
        lambda a, b, c, t, k: info_nce(a, b, c, t, chunk_size=k),
        lambda a, b, c, t, k: sup_con(torch.cat([a, b]), labels, t, chunk_size=k),
    ]
    for form in forms:
        plain, plain_grads = _value_and_grads(lambda *x, form=form: form(*x, None), (z1, z2, neg, t))
        chunked, chunked_grads = _value_and_grads(lambda *x, form=form: form(*x, chunk), (z1, z2, neg, t))
        torch.testing.assert_close(chunked, plain, rtol=1e-10, atol=0)
        for g_chunked, g_plain in zip(chunked_grads, plain_grads):
            torch.testing.assert_close(g_chunked, g_plain, rtol=1e-10, atol=1e-14)


def _saved_bytes(loss_fn) -> int:  # type: ignore[no-untyped-def]
    """Bytes of the distinct storages autograd keeps for backward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn()
    return sum(storages.values())


def test_chunked_memory_is_linear_plain_is_quadratic() -> None:
    d = 16

    def saved(n: int, chunk: int | None) -> int:
        z1, z2 = randn(n, d, seed=1, dtype=torch.float32), randn(n, d, seed=2, dtype=torch.float32)
        z1.requires_grad_()
        return _saved_bytes(lambda: nt_xent(z1, z2, 0.1, chunk_size=chunk))

    chunked = [saved(n, 64) for n in (256, 512, 1024)]
    plain = [saved(n, None) for n in (256, 512, 1024)]
    for small, large in zip(chunked, chunked[1:]):
        assert large <= 2.05 * small  # doubling N doubles what is kept
    for small, large in zip(plain, plain[1:]):
        assert large >= 3.5 * small  # the (2N, 2N) logits dominate: x4
    # the plain form keeps at least the fp32 (2N, 2N) matrix; the chunked one not even once
    assert plain[-1] >= 4 * (2 * 1024) ** 2
    assert chunked[-1] < (2 * 1024) ** 2


def test_module_wrappers_match_functions() -> None:
    z1, z2, neg = randn(6, 4, seed=1), randn(6, 4, seed=2), randn(9, 4, seed=3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    assert NTXent(0.3)(z1, z2).item() == pytest.approx(nt_xent(z1, z2, 0.3).item(), rel=1e-12)
    assert InfoNCE(0.2)(z1, z2, neg).item() == pytest.approx(info_nce(z1, z2, neg, 0.2).item(), rel=1e-12)
    symmetric = 0.5 * (info_nce(z1, z2, None, 0.2) + info_nce(z2, z1, None, 0.2))
    assert InfoNCE(0.2, symmetric=True)(z1, z2).item() == pytest.approx(symmetric.item(), rel=1e-12)
    assert SupCon(0.2, chunk_size=2)(z1, labels).item() == pytest.approx(sup_con(z1, labels, 0.2).item(), rel=1e-12)
    assert (
        "temperature" not in NTXent(0.3).state_dict() and "temperature.log_scale" in NTXent(learnable=True).state_dict()
    )


def test_learnable_temperature_gets_gradient_and_clamp_holds() -> None:
    loss_fn = NTXent(temperature=0.5, learnable=True)
    z1, z2 = randn(8, 4, seed=1, dtype=torch.float32), randn(8, 4, seed=2, dtype=torch.float32)
    assert loss_fn.temperature().item() == pytest.approx(0.5)
    loss_fn(z1, z2).backward()
    grad = loss_fn.temperature.log_scale.grad
    assert grad is not None and grad.abs().item() > 1e-6
    with torch.no_grad():
        loss_fn.temperature.log_scale.fill_(10.0)  # logit scale e^10 >> 100
    loss_fn.temperature.log_scale.grad = None
    assert loss_fn.temperature().item() == pytest.approx(0.01)
    loss = loss_fn(z1, z2)
    assert loss.item() == pytest.approx(nt_xent(z1, z2, 0.01).item(), rel=1e-6)
    loss.backward()
    # projected back to the bound, not clamped in the graph: the gradient still flows there
    assert loss_fn.temperature.log_scale.item() == pytest.approx(math.log(100))
    assert abs(loss_fn.temperature.log_scale.grad.item()) > 1.0  # was exactly 0 past a clamp in the graph
    with torch.no_grad():
        loss_fn.temperature.log_scale.fill_(10.0)
    with torch.inference_mode():  # evaluation reads T at the floor and leaves the parameter alone
        assert loss_fn.temperature().item() == pytest.approx(0.01)
    assert loss_fn.temperature.log_scale.item() == 10.0


def test_learnable_temperature_comes_back_from_its_floor() -> None:
    """First the views coincide (the loss drives T to the floor 0.01), then they are unrelated
    (it wants a large T): with a clamp in the graph T stayed at 0.01 with zero gradient for good."""
    loss_fn = NTXent(0.07, learnable=True)
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=0.05)
    easy = randn(1, 16, seed=1, dtype=torch.float32) + 0.3 * randn(32, 16, seed=2, dtype=torch.float32)
    hard = randn(32, 16, seed=3, dtype=torch.float32), randn(32, 16, seed=4, dtype=torch.float32)
    temperatures = []
    for step in range(300):
        z1, z2 = (easy, easy) if step < 150 else hard
        optimizer.zero_grad()
        loss_fn(z1, z2).backward()
        optimizer.step()
        temperatures.append(loss_fn.temperature().item())
    assert temperatures[149] == pytest.approx(0.01)  # at the floor
    assert min(temperatures) >= 0.01 * (1 - 1e-6) and temperatures[-1] > 0.2


def test_chunked_loss_refuses_a_second_derivative_and_ignores_autocast_in_backward() -> None:
    z1 = randn(8, 4, seed=1, dtype=torch.float32).requires_grad_()
    z2 = randn(8, 4, seed=2, dtype=torch.float32)
    assert torch.autograd.grad(nt_xent(z1, z2, 0.2), z1, create_graph=True)[0].requires_grad  # plain: fine
    with pytest.raises(RuntimeError, match="no second derivative.*chunk_size=None"):
        torch.autograd.grad(nt_xent(z1, z2, 0.2, chunk_size=3), z1, create_graph=True)
    reference = torch.autograd.grad(nt_xent(z1.double(), z2.double(), 0.2), z1)[0]
    loss = nt_xent(z1, z2, 0.2, chunk_size=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # backward called inside the autocast block
        grad = torch.autograd.grad(loss, z1)[0]
    torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-7)  # bf16 matmuls: ~1e-3


def test_info_nce_takes_mixed_float_dtypes_in_the_widest() -> None:
    q, k, neg = randn(5, 4, seed=1), randn(5, 4, seed=2), randn(7, 4, seed=3)  # float64
    for args in [(q, k.float(), neg.float()), (q.float(), k, neg.float()), (q.float(), k.float(), neg)]:
        loss = info_nce(*args, 0.2)
        assert loss.dtype == torch.float64
        assert loss.item() == pytest.approx(info_nce(q, k, neg, 0.2).item(), rel=1e-6)
    assert info_nce(q.float(), k, None, 0.2).item() == pytest.approx(info_nce(q, k, None, 0.2).item(), rel=1e-6)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: NTXent(temperature=0.0), "temperature must be a number > 0, got 0.0"),
        (lambda: NTXent(temperature="abc"), "temperature must be a number > 0, got 'abc'"),
        (lambda: NTXent(temperature=0.005, learnable=True), "below its floor 1/max_scale = 0.01"),
        (lambda: InfoNCE(temperature=-1.0), "temperature must be a number > 0"),
        (lambda: SupCon(temperature=0.1, chunk_size=0), "chunk_size"),
        (lambda: nt_xent(randn(3, 2), randn(4, 2)), "same shape"),
        (lambda: InfoNCE(symmetric=True)(randn(3, 2), randn(3, 2), randn(5, 2)), "symmetric"),
        (lambda: sup_con(randn(3, 2), torch.arange(4)), "labels"),
    ],
)
def test_invalid_arguments_raise(make, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_sup_con_of_one_row_is_a_zero_with_finite_gradient(chunk_size: int | None) -> None:
    """One row has no candidate at all: log-sum-exp over nothing is -inf, whose gradient is NaN."""
    z = torch.randn(1, 5, dtype=torch.float64, requires_grad=True)
    loss = sup_con(z, torch.tensor([0]), 0.1, chunk_size=chunk_size)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z.grad).all()
