"""Resume exactly after SIGKILL, refuse bad input with one clear line, lose nothing."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from contrastive.io import ResumableCSVLogger, state_dict_mismatch

BIN = Path(sys.executable).parent
RUN = [
    "data.source.num_train=400",
    "data.source.num_test=100",
    "data.batch_size=50",
    "trainer.max_epochs=4",
    "trainer.enable_progress_bar=false",
    "eval.every_n_epochs=10",
    "eval.final_probe=false",
    "checkpoint.every_n_epochs=1",
    "trainer.deterministic=true",
]


def _final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)


def _epoch_rows(run_dir: Path) -> tuple[list[float], list[float], list[float]]:
    """From metrics.csv: every row's step, the logged epoch_seconds, the logged val/knn_top1."""
    with open(run_dir / "logs" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    column = lambda key: [float(r[key]) for r in rows if r.get(key)]  # noqa: E731
    return column("step"), column("train/epoch_seconds"), column("val/knn_top1")


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(cli, tmp_path: Path) -> None:
    straight = cli("contrastive-train", *RUN, "hydra.run.dir=straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]

    cmd = [str(BIN / "contrastive-train"), *RUN, "hydra.run.dir=killed"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = tmp_path / "killed" / "checkpoints" / "epoch=0001.ckpt"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.4)  # into epoch 3
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "metrics.json").exists()
    killed_at = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 2 * 8 <= killed_at < 4 * 8  # 8 steps per epoch: killed after two epochs, before the fourth ended

    resumed = cli("contrastive-train", *RUN, "hydra.run.dir=killed", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Restoring states from the checkpoint" in resumed.stdout + resumed.stderr
    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "killed")
    assert a["global_step"] == b["global_step"] == 4 * 8
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:  # bit-for-bit: same data order, augmentation stream, optimiser state
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    mom_a = a["optimizer_states"][0]["state"]
    mom_b = b["optimizer_states"][0]["state"]
    assert all(torch.equal(mom_a[i]["momentum_buffer"], mom_b[i]["momentum_buffer"]) for i in mom_a)
    assert torch.equal(a["augment_generator"], b["augment_generator"])
    assert not list((tmp_path / "killed" / "checkpoints").glob(".*.tmp"))

    # The logs and the wall-clock span both calls: metrics.csv keeps the killed call's rows up to
    # its checkpoint (Lightning alone deletes the file on resume), each epoch's row once, in step
    # order; train_seconds adds the killed call's epochs (carried in the checkpoint) to the rest.
    for run in ("straight", "killed"):
        steps, seconds, knn = _epoch_rows(tmp_path / run)
        assert steps == sorted(steps), run
        assert len(seconds) == 4 and len(knn) == 2, run  # 4 epochs; untrained + final measurement
        train_seconds = json.loads((tmp_path / run / "metrics.json").read_text())["train_seconds"]
        assert train_seconds == pytest.approx(sum(seconds), rel=1e-5), run
    assert _epoch_rows(tmp_path / "straight")[2] == _epoch_rows(tmp_path / "killed")[2]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.temperature=0", "temperature"),
        ("loss.temperature=-0.5", "temperature"),
        ("data.batch_size=5000", "larger than the training set"),
        ("data.subset=100 data.batch_size=200", "(100 images): lower data.batch_size or raise data.subset"),
        ("trainer=ddp_cpu trainer.devices=2 data.batch_size=1500", "data.batch_size=1500 x 2 process(es)"),
        ("data.batch_size=abc", "data.batch_size"),
        ("trainer.max_epochs=1.5", "trainer.max_epochs"),
        ("eval.every_n_epochs=0", "eval.every_n_epochs"),
        ("data.num_classes=7", "data.num_classes=7 but the training split has 10 classes: pass data.num_classes=10"),
        ("optimizer.lr=-1", "optimizer.lr"),
        ("experiment=moco_shapes pipeline.queue_size=32", "pipeline.queue_size=32"),
        ("experiment=moco_shapes loss=sup_con", "loss SupCon does not fit the MoCo pipeline"),
        ("pipeline.num_views=3", "pipeline.num_views=3 needs loss=sup_con"),
        ("experiment=siamese_shapes loss=nt_xent", "loss NTXent does not fit the Siamese pipeline"),
        ("loss.temperature=abc", "temperature must be a number > 0, got 'abc'"),
        pytest.param(
            "trainer.accelerator=gpu",
            "No supported gpu backend found! (trainer.accelerator=gpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU"),
        ),
    ],
)
def test_bad_values_are_refused_before_training(cli, tmp_path: Path, override: str, message: str) -> None:
    out = cli("contrastive-train", *override.split(), cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [s for s in out.stderr.splitlines() if s.startswith("error: ")]
    assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]
    if "data.subset" not in override:  # raising data.subset helps only where it caps the data
        assert "data.subset" not in lines[0]
    assert "Traceback" not in out.stderr
    assert not list(tmp_path.rglob("*.ckpt"))


def test_state_dict_mismatch_says_what_differs() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    assert state_dict_mismatch(module.state_dict(), module) is None
    saved = {k: v for k, v in module.state_dict().items() if not k.startswith("1.")}
    saved["0.weight"], saved["queue.keys"] = torch.zeros(4, 2), torch.zeros(5)
    assert state_dict_mismatch(saved, module) == (
        "missing 1.* (5); unexpected queue.* (1); of another shape 0.weight (4, 2) vs (3, 2)"
    )


def test_resume_from_another_experiments_checkpoint_is_refused_before_work(cli, tmp_path: Path) -> None:
    tiny = [
        "data.source.num_train=80",
        "data.source.num_test=40",
        "data.batch_size=40",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "eval.final_probe=false",
    ]
    moco = cli(
        "contrastive-train",
        "experiment=moco_shapes",
        *tiny,
        "pipeline.queue_size=80",
        "hydra.run.dir=moco",
        cwd=tmp_path,
    )
    assert moco.returncode == 0, moco.stderr[-2000:]
    ckpt = tmp_path / "moco" / "checkpoints" / "last.ckpt"
    out = cli("contrastive-train", *tiny, f"resume={ckpt}", "hydra.run.dir=simclr", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    (line,) = [s for s in out.stderr.splitlines() if s.startswith("error: ")]
    assert (
        line.startswith(
            f"error: cannot resume from {ckpt}: it was written by another model or pipeline "
            "(run 'moco_shapes'; unexpected "
        )
        and "queue.* (2)" in line
        and "resume=never" in line
    )
    assert not (tmp_path / "simclr" / "logs").exists()  # refused before the untrained measurement
    missing = cli("contrastive-train", *tiny, f"resume={tmp_path / 'nope.ckpt'}", cwd=tmp_path)
    assert missing.returncode == 2 and "; pass resume=RUN_DIR/checkpoints/last.ckpt" in missing.stderr


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(cli, tmp_path: Path) -> None:
    base = [
        "data.source.num_train=100",
        "data.source.num_test=50",
        "data.batch_size=50",
        "trainer.enable_progress_bar=false",
        "eval.final_probe=false",
        "hydra.run.dir=run",
    ]
    ok = cli("contrastive-train", *base, "trainer.max_epochs=1", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    # resumes from last.ckpt; the temperature comes from the config (a buffer not restored)
    boom = cli("contrastive-train", *base, "trainer.max_epochs=2", "loss.temperature=1e-40", cwd=tmp_path)
    assert boom.returncode == 2
    line = [s for s in boom.stderr.splitlines() if s.startswith("error: ")][0]
    assert "non-finite loss at epoch 1, global step 2: loss=nan" in line and "temperature too low" in line
    assert last.read_bytes() == before


def test_resumed_csv_log_keeps_rows_before_the_checkpoint(tmp_path: Path) -> None:
    """Rows before the checkpoint's step stay, later ones (the lost part) go, new columns join the header."""
    (tmp_path / "logs").mkdir()
    old = tmp_path / "logs" / "metrics.csv"
    old.write_text("epoch,step,train/loss,val/knn_top1\n0,0,,15.0\n0,7,3.9,\n1,15,3.5,\n2,16,,20.0\n2,20,3.1,\n")
    logger = ResumableCSVLogger(tmp_path, name="logs", version="", resume_step=16)
    logger.log_metrics({"val/knn_top1": 15.0, "epoch": 0}, step=0)  # the resumed call's untrained measure
    logger.log_metrics({"train/loss": 3.0, "train/epoch_seconds": 0.5, "epoch": 2}, step=17)
    logger.save()
    with old.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["train/loss"], r["val/knn_top1"]) for r in rows] == [
        ("0", "", "15.0"),
        ("7", "3.9", ""),
        ("15", "3.5", ""),
        ("17", "3.0", ""),
    ]
    assert rows[-1]["train/epoch_seconds"] == "0.5" and rows[0]["train/epoch_seconds"] == ""
    fresh = ResumableCSVLogger(tmp_path, name="logs", version="")  # not resuming: Lightning's behaviour
    with pytest.warns(UserWarning, match="will be deleted"):
        fresh.log_metrics({"train/loss": 9.0}, step=0)
    fresh.save()
    assert old.read_text().splitlines() == ["step,train/loss", "0,9.0"]


@pytest.mark.slow
def test_stop_inside_an_epoch_then_resume_equals_uninterrupted(cli, tmp_path: Path) -> None:
    """A run stopped mid-epoch (max_time does this; max_steps stands in, deterministically)
    keeps last.ckpt at the last whole epoch, reports the fraction trained, and the same command
    then finishes bit-for-bit as a run never stopped. Saving the cut epoch instead would make the
    resume skip its remaining steps (Lightning counts the epoch as done)."""
    # max_steps does not reshape a constant lr (the experiment sets a warm-up, hence warmup_epochs=0)
    run = [*RUN, "trainer.max_epochs=2", "scheduler=constant", "scheduler.warmup_epochs=0"]
    straight = cli("contrastive-train", *run, "hydra.run.dir=straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]
    cut = cli("contrastive-train", *run, "+trainer.max_steps=11", "hydra.run.dir=cut", cwd=tmp_path)
    assert cut.returncode == 0, cut.stderr[-2000:]
    assert "training stopped after 3 of 8 steps of epoch 1" in cut.stdout + cut.stderr
    assert _final_state(tmp_path / "cut")["global_step"] == 8
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["epoch=0000.ckpt", "last.ckpt"]
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["epochs"] == 11 / 8

    again = cli("contrastive-train", *run, "hydra.run.dir=cut", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "cut")
    assert a["global_step"] == b["global_step"] == 16
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["epochs"] == 2
    steps, seconds, _ = _epoch_rows(tmp_path / "cut")
    assert len(seconds) == 2 and steps == sorted(steps)  # the cut epoch's rows gave way to the whole epoch's


def test_sigterm_exits_143_with_what_to_do(capsys: pytest.CaptureFixture) -> None:
    """Lightning's SIGTERMException is a SystemExit without a code: a killed run exited 0, as if it had finished."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from contrastive.cli.shell import run_guarded

    def terminated(cfg: object) -> None:
        raise SIGTERMException()

    with pytest.raises(SystemExit) as exit_info:
        run_guarded(terminated)(None)  # type: ignore[arg-type]
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err == (
        "error: stopped by SIGTERM; checkpoints/last.ckpt keeps the last whole epoch: "
        "run the same command to continue\n"
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("seed=-1", "seed=-1 is invalid: it must be an integer in"),
        ("seed=4294967296", "seed=4294967296 is invalid"),
        ("scheduler.warmup_epochs=abc", "scheduler.warmup_epochs='abc' is invalid: it must be a non-negative number"),
        ("eval.knn_temperature=abc", "eval.knn_temperature='abc' is invalid: it must be a positive number"),
        (
            "trainer.max_time=1",
            "trainer.max_time=1 is invalid: it must be DD:HH:MM:SS, e.g. trainer.max_time=00:04:00:00",
        ),
        ("trainer.max_time=00:00:05", "trainer.max_time='00:00:05' is invalid: it must be DD:HH:MM:SS"),
    ],
)
def test_values_that_crashed_with_a_traceback_are_refused_by_name(config, override: str, message: str) -> None:  # type: ignore[no-untyped-def]
    from contrastive.cli import ConfigError
    from contrastive.cli.checks import check_config

    check_config(config("train", ["trainer.max_time=00:04:00:00"]))  # the documented form passes
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("*", r"\*")):
        check_config(config("train", [override]))


@pytest.mark.parametrize(
    "override, hint",
    [
        (
            "trainer.precision=abc",
            "Precision 'abc' is invalid.*trainer.\\* values are the arguments of pytorch_lightning",
        ),
        ("trainer.num_nodes=0", "`num_nodes` must be a positive integer.*arguments of pytorch_lightning.Trainer"),
    ],
)
def test_trainer_values_it_refuses_are_one_config_error(config, tmp_path: Path, override: str, hint: str) -> None:  # type: ignore[no-untyped-def]
    """They were a ValueError traceback (only TypeError and MisconfigurationException were caught)."""
    from contrastive.cli import ConfigError
    from contrastive.cli.run import make_trainer

    with pytest.raises(ConfigError, match=hint):
        make_trainer(config("train", [override]), tmp_path)


def test_resume_path_starts_the_run_and_its_own_last_checkpoint_continues_it(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Re-running a resume=PATH command after an interruption began again at PATH, redoing the epochs since."""
    import contrastive.cli.run as cli_module

    monkeypatch.setattr(cli_module, "load_checkpoint", lambda path, **kwargs: {"path": str(path)})
    run, other = tmp_path / "run", tmp_path / "other" / "checkpoints" / "epoch=0003.ckpt"
    own = run / "checkpoints" / "last.ckpt"
    assert cli_module.resume_checkpoint(str(other), run)[0] == str(other)  # a new run starts from PATH
    own.parent.mkdir(parents=True)
    own.write_bytes(b"")
    assert cli_module.resume_checkpoint(str(other), run)[0] == str(own)  # the same command again continues
    rollback = run / "checkpoints" / "epoch=0001.ckpt"
    assert cli_module.resume_checkpoint(str(rollback), run)[0] == str(rollback)  # within the run: rolls back
    assert cli_module.resume_checkpoint("auto", run)[0] == str(own)
    assert cli_module.resume_checkpoint("never", run) is None


def test_an_unforeseen_error_in_a_sweep_job_is_recorded_and_the_sweep_goes_on(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """It ended the sweep with a traceback, the later jobs not run and no summary written."""
    from types import SimpleNamespace

    from hydra.types import RunMode

    import contrastive.cli.shell as cli_module

    def broken(cfg: object) -> None:
        raise ZeroDivisionError("division by zero")

    with pytest.raises(ZeroDivisionError):  # one run: the traceback, as for any bug
        cli_module.run_guarded(broken)(None)
    job = SimpleNamespace(mode=RunMode.MULTIRUN, runtime=SimpleNamespace(output_dir=str(tmp_path)))
    monkeypatch.setattr(cli_module.HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(cli_module.HydraConfig, "get", staticmethod(lambda: job))
    assert cli_module.run_guarded(broken)(None) is None  # the sweep goes on to its next job
    assert (tmp_path / "error.txt").read_text() == (
        "ZeroDivisionError: division by zero (traceback in the job's cli.log)\n"
    )


@pytest.mark.parametrize("stop", ["sigint", "sigterm"])
def test_ctrl_c_in_fit_exits_130_with_what_to_do_and_sigterm_stays_sigterm(
    stop: str, capsys: pytest.CaptureFixture
) -> None:
    """Lightning ends Ctrl-C with sys.exit(1) after its graceful shutdown: the user read only 'Detected
    KeyboardInterrupt'. Its SIGTERMException also leaves the trainer 'interrupted', and must still say SIGTERM."""
    import pytorch_lightning as pl
    from pytorch_lightning.utilities.exceptions import SIGTERMException
    from torch import nn

    from contrastive.augment import Augment
    from contrastive.cli.shell import fit_interruptible, run_guarded
    from contrastive.data import TensorDataModule, shapes
    from contrastive.losses import NTXent
    from contrastive.pipelines import SimCLR

    class Stop(pl.Callback):
        def on_train_batch_end(self, *args: object) -> None:
            raise KeyboardInterrupt if stop == "sigint" else SIGTERMException()

    pipeline = SimCLR(
        projector=nn.Linear(192, 4),
        loss=NTXent(),
        backbone=nn.Flatten(),
        augment=Augment(size=8),
        optimizer=torch.optim.SGD,
        feature_dim=192,
        num_classes=10,
        knn_k=5,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Stop()],
    )
    data = TensorDataModule(shapes(num_train=16, num_test=4, size=8), batch_size=8, eval_batch_size=4)
    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT during its shutdown
    try:
        with pytest.raises(SystemExit) as exit_info:
            run_guarded(lambda cfg: fit_interruptible(trainer, pipeline, datamodule=data))(None)  # type: ignore[arg-type]
    finally:
        signal.signal(signal.SIGINT, handler)
    signum = signal.SIGINT if stop == "sigint" else signal.SIGTERM
    assert exit_info.value.code == 128 + signum
    name = "Ctrl-C" if stop == "sigint" else "SIGTERM"
    assert capsys.readouterr().err.endswith(
        f"error: stopped by {name}; checkpoints/last.ckpt keeps the last whole "
        "epoch: run the same command to continue\n"
    )


def test_a_read_only_place_is_one_line_naming_it(capsys: pytest.CaptureFixture) -> None:
    """Run from a read-only folder, contrastive-train ended in three chained tracebacks (Hydra's mkdir)."""
    import errno

    from contrastive.cli.shell import run_hydra

    def main() -> None:
        raise OSError(errno.EROFS, "Read-only file system", "outputs")

    with pytest.raises(SystemExit) as exit_info:
        run_hydra(main, "train")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "error: cannot write outputs: Read-only file system. contrastive-train writes its run folder under the "
        "current folder, contrastive-eval beside the checkpoint: run from a folder you can write to, or pass "
        "hydra.run.dir=/a/writable/folder\n"
    )

    def other() -> None:  # any other OSError is not a user's setup problem: its traceback stays
        raise OSError(errno.EIO, "Input/output error", "x")

    with pytest.raises(OSError, match="Input/output error"):
        run_hydra(other, "train")
