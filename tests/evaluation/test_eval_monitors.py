"""The label-free monitors against float64 loops written from their definitions, and hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch

from contrastive.evaluation import alignment, embedding_std, label_free_monitors, rank_me, uniformity


def _unit(z: torch.Tensor) -> list[list[float]]:
    rows = z.double().tolist()
    return [[v / math.sqrt(sum(x * x for x in r)) for v in r] for r in rows]


def ref_embedding_std(z: torch.Tensor) -> float:
    u = _unit(z)
    n, d = len(u), len(u[0])
    stds = []
    for j in range(d):
        mean = sum(u[i][j] for i in range(n)) / n
        stds.append(math.sqrt(sum((u[i][j] - mean) ** 2 for i in range(n)) / (n - 1)))
    return sum(stds) / d


def ref_rank_me(z: torch.Tensor, eps: float = 1e-7) -> float:
    s = torch.linalg.svdvals(torch.tensor(_unit(z), dtype=torch.float64)).tolist()
    p = [v / sum(s) + eps for v in s]
    return math.exp(-sum(q * math.log(q) for q in p))


def ref_alignment(z1: torch.Tensor, z2: torch.Tensor, alpha: float) -> float:
    u1, u2 = _unit(z1), _unit(z2)
    return sum(math.sqrt(sum((a - b) ** 2 for a, b in zip(r1, r2))) ** alpha for r1, r2 in zip(u1, u2)) / len(u1)


def ref_uniformity(z: torch.Tensor, t: float) -> float:
    u = _unit(z)
    pairs = [(i, j) for i in range(len(u)) for j in range(i + 1, len(u))]
    terms = [math.exp(-t * sum((a - b) ** 2 for a, b in zip(u[i], u[j]))) for i, j in pairs]
    return math.log(sum(terms) / len(terms))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_embeddings_match_float64_references(dtype: torch.dtype, tol: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(23, 7, generator=g, dtype=torch.float64) * 3 + 0.5  # scale: the monitors normalise
    z2 = z1 + 0.3 * torch.randn(23, 7, generator=g, dtype=torch.float64)
    a, b = z1.to(dtype), z2.to(dtype)
    assert float(embedding_std(a)) == pytest.approx(ref_embedding_std(z1), abs=tol)
    assert float(rank_me(a)) == pytest.approx(ref_rank_me(z1), abs=tol * 10)
    assert float(alignment(a, b)) == pytest.approx(ref_alignment(z1, z2, 2.0), abs=tol)
    assert float(alignment(a, b, alpha=1.0)) == pytest.approx(ref_alignment(z1, z2, 1.0), abs=tol)
    assert float(uniformity(a)) == pytest.approx(ref_uniformity(z1, 2.0), abs=tol)
    assert float(uniformity(a, t=0.5)) == pytest.approx(ref_uniformity(z1, 0.5), abs=tol)


def test_identical_rows_are_collapse() -> None:
    z = torch.tensor([[1.0, 2.0, -2.0]]).repeat(10, 1)
    assert float(embedding_std(z)) == pytest.approx(0.0, abs=1e-7)
    assert float(rank_me(z)) == pytest.approx(1.0, abs=1e-5)  # one singular value, p = (1 + eps, eps, eps)
    assert float(uniformity(z)) == pytest.approx(0.0, abs=1e-6)
    assert float(alignment(z, 5 * z)) == pytest.approx(0.0, abs=1e-6)  # scale does not matter


@pytest.mark.parametrize("k", [1, 3, 8])
def test_orthonormal_rows_have_rank_k(k: int) -> None:
    q, _ = torch.linalg.qr(torch.randn(16, k, generator=torch.Generator().manual_seed(k), dtype=torch.float64))
    z = q.T  # (k, 16), orthonormal rows
    if k == 1:
        z = torch.cat([z, z])  # n >= 2: the same row twice is still rank 1
    # p_k = 1/k + eps: the entropy moves by O(k * eps)
    assert float(rank_me(z)) == pytest.approx(k, abs=k * 1e-5)


def test_hand_made_alignment_and_uniformity() -> None:
    e = torch.eye(2, dtype=torch.float64)
    assert float(alignment(e, -e)) == pytest.approx(4.0)  # ||u - (-u)||^2 = 4
    assert float(alignment(e, e.flip(0))) == pytest.approx(2.0)  # orthogonal: sqrt(2)^2
    assert float(uniformity(torch.stack([e[0], -e[0]]))) == pytest.approx(-8.0)  # log exp(-2 * 4)
    assert float(embedding_std(torch.stack([e[0], -e[0]]))) == pytest.approx(math.sqrt(2) / 2)  # dims: sqrt 2, 0


def test_spread_rows_std_near_one_over_sqrt_d() -> None:
    z = torch.randn(20000, 64, generator=torch.Generator().manual_seed(0))
    assert float(embedding_std(z)) == pytest.approx(1 / 8, rel=0.02)


def test_label_free_monitors_keys_and_bad_input() -> None:
    z = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    assert set(label_free_monitors(z)) == {"embedding_std", "rank_me", "uniformity"}
    assert label_free_monitors(z, z)["alignment"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="n >= 2"):
        rank_me(z[:1])
    with pytest.raises(ValueError, match="same shape"):
        alignment(z, z[:4])
