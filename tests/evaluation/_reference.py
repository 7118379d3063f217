"""Brute-force Python references for the evaluation metrics (loops over plain floats)."""

from __future__ import annotations

import math

import torch

from contrastive.evaluation.neighbors import tie_order

# Unit vectors whose pairwise dot products (0, +-0.5, +-1) are exact whatever the BLAS kernel does
EXACT_POOL = torch.tensor(
    [[1, 0, 0, 0], [0, 1, 0, 0], [0.5, 0.5, 0.5, 0.5], [0.5, -0.5, 0.5, -0.5], [-1, 0, 0, 0]], dtype=torch.float64
)


def ranked(query: list[float], refs: list[list[float]], skip: int | None, metric: str) -> list[int]:
    """Reference indices sorted by similarity (descending), ties by their place in ``tie_order``."""
    _, position = tie_order(len(refs))

    def sim(a: list[float], b: list[float]) -> float:
        if metric == "euclidean":
            return -sum((x - y) ** 2 for x, y in zip(a, b))
        na = math.sqrt(sum(x * x for x in a)) or 1.0
        nb = math.sqrt(sum(x * x for x in b)) or 1.0
        return sum(x * y for x, y in zip(a, b)) / (na * nb)

    scored = [(-sim(query, r), int(position[j]), j) for j, r in enumerate(refs) if j != skip]
    return [j for _, _, j in sorted(scored)]


def knn_loop(
    train: torch.Tensor,
    train_y: torch.Tensor,
    query: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
    weighted: bool,
    exclude_self: bool = False,
) -> list[int]:
    """Weighted (exp(sim/T)) or majority vote of the k nearest, ties to the lowest class."""
    refs, ys = train.tolist(), train_y.tolist()
    preds = []
    for i, q in enumerate(query.tolist()):
        order = ranked(q, refs, i if exclude_self else None, "cosine")[:k]
        qn = math.sqrt(sum(x * x for x in q))
        score = [0.0] * num_classes
        for j in order:
            s = sum(a * b for a, b in zip(q, refs[j])) / (qn * math.sqrt(sum(b * b for b in refs[j])))
            score[ys[j]] += math.exp(s / temperature) if weighted else 1.0
        best = max(score)
        preds.append(min(c for c in range(num_classes) if score[c] == best))
    return preds


def retrieval_loop(
    query: torch.Tensor,
    query_y: torch.Tensor,
    refs: torch.Tensor | None,
    refs_y: torch.Tensor | None,
    ks: tuple[int, ...],
    metric: str = "cosine",
) -> dict[str, float]:
    """Musgrave et al. 2020 definitions, one query at a time, in percent."""
    loo = refs is None
    ref_list = query.tolist() if loo else refs.tolist()
    ref_y = query_y.tolist() if loo else refs_y.tolist()
    sums: dict[str, float] = {f"recall_at_{k}": 0.0 for k in ks} | {"r_precision": 0.0, "map_at_r": 0.0}
    n = 0
    for i, (q, y) in enumerate(zip(query.tolist(), query_y.tolist())):
        order = ranked(q, ref_list, i if loo else None, metric)
        rel = [ref_y[j] == y for j in order]
        r = sum(rel)
        if r == 0:
            continue
        n += 1
        for k in ks:
            sums[f"recall_at_{k}"] += float(any(rel[:k]))
        sums["r_precision"] += sum(rel[:r]) / r
        hits, ap = 0, 0.0
        for j in range(r):
            if rel[j]:
                hits += 1
                ap += hits / (j + 1)
        sums["map_at_r"] += ap / r
    out = {key: 100.0 * v / n if n else float("nan") for key, v in sums.items()}
    out["num_queries"] = float(n)
    out["num_excluded_queries"] = float(len(query_y) - n)
    return out
