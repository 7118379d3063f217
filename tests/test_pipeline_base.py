"""Pipeline plumbing: non-finite checks, views, EMA (the schedules: tests/test_schedules.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from contrastive.augment import Augment
from contrastive.losses import NTXent
from contrastive.models import ema_update, momentum_copy, resnet
from contrastive.pipelines import NonFiniteLossError, SimCLR


def _pipeline(on_nonfinite: str) -> SimCLR:
    return SimCLR(
        projector=nn.Linear(4, 2),
        loss=NTXent(),
        backbone=nn.Flatten(),
        augment=Augment(),
        optimizer=torch.optim.SGD,
        feature_dim=4,
        num_classes=2,
        on_nonfinite=on_nonfinite,
    )


def test_nonfinite_raise_names_step_and_term() -> None:
    p = _pipeline("raise")
    p.log = lambda *a, **k: None  # no trainer attached
    ok = {"loss": torch.tensor(1.0), "ce": torch.tensor(0.5)}
    bad = {"loss": torch.tensor(float("nan")), "ce": torch.tensor(0.5)}
    assert p.finish_step(ok) is not None
    p.finish_step(bad)  # checked at the next step (or at the epoch's end)
    with pytest.raises(NonFiniteLossError, match=r"global step 0: loss=nan\. Likely causes: temperature"):
        p.finish_step(ok)


def test_pending_check_holds_no_autograd_graph() -> None:
    """The check of step t is read at step t + 1; what it keeps until then must not pin step t's graph."""
    p = _pipeline("raise")
    p.log = lambda *a, **k: None
    w = torch.ones(3, requires_grad=True)
    loss = (w * 2).sum()
    assert p.finish_step({"loss": loss}) is loss  # the objective itself still carries the graph
    flags, _, terms, _ = p._pending_check
    assert not flags.requires_grad and all(not v.requires_grad and v.grad_fn is None for v in terms.values())


def test_nonfinite_skip_returns_a_zero_on_every_parameter_and_the_step_updates_nothing() -> None:
    """Not None, which Lightning refuses under DDP: every parameter joins the backward with a zero
    gradient, and the optimiser step after a wholly skipped step drops those gradients."""
    p = _pipeline("skip")
    p.log = lambda *a, **k: None
    p.print = lambda *a, **k: None
    skipped = p.finish_step({"loss": torch.tensor(float("inf"))})
    assert p.skipped_steps == 1 and float(skipped.detach()) == 0.0
    skipped.backward()
    params = [q for q in p.parameters() if q.requires_grad]
    assert params and all(q.grad is not None and not q.grad.any() for q in params)
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1)
    p.on_before_optimizer_step(opt)
    assert all(q.grad is None for q in params)  # so SGD's momentum and weight decay leave them alone
    assert p.finish_step({"loss": torch.tensor(2.0)}) == 2.0
    params[0].grad = torch.ones_like(params[0])
    p.on_before_optimizer_step(opt)  # a step with a real loss keeps its gradients
    assert params[0].grad is not None


def test_nonfinite_features_stop_the_knn_monitor() -> None:
    """A NaN feature (e.g. NaN BatchNorm statistics) made the monitor log plausible numbers."""
    p = _pipeline("raise")
    p.log = lambda *a, **k: None
    x, y = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1] * 3)
    x[2, 1] = float("nan")
    p._val_outputs = {0: [(x, y)], 1: [(x[:4].nan_to_num(), y[:4])]}
    with pytest.raises(NonFiniteLossError, match="features of the train images hold NaN/Inf in 1 of 6 rows at epoch 0"):
        p.on_validation_epoch_end()


def test_checkpoint_carries_skipped_steps_and_clock() -> None:
    """A resumed run with on_nonfinite=skip keeps counting its skipped steps from where it was."""
    p = _pipeline("skip")
    p.skipped_steps, p.train_seconds = 3, 12.5
    checkpoint: dict = {}
    p.on_save_checkpoint(checkpoint)
    resumed = _pipeline("skip")
    resumed.on_load_checkpoint(checkpoint)
    assert (resumed.skipped_steps, resumed.train_seconds) == (3, 12.5)


def test_bad_on_nonfinite_value() -> None:
    with pytest.raises(ValueError, match="on_nonfinite"):
        _pipeline("ignore")


@pytest.mark.parametrize(
    "key, value", [("feature_dim", 0), ("num_classes", 0), ("knn_k", -1), ("knn_temperature", 0.0)]
)
def test_bad_base_arguments_name_the_key(key: str, value: float) -> None:
    args = dict(
        projector=nn.Linear(4, 2),
        loss=NTXent(),
        backbone=nn.Flatten(),
        augment=Augment(),
        optimizer=torch.optim.SGD,
        feature_dim=4,
        num_classes=2,
    )
    with pytest.raises(ValueError, match=f"invalid {key}={value}"):
        SimCLR(**{**args, key: value})


def test_a_backbone_wider_than_feature_dim_is_named_at_the_online_probe() -> None:
    p = _pipeline("raise")
    p.log = lambda *a, **k: None
    assert p.online_probe_loss(torch.randn(3, 4), torch.tensor([0, 1, 0])) is not None
    with pytest.raises(ValueError, match="outputs 6 features per image, but .* feature_dim=4: pass feature_dim=6"):
        p.online_probe_loss(torch.randn(3, 6), torch.tensor([0, 1, 0]))


def test_steps_per_epoch_counts_optimiser_steps() -> None:
    """metrics.json's epochs divided optimiser steps by batches: 0.5 for one epoch under accumulation 2."""
    from types import SimpleNamespace

    from contrastive.pipelines.base import steps_per_epoch

    for batches, accumulate, steps in ((4, 1, 4), (4, 2, 2), (5, 2, 3), (0, 1, 1)):
        trainer = SimpleNamespace(num_training_batches=batches, accumulate_grad_batches=accumulate)
        assert steps_per_epoch(trainer) == steps, (batches, accumulate)  # type: ignore[arg-type]


def test_ema_update_is_the_formula_exactly() -> None:
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3))
    target = momentum_copy(online)
    assert all(not p.requires_grad for p in target.parameters())
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    expected = [0.9 * t + (1 - 0.9) * o for t, o in zip(target.parameters(), online.parameters())]
    ema_update(target, online, 0.9)
    for got, want in zip(target.parameters(), expected):
        assert torch.equal(got, want)


def test_resnet_cifar_stem() -> None:
    net = resnet("resnet18", cifar_stem=True)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 512)


def test_views_under_two_ranks_are_the_rows_of_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank draws the global batch's parameters and applies its own rows."""
    import contrastive.pipelines.base as base

    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    whole = _pipeline("raise").views(images)  # one process, global batch of 8
    for r in range(2):
        monkeypatch.setattr(base, "world_size", lambda: 2)
        monkeypatch.setattr(base, "rank", lambda r=r: r)
        mine = _pipeline("raise").views(images[4 * r : 4 * r + 4])  # same seed: generators in step
        for v in range(2):
            assert torch.equal(mine[v], whole[v][4 * r : 4 * r + 4])


class _RecordLayout(SimCLR):
    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.view_layouts = [v.is_contiguous(memory_format=torch.channels_last) for v in self.views(batch[0])]
        return super().training_step(batch, batch_idx)


def test_training_on_the_cpu_runs_channels_last() -> None:
    """oneDNN's NHWC convolutions are the faster ones on the CPU too (docs/benchmarks.md): the weights
    are channels-last from ``setup`` on (before a strategy wraps them), and so are the views."""
    import pytorch_lightning as pl

    from contrastive.data import TensorDataModule, shapes
    from contrastive.models import convnet
    from contrastive.pipelines.base import channels_last

    assert channels_last(torch.device("cpu")) and not channels_last(torch.device("mps"))
    p = _RecordLayout(
        projector=nn.Linear(32, 8),
        loss=NTXent(),
        backbone=convnet(width=8),
        augment=Augment(size=16),
        optimizer=torch.optim.SGD,
        feature_dim=32,
        num_classes=10,
        knn_k=5,
    )
    convs = [m.weight for m in p.modules() if isinstance(m, nn.Conv2d)]
    assert convs and not any(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    data = TensorDataModule(shapes(num_train=8, num_test=4, size=16, seed=0), batch_size=8, eval_batch_size=4)
    pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    ).fit(p, datamodule=data)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert p.view_layouts == [True, True]
    assert p.features(data.splits.test.images).shape == (4, 32)
