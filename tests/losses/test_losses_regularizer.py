"""Softmax-CE regulariser and RegularizedMetricLoss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contrastive.losses import RegularizedMetricLoss, SoftmaxCERegularizer, TripletMargin, triplet_margin


def blobs(n_per_class: int, classes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 2.0
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[labels] + torch.randn(len(labels), dim, generator=g), labels


@pytest.mark.parametrize(("kind", "bnneck"), [("linear", False), ("cosine", True)])
def test_triplet_plus_regulariser_learns_the_classes(kind: str, bnneck: bool) -> None:
    torch.manual_seed(0)
    x, y = blobs(16, 4, 10, seed=1)
    net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 8))
    loss_fn = RegularizedMetricLoss(TripletMargin(0.2), SoftmaxCERegularizer(8, 4, kind=kind, bnneck=bnneck), 0.5)
    optimiser = torch.optim.Adam([*net.parameters(), *loss_fn.parameters()], lr=3e-3)
    first = loss_fn(net(x), y)
    assert set(first) == {"loss", "metric", "ce", "ce_acc"}
    torch.testing.assert_close(first["loss"], first["metric"] + 0.5 * first["ce"])
    for _ in range(300):
        out = loss_fn(net(x), y)
        optimiser.zero_grad()
        out["loss"].backward()
        optimiser.step()
    loss_fn.eval()
    final = loss_fn(net(x), y)
    assert first["ce_acc"].item() < 60  # percent; chance is 25
    assert final["ce_acc"].item() > 90
    assert final["ce"].item() < 0.5 * first["ce"].item()
    assert final["metric"].item() < first["metric"].item()


def test_regulariser_logits_and_cross_entropy_by_hand() -> None:
    torch.manual_seed(0)
    reg = SoftmaxCERegularizer(5, 3, kind="cosine", temperature=0.1, label_smoothing=0.2).double()
    f, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 2, 1, 2])
    w = reg.classifier.weight
    logits = (f / f.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T / 0.1
    torch.testing.assert_close(reg.logits(f), logits)
    ce, acc = reg(f, y)
    # label smoothing by hand: (1 - eps) * NLL + eps * mean over classes of -log p
    logp = logits.log_softmax(dim=1)
    expected = (0.8 * -logp[torch.arange(4), y] + 0.2 * -logp.mean(dim=1)).mean()
    assert ce.item() == pytest.approx(expected.item(), rel=1e-12)
    assert acc.item() == pytest.approx(100 * (logits.argmax(1) == y).double().mean().item())  # percent


def test_bnneck_metric_sees_raw_features_classifier_sees_normalised() -> None:
    torch.manual_seed(0)
    reg = SoftmaxCERegularizer(6, 3, bnneck=True)
    assert reg.classifier.bias is None and not reg.neck.bias.requires_grad
    f, y = torch.randn(12, 6) * 5 + 3, torch.arange(12) % 3
    bn = (f - f.mean(0)) / torch.sqrt(f.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(reg.logits(f), bn @ reg.classifier.weight.T, rtol=1e-4, atol=1e-5)
    combined = RegularizedMetricLoss(TripletMargin(), reg)
    assert combined(f, y)["metric"].item() == triplet_margin(f, y).item()


def test_without_regulariser_and_validation() -> None:
    f, y = torch.randn(6, 4), torch.arange(6) % 2
    out = RegularizedMetricLoss(TripletMargin())(f, y)
    assert set(out) == {"loss", "metric"} and out["loss"] is out["metric"]
    linear = SoftmaxCERegularizer(4, 2)
    torch.testing.assert_close(linear(f, y)[0], F.cross_entropy(linear.classifier(f), y))
    with pytest.raises(ValueError, match="kind"):
        SoftmaxCERegularizer(4, 2, kind="sphereface")
    with pytest.raises(ValueError, match="label_smoothing"):
        SoftmaxCERegularizer(4, 2, label_smoothing=1.0)
    with pytest.raises(ValueError, match="temperature"):
        SoftmaxCERegularizer(4, 2, kind="cosine", temperature=0.0)
    with pytest.raises(ValueError, match="weight"):
        RegularizedMetricLoss(TripletMargin(), weight=-1.0)
    assert math.isclose(SoftmaxCERegularizer(4, 2, kind="cosine").temperature, 0.05)
    with pytest.raises(ValueError, match=r"labels must be integer class ids in \[0, 2\), got torch.float32"):
        linear(f, y.float() + 0.7)  # .long() would have truncated 1.7 to 1 for the CE only


def test_one_class_and_nan_weight_are_refused() -> None:
    """One class gives a constant cross-entropy (nothing to learn); a NaN weight would pass a ``weight < 0`` check."""
    with pytest.raises(ValueError, match=r"need embed_dim >= 1 and num_classes >= 2, got 4 and 1\."):
        SoftmaxCERegularizer(4, 1)
    with pytest.raises(ValueError, match=r"need embed_dim >= 1 and num_classes >= 2, got 0 and 3\."):
        SoftmaxCERegularizer(0, 3)
    with pytest.raises(ValueError, match=r"weight must be >= 0, got nan\."):
        RegularizedMetricLoss(TripletMargin(), SoftmaxCERegularizer(4, 2), weight=float("nan"))
    assert RegularizedMetricLoss(TripletMargin(), weight=0.0).weight == 0.0  # the boundary is allowed
