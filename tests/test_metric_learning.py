"""Metric learning beyond triplets in the Siamese pipeline: the margin-softmax heads (CosFace, ArcFace) as
regulariser kinds and as losses, Proxy-Anchor, and the cross-batch memory (XBM), through the real configs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from contrastive.cli.run import build_pipeline
from contrastive.losses import (
    ArcFace,
    CosFace,
    ProxyAnchor,
    SoftmaxCERegularizer,
    cosface_logits,
    proxy_anchor,
    triplet_margin,
)

# --------------------------------------------------------------------------- margin-softmax heads


@pytest.mark.parametrize(
    ("option", "kind", "margin", "scale"), [("cosface", "cosface", 0.48, 120.0), ("arcface", "arcface", 0.365, 105.0)]
)
def test_margin_heads_are_regularizer_options_with_the_reality_checks_values(
    config, option: str, kind: str, margin: float, scale: float
) -> None:
    """regularizer=cosface|arcface: the middle of the ranges the Reality Check tuned (m 0.34-0.62 and s 88-161;
    18.6-23.2 degrees and s 50-220)."""
    cfg = config("train", ["experiment=siamese_shapes", f"regularizer={option}", "regularizer.weight=0.5"])
    head = build_pipeline(cfg).loss.regularizer
    assert isinstance(head, SoftmaxCERegularizer)
    assert (head.kind, head.margin, head.scale, cfg.pipeline.regularizer_weight) == (kind, margin, scale, 0.5)
    if kind == "arcface":
        assert 18.6 <= math.degrees(margin) <= 23.2 and 50 <= scale <= 220
    else:
        assert 0.34 <= margin <= 0.62 and 88 <= scale <= 161
    cosine = config("train", ["experiment=siamese_shapes", "regularizer=cosine_softmax_ce"]).regularizer.head
    assert 0.06 <= cosine.temperature <= 0.11  # the Reality Check's normalised softmax, not PML's 0.05


def test_margin_regulariser_adds_its_ce_to_the_triplet_loss(config) -> None:
    cfg = config("train", ["experiment=siamese_shapes", "regularizer=cosface", "regularizer.weight=0.5"])
    pipeline = build_pipeline(cfg)
    pipeline.loss.double()
    torch.manual_seed(0)
    e, y = torch.randn(12, 64, dtype=torch.float64), torch.arange(12) % 3
    terms = pipeline.loss(e, y)
    w = pipeline.loss.regularizer.classifier.weight
    expected = triplet_margin(e, y, 0.2, "batch_hard") + 0.5 * F.cross_entropy(cosface_logits(e, w, y, 0.48, 120.0), y)
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize(("option", "cls"), [("cosface", CosFace), ("arcface", ArcFace)])
def test_margin_losses_are_loss_options_of_the_siamese_pipeline(config, option: str, cls: type) -> None:
    pipeline = build_pipeline(config("train", ["experiment=siamese_shapes", f"loss={option}"]))
    loss = pipeline.loss.metric_loss
    assert isinstance(loss, cls) and loss.weight.shape == (10, 64)  # data.num_classes x the embedding
    optimised = {id(p) for group in pipeline.parameter_groups() for p in group["params"]}
    assert id(loss.weight) in optimised  # the class weights are trained with the network
    assert pipeline.retrieval_metric == "cosine"
    with pytest.raises(Exception) as error:  # Hydra wraps the constructor's ValueError
        build_pipeline(config("train", ["~experiment", "pipeline=simclr", f"loss={option}"]))
    assert f"loss {cls.__name__} does not fit the SimCLR pipeline" in str(error.value.__cause__)


# --------------------------------------------------------------------------- Proxy-Anchor


def test_proxy_anchor_is_a_loss_option_whose_proxies_learn_faster(config) -> None:
    """loss=proxy_anchor: the paper's margin 0.1, alpha 32, and proxies at 100x the network's learning rate,
    through the optimiser's own parameter group (the scheduler then scales both rates alike)."""
    pipeline = build_pipeline(config("train", ["experiment=siamese_shapes", "loss=proxy_anchor"]))
    loss = pipeline.loss.metric_loss
    assert isinstance(loss, ProxyAnchor) and loss.proxies.shape == (10, 64)
    assert (loss.margin, loss.alpha, loss.lr_scale, loss.gather) == (0.1, 32.0, 100.0, True)
    groups = pipeline.parameter_groups()
    assert [set(g) - {"params"} for g in groups] == [set(), {"weight_decay"}, {"lr_scale"}]
    assert groups[2]["lr_scale"] == 100.0 and [id(p) for p in groups[2]["params"]] == [id(loss.proxies)]
    everything = [id(p) for g in groups for p in g["params"]]
    assert sorted(everything) == sorted(id(p) for p in pipeline.parameters() if p.requires_grad)  # each once
    pipeline.scheduler_factory = None  # the scheduler needs a Trainer; the rates are set before it
    optimizer = pipeline.configure_optimizers()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2e-3, 2e-3, 0.2])
    assert [g["weight_decay"] for g in optimizer.param_groups] == pytest.approx([5e-4, 0.0, 5e-4])
    # without a module asking for another rate, the groups are the plain two
    plain = build_pipeline(config("train", ["experiment=siamese_shapes"])).parameter_groups()
    assert [set(g) - {"params"} for g in plain] == [set(), {"weight_decay"}]


def test_proxy_anchor_loss_in_the_pipeline_equals_the_function(config) -> None:
    pipeline = build_pipeline(config("train", ["experiment=siamese_shapes", "loss=proxy_anchor"])).double()
    torch.manual_seed(0)
    e, y = torch.randn(12, 64, dtype=torch.float64), torch.arange(12) % 3
    expected = proxy_anchor(e, y, pipeline.loss.metric_loss.proxies, 0.1, 32.0)
    assert pipeline.loss(e, y)["loss"].item() == pytest.approx(expected.item(), rel=1e-12)
