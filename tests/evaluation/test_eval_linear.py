"""Linear probe on synthetic cached features."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import accuracy_score

from contrastive.evaluation import linear_probe


def _blobs(n: int, d: int, c: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    centers = 10.0 * torch.randn(c, d, generator=g)
    return centers[y] + spread * torch.randn(n, d, generator=g) + 50.0, y  # offset: standardisation must cope


@pytest.mark.parametrize(("normalize", "optimizer"), [("standardize", "sgd"), ("l2", "sgd"), ("none", "adamw")])
def test_separable_blobs_reach_100_percent(normalize: str, optimizer: str) -> None:
    x, y = _blobs(1200, 16, 5, spread=1.0, seed=0)
    out = linear_probe(x[:600], y[:600], x[600:], y[600:], 5, epochs=20, optimizer=optimizer, normalize=normalize)
    assert out["linear_train_top1"] == 100.0
    assert out["linear_top1"] == 100.0
    assert out["linear_top1"] == 100.0 * accuracy_score(y[600:].numpy(), out["test_predictions"].numpy())


def test_random_labels_stay_near_chance_on_test() -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6000, 32, generator=g), torch.randint(0, 10, (6000,), generator=g)
    out = linear_probe(x[:3000], y[:3000], x[3000:], y[3000:], 10, epochs=10)
    assert abs(out["linear_top1"] - 10.0) < 10.0  # chance is 100 / 10
    assert out["linear_test_loss"] > 2.0  # ~ log(10) = 2.30: nothing generalises


def test_classifier_takes_raw_features_and_reproduces_predictions() -> None:
    x, y = _blobs(600, 8, 4, spread=6.0, seed=2)  # overlapping: predictions are not trivially all right
    out = linear_probe(x[:300], y[:300], x[300:], y[300:], 4, epochs=5)
    assert 40.0 < out["linear_top1"] < 100.0
    with torch.no_grad():
        raw_pred = out["classifier"](x[300:]).argmax(1)
    assert (raw_pred == out["test_predictions"]).double().mean() > 0.99  # folding changes rounding only


def test_deterministic_given_seed_and_seed_matters() -> None:
    x, y = _blobs(400, 8, 4, spread=6.0, seed=3)
    a = linear_probe(x[:200], y[:200], x[200:], y[200:], 4, epochs=3, batch_size=32, seed=7)
    b = linear_probe(x[:200], y[:200], x[200:], y[200:], 4, epochs=3, batch_size=32, seed=7)
    c = linear_probe(x[:200], y[:200], x[200:], y[200:], 4, epochs=3, batch_size=32, seed=8)
    assert torch.equal(a["classifier"].weight, b["classifier"].weight)
    assert not torch.equal(a["classifier"].weight, c["classifier"].weight)


def test_rejects_unknown_options() -> None:
    x, y = torch.randn(8, 2), torch.arange(8) % 2
    with pytest.raises(ValueError):
        linear_probe(x, y, x, y, 2, normalize="whiten")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        linear_probe(x, y, x, y, 2, optimizer="lbfgs")  # type: ignore[arg-type]
