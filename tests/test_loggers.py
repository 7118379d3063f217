"""logger=csv_tensorboard|wandb|mlflow: Lightning's loggers, offline (W&B offline mode, MLflow's SQLite file), read
back from the files they write; a resumed run continues the same W&B / MLflow run; a missing package is one line."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from contrastive.cli.checks import check_config
from contrastive.cli.shell import ConfigError

SHRINK = [
    "data.source.num_train=200",
    "data.source.num_test=100",
    "data.batch_size=50",
    "eval.every_n_epochs=1",
    "eval.final_probe=false",
    "scheduler=constant",
    "hydra.run.dir=run",
]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: W&B offline, MLflow's telemetry off (the subprocesses inherit the environment)."""
    for key, value in {"WANDB_MODE": "offline", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}.items():
        monkeypatch.setenv(key, value)
    for key in ("MLFLOW_TRACKING_URI", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_PROJECT"):
        monkeypatch.delenv(key, raising=False)


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a W&B transaction log (``run-<id>.wandb``): a LevelDB-style log of 32 KiB blocks
    after a 7-byte header, each chunk ``crc32 (4) | length (2, LE) | type (1: full, 2: first, 3: middle,
    4: last)``. W&B's own Python reader of this file went with its Go core."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, records, pending, block = path.read_bytes(), [], b"", 32768
    assert data[:4] == b":W&B"
    pos = 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run(folder: Path) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    """(the run record, the history rows, the config) of one offline W&B run folder."""
    (log,) = folder.glob("run-*.wandb")
    run, history, config = None, [], {}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            history.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
        elif kind == "config":
            config |= {item.key: json.loads(item.value_json) for item in record.config.update}
    return run, history, config


@pytest.mark.slow
def test_wandb_offline_and_mlflow_log_the_curves_and_config_and_a_resumed_run_continues_them(
    cli, tmp_path: Path, offline: None
) -> None:
    first = cli("contrastive-train", "logger=[wandb,mlflow]", *SHRINK, "trainer.max_epochs=1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = cli("contrastive-train", "logger=[wandb,mlflow]", *SHRINK, "trainer.max_epochs=2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    knn = json.loads((tmp_path / "run" / "metrics.json").read_text())["knn_top1"]

    # W&B: two offline folders (one per call) of one run, named after the run folder, grouped by experiment
    calls = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(calls) == 2
    (run, history, config), (run2, history2, _) = (wandb_run(c) for c in calls)
    assert run.run_id == run2.run_id and run.display_name == "simclr_shapes/run" and run.run_group == "simclr_shapes"
    assert config["loss"]["temperature"] == 0.2 and config["trainer"]["max_epochs"] == 1  # the composed config
    rows = history + history2
    losses = [r["train/loss_epoch"] for r in rows if "train/loss_epoch" in r]
    assert len(losses) == 2 and all(0 < v < 10 for v in losses)
    curve = [r["val/knn_top1"] for r in rows if "val/knn_top1" in r]
    assert len(curve) >= 3 and curve[-1] == pytest.approx(knn, abs=1e-3)  # untrained, epoch 1, epoch 2 (, final)

    # MLflow: one run in ./mlflow.db, continued by the resumed call, with both epochs' loss
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("simclr_shapes").experiment_id])
    assert mlrun.info.run_name == "simclr_shapes/run" and mlrun.data.params["loss/temperature"] == "0.2"
    loss_steps = [m.step for m in client.get_metric_history(mlrun.info.run_id, "train/loss_epoch")]
    assert len(loss_steps) == 2 and loss_steps[0] < loss_steps[1]
    knn_curve = client.get_metric_history(mlrun.info.run_id, "val/knn_top1")
    assert max(knn_curve, key=lambda m: (m.step, m.timestamp)).value == pytest.approx(knn, abs=1e-3)

    # the default writes neither
    default = cli("contrastive-train", *SHRINK, "trainer.max_epochs=1", "hydra.run.dir=plain", cwd=tmp_path)
    assert default.returncode == 0, default.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == [
        ".hydra",
        "checkpoints",
        "cli.log",
        "logs",
        "metrics.json",
        "tb",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "plain", "run"]


@pytest.mark.parametrize(("logger", "extra"), [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_a_logger_without_its_package_says_which_pip_command_installs_it(
    config, monkeypatch: pytest.MonkeyPatch, logger: str, extra: str
) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == extra else find_spec(name, *a))
    with pytest.raises(ConfigError) as refused:
        check_config(config("train", [f"logger={logger}"]))
    assert str(refused.value) == (
        f'logger.{logger} needs the package {extra}, which is not installed: pip install "contrastive[{extra}]" '
        "(or pick another logger=, e.g. the default csv_tensorboard)"
    )
    check_config(config("train", ["logger=csv_tensorboard"]))  # needs nothing beyond the core install


def test_logger_wandb_without_wandb_is_refused_in_one_line_before_torch_leaving_nothing(tmp_path: Path) -> None:
    import subprocess
    import sys

    hide = (
        "import sys, atexit\n"
        "sys.modules['wandb'] = None  # as if not installed\n"
        "atexit.register(lambda: print(sorted(m for m in ('torch', 'pytorch_lightning') if m in sys.modules)))\n"
        "from contrastive.cli import train\n"
        "sys.argv = ['contrastive-train', 'logger=wandb']\n"
        "train()\n"
    )
    out = subprocess.run([sys.executable, "-c", hide], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip() == (
        'error: logger.wandb needs the package wandb, which is not installed: pip install "contrastive[wandb]" '
        "(or pick another logger=, e.g. the default csv_tensorboard)"
    )
    assert out.stdout.strip().splitlines()[-1] == "[]" and list(tmp_path.iterdir()) == []
