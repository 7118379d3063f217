"""kNN classifier against a brute-force loop and hand-made cases."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import accuracy_score

from contrastive.evaluation import knn_predict, knn_top1
from contrastive.evaluation.neighbors import tie_order

from ._reference import EXACT_POOL, knn_loop


def _data(n: int, q: int, d: int, c: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(c, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n + q,), generator=g)
    x = centers[y] + 1.5 * torch.randn(n + q, d, generator=g, dtype=torch.float64)
    return x[:n], y[:n], x[n:], y[n:]


def test_weighted_and_majority_differ_on_hand_made_case() -> None:
    # query (1, 0). class 0: one point at sim 1; class 1: two points at sim 0. k = 3, T = 0.1.
    # weighted: class 0 scores e^10 ~ 22026, class 1 scores 2 e^0 = 2  -> 0
    # majority: class 0 has 1 vote, class 1 has 2                      -> 1
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[3.0, 0.0]])
    assert knn_predict(train, labels, query, 2, k=3, temperature=0.1).tolist() == [0]
    assert knn_predict(train, labels, query, 2, k=3, weighted=False).tolist() == [1]


def test_tie_rules_tie_order_then_lowest_class() -> None:
    # query (1, 0): train 0 (label 2) at sim 1, then train 1 (label 1) and train 2 (label 0) tied at sim 0.
    # tie_order(3) places train 2 before train 1, so k = 2 takes train 2 and the votes are {2: 1, 0: 1}:
    # a tie, lowest class -> 0. (The lower index, train 1, would have given {2, 1} -> 1.)
    assert tie_order(3)[0].tolist() == [2, 0, 1]
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([2, 1, 0])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_predict(train, labels, query, 3, k=2, weighted=False).tolist() == [0]
    assert knn_loop(train, labels, query, 3, 2, 0.1, weighted=False) == [0]


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("k", [1, 5, 30])
def test_matches_brute_force_loop(weighted: bool, k: int) -> None:
    train, train_y, query, query_y = _data(120, 40, 6, 4, seed=k)
    pred = knn_predict(train, train_y, query, 4, k=k, temperature=0.07, weighted=weighted, chunk_size=16)
    expected = knn_loop(train, train_y, query, 4, k, 0.07, weighted)
    assert pred.tolist() == expected
    top1 = knn_top1(train, train_y, query, query_y, 4, k=k, temperature=0.07, weighted=weighted)
    assert top1 == pytest.approx(100.0 * accuracy_score(query_y.numpy(), expected))


def test_leave_one_out_matches_loop_and_differs_from_including_self() -> None:
    train, train_y, _, _ = _data(80, 0, 5, 3, seed=7)
    loo = knn_predict(train, train_y, train, 3, k=1, exclude_self=True, chunk_size=9)
    assert loo.tolist() == knn_loop(train, train_y, train, 3, 1, 0.1, weighted=True, exclude_self=True)
    # with itself allowed, 1-NN always returns its own label
    assert knn_top1(train, train_y, train, train_y, 3, k=1) == 100.0
    assert knn_top1(train, train_y, train, train_y, 3, k=1, exclude_self=True) < 100.0


def test_chunked_equals_unchunked_and_k_clamps() -> None:
    train, train_y, query, _ = _data(300, 100, 16, 10, seed=3)
    full = knn_predict(train.float(), train_y, query.float(), 10, k=50, chunk_size=10_000)
    for chunk in (1, 7, 64):
        assert torch.equal(knn_predict(train.float(), train_y, query.float(), 10, k=50, chunk_size=chunk), full)
    # k beyond the train set uses every training point
    big = knn_predict(train, train_y, query, 10, k=10_000, weighted=False)
    assert torch.equal(big, torch.full_like(big, int(torch.bincount(train_y, minlength=10).argmax())))


def test_tiny_temperature_does_not_overflow() -> None:
    train, train_y, query, _ = _data(50, 20, 4, 3, seed=1)
    pred = knn_predict(train, train_y, query, 3, k=10, temperature=1e-4)
    # as T -> 0 the nearest neighbour dominates: equals 1-NN
    assert torch.equal(pred, knn_predict(train, train_y, query, 3, k=1))


def test_rejects_bad_labels_and_loo_shape() -> None:
    x = torch.randn(4, 2)
    with pytest.raises(ValueError):
        knn_predict(x, torch.tensor([0, 1, 2, 3]), x, num_classes=3)
    with pytest.raises(ValueError):
        knn_predict(x, torch.tensor([0, 1, 0, 1]), x[:2], num_classes=2, exclude_self=True)


@pytest.mark.parametrize("weighted", [True, False])
def test_matches_brute_force_with_many_exact_ties(weighted: bool) -> None:
    g = torch.Generator().manual_seed(5)
    x = EXACT_POOL[torch.randint(0, 5, (90,), generator=g)]  # similarities exact and mostly tied
    y = torch.randint(0, 3, (90,), generator=g)
    pred = knn_predict(x, y, x, 3, k=7, weighted=weighted, exclude_self=True, chunk_size=8)
    assert pred.tolist() == knn_loop(x, y, x, 3, 7, 0.1, weighted, exclude_self=True)


def test_leave_one_out_with_k_past_the_set_never_votes_for_itself() -> None:
    """k >= N with exclude_self clamps to the N - 1 others; at k = N the query's own label was counted."""
    x = torch.eye(3)  # each label is unique: the query's own label wins only through itself
    y = torch.tensor([0, 1, 2])
    for k in (3, 50):
        pred = knn_predict(x, y, x, 3, k=k, weighted=False, exclude_self=True)
        assert (pred != y).all(), pred
        assert knn_top1(x, y, x, y, 3, k=k, weighted=False, exclude_self=True) == 0.0


@pytest.mark.parametrize("temperature", [float("nan"), 0.0, -0.1])
def test_a_nan_or_non_positive_temperature_is_refused(temperature: float) -> None:
    x = torch.randn(6, 2)
    with pytest.raises(ValueError, match="temperature > 0"):
        knn_predict(x, torch.tensor([0, 1, 0, 1, 0, 1]), x, 2, temperature=temperature)
