"""Sweeps beyond one process: Hydra's submitit launcher (submitit_local on the CPU here; the SLURM presets as
the parameters they hand to submitit), requeue at the time-limit signal, `contrastive-summary` on demand."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.executable).parent
RUN = [
    "data.source.num_train=400",
    "data.source.num_test=100",
    "data.batch_size=50",
    "trainer.max_epochs=3",
    "eval.every_n_epochs=10",
    "eval.monitor_samples=0",
    "eval.final_probe=false",
    "checkpoint.every_n_epochs=1",
    "trainer.deterministic=true",
]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _same_run(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k != "train_seconds"}  # wall-clock


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """metrics.json of RUN at seed 0, trained in one go by a plain contrastive-train."""
    from conftest import run_cli

    where = tmp_path_factory.mktemp("straight")
    out = run_cli("contrastive-train", "seed=0", *RUN, "hydra.run.dir=straight", cwd=where)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads((where / "straight" / "metrics.json").read_text())


def _interrupt(sweep: Path, proc: subprocess.Popen, signum: signal.Signals) -> Path:
    """Send ``signum`` to the training process of the sweep's seed=0 job once its first epoch is on disk;
    its job folder."""
    deadline = time.time() + 300
    while not (job := _job_folder(sweep, "seed=0")) or not (job / "checkpoints" / "epoch=0000.ckpt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    controllers = [int(p.name) for p in (sweep / ".submitit").iterdir() if p.name.isdigit()]
    task = _task_writing(job.resolve(), controllers)
    assert task is not None and not (job / "metrics.json").exists(), "the job ended before it could be interrupted"
    os.kill(task, signum)
    return job


def _job_folder(sweep: Path, override: str) -> Path | None:
    """The job folder of ``sweep`` whose overrides hold ``override`` (the folder names are cut and hashed)."""
    found = [p.parent.parent for p in sweep.glob("*/.hydra/overrides.yaml") if f"- {override}\n" in p.read_text()]
    return found[0] if found else None


def _task_writing(folder: Path, controllers: list[int]) -> int | None:
    """The training process of the submitit_local job that writes into ``folder`` (its cli.log is open): the
    child of one of the jobs' controllers (a local job's id is its controller's pid)."""
    for controller in controllers:
        children = Path(f"/proc/{controller}/task/{controller}/children")
        for task in children.read_text().split() if children.exists() else []:
            fds = Path(f"/proc/{task}/fd")
            try:
                if any(str(folder) in os.readlink(fd) for fd in fds.iterdir()):
                    return int(task)
            except OSError:  # it ended meanwhile
                continue
    return None


@pytest.mark.slow
def test_a_submitit_local_sweep_requeues_a_job_at_its_time_limit_signal_and_it_ends_as_an_uninterrupted_run(
    cli, tmp_path: Path, uninterrupted: dict[str, Any]
) -> None:
    """Two jobs of a sweep, each its own process under submitit's local runner. One gets SIGUSR2, the signal
    submitit has SLURM send ``signal_delay_s`` before the time limit (and on pre-emption): submitit requeues it,
    the new attempt continues from the run folder's last.ckpt, and its metrics.json is the uninterrupted run's.
    While it runs, ``contrastive-summary`` writes the summary with a row for it, without metrics."""
    sweep = tmp_path / "multirun" / "simclr_shapes"
    cmd = [str(BIN / "contrastive-train"), "-m", "hydra/launcher=submitit_local", "seed=0,1", *RUN]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job = _interrupt(sweep, proc, signal.SIGUSR2)

    on_demand = cli("contrastive-summary", str(sweep), cwd=tmp_path)
    assert on_demand.returncode == 0, on_demand.stderr[-2000:]
    assert f"of 2 jobs finished, 0 failed: {sweep / 'summary.md'}" in on_demand.stdout
    running = [r for r in _rows(sweep / "summary.csv") if r["seed"] == "0"]
    assert len(running) == 1 and running[0].get("knn_top1", "") == ""

    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    requeue_log = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.*"))
    assert "Requeued job" in requeue_log, requeue_log[-3000:]
    assert "Restoring states from the checkpoint" in (job / "cli.log").read_text() + requeue_log
    rows = {r["seed"]: r for r in _rows(sweep / "summary.csv")}
    assert sorted(rows) == ["0", "1"] and all(0 <= float(r["knn_top1"]) <= 100 for r in rows.values())

    requeued: dict[str, Any] = json.loads((job / "metrics.json").read_text())
    assert _same_run(requeued) == _same_run(uninterrupted)
    assert requeued["epochs"] == 3


@pytest.mark.slow
def test_a_sweep_job_sent_sigterm_continues_when_the_sweep_runs_again_and_ends_as_an_uninterrupted_run(
    cli, tmp_path: Path, uninterrupted: dict[str, Any]
) -> None:
    """SIGTERM, as SLURM sends at a time limit (no requeue without submitit's SIGUSR2): the job stops with
    exit status 143 and its last.ckpt, the sweep command says so in one line (not submitit's traceback), and
    the same command again continues the job to the uninterrupted run's metrics.json."""
    sweep = tmp_path / "multirun" / "simclr_shapes"
    cmd = [str(BIN / "contrastive-train"), "-m", "hydra/launcher=submitit_local", "seed=0", *RUN]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job = _interrupt(sweep, proc, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
    (line,) = [x for x in out.splitlines() if x.startswith("error: Job ")]
    assert line.endswith(
        "ended without a result; its log: "
        f"{sweep / '.submitit'}/{line.split()[2]}/. Run the same command again: the jobs that have not finished "
        "continue from their checkpoints/last.ckpt, the finished ones are evaluated again (contrastive-summary "
        "MULTIRUN_DIR summarises the jobs so far)"
    )
    stopped = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.err"))
    assert "error: stopped by SIGTERM; checkpoints/last.ckpt keeps the last whole epoch" in stopped
    assert not (job / "metrics.json").exists()

    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Restoring states from the checkpoint" in (job / "cli.log").read_text() + "".join(
        p.read_text() for p in (sweep / ".submitit").glob("*/*_log.*")
    )
    assert _same_run(json.loads((job / "metrics.json").read_text())) == _same_run(uninterrupted)
    assert [r["seed"] for r in _rows(sweep / "summary.csv")] == ["0"]


def _launcher_parameters(overrides: list[str]) -> dict[str, Any]:
    """What Hydra's submitit launcher, built from ``hydra/launcher=...``, hands to submitit's executor."""
    import submitit
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    with initialize_config_module("contrastive.configs", version_base="1.3"):
        cfg = compose("train", overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    handed: dict[str, Any] = {}

    class Executor:  # records instead of submitting (no sbatch here)
        def __init__(self, folder: str, cluster: str, **kwargs: Any) -> None:
            handed.update(kwargs, cluster=cluster)

        def update_parameters(self, **kwargs: Any) -> None:
            handed.update(kwargs)

        def map_array(self, *args: Any) -> None:
            raise StopIteration

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(submitit, "AutoExecutor", Executor)
        with pytest.raises(StopIteration):
            launcher.launch([["seed=0"]], 0)
    return handed


def test_the_slurm_presets_give_one_gpu_per_job_or_one_task_per_gpu_and_requeue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    gpu = _launcher_parameters(["hydra/launcher=slurm_gpu"])
    assert (gpu["cluster"], gpu["nodes"], gpu["tasks_per_node"], gpu["gpus_per_node"]) == ("slurm", 1, 1, 1)
    assert gpu["slurm_max_num_timeout"] == 20 and gpu["slurm_signal_delay_s"] == 120
    ddp = _launcher_parameters(["hydra/launcher=slurm_ddp", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"])
    # Lightning under SLURM: one task per device, on each node
    assert (ddp["nodes"], ddp["tasks_per_node"], ddp["gpus_per_node"]) == (2, 4, 4)
    assert ddp["slurm_max_num_timeout"] == 20


def test_a_launcher_whose_plugin_is_missing_says_which_pip_command_installs_it(tmp_path: Path) -> None:
    hide = (
        "import sys\n"
        "sys.modules['hydra_plugins.hydra_submitit_launcher'] = None  # as if not installed\n"
        "from contrastive.cli import train\n"
        "sys.argv = ['contrastive-train', '-m', 'hydra/launcher={}', 'seed=0,1']\n"
        "train()\n"
    )
    for launcher in ("submitit_local", "slurm_gpu"):
        out = subprocess.run(
            [sys.executable, "-c", hide.format(launcher)], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 2, out.stderr[-2000:]
        assert out.stderr.strip() == (
            "error: Hydra's submitit launcher (hydra/launcher=submitit_slurm|submitit_local|slurm_gpu|slurm_ddp) is "
            'not installed: pip install "contrastive[slurm]"'
        )
    assert list(tmp_path.iterdir()) == []


def test_contrastive_summary_of_a_folder_without_jobs_is_one_line(cli, tmp_path: Path) -> None:
    out = cli("contrastive-summary", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 2 and out.stderr == (
        f"error: {tmp_path} holds no job folders of a sweep (<job>/.hydra/overrides.yaml): pass the folder that "
        "`contrastive-train -m` wrote, e.g. multirun/simclr_shapes\n"
    )
    assert cli("contrastive-summary", "--help", cwd=tmp_path).stdout.startswith("usage: contrastive-summary")
