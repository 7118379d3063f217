"""MoCo v2 (He et al. 2020; Chen et al. 2020): a momentum key encoder and a queue of negatives.

One step: update the key encoder ``xi <- m xi + (1 - m) theta``, encode the query view
with the trained encoder and the key view with the key encoder, InfoNCE of each query
against its key and the K queued keys, then enqueue the new keys. The loss stays pure:
the queue changes only after the loss has been computed. A non-finite loss is checked one
step late under ``on_nonfinite=raise`` (its keys are enqueued, but the run stops before the
next checkpoint), at once under ``skip`` (its keys are not enqueued).

Batch statistics must not leak the positive. MoCo's shuffle-BN computes the key
encoder's BN statistics on G GPUs after shuffling the keys across them, so a query
and its key are normalised with statistics of different sample sets. One device does
the same with :class:`SplitBatchNorm` (statistics per group of B/G samples, as each GPU
would) in both encoders plus a random permutation of the key batch before the key
encoder (undone after it), as the MoCo authors' CIFAR-10 demo does. A fixed shift of
the groups would *not* do: the key groups would then hold exactly the images of a
query group, and the statistics would leak again. Under W processes the permutation is
global (MoCo's ``batch_shuffle_ddp``): each rank encodes a random B-row slice of the
W*B keys, still in ``bn_splits`` groups per rank (W * bn_splits groups in all).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastive.distributed import all_gather, rank, world_size
from contrastive.losses import LossForm, l2_normalize
from contrastive.models import ema_update, momentum_copy
from contrastive.pipelines.base import Pipeline, RunFacts, total_steps
from contrastive.queue import KeyQueue
from contrastive.schedules import momentum_at


def queue_problem(queue_size: int, keys_per_step: int) -> str | None:
    """What is wrong with a queue of ``queue_size`` keys for ``keys_per_step`` keys a step
    (``data.batch_size`` x processes, x 2 when symmetric), or None: the queue must hold
    at least one step's keys, else the negatives are a fragment of one batch."""
    if keys_per_step <= queue_size:
        return None
    return (
        f"pipeline.queue_size={queue_size} is smaller than the keys enqueued per step ({keys_per_step} = "
        "data.batch_size x processes, x 2 when pipeline.symmetric): raise pipeline.queue_size or lower "
        "data.batch_size"
    )


class SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are computed per group of the batch.

    Sample i belongs to group ``i mod G`` (then ``(N, C, *S) -> (N/G, G*C, *S)`` is a
    view of a contiguous batch and one ``batch_norm`` call does all groups). Each group
    is normalised with its own mean and biased variance, as G processes with B/G
    samples each would be. Running statistics move towards the mean over groups of the
    group means and unbiased variances. Eval mode uses the running statistics (plain BN).
    Inputs (N, C) and (N, C, *S) alike; N must be a multiple of G.
    """

    def __init__(
        self,
        num_features: int,
        num_splits: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        self.num_splits = num_splits

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an (N, C, ...) input, got {x.dim()}-D")

    def forward(self, x: Tensor) -> Tensor:
        g = self.num_splits
        if g == 1 or not (self.training or not self.track_running_stats):
            return super().forward(x)
        n, c = x.shape[:2]
        if n % g:
            raise ValueError(f"SplitBatchNorm: batch {n} is not a multiple of num_splits={g} (pipeline.bn_splits)")
        factor = 0.0
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        mean = var = None
        if self.running_mean is not None and self.running_var is not None:
            mean, var = self.running_mean.repeat(g), self.running_var.repeat(g)  # (G*C,), updated in place below
        weight = self.weight.repeat(g) if self.weight is not None else None
        bias = self.bias.repeat(g) if self.bias is not None else None
        y = F.batch_norm(x.reshape(n // g, g * c, *x.shape[2:]), mean, var, weight, bias, True, factor, self.eps)
        if self.training and mean is not None and var is not None:
            assert self.running_mean is not None and self.running_var is not None  # mean, var are their copies
            with torch.no_grad():
                self.running_mean.copy_(mean.view(g, c).mean(0))
                self.running_var.copy_(var.view(g, c).mean(0))
        return y.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


def convert_to_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm (1d/2d/3d) in ``module`` by a :class:`SplitBatchNorm` with the same state.

    Children are replaced in place; the (possibly new) root is returned.
    ``num_splits=1`` returns ``module`` unchanged (plain BN computes the same).
    """
    if num_splits == 1:
        return module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SplitBatchNorm):
        split = SplitBatchNorm(
            module.num_features, num_splits, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        split.load_state_dict(module.state_dict())
        state = [*module.parameters(), *module.buffers()]
        return split.to(state[0].device) if state else split
    for name, child in module.named_children():
        setattr(module, name, convert_to_split_bn(child, num_splits))
    return module


class MoCo(Pipeline):
    """MoCo v2: query encoder ``g(f(.))``, key encoder its EMA, InfoNCE against a queue.

    Args:
        backbone: f, (B, C, H, W) -> (B, F); its BN layers become :class:`SplitBatchNorm`.
        projector: g, (B, F) -> (B, D), the head (MoCo's CIFAR demo: one linear layer to 128).
        loss: ``loss(query, key, negatives) -> scalar``, ``contrastive.losses.InfoNCE`` (MoCo form).
        queue_size: K, the number of queued negative keys; any K >= keys per step
            (the queue wraps around, K need not be a multiple of the batch).
        momentum: m0 of the key encoder's EMA.
        momentum_cosine: raise m from m0 to 1 on a cosine over training (BYOL); off in MoCo.
        symmetric: both views serve as query: ``(L(q1, k2) + L(q2, k1)) / 2``, and
            ``cat(k1, k2)`` is enqueued (2B keys per step). The MoCo demo *sums* the two
            terms; with SGD that equals our mean at twice the lr and half the weight decay.
        bn_splits: G, the groups of each process's batch that BN statistics are computed
            over (shuffle-BN on one device); 1 = statistics of the whole (per-process) batch.
            The keys are shuffled whenever G > 1 or there are several processes.
        **base: the :class:`Pipeline` arguments (augment, optimizer, ...).
    """

    loss_forms: ClassVar[tuple[LossForm, ...]] = ("query_key_negatives",)
    loss_hint: ClassVar[str] = "it calls loss(query, key, queue); use loss=info_nce"

    def __init__(
        self,
        backbone: nn.Module,
        projector: nn.Module,
        loss: nn.Module,
        queue_size: int = 4096,
        momentum: float = 0.99,
        momentum_cosine: bool = False,
        symmetric: bool = False,
        bn_splits: int = 8,
        **base: Any,
    ) -> None:
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"pipeline.momentum={momentum} must be in [0, 1]")
        self.loss_form(loss)
        if getattr(loss, "symmetric", False):
            raise ValueError("loss.symmetric=true is InfoNCE's in-batch (CLIP) form; use pipeline.symmetric for MoCo")
        super().__init__(backbone=convert_to_split_bn(backbone, bn_splits), **base)
        self.projector = convert_to_split_bn(projector, bn_splits)
        self.loss = loss
        self.key_backbone = momentum_copy(self.backbone)  # frozen: requires_grad False, in the checkpoint
        self.key_projector = momentum_copy(self.projector)
        self.queue = KeyQueue(queue_size, self._out_dim())
        self.momentum, self.momentum_cosine = momentum, momentum_cosine
        self.symmetric, self.bn_splits = symmetric, bn_splits
        self._ema_step = -1  # the optimiser step whose EMA is done (accumulated micro-batches share one)

    def _out_dim(self) -> int:
        """D, the projector's output width (the key dimension)."""
        linears = [m for m in self.projector.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("the projector needs a final nn.Linear to infer the key dimension")
        return linears[-1].out_features

    def check_run(self, facts: RunFacts) -> None:
        """MoCo's rules: a queue of at least one step's keys; no global BatchNorm statistics (the positive key
        would leak through them); BatchNorm groups of 2 or more images, the last batch's included."""
        keys = facts.batch_size * facts.world_size * (2 if self.symmetric else 1)
        if problem := queue_problem(self.queue.size, keys):
            raise ValueError(problem)
        if facts.sync_batchnorm:
            raise ValueError(
                "trainer.sync_batchnorm=true would replace MoCo's shuffle-BN by global BatchNorm statistics, through "
                "which the positive key leaks (docs/distributed.md): pass trainer.sync_batchnorm=false"
            )
        g = self.bn_splits
        if facts.batch_size % g:
            raise ValueError(f"data.batch_size={facts.batch_size} is not a multiple of pipeline.bn_splits={g}")
        if g > 1 and facts.batch_size // g < 2:
            raise ValueError(
                f"data.batch_size={facts.batch_size} leaves one image per BatchNorm group (pipeline.bn_splits="
                f"{g}), whose statistics are undefined: raise data.batch_size or lower pipeline.bn_splits"
            )
        self._check_last_batch(facts, groups=g)

    def on_fit_start(self) -> None:
        # Lightning's sync_batchnorm=True (applied before this hook) swaps SplitBatchNorm for global statistics,
        # through which the positive key leaks; the CLI refuses it earlier, a plain Trainer gets here.
        if any(isinstance(m, nn.SyncBatchNorm) for m in self.modules()):
            raise ValueError(
                "MoCo with SyncBatchNorm (Trainer(sync_batchnorm=True)) would replace its shuffle-BN by "
                "global BatchNorm statistics, through which the positive key leaks: use sync_batchnorm=False"
            )

    # ------------------------------------------------------------------ parts of a step
    def current_momentum(self) -> float:
        """m of this step (``global_step`` of ``estimated_stepping_batches``)."""
        if not self.momentum_cosine or self._trainer is None:
            return self.momentum
        return momentum_at(self.global_step, total_steps(self.trainer), self.momentum)

    @torch.no_grad()
    def keys(self, x: Tensor) -> Tensor:
        """Key-encoder embeddings (B, D) of a view, the keys shuffled across the BN groups (shuffle-BN).

        One process: the batch is permuted, encoded (BN statistics per ``bn_splits`` group)
        and un-permuted. W processes (B rows on each, as MoCo's ``batch_shuffle_ddp``):
        the W*B key views are gathered, permuted by one global permutation, each rank
        encodes its B-row slice of the permuted batch (``bn_splits`` groups of it), the
        keys are gathered, un-permuted, and this rank's rows returned. Its BN statistics
        thus mix images of every rank, so a query and its key share none. No shuffle at
        all only with W = 1 and ``bn_splits=1``.
        """
        w, r, b = world_size(), rank(), len(x)
        if w == 1 and self.bn_splits == 1:
            return self.key_projector(self.key_backbone(x))
        # The checkpointed augmentation generator draws it, so resume is exact. Every rank's
        # generator is in the same state (same seed, same draws: ``Pipeline.views``), so every
        # rank draws this same permutation without a broadcast (with bn_splits > 1 also the one
        # that one process holding the global batch draws: the generators stay in step).
        perm = torch.randperm(w * b, generator=self.generator).to(x.device)  # (W*B,)
        mine = perm[r * b : (r + 1) * b]  # (B,) the global rows this rank encodes
        k = self.key_projector(self.key_backbone(all_gather(x)[mine]))  # row j: key of global row mine[j]
        k = all_gather(k)  # (W*B, D), row j is the key of global row perm[j]
        return torch.empty_like(k).index_copy_(0, perm, k)[r * b : (r + 1) * b]  # row i: key of x[i]

    def check_queue(self, keys_per_step: int) -> None:
        """K must hold at least one step's keys, else the negatives are a fragment of one batch."""
        problem = queue_problem(self.queue.size, keys_per_step)
        if problem:
            raise ValueError(problem)

    # ------------------------------------------------------------------ the step
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        self.check_queue(len(images) * world_size() * (2 if self.symmetric else 1))
        m = self.current_momentum()
        if self.global_step != self._ema_step:  # once per optimiser step (trainer.accumulate_grad_batches)
            ema_update(self.key_backbone, self.backbone, m)  # before the keys, as MoCo
            ema_update(self.key_projector, self.projector, m)
            self._ema_step = self.global_step
        v1, v2 = self.views(images)
        negatives = self.queue()  # (K, D)
        h1 = self.backbone(v1)  # (B, F); separate passes: BN groups of B/G, as the demo
        k2 = self.keys(v2)  # (B, D)
        loss = self.loss(self.projector(h1), k2, negatives)
        new_keys: tuple[Tensor, ...]
        if self.symmetric:
            h2 = self.backbone(v2)
            k1 = self.keys(v1)
            loss = 0.5 * (loss + self.loss(self.projector(h2), k1, negatives))
            new_keys, h, y = (k1, k2), torch.cat([h1, h2]), labels.repeat(2)  # (2B, F), (2B,)
        else:
            new_keys, h, y = (k2,), h1, labels
        self.log("train/momentum", m, on_step=True, on_epoch=False)
        skipped = self.skipped_steps
        out = self.finish_step({"loss": loss}, self.online_probe_loss(h, y))
        if self.skipped_steps == skipped:  # a skipped (non-finite) step enqueues nothing
            # gathered per view: [all k1; all k2] (W*B each), the order one process with the global batch enqueues
            self.queue.enqueue(torch.cat([all_gather(l2_normalize(k.float())) for k in new_keys]))
        return out
