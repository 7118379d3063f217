"""Retrieval of a large gallery in bounded memory: the block of similarities never passes MAX_BLOCK, whatever
``chunk_size`` asks, and the figures do not depend on it (docs/benchmarks.md measures 100,000 x 100,000)."""

from __future__ import annotations

import pytest
import torch

from contrastive.evaluation import retrieval, retrieval_metrics

from ._reference import retrieval_loop


def _blocks(monkeypatch: pytest.MonkeyPatch, limit: int) -> list[tuple[int, int]]:
    """Cap the block at ``limit`` similarities; the (queries, references) of every block searched."""
    shapes: list[tuple[int, int]] = []
    search = retrieval.topk_neighbors

    def recording(query: torch.Tensor, reference: torch.Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        shapes.append((len(query), len(reference)))
        return search(query, reference, *args, **kwargs)

    monkeypatch.setattr(retrieval, "MAX_BLOCK", limit)
    monkeypatch.setattr(retrieval, "topk_neighbors", recording)
    return shapes


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_the_block_is_bounded_and_the_figures_do_not_depend_on_it(monkeypatch: pytest.MonkeyPatch, metric: str) -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 7, (300,), generator=g)
    x = torch.randn(7, 6, generator=g, dtype=torch.float64)[y] + torch.randn(300, 6, generator=g, dtype=torch.float64)
    unbounded = retrieval_metrics(x, y, chunk_size=512, metric=metric)  # 300 x 300 < 2**26: one block
    pairs = retrieval_metrics(x[:100], y[:100], x[100:], y[100:], chunk_size=512, metric=metric)
    shapes = _blocks(monkeypatch, limit=1000)  # 3 queries x 300 references at most
    assert retrieval_metrics(x, y, chunk_size=512, metric=metric) == unbounded
    assert len(shapes) == 100 and all(q * n <= 1000 for q, n in shapes) and sum(q for q, _ in shapes) == 300
    shapes.clear()
    assert retrieval_metrics(x[:100], y[:100], x[100:], y[100:], chunk_size=512, metric=metric) == pairs
    assert all(q * n <= 1000 and n == 200 for q, n in shapes) and sum(q for q, _ in shapes) == 100
    expected = retrieval_loop(x, y, None, None, (1, 2, 4, 8), metric)
    for key, value in expected.items():
        assert unbounded[key] == pytest.approx(value, abs=1e-9), key
    _blocks(monkeypatch, limit=1)  # a gallery wider than the cap still ranks one query at a time
    assert retrieval_metrics(x, y, chunk_size=512, metric=metric) == unbounded
