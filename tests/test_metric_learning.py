"""Metric learning beyond triplets in the Siamese pipeline: the margin-softmax heads (CosFace, ArcFace) as
regulariser kinds and as losses, Proxy-Anchor, and the cross-batch memory (XBM), through the real configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pipeline_helpers import StopAfterEpoch, quiet_trainer
from test_siamese import RETRIEVAL, SHRINK, train

from contrastive.cli.run import build_pipeline
from contrastive.data import TensorDataModule, shapes
from contrastive.losses import (
    ArcFace,
    CosFace,
    ProxyAnchor,
    SoftmaxCERegularizer,
    cosface_logits,
    proxy_anchor,
    triplet_margin,
)
from contrastive.memory import CrossBatchMemory
from contrastive.pipelines import Siamese

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


# --------------------------------------------------------------------------- cross-batch memory


def _shrunk(*overrides: str) -> Siamese:
    """siamese_shapes through its real config, with a tiny CNN, the memory's keys as given."""
    cfg = config_of(["experiment=siamese_shapes", "model.backbone.width=4", "model.feature_dim=16", *overrides])
    return build_pipeline(cfg)


def config_of(overrides: list[str]):  # type: ignore[no-untyped-def]
    from conftest import compose_config

    return compose_config("train", overrides)


def test_memory_is_off_by_default_and_one_override_away(config) -> None:
    assert build_pipeline(config("train", ["experiment=siamese_shapes"])).memory is None
    cfg = config("train", ["experiment=siamese_shapes", "pipeline.memory_size=300", "pipeline.memory_start=20"])
    pipeline = build_pipeline(cfg)
    assert isinstance(pipeline.memory, CrossBatchMemory) and pipeline.memory.embeddings.shape == (300, 64)
    assert pipeline.memory_start == 20 and config("train", ["experiment=siamese_shapes"]).pipeline.memory_start == 1000
    assert {"memory.embeddings", "memory.labels", "memory.ptr", "memory.filled"} <= set(pipeline.state_dict())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss=proxy_anchor"], "pipeline.memory_size=50: loss ProxyAnchor takes no cross-batch memory"),
        (["loss=cosface"], "pipeline.memory_size=50: loss CosFace takes no cross-batch memory"),
        (["pipeline.memory_start=-1"], "pipeline.memory_size must be an integer >= 0 (0: no memory) and "),
        (["pipeline.embed_dim=null"], "pipeline.memory_size=50 needs the embedding's width: pass embed_dim"),
    ],
)
def test_memory_settings_that_cannot_work_are_one_line(config, overrides: list[str], message: str) -> None:
    with pytest.raises(Exception) as error:  # Hydra wraps the constructor's ValueError
        build_pipeline(config("train", ["experiment=siamese_shapes", "pipeline.memory_size=50", *overrides]))
    cause = error.value.__cause__
    assert type(cause) is ValueError and str(cause).startswith(message) and "\n" not in str(cause)


class _Spy(torch.nn.Module):
    """The metric loss, recording what each call received."""

    def __init__(self, loss: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = loss, []  # type: ignore[var-annotated]

    def forward(self, e: torch.Tensor, y: torch.Tensor, *memory: torch.Tensor) -> torch.Tensor:
        self.calls.append((e.detach().clone(), y.clone(), [m.clone() for m in memory]))
        return self.inner(e, y, *memory)


def _step(pipeline: Siamese, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    images, labels = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(8) % 4
    return pipeline.training_step((images, labels), 0)


def test_the_step_scores_against_the_memory_then_writes_the_batch(config) -> None:
    """The loss of a step gets the memory as it was before the step; the step's embeddings and labels
    are written after the loss; before memory_start the loss gets no memory (it fills all the same)."""
    for start in (0, 1):
        pipeline = build_pipeline(
            config("train", ["experiment=siamese_shapes", "pipeline.memory_size=12", f"pipeline.memory_start={start}"])
        )
        spy = _Spy(pipeline.loss.metric_loss)
        pipeline.loss.metric_loss = spy
        pipeline.log = lambda *a, **k: None  # outside a Trainer: global_step stays 0
        _step(pipeline, 0)
        e0, y0, memory = spy.calls[0]
        assert int(pipeline.memory.filled) == 8 and torch.equal(pipeline.memory()[1], y0)
        torch.testing.assert_close(pipeline.memory()[0], e0)
        if start == 1:
            assert memory == []  # not joined yet
            continue
        assert [m.shape for m in memory] == [(0, 64), (0,)]  # joined, still empty
        loss = _step(pipeline, 1)
        e1, y1, memory = spy.calls[1]
        torch.testing.assert_close(memory[0], e0)
        assert torch.equal(memory[1], y0)
        expected = triplet_margin(e1, y1, 0.2, "batch_hard", memory=e0, memory_labels=y0)
        assert spy.inner(e1, y1, *memory).item() == pytest.approx(expected.item(), rel=1e-6)
        assert loss.requires_grad and int(pipeline.memory.filled) == 12 and int(pipeline.memory.ptr) == 4


def test_a_skipped_step_writes_nothing_to_the_memory(config) -> None:
    cfg = config("train", ["experiment=siamese_shapes", "pipeline.memory_size=12", "pipeline.on_nonfinite=skip"])
    pipeline = build_pipeline(cfg)
    pipeline.log = lambda *a, **k: None  # outside a Trainer
    pipeline.print = lambda *a, **k: None
    _step(pipeline, 0)
    before = {k: v.clone() for k, v in pipeline.memory.state_dict().items()}
    pipeline.loss.metric_loss = _Spy(lambda e, y, *m: e.sum() * float("nan"))  # type: ignore[arg-type]
    loss = _step(pipeline, 1)
    assert pipeline.skipped_steps == 1 and loss.requires_grad  # the zero loss every process backpropagates
    for name, value in pipeline.memory.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_the_regulariser_learns_from_the_batch_only(config) -> None:
    cfg = config("train", ["experiment=siamese_shapes", "regularizer=softmax_ce", "pipeline.memory_size=8"])
    loss = build_pipeline(cfg).loss.double()
    torch.manual_seed(0)
    e, y, mem, mem_y = (
        torch.randn(6, 64, dtype=torch.float64),
        torch.arange(6) % 3,
        torch.randn(8, 64, dtype=torch.float64),
        torch.arange(8) % 4,
    )
    terms = loss(e, y, mem, mem_y)
    assert terms["metric"].item() == triplet_margin(e, y, 0.2, memory=mem, memory_labels=mem_y).item()
    assert terms["ce"].item() == loss.regularizer(e, y)[0].item()


def _fit(tmp: Path, ckpt: str | None = None, stop_after: int | None = None) -> tuple[Siamese, pl.Trainer]:
    """Two epochs of 4 steps (16 images each) into a memory of 40 that joins at step 2 and wraps in epoch 2."""
    pl.seed_everything(0, verbose=False)
    data = TensorDataModule(shapes(num_train=64, num_test=16, size=16, seed=0), batch_size=16, eval_batch_size=64)
    pipeline = _shrunk("pipeline.memory_size=40", "pipeline.memory_start=2", "data.image_size=16")
    trainer = quiet_trainer(
        max_epochs=2,
        default_root_dir=tmp,
        callbacks=[StopAfterEpoch(stop_after)] if stop_after is not None else [],
    )
    trainer.fit(pipeline, datamodule=data, ckpt_path=ckpt)
    return pipeline, trainer


def test_resume_restores_the_memory_exactly(tmp_path: Path) -> None:
    straight, t_straight = _fit(tmp_path / "a")
    first, t_first = _fit(tmp_path / "b", stop_after=0)
    assert t_first.global_step == 4 and (int(first.memory.filled), int(first.memory.ptr)) == (40, 64 % 40)
    t_first.save_checkpoint(tmp_path / "mid.ckpt")
    resumed, t_resumed = _fit(tmp_path / "c", ckpt=str(tmp_path / "mid.ckpt"))
    assert t_straight.global_step == t_resumed.global_step == 8
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and {"memory.embeddings", "memory.labels", "memory.ptr", "memory.filled"} <= set(a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not torch.equal(first.memory.embeddings, resumed.memory.embeddings)  # the second epoch did change it
    loss_a, loss_b = t_straight.callback_metrics["train/loss_step"], t_resumed.callback_metrics["train/loss_step"]
    assert torch.equal(loss_a, loss_b)


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.parametrize(
    "arm",
    [
        ["pipeline.memory_size=200", "pipeline.memory_start=10"],  # XBM from step 10 of 20
        ["loss=proxy_anchor"],
        ["loss=arcface"],
        ["regularizer=cosface"],
    ],
    ids=["xbm", "proxy_anchor", "arcface", "triplet_cosface"],
)
def test_class_disjoint_retrieval_beats_the_untrained_network(cli, tmp_path: Path, arm: list[str]) -> None:
    """siamese_cifar10_disjoint's protocol on the shapes data, shrunk as tests/test_siamese.py's runs (4 epochs
    of 500 images): each arm's retrieval of the unseen classes beats the untrained network's."""
    metrics, columns = train(cli, tmp_path, "experiment=siamese_cifar10_disjoint", *SHRINK, *arm)
    assert "val/map_at_r" in columns and set(RETRIEVAL) <= set(metrics)
    assert metrics["map_at_r"] > metrics["map_at_r_untrained"] + 1.0
    assert metrics["precision_at_1"] > metrics["precision_at_1_untrained"] + 5.0
