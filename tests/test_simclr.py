"""SimCLR's V-view form: SupCon with instance labels (NT-Xent exactly at V = 2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.errors import InstantiationException
from torch import Tensor

from contrastive.cli.run import build_pipeline
from contrastive.pipelines.simclr import instance_labels


def test_instance_labels_are_view_major_and_offset_by_rank() -> None:
    assert instance_labels(3, 2).tolist() == [0, 1, 2, 0, 1, 2]
    assert instance_labels(3, 3, process_rank=1).tolist() == [3, 4, 5] * 3


def _step(config, overrides: list[str], images: Tensor, labels: Tensor) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """What one training step saw: its contrastive ``loss`` (online probe left out), the embeddings ``z``,
    the loss's inputs ``loss_inputs``, and the backbone features ``h`` and labels ``probe_labels`` of the
    online probe."""
    torch.manual_seed(0)  # the same initial weights for every pipeline built here
    pipeline = build_pipeline(config("train", overrides))
    seen: dict[str, Any] = {}
    pipeline.finish_step = lambda terms, extra=None: seen.setdefault("loss", terms["loss"])
    pipeline.projector.register_forward_hook(lambda module, inputs, out: seen.setdefault("z", out))
    pipeline.loss.register_forward_pre_hook(lambda module, inputs: seen.setdefault("loss_inputs", inputs))
    probe = pipeline.online_probe_loss
    pipeline.online_probe_loss = lambda h, y: (seen.update(h=h, probe_labels=y), probe(h, y))[1]
    pipeline.training_step((images, labels), 0)
    return seen


def _step_loss(config, overrides: list[str], images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[no-untyped-def]
    """The contrastive loss of one training step (online probe left out) and the embeddings it saw."""
    seen = _step(config, overrides, images, labels)
    return seen["loss"], seen["z"]


def test_two_view_sup_con_equals_nt_xent(config) -> None:  # type: ignore[no-untyped-def]
    images, labels = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.arange(8) % 4
    nt, z_nt = _step_loss(config, ["loss.temperature=0.2"], images, labels)
    sc, z_sc = _step_loss(config, ["loss=sup_con", "loss.temperature=0.2"], images, labels)
    assert z_nt.shape == z_sc.shape == (16, 64) and torch.equal(z_nt, z_sc)  # same views, same weights
    assert sc.item() == pytest.approx(nt.item(), rel=1e-6)


def test_four_views_stack_and_share_instance_labels(config) -> None:  # type: ignore[no-untyped-def]
    from contrastive.losses import sup_con

    images, labels = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8), torch.arange(5)
    loss, z = _step_loss(config, ["loss=sup_con", "loss.temperature=0.2", "pipeline.num_views=4"], images, labels)
    assert z.shape == (20, 64)
    expected = sup_con(z.detach().double(), torch.arange(5).repeat(4), 0.2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_one_view_is_refused_and_two_pass(config) -> None:  # type: ignore[no-untyped-def]
    """pipeline.num_views=1 has no positive pair to contrast: refused when built; 2 (the default) is the minimum."""
    with pytest.raises(InstantiationException) as error:
        build_pipeline(config("train", ["pipeline.num_views=1"]))
    cause = error.value.__cause__
    assert type(cause) is ValueError and str(cause) == "pipeline.num_views must be an integer >= 2, got 1."
    assert build_pipeline(config("train", ["pipeline.num_views=2"])).num_views == 2


def test_sup_con_instance_labels_are_offset_by_the_process_rank(config, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Under DDP (rank 1 here) the gathered SupCon loss must see labels B..2B-1, else images of two
    processes with the same index would count as positives of each other."""
    import contrastive.pipelines.simclr as simclr_module

    monkeypatch.setattr(simclr_module, "rank", lambda: 1)
    images, labels = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8), torch.arange(5)
    seen = _step(config, ["loss=sup_con", "pipeline.num_views=3"], images, labels)
    z, instance = seen["loss_inputs"]
    assert z.shape == (15, 64)
    assert instance.tolist() == [5, 6, 7, 8, 9] * 3  # arange(B, 2B), view-major like the views


def test_online_probe_gets_the_class_labels_once_per_view(config) -> None:  # type: ignore[no-untyped-def]
    """The probe's (V*B, F) features are view-major, so its labels must be labels.repeat(V), not interleaved."""
    images, labels = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8), torch.tensor([7, 3, 5, 3, 9])
    seen = _step(config, ["loss=sup_con", "pipeline.num_views=4"], images, labels)
    assert seen["h"].shape == (20, 128)
    assert seen["probe_labels"].tolist() == [7, 3, 5, 3, 9] * 4


@pytest.mark.slow
def test_four_view_simclr_learns(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """loss=sup_con pipeline.num_views=4 on the built-in data, 8 short epochs (measured kNN 18.0 -> 27.9)."""
    out = cli(
        "contrastive-train",
        "loss=sup_con",
        "loss.temperature=0.2",
        "pipeline.num_views=4",
        "data.source.num_train=1000",
        "trainer.max_epochs=8",
        "trainer.enable_progress_bar=false",
        "eval.every_n_epochs=8",
        "probe.epochs=5",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["knn_top1"] > metrics["knn_top1_untrained"] + 6
