"""DCL / DCLW in the SimCLR pipeline: the loss the step computes, the CIFAR-10 recipe, the CPU demo.
(The loss itself: tests/losses/test_dcl.py; two processes: tests/losses/test_distributed.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from contrastive.losses import DCL, dcl


def test_simclr_with_loss_dcl_minimises_dcl_of_the_two_views(config) -> None:  # type: ignore[no-untyped-def]
    """loss=dclw in the shipped demo: the step's loss is dcl(z1, z2, T, 0.5) of its two projected views."""
    from contrastive.cli.run import build_pipeline

    cfg = config("train", ["experiment=dcl_shapes", "loss=dclw", "pipeline.online_probe=false"])
    model = build_pipeline(cfg)
    assert isinstance(model.loss, DCL) and model.loss.weight_sigma == 0.5 and cfg.loss.temperature == 0.2
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    state = model.generator.get_state()
    loss = model.training_step((images, torch.arange(8)), 0)
    model.generator.set_state(state)  # the same views, encoded again
    with torch.no_grad():
        z1, z2 = model.projector(model.backbone(torch.cat(model.views(images)))).chunk(2)
    torch.testing.assert_close(loss.detach(), dcl(z1, z2, 0.2, 0.5), rtol=1e-5, atol=0)


def test_experiment_dcl_cifar10_holds_lightlys_recipe(config) -> None:  # type: ignore[no-untyped-def]
    cfg = config("train", ["experiment=dcl_cifar10"])
    assert cfg.name == "dcl_cifar10" and cfg.pipeline._target_ == "contrastive.pipelines.SimCLR"
    assert cfg.loss._target_ == "contrastive.losses.DCL" and cfg.loss.temperature == 0.1
    assert cfg.loss.weight_sigma is None and cfg.loss.gather is True
    assert cfg.data.source._target_ == "contrastive.data.cifar10" and cfg.data.batch_size == 512
    assert cfg.model.backbone.name == "resnet18" and cfg.model.backbone.cifar_stem is True
    o = cfg.optimizer
    assert (o._target_, o.lr, o.momentum, o.weight_decay) == ("torch.optim.SGD", 0.24, 0.9, 5e-4)
    assert cfg.trainer.max_epochs == 200
    assert config("train", ["experiment=dcl_cifar10", "loss=dclw"]).loss.weight_sigma == 0.5


@pytest.mark.slow
def test_dcl_shapes_demo_learns(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The CPU demo as shipped beats the untrained network's kNN by 30 points."""
    out = cli(
        "contrastive-train",
        "experiment=dcl_shapes",
        "trainer.enable_progress_bar=false",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs"] == 25
    assert metrics["knn_top1"] >= metrics["knn_top1_untrained"] + 30, metrics
