"""Shared fixtures: the real Hydra configs, the CLI as a user runs it, small data sets."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
# The CIFAR-10 copy beside the checkout (../shared/data), wherever the clone lives on this machine.
_SHARED_CANDIDATES = [REPO.parent / "shared" / "data", Path("/work/shared/data")]
SHARED_DATA = Path(
    os.environ.get("CONTRASTIVE_SHARED_DATA")
    or next((c for c in _SHARED_CANDIDATES if (c / "build_cifar10.py").is_file()), _SHARED_CANDIDATES[0])
)
BIN = Path(sys.executable).parent


def compose_config(config_name: str = "train", overrides: list[str] | None = None) -> DictConfig:
    """Compose a config shipped in ``contrastive.configs`` exactly as the CLI does."""
    from contrastive.cli.shell import register_resolvers

    register_resolvers()
    with initialize_config_module("contrastive.configs", version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides or [])


def run_cli(script: str, *overrides: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``contrastive-train`` / ``contrastive-eval`` as a user would, in ``cwd``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [str(BIN / script), *overrides], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def write_fake_cifar10(root: Path, n_train: int = 60, n_test: int = 20, seed: int = 0) -> Path:
    """A tiny random CIFAR-10 in torchvision's pickle layout (md5 sums differ from the archive)."""
    rng = np.random.default_rng(seed)
    out = root / "cifar-10-batches-py"
    out.mkdir(parents=True)
    per = n_train // 5
    for name, n in [(f"data_batch_{i}", per) for i in range(1, 6)] + [("test_batch", n_test)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}
        (out / name).write_bytes(pickle.dumps(batch))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (out / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return root


STL10_NAMES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def write_fake_stl10(root: Path, n_train: int = 6, n_test: int = 4, n_unlabelled: int = 5) -> dict[str, np.ndarray]:
    """Random images (N, 3, 96, 96) in STL-10's files: each channel column-major, labels 1..10 as bytes."""
    rng = np.random.default_rng(0)
    base = root / "stl10_binary"
    base.mkdir(parents=True)
    images = {}
    for split, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabelled)):
        images[split] = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        (base / f"{split}_X.bin").write_bytes(images[split].transpose(0, 1, 3, 2).tobytes())  # column-major
        if split != "unlabeled":
            labels = rng.integers(1, 11, n, dtype=np.uint8)
            (base / f"{split}_y.bin").write_bytes(labels.tobytes())
            images[f"{split}_y"] = labels.astype(np.int64) - 1
    (base / "class_names.txt").write_text("\n".join(STL10_NAMES) + "\n")
    return images


@pytest.fixture
def fake_cifar10() -> object:
    """``fake_cifar10(root, n_train, n_test)`` writes a tiny random CIFAR-10 under ``root``."""
    return write_fake_cifar10


@pytest.fixture
def cli() -> object:
    """``cli(script, *overrides, cwd=...)`` runs a console script (see :func:`run_cli`)."""
    return run_cli


@pytest.fixture
def config() -> object:
    """``config(name, overrides)`` composes a shipped config (see :func:`compose_config`)."""
    return compose_config


def check_run(cfg: DictConfig, splits: object, world: int) -> None:
    """The CLI's checks against the data for ``cfg``, with the pipeline ``cfg`` builds (its own rules included)."""
    from contrastive.cli.checks import check_against_data
    from contrastive.cli.run import build_pipeline

    check_against_data(cfg, splits, world, build_pipeline(cfg))  # type: ignore[arg-type]


@pytest.fixture
def run_checks() -> object:
    """``run_checks(cfg, splits, world)``: the checks before a run's first step (see :func:`check_run`)."""
    return check_run


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared CIFAR-10 copy rebuilt in torchvision's layout (skipped where it is absent)."""
    script = SHARED_DATA / "build_cifar10.py"
    if not script.is_file():
        pytest.skip(f"CIFAR-10 copy not found at {SHARED_DATA} (set CONTRASTIVE_SHARED_DATA)")
    root = tmp_path_factory.mktemp("cifar")
    subprocess.run([sys.executable, str(script), str(root)], check=True, capture_output=True)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port() -> object:
    """``free_port()`` gives a free TCP port on 127.0.0.1 for a gloo process group."""
    return _free_port
