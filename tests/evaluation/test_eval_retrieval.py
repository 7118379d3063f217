"""Retrieval metrics against brute-force loops, scikit-learn and hand-worked cases."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import average_precision_score

from contrastive.evaluation import knn_top1, retrieval_metrics
from contrastive.evaluation.neighbors import tie_order

from ._reference import EXACT_POOL, retrieval_loop

KS = (1, 2, 4, 8)


def _data(n: int, d: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    x = torch.randn(c, d, generator=g, dtype=torch.float64)[y] + 2 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, y


def _assert_matches(got: dict[str, float], expected: dict[str, float]) -> None:
    assert got.keys() >= expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_hand_worked_map_at_r() -> None:
    # query (1, 0) with label 0; references, most similar first:
    #   r0 (1, 0)     sim  1.0  label 0  relevant
    #   r1 (.8, .6)   sim  0.8  label 1
    #   r2 (.6, .8)   sim  0.6  label 0  relevant
    #   r3 (0, 1)     sim  0.0  label 0  relevant
    #   r4 (-1, 0)    sim -1.0  label 1
    # R = 3, top-3 relevance = [1, 0, 1]
    # MAP@R = (1/R) * (P@1*1 + P@2*0 + P@3*1) = (1/3) * (1/1 + 2/3) = 5/9
    # R-precision = 2/3; precision@1 = recall@1 = 1
    refs = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    out = retrieval_metrics(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), refs, torch.tensor([0, 1, 0, 0, 1]))
    assert out["map_at_r"] == pytest.approx(100 * 5 / 9)
    assert out["r_precision"] == pytest.approx(100 * 2 / 3)
    assert out["precision_at_1"] == out["recall_at_1"] == 100.0
    assert out["num_queries"] == 1.0 and out["num_excluded_queries"] == 0.0


@pytest.mark.parametrize(("labels", "expected"), [([1, 0], 0.0), ([0, 1], 100.0)])
def test_similarity_ties_rank_in_tie_order(labels: list[int], expected: float) -> None:
    # both references sit at similarity 0 to the query; R = 1, so only the first ranked one counts,
    # which tie_order(2) says is reference 0
    assert tie_order(2)[0].tolist() == [0, 1]
    refs = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    out = retrieval_metrics(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), refs, torch.tensor(labels), ks=(1, 2))
    assert out["precision_at_1"] == out["map_at_r"] == out["r_precision"] == expected
    assert out["recall_at_2"] == 100.0


def test_leave_one_out_excludes_self_and_lone_classes() -> None:
    # the query itself would always be rank 1; class 1 has one member, so query 2 has R = 0
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [1.0, 0.1]])
    y = torch.tensor([0, 0, 1, 2, 2, 2])
    out = retrieval_metrics(x, y, ks=(1,))
    _assert_matches(out, retrieval_loop(x, y, None, None, (1,)))
    assert out["num_excluded_queries"] == 1.0 and out["num_queries"] == 5.0
    # query 0's nearest other point is point 2 (class 1, identical vector, before 5 in tie_order(6)): a miss
    assert out["precision_at_1"] < 100.0


def test_all_queries_lone_gives_nan() -> None:
    out = retrieval_metrics(torch.randn(3, 2), torch.tensor([0, 1, 2]))
    assert math.isnan(out["map_at_r"]) and out["num_excluded_queries"] == 3.0


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force_leave_one_out(metric: str, seed: int) -> None:
    x, y = _data(90, 5, 6, seed)
    y[0] = 99  # a lone class
    out = retrieval_metrics(x, y, ks=KS, chunk_size=13, metric=metric)
    _assert_matches(out, retrieval_loop(x, y, None, None, KS, metric))
    assert out["num_excluded_queries"] == 1.0


def test_matches_brute_force_query_reference_mode() -> None:
    x, y = _data(150, 4, 5, seed=2)
    q, qy, r, ry = x[:40], y[:40].clone(), x[40:], y[40:]
    qy[0] = 42  # label absent from the references: excluded
    out = retrieval_metrics(q, qy, r, ry, ks=(1, 3, 500), chunk_size=8)
    _assert_matches(out, retrieval_loop(q, qy, r, ry, (1, 3, 500)))
    assert out["recall_at_500"] == 100.0  # K clamps to the 110 references, all of which are ranked


def test_map_at_r_equals_sklearn_average_precision_of_top_r_times_r_precision() -> None:
    # For one query, sklearn's AP over the top-R list averages P@j over the relevant items found there;
    # MAP@R divides the same sum by R instead, so MAP@R = AP(top R) * (relevant in top R) / R.
    x, y = _data(60, 3, 4, seed=5)
    xn = torch.nn.functional.normalize(x, dim=1)
    expected = []
    for i in range(len(y)):
        sims = xn @ xn[i]
        sims[i] = -math.inf
        order = sims.argsort(descending=True)[: int((y == y[i]).sum()) - 1]
        rel = (y[order] == y[i]).numpy()
        found = rel.sum()
        ap = average_precision_score(rel, sims[order].numpy()) if found else 0.0
        expected.append(ap * found / len(rel))
    out = retrieval_metrics(x, y)
    assert out["map_at_r"] == pytest.approx(100 * sum(expected) / len(expected), abs=1e-9)


def test_chunked_equals_unchunked() -> None:
    x, y = _data(400, 16, 10, seed=4)
    x = x.float()
    full = retrieval_metrics(x, y, chunk_size=10_000)
    for chunk in (1, 33, 128):
        assert retrieval_metrics(x, y, chunk_size=chunk) == full


def test_perfect_embedding_scores_100() -> None:
    y = torch.arange(5).repeat_interleave(4)
    x = torch.nn.functional.one_hot(y, 5).double() + 0.01 * torch.randn(20, 5, dtype=torch.float64)
    out = retrieval_metrics(x, y)
    assert all(out[key] == pytest.approx(100.0) for key in ("recall_at_1", "r_precision", "map_at_r"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_with_many_exact_ties(seed: int) -> None:
    # every item is one of 5 unit vectors with dyadic entries, so every similarity is exact in any
    # summation order and most are tied; the rule (tie_order) must pick the same neighbours
    # as the loop's sorted((-sim, place in tie_order))
    g = torch.Generator().manual_seed(seed)
    x = EXACT_POOL[torch.randint(0, 5, (70,), generator=g)]
    y = torch.randint(0, 3, (70,), generator=g)
    _assert_matches(retrieval_metrics(x, y, ks=(1, 5, 20), chunk_size=11), retrieval_loop(x, y, None, None, (1, 5, 20)))


def test_ties_do_not_favour_a_data_set_stored_class_by_class() -> None:
    """A collapsed network (zero features: every similarity 0) on 5 classes x 40 stored class by class:
    ranking ties by index put class 0 first for every query: its 40 queries scored MAP@R 100 (20 overall
    instead of ~6 by chance, which a shuffled order of the same data gives)."""
    y = torch.arange(5).repeat_interleave(40)
    sorted_out = retrieval_metrics(torch.zeros(200, 8), y)
    shuffled = y[torch.randperm(200, generator=torch.Generator().manual_seed(1))]
    shuffled_out = retrieval_metrics(torch.zeros(200, 8), shuffled)
    for out in (sorted_out, shuffled_out):
        assert out["map_at_r"] < 8 and 10 < out["precision_at_1"] < 30
    assert abs(sorted_out["map_at_r"] - shuffled_out["map_at_r"]) < 2
    knn = knn_top1(torch.zeros(200, 8), y, torch.zeros(50, 8), torch.arange(5).repeat(10), 5, k=20)
    assert knn == 20.0  # every query gets the same (tied) neighbours, so one class: chance


def test_the_query_set_passed_again_as_reference_warns_and_an_int_k_works() -> None:
    x, y = torch.randn(12, 3, generator=torch.Generator().manual_seed(0)), torch.arange(12) % 3
    with pytest.warns(UserWarning, match="every query finds itself at rank 1.*pass reference=None"):
        assert retrieval_metrics(x, y, x, y)["precision_at_1"] == 100.0
    assert retrieval_metrics(x, y, ks=4) == retrieval_metrics(x, y, ks=(4,))  # a TypeError before
