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


def _reference_probe(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    c: int,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    lr: float = 0.1,
    wd: float = 1e-5,
    momentum: float = 0.9,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The documented recipe in float64 by hand: standardise with the train mean and population std
    (a constant column becomes 0), zero init, Nesterov SGD with L2 decay, cosine lr per step to 0."""
    x_train, x_test = x_train.double(), x_test.double()
    mean, std = x_train.mean(0), x_train.std(0, correction=0)
    std = torch.where(std > 0, std, torch.inf)  # constant column -> 0
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    w, b = torch.zeros(c, x_train.shape[1], dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    buf_w, buf_b = torch.zeros_like(w), torch.zeros_like(b)
    g = torch.Generator().manual_seed(seed)
    total = epochs * -(-len(x_train) // batch_size)
    step = 0
    for _ in range(epochs):
        for idx in torch.randperm(len(x_train), generator=g).split(batch_size):
            p = torch.softmax(x_train[idx] @ w.T + b, 1) - torch.nn.functional.one_hot(y_train[idx], c)
            grad_w, grad_b = p.T @ x_train[idx] / len(idx) + wd * w, p.mean(0) + wd * b
            rate = lr * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / total, dtype=torch.float64)))
            buf_w, buf_b = momentum * buf_w + grad_w, momentum * buf_b + grad_b
            w, b = w - rate * (grad_w + momentum * buf_w), b - rate * (grad_b + momentum * buf_b)
            step += 1
    return w, b, x_test @ w.T + b


def test_default_recipe_matches_a_float64_reference_with_a_constant_feature() -> None:
    """Pins every part of the documented recipe (train-only statistics, population std, Nesterov, decay,
    cosine schedule, 100 epochs) and that a constant feature (a dead unit) is ignored, not NaN."""
    x, y = _blobs(200, 6, 3, spread=8.0, seed=4)  # overlapping classes: the weights keep moving
    x[:, 2] = 3.0  # a dead unit: std 0
    x[100:, 0] += 5.0  # the test set's own mean differs: only the train statistics may be used
    out = linear_probe(x[:100], y[:100], x[100:], y[100:], 3, batch_size=32)
    w, b, logits = _reference_probe(x[:100], y[:100], x[100:], 3, epochs=100, batch_size=32, seed=0)
    assert torch.isfinite(out["classifier"].weight).all()
    torch.testing.assert_close(out["classifier"](x[100:]).double(), logits, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(
        torch.tensor(out["linear_test_loss"], dtype=torch.float64),
        torch.nn.functional.cross_entropy(logits, y[100:]),
        atol=1e-4,
        rtol=1e-4,
    )
    assert out["linear_top1"] == 100.0 * (logits.argmax(1) == y[100:]).double().mean().item()
    # the decay itself (its documented default, 1e-5, moves these weights below float32 noise)
    import inspect

    assert inspect.signature(linear_probe).parameters["weight_decay"].default == 1e-5
    out = linear_probe(x[:100], y[:100], x[100:], y[100:], 3, batch_size=32, epochs=20, weight_decay=0.05)
    logits = _reference_probe(x[:100], y[:100], x[100:], 3, epochs=20, batch_size=32, seed=0, wd=0.05)[2]
    torch.testing.assert_close(out["classifier"](x[100:]).double(), logits, atol=2e-3, rtol=1e-3)
