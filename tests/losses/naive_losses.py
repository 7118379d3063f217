"""Literal float64 loop references for the losses (python floats, math.exp/log).

Written to read like the papers, not to be fast: every test compares the library
against these on random inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

Vec = list[float]


def rows(x: Tensor, normalize: bool = True) -> list[Vec]:
    out = []
    for row in x.double().tolist():
        norm = math.sqrt(sum(v * v for v in row))
        out.append([v / norm for v in row] if normalize else row)
    return out


def dot(a: Vec, b: Vec) -> float:
    return sum(x * y for x, y in zip(a, b))


def dist(a: Vec, b: Vec, squared: bool = False) -> float:
    d2 = sum((x - y) ** 2 for x, y in zip(a, b))
    return d2 if squared else math.sqrt(d2)


def log_softmax_at(logits: Sequence[float], k: int) -> float:
    """log(exp(l_k) / sum_j exp(l_j)), literally (shifted by the max to avoid overflow)."""
    top = max(logits)
    return logits[k] - top - math.log(sum(math.exp(v - top) for v in logits))


def nt_xent(z1: Tensor, z2: Tensor, t: float) -> float:
    z = rows(torch.cat([z1, z2]))
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        positive = (i + n2 // 2) % n2
        others = [j for j in range(n2) if j != i]
        logits = [dot(z[i], z[j]) / t for j in others]
        total -= log_softmax_at(logits, others.index(positive))
    return total / n2


def info_nce(q: Tensor, k: Tensor, negatives: Tensor | None, t: float) -> float:
    qs, ks = rows(q), rows(k)
    total = 0.0
    for i in range(len(qs)):
        if negatives is None:
            logits = [dot(qs[i], kj) / t for kj in ks]
            total -= log_softmax_at(logits, i)
        else:
            logits = [dot(qs[i], ks[i]) / t] + [dot(qs[i], nj) / t for nj in rows(negatives)]
            total -= log_softmax_at(logits, 0)
    return total / len(qs)


def sup_con(z: Tensor, labels: Tensor, t: float) -> float:
    """SupCon L_out: mean over anchors with a positive of -mean_p log p(p | i)."""
    zs, ys = rows(z), labels.tolist()
    per_anchor = []
    for i in range(len(zs)):
        others = [a for a in range(len(zs)) if a != i]
        positives = [p for p in others if ys[p] == ys[i]]
        if not positives:
            continue
        logits = [dot(zs[i], zs[a]) / t for a in others]
        per_anchor.append(-sum(log_softmax_at(logits, others.index(p)) for p in positives) / len(positives))
    return sum(per_anchor) / len(per_anchor) if per_anchor else 0.0


def _distances(x: Tensor, squared: bool, normalize: bool) -> list[list[float]]:
    xs = rows(x, normalize)
    return [[dist(a, b, squared) for b in xs] for a in xs]


def triplet(
    x: Tensor, labels: Tensor, margin: float, mining: str, squared: bool, normalize: bool, soft: bool = False
) -> float:
    d, y = _distances(x, squared, normalize), labels.tolist()

    def hinge(v: float) -> float:  # v = d(a, p) - d(a, n) + margin
        return math.log1p(math.exp(v)) if soft else max(0.0, v)

    n = len(y)
    losses = []
    for a in range(n):
        pos = [p for p in range(n) if p != a and y[p] == y[a]]
        neg = [k for k in range(n) if y[k] != y[a]]
        if not pos or not neg:
            continue
        if mining == "all":
            for p in pos:
                for k in neg:
                    value = hinge(d[a][p] - d[a][k] + margin)
                    if value > 0:
                        losses.append(value)
        elif mining == "batch_hard":
            losses.append(hinge(max(d[a][p] for p in pos) - min(d[a][k] for k in neg) + margin))
        else:  # semi_hard: closest negative farther than the positive, else the farthest negative
            for p in pos:
                farther = [d[a][k] for k in neg if d[a][k] > d[a][p]]
                chosen = min(farther) if farther else max(d[a][k] for k in neg)
                losses.append(hinge(d[a][p] - chosen + margin))
    return sum(losses) / len(losses) if losses else 0.0


def contrastive(
    x: Tensor, labels: Tensor, pos_margin: float, neg_margin: float, squared: bool, normalize: bool
) -> float:
    d, y = _distances(x, squared, normalize), labels.tolist()
    pull, push = [], []
    for i in range(len(y)):
        for j in range(len(y)):
            if i == j:
                continue
            if y[i] == y[j]:
                pull.append(0.5 * max(0.0, d[i][j] - pos_margin) ** 2)
            else:
                push.append(0.5 * max(0.0, neg_margin - d[i][j]) ** 2)
    return (sum(pull) / len(pull) if pull else 0.0) + (sum(push) / len(push) if push else 0.0)
