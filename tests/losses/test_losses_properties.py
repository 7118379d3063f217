"""Hypothesis: any finite input, of any shape and scale, gives a finite loss and gradient."""

from __future__ import annotations

import hypothesis.strategies as st
import torch
from hypothesis import given, settings
from hypothesis.extra import numpy as hnp

from contrastive.losses import contrastive_margin, info_nce, nt_xent, sup_con, triplet_margin

SCALES = [0.0, 1e-30, 1e-8, 1.0, 1e8, 1e30]


@st.composite
def batches(draw: st.DrawFn, max_rows: int = 8, max_dim: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (n, d) float32 tensors with rows of mixed, extreme scales (zero rows included)."""
    n, d = draw(st.integers(1, max_rows)), draw(st.integers(1, max_dim))
    # entries 0 or of magnitude >= 2^-10: with scales down to 1e-30 every non-zero row keeps a
    # norm >= 1e-33, whose normalisation gradient (~1/norm) is still a float32 number
    magnitudes = st.floats(2.0**-10, 1.0, width=32)
    elements = st.one_of(st.just(0.0), magnitudes, magnitudes.map(lambda v: -v))
    a, b = (draw(hnp.arrays("float32", (n, d), elements=elements)) for _ in range(2))
    scales = draw(hnp.arrays("float32", (2, n, 1), elements=st.sampled_from(SCALES)))
    return torch.from_numpy(a * scales[0]), torch.from_numpy(b * scales[1])


def assert_finite(loss: torch.Tensor, leaf: torch.Tensor) -> None:
    assert torch.isfinite(loss), loss
    (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True, materialize_grads=True)
    assert torch.isfinite(grad).all()


temperatures = st.sampled_from([0.01, 0.1, 1.0])
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


@settings(max_examples=60, deadline=None)
@given(batches(), temperatures, st.sampled_from([None, 3]), dtypes)
def test_softmax_losses_finite(pair: tuple[torch.Tensor, torch.Tensor], t: float, chunk: int | None, dtype) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    if dtype != torch.float32:  # clip into the dtype's range; scales stay extreme
        a, b = (x.clamp(-6e4, 6e4).to(dtype) for x in (a, b))
    a.requires_grad_()
    labels = torch.arange(2 * a.shape[0]) % 3
    assert_finite(nt_xent(a, b, t, chunk_size=chunk), a)
    assert_finite(info_nce(a, b, None, t, chunk_size=chunk), a)
    assert_finite(info_nce(a, b, b, t, chunk_size=chunk), a)
    assert_finite(sup_con(torch.cat([a, b]), labels, t, chunk_size=chunk), a)


@settings(max_examples=60, deadline=None)
@given(batches(), st.integers(1, 4), st.sampled_from(["all", "batch_hard", "semi_hard"]), st.booleans())
def test_metric_losses_finite(
    pair: tuple[torch.Tensor, torch.Tensor], classes: int, mining: str, squared: bool
) -> None:
    x = pair[0].requires_grad_()
    labels = torch.arange(x.shape[0]) % classes
    for normalize in (True, False):
        # Unnormalised, the loss is a power of the distance and must fit float32 itself:
        # triplet is linear in d (any input), squared d needs |x| <= 1e18; the contrastive
        # loss squares the hinge: |x| <= 1e18 for d, 1e8 for squared d.
        limit_triplet = 1e18 if squared and not normalize else float("inf")
        limit_pair = (1e8 if squared else 1e18) if not normalize else float("inf")
        assert_finite(
            triplet_margin(x.clamp(-limit_triplet, limit_triplet), labels, 0.2, mining, squared, normalize), x
        )
        assert_finite(contrastive_margin(x.clamp(-limit_pair, limit_pair), labels, 0.0, 1.0, squared, normalize), x)
