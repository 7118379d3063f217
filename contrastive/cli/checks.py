"""Configuration checks: each bad value is one ConfigError naming the key and the fix, before any work.

The rules of a pipeline (its queue, its BatchNorm groups, ...) are the pipeline's own
(:meth:`contrastive.pipelines.Pipeline.check_run`); here are those of the run itself.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from contrastive.cli.shell import ConfigError

if TYPE_CHECKING:  # the checks of the settings alone run before torch is imported (a second of start-up)
    import torch

    from contrastive.data import Splits
    from contrastive.pipelines import Pipeline

#: The choices of ``contrastive.evaluation.linear``'s ``ProbeOptimizer`` and ``Normalize``, here so that a
#: typo is refused without importing torch (tests/test_cli_output.py checks that they are the same).
PROBE_CHOICES = {"probe.optimizer": ("sgd", "adamw"), "probe.normalize": ("standardize", "l2", "none")}


def _check(cfg: DictConfig, key: str, kinds: tuple[type, ...], ok: Callable[[Any], bool], what: str) -> None:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, kinds) or not ok(value):
        raise ConfigError(f"{key}={value!r} is invalid: it must be {what}")


_POSITIVE_INT = (int,), lambda v: v >= 1, "a positive integer"
_NON_NEGATIVE = (int, float), lambda v: v >= 0, "a non-negative number"


def _check_optional(cfg: DictConfig, key: str, kinds: tuple[type, ...], ok: Callable[[Any], bool], what: str) -> None:
    """:func:`_check` where the key is set (a group option may not have it, e.g. AdamW has no momentum)."""
    if OmegaConf.select(cfg, key) is not None:
        _check(cfg, key, kinds, ok, what)


def check_probe_config(cfg: DictConfig) -> None:
    """The linear probe's settings (``probe.*``, a group of both train.yaml and eval.yaml), checked up front:
    the probe runs after training (or after feature extraction), too late to learn of a typo."""
    _check(cfg, "probe.epochs", *_POSITIVE_INT)
    _check(cfg, "probe.batch_size", *_POSITIVE_INT)
    _check_optional(cfg, "probe.lr", (int, float), lambda v: v > 0, "a positive number (or null for the default)")
    _check(cfg, "probe.weight_decay", *_NON_NEGATIVE)
    for key, choices in PROBE_CHOICES.items():
        _check(cfg, key, (str,), choices.__contains__, ", ".join(choices[:-1]) + " or " + choices[-1])


def check_config(cfg: DictConfig) -> None:
    """Reject wrong types and invalid values before anything is built.

    Unknown keys are rejected earlier by Hydra's struct mode; hyper-parameters of
    losses, augmentations and pipelines are checked by their constructors.
    """
    _check(cfg, "data.batch_size", (int,), lambda v: v >= 2, "an integer >= 2 (a contrastive batch needs pairs)")
    _check(cfg, "data.eval_batch_size", *_POSITIVE_INT)
    _check(cfg, "trainer.max_epochs", (int,), lambda v: v >= 0, "a non-negative integer")
    _check(cfg, "eval.every_n_epochs", *_POSITIVE_INT)
    _check(cfg, "checkpoint.every_n_epochs", *_POSITIVE_INT)
    _check(cfg, "seed", (int,), lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)")
    _check_optional(cfg, "scheduler.warmup_epochs", *_NON_NEGATIVE)
    _check(cfg, "eval.knn_temperature", (int, float), lambda v: v > 0, "a positive number")
    max_time = OmegaConf.select(cfg, "trainer.max_time")
    if max_time is not None and not (isinstance(max_time, str) and re.fullmatch(r"\d+:\d\d:\d\d:\d\d", max_time)):
        raise ConfigError(
            f"trainer.max_time={max_time!r} is invalid: it must be DD:HH:MM:SS, e.g. "
            "trainer.max_time=00:04:00:00 for four hours"
        )
    _check_optional(cfg, "data.num_classes", *_POSITIVE_INT)  # null: counted from the data
    _check_optional(cfg, "eval.monitor_samples", (int,), lambda v: v >= 0, "a non-negative integer (0: off)")
    unlabelled = str(OmegaConf.select(cfg, "data.source._target_")).endswith("unlabelled_splits")
    if OmegaConf.select(cfg, "eval_data") and not unlabelled:
        raise ConfigError(
            "eval_data is the labelled evaluation set of a run on unlabelled images (data=image_folder_unlabelled); "
            "this data set is evaluated on its own test split: leave eval_data out"
        )
    _check_optional(cfg, "optimizer.lr", (int, float), lambda v: v > 0, "a positive number")
    _check_optional(cfg, "optimizer.weight_decay", *_NON_NEGATIVE)
    _check_optional(cfg, "optimizer.momentum", (int, float), lambda v: 0 <= v < 1, "a number in [0, 1)")
    _check_optional(
        cfg,
        "scheduler.final_lr_fraction",
        (int, float),
        lambda v: 0 <= v <= 1,
        "a number in [0, 1] (the final lr as a fraction of the peak)",
    )
    if cfg.eval.final_probe:
        check_probe_config(cfg)
    check_extras(cfg)
    for key in ("data.subset", "data.test_subset"):
        _check_optional(cfg, key, *_POSITIVE_INT)
    if cfg.data.train_classes != cfg.data.test_classes and cfg.eval.knn_k != 0:
        raise ConfigError(
            "data.train_classes and data.test_classes differ (class-disjoint retrieval), so a kNN classifier "
            "of the test images by the training classes means nothing: pass eval.knn_k=0 to monitor MAP@R "
            "among the test images instead"
        )


#: The classes of the optional integrations, by ``_target_``: the package each needs and the extra that installs it.
EXTRAS = {
    "pytorch_lightning.loggers.WandbLogger": ("wandb", "wandb"),
    "pytorch_lightning.loggers.MLFlowLogger": ("mlflow", "mlflow"),
}


def check_extras(cfg: DictConfig) -> None:
    """Each logger of ``logger=`` whose package is missing is refused, with the pip command that installs it
    (looked up without importing it: a second of start-up for W&B)."""
    for key, spec in (OmegaConf.select(cfg, "logger") or {}).items():
        package, extra = EXTRAS.get(str(spec.get("_target_")), (None, None))
        if package is not None and importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"logger.{key} needs the package {package}, which is not installed: "
                f'pip install "contrastive[{extra}]" (or pick another logger=, e.g. the default csv_tensorboard)'
            )


def warmup_warning(cfg: DictConfig) -> str | None:
    """A line to log when the LR warm-up lasts the whole run (no decay at all), else None."""
    warmup, epochs = OmegaConf.select(cfg, "scheduler.warmup_epochs"), cfg.trainer.max_epochs
    if not warmup or epochs == 0 or warmup < epochs:
        return None
    return (
        f"scheduler.warmup_epochs={warmup} >= trainer.max_epochs={epochs}: the whole run is warm-up (the lr "
        f"rises to its peak and never decays); pass a shorter one, e.g. scheduler.warmup_epochs={epochs / 10:g} "
        "(a tenth of the run; fractions of an epoch are fine)"
    )


def knn_k_warning(key: str, k: int, num_train: int) -> str | None:
    """A line to log when kNN's k exceeds the training images (the vote is then over all of them), else None."""
    if k <= num_train:
        return None
    return (
        f"{key}={k} is more than the {num_train} training images: the kNN votes over all of them (k = "
        f"{num_train}), which is not the k-NN figure asked for; pass a smaller {key}"
    )


def unseen_test_classes_warning(splits: Splits) -> str | None:
    """A line to log when the test split holds classes without training images (an image folder's class
    folders found only in ``test/``), with the overrides of class-disjoint retrieval; else None."""
    trained = sorted(set(splits.train.labels.unique().tolist()))
    tested = sorted(set(splits.test.labels.unique().tolist()))
    extra = [c for c in tested if c not in trained]
    if not extra:
        return None
    names = splits.test.class_names or [str(c) for c in range(splits.num_classes)]
    shown = ", ".join(names[c] for c in extra[:5]) + (", ..." if len(extra) > 5 else "")
    return (
        f"the test split holds {len(extra)} class(es) without training images ({shown}), labelled after the "
        f"training classes, so the data set has {splits.num_classes} classes and kNN and the linear probe cannot "
        f"predict those. For class-disjoint retrieval pass data.train_classes=[{','.join(map(str, trained))}] "
        f"data.test_classes=[{','.join(map(str, tested))}] data.num_classes={len(trained)} eval.knn_k=0"
    )


def check_eval_config(cfg: DictConfig) -> None:
    """``contrastive-eval``'s values, checked before the checkpoint is read."""
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={cfg.device!r} is invalid: it must be auto, cpu or cuda")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device=cuda, but no CUDA GPU is visible here: use device=auto or device=cpu")
    for key in ("batch_size", "knn_k"):
        _check(cfg, key, *_POSITIVE_INT)
    if cfg.linear_probe:
        check_probe_config(cfg)
    _check(cfg, "knn_temperature", (int, float), lambda v: v > 0, "a positive number")
    for key in ("subset", "test_subset"):
        _check_optional(cfg, key, *_POSITIVE_INT)


def check_against_data(cfg: DictConfig, splits: Splits, world: int, pipeline: Pipeline) -> None:
    """Checks that need the data set: batch vs set size, class count, image size; then the pipeline's own
    rules (:meth:`~contrastive.pipelines.Pipeline.check_run`) for these facts.

    ``world`` is the number of training processes (the Trainer's: it resolves
    ``devices=auto``, torchrun and SLURM).
    """
    batch_size = cfg.data.batch_size
    if batch_size * world > len(splits.train):
        capped = OmegaConf.select(cfg, "data.subset") == len(splits.train)  # else raising data.subset adds nothing
        raise ConfigError(
            f"data.batch_size={batch_size} x {world} process(es) is larger than the training set "
            f"({len(splits.train)} images): lower data.batch_size{' or raise data.subset' if capped else ''}"
        )
    if cfg.data.num_classes != splits.num_classes:
        trained = len(set(splits.train.labels.unique().tolist()))
        has = (
            f"the training split has {splits.num_classes} classes"
            if trained == splits.num_classes
            else f"the data set has {splits.num_classes} classes ({trained} in the training split, "
            f"{splits.num_classes - trained} only in the test split)"
        )
        raise ConfigError(
            f"data.num_classes={cfg.data.num_classes} but {has}: pass data.num_classes={splits.num_classes}, or "
            "leave data.num_classes out (null): it is then counted"
        )
    height, width = (splits.train if splits.labelled else splits.test).images.shape[-2:]  # unlabelled: stored larger
    if cfg.data.image_size != height or height != width:  # the views would be one size, kNN and probe another's
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} but the images are {height}x{width} (CIFAR's are 32x32; image "
            f"folders are resized to data.image_size): pass data.image_size={height}"
        )
    keeps_last = OmegaConf.select(cfg, "sampler.drop_last") is False
    if world > 1 and keeps_last:
        raise ConfigError(
            f"sampler.drop_last=false under {world} processes would give the processes last batches of different "
            "sizes, which the gathered losses cannot pair up: use sampler.drop_last=true (the default)"
        )
    from contrastive.pipelines import RunFacts

    facts = RunFacts(
        batch_size=batch_size,
        world_size=world,
        num_train=len(splits.train),
        last_batch=len(splits.train) % (batch_size * world) if keeps_last else 0,
        sync_batchnorm=bool(OmegaConf.select(cfg, "trainer.sync_batchnorm")),
    )
    try:
        pipeline.check_run(facts)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_eval_data(run_cfg: DictConfig, splits: Splits, data_root: str | None) -> None:
    """The data set found has the run's number of classes (else kNN and the probe score another task)."""
    if splits.num_classes != run_cfg.data.num_classes:
        where = f"data_root={data_root}" if data_root is not None else f"data.root={run_cfg.data.get('root')}"
        raise ConfigError(
            f"the run trained on {run_cfg.data.num_classes} classes, but the data at {where} has "
            f"{splits.num_classes}: point data_root at the data set the run trained on"
        )


# What contrastive-eval writes beside metrics.json; a later eval of the same checkpoint removes those it
# did not write again, so the folder never mixes two evaluations.


def check_feature_dim(backbone: torch.nn.Module, feature_dim: int, image_size: int, in_channels: int = 3) -> None:
    """``model.feature_dim`` (the heads' input width) against one forward pass of a blank image.

    A wrong value (e.g. after ``model.backbone.width=64`` or ``name=resnet50``) otherwise failed
    with a shape error at the first step, after the untrained measurement.
    """
    import torch

    was_training = backbone.training
    with torch.no_grad():
        width = backbone.eval()(torch.zeros(1, in_channels, image_size, image_size)).shape[1:]
    backbone.train(was_training)
    if len(width) != 1:
        raise ConfigError(
            f"the backbone outputs shape {tuple(width)} per image, not a feature vector: end "
            "model.backbone with a global pooling and a flatten (as the built-in backbones do)"
        )
    if width[0] != feature_dim:
        raise ConfigError(
            f"model.feature_dim={feature_dim}, but the backbone outputs {width[0]} features per "
            f"image: pass model.feature_dim={width[0]}"
        )
