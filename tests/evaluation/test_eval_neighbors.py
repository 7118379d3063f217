"""Exact top-k with the lowest-index tie rule, against a stable sort."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from contrastive.evaluation.neighbors import prepare_features, similarity, topk_lowest_index, topk_neighbors


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 40),
    levels=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_topk_equals_stable_sort_with_many_ties(
    rows: int, cols: int, levels: int, seed: int, data: st.DataObject
) -> None:
    g = torch.Generator().manual_seed(seed)
    sims = torch.randint(0, levels, (rows, cols), generator=g).float()  # few distinct values: ties everywhere
    k = data.draw(st.integers(1, cols))
    values, indices = topk_lowest_index(sims.clone(), k)
    ref_values, ref_indices = sims.sort(dim=1, descending=True, stable=True)
    assert torch.equal(indices, ref_indices[:, :k])
    assert torch.equal(values, ref_values[:, :k])


def test_self_excluded_by_index_not_distance() -> None:
    # rows 0 and 1 are identical: excluding "sim == 1" would drop both, excluding by index drops one
    x = prepare_features(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    _, idx = topk_neighbors(x, x, 2, self_index=torch.arange(3))
    assert idx.tolist() == [[1, 2], [0, 2], [0, 1]]


def test_euclidean_similarity_is_negative_squared_distance() -> None:
    g = torch.Generator().manual_seed(0)
    q, r = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(similarity(q, r, "euclidean"), -torch.cdist(q, r).pow(2))


def test_euclidean_ranking_does_not_depend_on_a_shift_of_all_features() -> None:
    """Far from the origin, float32 ``2 q.r - |q|^2 - |r|^2`` cancels to noise unless centred first."""
    q = torch.tensor([[1000.0, 0.0]])
    r = torch.tensor([[999.92, 0.17], [999.875, -0.05]])  # distances 0.188 and 0.135: reference 1 is nearer
    torch.testing.assert_close(
        similarity(q, r, "euclidean"), -torch.cdist(q.double(), r.double()).pow(2).float(), atol=1e-4, rtol=0
    )
    assert topk_neighbors(q, r, 1, "euclidean")[1].item() == 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    _, near = topk_neighbors(x, x, 8, "euclidean", self_index=torch.arange(200))
    _, shifted = topk_neighbors(x + 1000.0, x + 1000.0, 8, "euclidean", self_index=torch.arange(200))
    assert (near == shifted).float().mean() > 0.99  # only float32 rounding of x + 1000 may swap near-ties


def test_cosine_neighbours_and_metrics_do_not_depend_on_the_features_scale() -> None:
    """Rows of norm 1e20 (squares overflow float32) or 1e-20 (squares underflow) rank as at norm 1."""
    from contrastive.evaluation import knn_predict, retrieval_metrics

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 8, generator=g), torch.randint(0, 4, (60,), generator=g)
    torch.testing.assert_close(prepare_features(x * 1e20), prepare_features(x))
    torch.testing.assert_close(prepare_features(x * 1e-20), prepare_features(x))
    _, idx = topk_neighbors(prepare_features(x), prepare_features(x), 5, self_index=torch.arange(60))
    base = retrieval_metrics(x, y)
    for scale in (1e20, 1e-20):
        _, scaled = topk_neighbors(
            prepare_features(x * scale), prepare_features(x * scale), 5, self_index=torch.arange(60)
        )
        assert torch.equal(scaled, idx)
        assert retrieval_metrics(x * scale, y) == base
        assert torch.equal(knn_predict(x * scale, y, x[:10] * scale, 4, k=5), knn_predict(x, y, x[:10], 4, k=5))


def test_prepare_features_refuses_a_vector() -> None:
    """A 1-D tensor is not N rows of D features: refused with the expected shape, not searched as N scalars."""
    with pytest.raises(ValueError, match=r"features must be \(N, D\), got shape \(3,\)"):
        prepare_features(torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"features must be \(N, D\), got shape \(1, 2, 3\)"):
        prepare_features(torch.zeros(1, 2, 3), "euclidean")


def test_leave_one_out_excludes_self_at_any_euclidean_distance() -> None:
    """Euclidean similarities reach -4e6 here: the own row must be set to -inf, not a finite 'very low' value."""
    x = prepare_features(torch.tensor([[0.0], [1000.0], [2000.0]], dtype=torch.float64), "euclidean")
    values, idx = topk_neighbors(x, x, 2, "euclidean", self_index=torch.arange(3))
    assert idx.tolist() == [[1, 2], [0, 2], [1, 0]]  # row 1: 0 and 2 tie at distance 1000, lower index first
    assert values.tolist() == [[-1e6, -4e6], [-1e6, -1e6], [-1e6, -4e6]]
