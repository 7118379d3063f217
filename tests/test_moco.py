"""MoCo: the queue, the EMA, split BN + key shuffle, the loss with a queue, exact resume, configs, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pipeline_helpers import StopAfterEpoch, quiet_trainer
from torch import Tensor, nn

from contrastive.augment import Augment
from contrastive.data import TensorDataModule, shapes
from contrastive.losses import InfoNCE
from contrastive.models import convnet, ema_update, mlp, momentum_copy, resnet
from contrastive.pipelines import MoCo
from contrastive.pipelines.moco import SplitBatchNorm, convert_to_split_bn
from contrastive.queue import KeyQueue

# --------------------------------------------------------------------------- queue


def test_queue_init_is_unit_keys_and_pointer_zero() -> None:
    torch.manual_seed(0)
    q = KeyQueue(7, 5)
    assert q.keys.shape == (7, 5) and q.ptr.dtype == torch.long and q.ptr.ndim == 0 and int(q.ptr) == 0
    torch.testing.assert_close(q.keys.norm(dim=1), torch.ones(7))
    assert set(dict(q.named_buffers())) == {"keys", "ptr"}


def test_queue_wraps_around_and_moves_the_pointer() -> None:
    q = KeyQueue(5, 2)
    rows = torch.arange(20.0).view(10, 2)
    q.enqueue(rows[0:2])  # slots 0, 1
    assert int(q.ptr) == 2 and torch.equal(q.keys[:2], rows[0:2])
    q.enqueue(rows[2:4])  # slots 2, 3
    q.enqueue(rows[4:6])  # slots 4, 0: wraps
    assert int(q.ptr) == 1
    assert torch.equal(q.keys, torch.stack([rows[5], rows[1], rows[2], rows[3], rows[4]]))
    q.enqueue(rows[0:7])  # more keys than slots: the last 5 survive, ptr advances by 7
    assert int(q.ptr) == (1 + 7) % 5
    assert torch.equal(q.keys, torch.stack([rows[4], rows[5], rows[6], rows[2], rows[3]]))


@pytest.mark.parametrize("size", [1, 4, 7])
def test_queue_batch_enqueue_equals_one_by_one(size: int) -> None:
    torch.manual_seed(size)
    batched, single = KeyQueue(size, 3), KeyQueue(size, 3)
    single.load_state_dict(batched.state_dict())
    for n in [1, 3, 2, 9, 4, 7, 5]:
        keys = torch.randn(n, 3)
        batched.enqueue(keys)
        for row in keys:
            single.enqueue(row[None])
        assert torch.equal(batched.keys, single.keys) and torch.equal(batched.ptr, single.ptr)


def test_enqueued_keys_carry_no_gradient_and_negatives_are_a_copy() -> None:
    q = KeyQueue(4, 3)
    w = torch.randn(3, 3, requires_grad=True)
    keys = torch.randn(2, 3) @ w  # has a grad_fn
    q.enqueue(keys)
    assert not q.keys.requires_grad and q.keys.grad_fn is None
    neg = q()
    assert not neg.requires_grad and neg.grad_fn is None
    assert torch.equal(neg, q.keys) and neg.data_ptr() != q.keys.data_ptr()
    q.enqueue(torch.zeros(4, 3))
    assert not torch.equal(neg, q.keys)  # the copy taken before the loss is untouched


def test_queue_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError, match="size and dim"):
        KeyQueue(0, 3)
    with pytest.raises(ValueError, match=r"keys must be \(n, 3\)"):
        KeyQueue(4, 3).enqueue(torch.zeros(2, 4))


# --------------------------------------------------------------------------- EMA


def _assert_ema(new: Tensor, xi: Tensor, theta: Tensor, m: float) -> None:
    """``new`` is ``m * xi + (1 - m) * theta`` (float64) up to float32 rounding of the two terms and the sum.

    Not ``torch.equal`` against one float32 expression: ``ema_update``'s ``_foreach`` kernels
    contract some elements to a fused multiply-add and not others (1 ulp apart on CPU).
    """
    a, b = m * xi.double(), (1 - m) * theta.double()
    bound = 2 * torch.finfo(torch.float32).eps * (a.abs() + b.abs())  # 2 ulp of the larger term
    assert ((new.double() - (a + b)).abs() <= bound).all()


def test_ema_update_equals_its_formula() -> None:
    torch.manual_seed(0)
    source = mlp(6, 8, 4)
    target = momentum_copy(source)
    for p in target.parameters():
        assert not p.requires_grad
        p.add_(torch.randn_like(p))  # xi != theta
    m = 0.99
    xi = [p.clone() for p in target.parameters()]
    ema_update(target, source, m)
    for x, theta, new in zip(xi, source.parameters(), target.parameters()):
        _assert_ema(new, x, theta.detach(), m)


# --------------------------------------------------------------------------- split BN


def _bn_reference(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """Batch norm of one group in float64 by hand: (x - mean) / sqrt(var + eps) * w + b."""
    dims = [0, *range(2, x.ndim)]
    shape = [1, -1] + [1] * (x.ndim - 2)
    x = x.double()
    mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
    return (x - mean) / (var + eps).sqrt() * weight.double().view(shape) + bias.double().view(shape)


@pytest.mark.parametrize("shape", [(16, 3, 4, 5), (12, 6), (8, 2, 7)])
def test_split_bn_statistics_are_per_group(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    g = 4
    bn = SplitBatchNorm(shape[1], g, momentum=0.3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(1, 2)
    old_mean, old_var = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(shape) * 3 + torch.randn(shape[0]).view(-1, *[1] * (len(shape) - 1))  # groups differ
    y = bn(x)
    dims = [0, *range(2, x.ndim)]
    means, variances = [], []
    for j in range(g):  # group j is the samples j, j+G, j+2G, ...
        part = x[j::g]
        torch.testing.assert_close(y[j::g].double(), _bn_reference(part, bn.weight, bn.bias, bn.eps), atol=2e-5, rtol=0)
        means.append(part.double().mean(dims))
        variances.append(part.double().var(dims, unbiased=True))
    # the whole batch's statistics would give a different result
    assert not torch.allclose(y.double(), _bn_reference(x, bn.weight, bn.bias, bn.eps), atol=1e-2)
    torch.testing.assert_close(
        bn.running_mean.double(), 0.7 * old_mean.double() + 0.3 * torch.stack(means).mean(0), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        bn.running_var.double(), 0.7 * old_var.double() + 0.3 * torch.stack(variances).mean(0), rtol=1e-5, atol=1e-6
    )
    assert int(bn.num_batches_tracked) == 1
    y.sum().backward()  # differentiable as a plain BN
    assert bn.weight.grad is not None and torch.isfinite(bn.weight.grad).all()


def test_split_bn_eval_uses_running_stats_and_one_split_is_plain_bn() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    plain = nn.BatchNorm2d(3)
    with torch.no_grad():
        plain.running_mean.normal_(), plain.running_var.uniform_(1, 2), plain.weight.normal_()
    split = convert_to_split_bn(nn.Sequential(plain), 4)[0]
    assert isinstance(split, SplitBatchNorm) and split.num_splits == 4
    split.eval(), plain.eval()
    assert torch.equal(split(x), plain(x))
    assert torch.equal(split(x[:1]), plain(x[:1]))  # any batch size in eval
    one = SplitBatchNorm(3, 1)
    one.load_state_dict(nn.BatchNorm2d(3).state_dict())
    assert torch.equal(one.train()(x), nn.BatchNorm2d(3).train()(x))
    with pytest.raises(ValueError, match="not a multiple of num_splits=4"):
        split.train()(torch.randn(6, 3, 4, 4))


def test_convert_to_split_bn_swaps_every_bn_and_keeps_the_state() -> None:
    torch.manual_seed(0)
    net = resnet("resnet18", cifar_stem=True)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(), m.running_var.uniform_(1, 2), m.weight.uniform_(0.5, 2)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    x = torch.randn(2, 3, 32, 32)
    before = net.eval()(x)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    converted = convert_to_split_bn(net, 8)
    assert sum(isinstance(m, SplitBatchNorm) for m in converted.modules()) == n_bn == 20
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert all(torch.equal(v, state[k]) for k, v in converted.state_dict().items())
    assert torch.equal(converted.eval()(x), before)
    assert convert_to_split_bn(mlp(4, 8, 2), 1)[1].__class__ is nn.BatchNorm1d  # 1 split: unchanged


# --------------------------------------------------------------------------- the pipeline


def _augment() -> Augment:
    return Augment(size=16, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])


def _moco(seed: int = 0, **kwargs) -> MoCo:  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    args = dict(queue_size=48, momentum=0.9, bn_splits=4, feature_dim=32, online_probe=True)
    args.update(kwargs)
    return MoCo(
        backbone=convnet(width=8),
        projector=mlp(32, 32, 16),
        loss=InfoNCE(temperature=0.2),
        augment=_augment(),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4),
        **args,
    )


def _images(n: int = 16, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g), torch.arange(n) % 10


def test_info_nce_with_a_queue_equals_a_float64_loop() -> None:
    torch.manual_seed(0)
    n, d, k, t = 6, 5, 11, 0.1
    q, key, queue = torch.randn(n, d), torch.randn(n, d), F.normalize(torch.randn(k, d), dim=1)
    loss = InfoNCE(temperature=t)(q, key, queue)
    total = 0.0
    for i in range(n):  # -log(exp(q.k/T) / (exp(q.k/T) + sum_j exp(q.n_j/T))), normalised vectors
        qi = q[i].double() / q[i].double().norm()
        ki = key[i].double() / key[i].double().norm()
        pos = math.exp(float(qi @ ki) / t)
        neg = sum(math.exp(float(qi @ (queue[j].double() / queue[j].double().norm())) / t) for j in range(k))
        total += -math.log(pos / (pos + neg))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(total / n, rel=1e-5)


class _Recorder(nn.Module):
    """Wraps a loss and records its inputs."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = loss, []  # type: ignore[var-annotated]

    def forward(self, q: Tensor, k: Tensor, negatives: Tensor) -> Tensor:
        self.calls.append((q.detach().clone(), k.clone(), negatives.clone()))
        return self.inner(q, k, negatives)


@pytest.mark.parametrize("symmetric", [False, True])
def test_step_uses_the_queue_as_negatives_then_enqueues_the_keys(symmetric: bool) -> None:
    moco = _moco(symmetric=symmetric)
    moco.loss = _Recorder(moco.loss)
    queue_before = moco.queue.keys.clone()
    images, labels = _images()
    loss = moco.training_step((images, labels), 0)
    assert loss is not None and loss.requires_grad
    calls = moco.loss.calls
    assert len(calls) == (2 if symmetric else 1)
    for q, k, negatives in calls:
        assert torch.equal(negatives, queue_before)  # the queue of before the step, not yet updated
        assert not k.requires_grad and k.grad_fn is None and q.shape == k.shape == (16, 16)
    # the keys enqueued: cat(k1, k2) when symmetric (the MoCo demo's order), else k2
    keys = torch.cat([calls[1][1], calls[0][1]]) if symmetric else calls[0][1]
    n = len(keys)
    assert int(moco.queue.ptr) == n
    torch.testing.assert_close(moco.queue.keys[:n], F.normalize(keys, dim=1))
    assert torch.equal(moco.queue.keys[n:], queue_before[n:])
    expected = [moco.loss.inner(q, k, neg) for q, k, neg in calls]
    assert loss.item() >= sum(e.item() for e in expected) / len(expected)  # + the online probe's CE
    loss.backward()  # enqueueing after the loss did not invalidate the saved tensors
    assert all(p.grad is None for p in moco.key_backbone.parameters())
    assert moco.backbone[0].weight.grad is not None


@pytest.mark.parametrize("symmetric", [False, True])
def test_the_step_loss_is_the_mean_over_the_directions(symmetric: bool) -> None:
    """Symmetric MoCo (v3 / the demo's option) averages the two directions: a sum doubled lr and gradient."""
    moco = _moco(symmetric=symmetric, online_probe=False)
    moco.loss = _Recorder(moco.loss)
    loss = moco.training_step(_images(), 0)
    expected = torch.stack([moco.loss.inner(q, k, neg) for q, k, neg in moco.loss.calls]).mean()
    assert len(moco.loss.calls) == (2 if symmetric else 1)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)


class _NaNLoss(nn.Module):
    def forward(self, q: Tensor, k: Tensor, negatives: Tensor) -> Tensor:
        return (q * k).sum() + float("nan")


def test_a_skipped_step_enqueues_nothing() -> None:
    moco = _moco()
    moco.on_nonfinite = "skip"
    moco.print = lambda *a, **k: None  # no Trainer attached
    moco.loss = _NaNLoss()
    queue_before, ptr_before = moco.queue.keys.clone(), int(moco.queue.ptr)
    loss = moco.training_step(_images(), 0)
    assert moco.skipped_steps == 1 and loss.requires_grad  # the zero loss every process backpropagates
    assert torch.equal(moco.queue.keys, queue_before) and int(moco.queue.ptr) == ptr_before


def test_step_updates_the_key_encoder_by_the_ema_formula() -> None:
    moco = _moco(momentum=0.9)
    with torch.no_grad():
        for p in moco.backbone.parameters():
            p.add_(0.1 * torch.randn_like(p))  # query != key encoder
    xi = [p.clone() for p in [*moco.key_backbone.parameters(), *moco.key_projector.parameters()]]
    theta = [p.detach().clone() for p in [*moco.backbone.parameters(), *moco.projector.parameters()]]
    moco.training_step(_images(), 0)
    for x, t, new in zip(xi, theta, [*moco.key_backbone.parameters(), *moco.key_projector.parameters()]):
        _assert_ema(new, x, t, 0.9)
    assert all(not p.requires_grad for p in moco.key_backbone.parameters())
    # the optimiser sees only the query encoder, the probe and the loss's parameters
    opt_params = {id(p) for g in moco.parameter_groups() for p in g["params"]}
    assert not opt_params & {id(p) for p in moco.key_backbone.parameters()}


def test_shuffled_keys_come_back_in_order() -> None:
    moco = _moco()
    x = torch.randn(16, 3, 16, 16)
    moco.eval()  # eval BN: each row independent of the others, so the shuffle must be invisible
    direct = moco.key_projector(moco.key_backbone(x))
    state = moco.generator.get_state()
    shuffled = moco.keys(x)
    assert not torch.equal(moco.generator.get_state(), state)  # a permutation was drawn
    torch.testing.assert_close(shuffled, direct, rtol=0, atol=1e-6)


def test_split_bn_in_training_mode_differs_from_whole_batch_bn() -> None:
    """In training mode the key of an image depends on which group it lands in."""
    moco = _moco(bn_splits=4)
    x = torch.randn(16, 3, 16, 16)
    whole = _moco(bn_splits=1)
    whole.load_state_dict(moco.state_dict())
    k_split = moco.key_projector(moco.key_backbone(x))
    k_whole = whole.key_projector(whole.key_backbone(x))
    assert not torch.allclose(k_split, k_whole, atol=1e-3)


def test_queue_smaller_than_a_step_is_a_clear_error() -> None:
    moco = _moco(queue_size=24, symmetric=True)  # 2 x 16 keys per step > 24
    with pytest.raises(ValueError, match=r"pipeline\.queue_size=24 .*32 = data\.batch_size"):
        moco.training_step(_images(), 0)
    ok = _moco(queue_size=24)  # 16 keys per step, 24 not a multiple of 16: fine, the queue wraps
    ok.training_step(_images(), 0)
    ok.training_step(_images(seed=2), 1)
    assert int(ok.queue.ptr) == 32 % 24
    exact = _moco(queue_size=32, symmetric=True)  # a queue of exactly one step's keys is allowed
    before = exact.queue.keys.clone()
    exact.training_step(_images(), 0)
    assert int(exact.queue.ptr) == 0 and not torch.isclose(exact.queue.keys, before).all(1).any()  # all replaced


def test_in_batch_symmetric_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="pipeline.symmetric"):
        MoCo(
            backbone=convnet(8),
            projector=mlp(32, 32, 16),
            loss=InfoNCE(symmetric=True),
            augment=_augment(),
            optimizer=torch.optim.SGD,
            feature_dim=32,
        )


def test_sync_batchnorm_is_refused_at_fit_start() -> None:
    """A plain Trainer(sync_batchnorm=True) converts SplitBatchNorm too: the positive key would leak."""
    moco = _moco()
    moco.on_fit_start()  # split BN: fine
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(moco)
    with pytest.raises(ValueError, match="MoCo with SyncBatchNorm.*use sync_batchnorm=False"):
        synced.on_fit_start()


def test_features_are_the_query_backbone() -> None:
    moco = _moco().eval()
    images, _ = _images(4)
    x = (images.float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(moco.features(images), moco.backbone(x), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- exact resume


def _fit(tmp: Path, ckpt: str | None = None, stop_after: int | None = None) -> tuple[MoCo, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    splits = shapes(num_train=64, num_test=16, size=16, seed=0)
    data = TensorDataModule(splits, batch_size=16, eval_batch_size=64, seed=0)
    moco = _moco(symmetric=True, momentum_cosine=True, queue_size=40)
    trainer = quiet_trainer(
        max_epochs=2,
        default_root_dir=tmp,
        callbacks=[StopAfterEpoch(stop_after)] if stop_after is not None else [],
    )
    trainer.fit(moco, datamodule=data, ckpt_path=ckpt)
    return moco, trainer


def test_resume_mid_run_is_exact(tmp_path: Path) -> None:
    straight, t_straight = _fit(tmp_path / "a")
    first, t_first = _fit(tmp_path / "b", stop_after=0)
    assert t_first.global_step == 4 and int(first.queue.ptr) == (4 * 32) % 40
    t_first.save_checkpoint(tmp_path / "mid.ckpt")
    resumed, t_resumed = _fit(tmp_path / "c", ckpt=str(tmp_path / "mid.ckpt"))
    assert t_straight.global_step == t_resumed.global_step == 8
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and {"queue.keys", "queue.ptr", "key_backbone.0.weight"} <= set(a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not torch.equal(first.queue.keys, resumed.queue.keys)  # the second epoch did change it
    loss_a, loss_b = t_straight.callback_metrics["train/loss_step"], t_resumed.callback_metrics["train/loss_step"]
    assert torch.equal(loss_a, loss_b)
    assert torch.equal(straight.generator.get_state(), resumed.generator.get_state())


# --------------------------------------------------------------------------- configs and CLI


def test_experiment_moco_cifar10_holds_the_recipe(config) -> None:
    cfg = config("train", ["experiment=moco_cifar10"])
    assert cfg.name == "moco_cifar10" and cfg.pipeline._target_ == "contrastive.pipelines.MoCo"
    assert cfg.data.source._target_ == "contrastive.data.cifar10" and cfg.data.batch_size == 512
    assert cfg.model.backbone.name == "resnet18" and cfg.model.backbone.cifar_stem is True
    assert cfg.model.projector.num_layers == 1 and cfg.model.projector.out_dim == 128  # linear fc to 128
    p = cfg.pipeline
    assert (p.queue_size, p.momentum, p.momentum_cosine, p.symmetric, p.bn_splits) == (4096, 0.99, False, False, 8)
    assert cfg.loss._target_ == "contrastive.losses.InfoNCE" and cfg.loss.temperature == 0.1
    assert cfg.loss.symmetric is False
    o = cfg.optimizer
    assert (o._target_, o.lr, o.momentum, o.weight_decay) == ("torch.optim.SGD", 0.06, 0.9, 5e-4)
    assert cfg.scheduler.warmup_epochs == 0 and cfg.scheduler.final_lr_fraction == 0.0
    assert cfg.trainer.max_epochs == 200 and (cfg.eval.knn_k, cfg.eval.knn_temperature) == (200, 0.1)


def test_experiment_moco_cifar10_builds_the_demo_model(config) -> None:
    from contrastive.cli.run import build_pipeline

    moco = build_pipeline(config("train", ["experiment=moco_cifar10"]))
    assert isinstance(moco, MoCo)
    linears = [m for m in moco.projector.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 128)]
    assert sum(isinstance(m, SplitBatchNorm) and m.num_splits == 8 for m in moco.backbone.modules()) == 20
    assert moco.queue.keys.shape == (4096, 128)


MOCO_SHRINK = [
    "data.source.num_train=200",
    "data.source.num_test=100",
    "data.batch_size=40",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "eval.every_n_epochs=1",
    "probe.epochs=5",
    "pipeline.queue_size=128",
    "hydra.run.dir=run",
]


def test_moco_shapes_cli_run(cli, tmp_path: Path) -> None:
    out = cli("contrastive-train", "experiment=moco_shapes", *MOCO_SHRINK, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("knn_top1", "knn_top1_untrained", "linear_top1", "linear_train_top1", "map_at_r"):
        assert 0.0 <= metrics[key] <= 100.0, key
    assert metrics["epochs"] == 1
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 200 // 40
    assert int(ckpt["state_dict"]["queue.ptr"]) == (5 * 40) % 128  # 200 keys through a queue of 128
    assert "key_backbone.0.weight" in ckpt["state_dict"] and "augment_generator" in ckpt


@pytest.mark.slow
def test_moco_cifar10_few_steps(cli, cifar10_root: Path, tmp_path: Path) -> None:
    """The real experiment config on a CIFAR-10 subset, ResNet-18 on the CPU."""
    out = cli(
        "contrastive-train",
        "experiment=moco_cifar10",
        f"data.root={cifar10_root}",
        "data.subset=256",
        "data.test_subset=128",
        "data.batch_size=64",
        "pipeline.queue_size=256",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "probe.epochs=5",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and 0 <= metrics["knn_top1"] <= 100 and 0 <= metrics["linear_top1"] <= 100
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert int(ckpt["state_dict"]["queue.ptr"]) == (4 * 64) % 256


@pytest.mark.slow
def test_moco_shapes_demo_learns(cli, tmp_path: Path) -> None:
    """The CPU demo as shipped: MoCo must beat the untrained network's kNN by 10 points."""
    out = cli(
        "contrastive-train",
        "experiment=moco_shapes",
        "trainer.enable_progress_bar=false",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs"] == 20
    assert metrics["knn_top1"] >= metrics["knn_top1_untrained"] + 10, metrics


def test_a_loss_that_does_not_take_the_queue_is_refused(config) -> None:
    from hydra.errors import InstantiationException

    from contrastive.cli.run import build_pipeline

    with pytest.raises(InstantiationException, match="loss NTXent does not fit the MoCo pipeline.*loss=info_nce"):
        build_pipeline(config("train", ["experiment=moco_shapes", "loss=nt_xent"]))


def test_queue_refuses_a_zero_dim_and_keys_that_are_not_a_matrix() -> None:
    """dim 0 is refused like size 0; keys that are not (n, D) are a ValueError, not an IndexError or a broadcast."""
    with pytest.raises(ValueError, match=r"size and dim must be >= 1, got size=4, dim=0"):
        KeyQueue(4, 0)
    q = KeyQueue(4, 3)
    with pytest.raises(ValueError, match=r"keys must be \(n, 3\), got \(3,\)"):
        q.enqueue(torch.zeros(3))
    with pytest.raises(ValueError, match=r"keys must be \(n, 3\), got \(2, 3, 3\)"):
        q.enqueue(torch.zeros(2, 3, 3))
    assert int(q.ptr) == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_enqueued_keys_are_cast_to_the_queue_dtype(dtype: torch.dtype) -> None:
    """Keys of another dtype (float64 features, bf16 autocast) are stored cast to the queue's float32."""
    q = KeyQueue(3, 2)
    keys = torch.tensor([[1 / 3, -2 / 3], [0.1, 1e-3]], dtype=dtype)
    q.enqueue(keys)
    assert q.keys.dtype == torch.float32 and int(q.ptr) == 2
    assert torch.equal(q.keys[:2], keys.to(torch.float32))
