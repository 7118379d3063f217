"""Every option of every config group (each YAML file the package ships) composes and instantiates.

The options are discovered from the package's config folder, so a new YAML file is checked without
a new line here; a new *group* fails :func:`test_every_group_is_covered` until it gets a builder.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from contrastive.augment import Augment
from contrastive.cli.checks import check_config
from contrastive.cli.run import build_pipeline, build_splits, make_trainer
from contrastive.data import Splits, shapes
from contrastive.pipelines import Pipeline
from contrastive.views import MultiCrop

CONFIGS = Path(str(files("contrastive.configs")))
# hydra/: presets of Hydra's own groups (hydra/launcher=slurm_gpu|slurm_ddp, hydra/sweeper=search|temperature_lr),
# built in tests/test_cluster.py and tests/test_search.py
GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir() and not p.name.startswith("_") and p.name != "hydra")


# Without the default experiment, whose values belong to its own options (e.g. loss.temperature, aug.scale:
# keys that a triplet loss or a multi-crop config lack): each option as the group's YAML ships it.
BARE = ["~experiment"]


def options(group: str) -> list[str]:
    """The selectable options of ``group``: its YAML files, without the shared ``_common`` parts."""
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml") if not p.stem.startswith("_"))


def _write_cifar100(root: Path, n: int = 20) -> None:
    rng = np.random.default_rng(0)
    out = root / "cifar-100-python"
    out.mkdir(parents=True)
    for name in ("train", "test"):
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": list(rng.integers(0, 100, n))}
        (out / name).write_bytes(pickle.dumps(batch))
    (out / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))


def _write_image_folder(root: Path) -> None:
    from PIL import Image

    for split in ("train", "test"):
        for c in range(2):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 30), (80 * c + 10 * i, 50, 90)).save(root / split / f"class{c}" / f"{i}.png")


@pytest.fixture(scope="module")
def data_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Overrides that point each data option at a tiny copy (nothing is downloaded)."""
    from conftest import write_fake_cifar10, write_fake_stl10

    root = tmp_path_factory.mktemp("data")
    write_fake_cifar10(root / "c10")
    _write_cifar100(root / "c100")
    _write_image_folder(root / "folder")
    write_fake_stl10(root / "stl10")
    return {
        "cifar10": [f"data.root={root / 'c10'}"],
        "cifar100": [f"data.root={root / 'c100'}"],
        "image_folder": [f"data.root={root / 'folder'}", "data.num_classes=2", "data.source.cache=false"],
        "image_folder_unlabelled": [f"data.root={root / 'folder'}", "data.source.images.cache=false"],
        "shapes": ["data.source.num_train=40", "data.source.num_test=20"],
        "stl10": [f"data.root={root / 'stl10'}"],
    }


def _tiny_splits() -> Splits:
    return shapes(num_train=400, num_test=20, size=32)


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.zeros(3))]


# One builder per group: compose ``group=option`` into train.yaml (or eval.yaml) and instantiate what it describes.


def _build_data(config: Callable[..., DictConfig], option: str, roots: dict[str, list[str]]) -> None:
    cfg = config("train", [*BARE, f"data={option}", *roots[option]])
    splits = build_splits(cfg.data, cfg.seed)
    assert splits.num_classes == cfg.data.num_classes or option.startswith("image_folder")
    assert splits.train.images.dtype == torch.uint8 and len(splits.train) > 0 and len(splits.test) > 0


def _build_model(config: Callable[..., DictConfig], option: str) -> None:
    cfg = config("train", [*BARE, f"model={option}"])
    backbone, projector = instantiate(cfg.model.backbone), instantiate(cfg.model.projector)
    features = backbone.eval()(torch.zeros(2, 3, 32, 32))
    assert features.shape == (2, cfg.model.feature_dim)
    assert projector.eval()(features).shape[0] == 2


def _build_aug(config: Callable[..., DictConfig], option: str) -> None:
    augment = instantiate(config("train", [*BARE, f"aug={option}"]).aug)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    if isinstance(augment, MultiCrop):
        views = augment(images, g)
        # multi-crop's 2 + 6 views, or an asymmetric pair (aug=asymmetric: two groups of one view)
        assert [v.shape[-1] for v in views] == augment.sizes and augment.sizes[0] == 32 and len(views) >= 2
    else:
        assert isinstance(augment, Augment) and augment(images, g).shape == (4, 3, 32, 32)


def _build_loss(config: Callable[..., DictConfig], option: str) -> None:
    loss = instantiate(config("train", [*BARE, f"loss={option}"]).loss)
    assert isinstance(loss, torch.nn.Module) and getattr(loss, "input_forms", None), option


def _build_pipeline(config: Callable[..., DictConfig], option: str) -> None:
    """A pipeline option builds with at least one shipped loss; every other loss is refused in one line."""
    built = []
    for loss in options("loss"):
        try:
            pipeline = build_pipeline(config("train", [*BARE, f"pipeline={option}", f"loss={loss}"]))
        except Exception as e:  # Hydra wraps the constructor's ValueError
            cause = e.__cause__ or e
            assert isinstance(cause, ValueError) and "does not fit the" in str(cause), (option, loss, cause)
            continue
        assert isinstance(pipeline, Pipeline)
        built.append(loss)
    assert built, f"pipeline={option} takes none of the shipped losses"


def _build_optimizer(config: Callable[..., DictConfig], option: str) -> None:
    optimizer = instantiate(config("train", [*BARE, f"optimizer={option}"]).optimizer)(_params())
    assert isinstance(optimizer, torch.optim.Optimizer)


def _build_scheduler(config: Callable[..., DictConfig], option: str) -> None:
    cfg = config("train", [*BARE, f"scheduler={option}"])
    optimizer = torch.optim.SGD(_params(), lr=1.0)
    scheduler = instantiate(cfg.scheduler)(optimizer, total_steps=20, steps_per_epoch=2)
    for _ in range(20):
        optimizer.step()
        scheduler.step()
    assert 0 <= optimizer.param_groups[0]["lr"] <= 1.0


def _build_sampler(config: Callable[..., DictConfig], option: str) -> None:
    cfg = config("train", [*BARE, f"sampler={option}"])
    batches = instantiate(cfg.sampler)(_tiny_splits().train, batch_size=256, seed=0, world=1)
    images, labels = next(iter(batches))
    assert len(images) == len(labels) == 256


def _build_regularizer(config: Callable[..., DictConfig], option: str) -> None:
    cfg = config("train", ["experiment=siamese_shapes", f"regularizer={option}"])
    head = instantiate(cfg.regularizer.head)
    assert head is None or isinstance(head, torch.nn.Module)
    assert isinstance(build_pipeline(cfg), Pipeline)


def _build_trainer(config: Callable[..., DictConfig], option: str, tmp_path: Path) -> None:
    trainer = make_trainer(config("train", [*BARE, f"trainer={option}"]), tmp_path)
    assert trainer.max_epochs == config("train", [*BARE, f"trainer={option}"]).trainer.max_epochs


def _build_probe(config: Callable[..., DictConfig], option: str) -> None:
    for name, extra in (("train", BARE), ("eval", ["checkpoint=x.ckpt"])):  # eval.yaml has no experiment
        probe = instantiate(config(name, [*extra, f"probe={option}"]).probe)
        assert callable(probe)


def _build_eval_data(config: Callable[..., DictConfig], option: str, roots: dict[str, list[str]]) -> None:
    """An evaluation set of a run on unlabelled images: labelled splits at the training size, or none."""
    where = {"cifar10": [f"eval_data.root={roots['cifar10'][0].split('=', 1)[1]}"], "none": []}.get(
        option, [f"eval_data.root={roots['image_folder'][0].split('=', 1)[1]}", "eval_data.cache=false"]
    )
    unlabelled = ["data=image_folder_unlabelled", *roots["image_folder_unlabelled"]]
    cfg = config("train", [*BARE, *unlabelled, f"eval_data={option}", *where])
    check_config(cfg)
    splits = build_splits(cfg.data, cfg.seed)
    assert not splits.labelled and splits.evaluated == (option != "none")
    assert splits.test.images.shape[-1] == cfg.data.image_size and (splits.bank is None) == (option == "none")


def _build_logger(config: Callable[..., DictConfig], option: str, tmp_path: Path) -> None:
    """Lightning's loggers, built (nothing started: W&B and MLflow begin a run only when first used)."""
    from pytorch_lightning.loggers import Logger

    from contrastive.cli.run import make_loggers
    from contrastive.io import ResumableCSVLogger

    cfg = config("train", [*BARE, f"logger={option}"])
    with pytest.MonkeyPatch.context() as env:  # MLflow's client opens its store (./mlflow.db) when built
        env.chdir(tmp_path)
        env.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        loggers = make_loggers(cfg, tmp_path, resume_step=3)
    assert len(loggers) == len(cfg.logger) and all(isinstance(lg, Logger) for lg in loggers)
    assert isinstance(loggers[0], ResumableCSVLogger) and loggers[0].resume_step == 3  # the run's own record


def _build_experiment(config: Callable[..., DictConfig], option: str, roots: dict[str, list[str]]) -> None:
    cfg = config("train", [f"experiment={option}"])
    target = cfg.data.source._target_.replace("unlabelled_splits", "image_folder_unlabelled")
    data = next(k for k in roots if target.endswith(f".{k}"))
    extra = [f"eval_data.root={roots['image_folder'][0].split('=', 1)[1]}"] if cfg.eval_data else []
    cfg = config("train", [f"experiment={option}", *roots[data], *extra])
    check_config(cfg)
    assert cfg.name == option
    splits = build_splits(cfg.data, cfg.seed)
    if cfg.data.num_classes is None:  # counted, as contrastive-train does
        cfg.data.num_classes = splits.num_classes
    assert isinstance(build_pipeline(cfg), Pipeline)


BUILDERS: dict[str, Callable[..., None]] = {
    "aug": _build_aug,
    "data": _build_data,
    "eval_data": _build_eval_data,
    "experiment": _build_experiment,
    "logger": _build_logger,
    "loss": _build_loss,
    "model": _build_model,
    "optimizer": _build_optimizer,
    "pipeline": _build_pipeline,
    "probe": _build_probe,
    "regularizer": _build_regularizer,
    "sampler": _build_sampler,
    "scheduler": _build_scheduler,
    "trainer": _build_trainer,
}


def test_every_group_is_covered() -> None:
    assert set(GROUPS) == set(BUILDERS), "a config group without a builder here (or a builder without its group)"
    assert all(options(group) for group in GROUPS)


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_instantiates(
    group: str, option: str, config: Any, data_roots: Any, tmp_path: Path
) -> None:
    build = BUILDERS[group]
    if group in ("data", "eval_data", "experiment"):
        build(config, option, data_roots)
    elif group in ("trainer", "logger"):
        build(config, option, tmp_path)
    else:
        build(config, option)
