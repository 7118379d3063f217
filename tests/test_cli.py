"""The CLI as a user runs it: real configs, shrunk, on the CPU."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch

from contrastive.cli import ConfigError
from contrastive.cli.checks import check_eval_config
from contrastive.cli.shell import short_name

SHRINK = [
    "data.source.num_train=200",
    "data.source.num_test=100",
    "data.batch_size=50",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "eval.every_n_epochs=2",
    "checkpoint.every_n_epochs=1",
    "probe.epochs=5",
]


def test_experiment_simclr_cifar10_holds_the_recipe(config) -> None:
    cfg = config("train", ["experiment=simclr_cifar10"])
    assert cfg.name == "simclr_cifar10"
    assert cfg.data.source._target_ == "contrastive.data.cifar10" and cfg.data.batch_size == 512
    assert cfg.model.backbone.name == "resnet18" and cfg.model.backbone.cifar_stem is True
    assert cfg.loss._target_ == "contrastive.losses.NTXent" and cfg.loss.temperature == 0.5
    assert cfg.optimizer.lr == pytest.approx(0.24) and cfg.trainer.max_epochs == 200
    assert (cfg.aug.jitter_p, cfg.aug.gray_p, list(cfg.aug.scale)) == (0.8, 0.2, [0.08, 1.0])


def test_default_config_is_simclr_on_builtin_data(config) -> None:
    cfg = config("train")
    assert cfg.data.source._target_ == "contrastive.data.shapes"
    assert cfg.pipeline._target_ == "contrastive.pipelines.SimCLR"


def test_compile_is_off_by_default_and_one_override(config) -> None:
    from contrastive.cli.run import build_pipeline

    assert build_pipeline(config("train")).backbone._compiled_call_impl is None
    assert build_pipeline(config("train", ["compile=true"])).backbone._compiled_call_impl is not None


@pytest.mark.slow
def test_compiled_run_writes_plain_checkpoint_keys(cli, config, tmp_path: Path) -> None:
    """compile=true trains (inductor on the CPU here) and its checkpoint loads into an uncompiled pipeline."""
    from contrastive.cli.run import build_pipeline

    out = cli(
        "contrastive-train",
        "compile=true",
        *SHRINK,
        "trainer.max_epochs=1",
        "eval.every_n_epochs=1",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert not any("_orig_mod" in k for k in state)
    build_pipeline(config("train")).load_state_dict(state, strict=True)


def test_train_writes_run_dir_and_resumes(cli, tmp_path: Path) -> None:
    # data.download=true (the README's first CIFAR command) fetches nothing for shapes; a later call without it
    # must find the same run
    out = cli("contrastive-train", *SHRINK, "trainer.max_time=00:01:00:00", "+data.download=true", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "litlogger" not in out.stdout + out.stderr and "LeafSpec" not in out.stderr  # Lightning's notices
    run = tmp_path / "outputs" / "simclr_shapes"
    (run_dir,) = [p for p in run.iterdir() if p.is_dir()]
    # a time limit is not a new run: the folder is named by the other overrides alone
    named = sorted(o for o in SHRINK if not o.startswith("trainer.enable_progress_bar"))  # also left out
    assert run_dir.name == short_name(",".join(named))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("knn_top1", "knn_top1_untrained", "linear_top1", "linear_train_top1", "linear_top1_untrained"):
        assert 0.0 <= metrics[key] <= 100.0, key
    assert metrics["epochs"] == 2
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "logs" / "metrics.csv").read_text().count("val/knn_top1") == 1
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2 * 4 and ckpt["contrastive_config"]["name"] == "simclr_shapes"
    # The same command with more epochs continues from last.ckpt instead of starting over.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "epoch=0000.ckpt",
        "epoch=0001.ckpt",
        "last.ckpt",
    ]
    again = cli(
        "contrastive-train",
        *[o.replace("max_epochs=2", "max_epochs=3") for o in SHRINK],
        f"hydra.run.dir='{run_dir}'",
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Restoring states from the checkpoint" in again.stdout + again.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 3
    # A periodic checkpoint of this run, its path typed as the CLI printed it: '=' and ',' need no quoting.
    ev = cli(
        "contrastive-eval",
        f"checkpoint={run_dir}/checkpoints/epoch=0000.ckpt",
        "linear_probe=false",
        "plots=false",
        "export=false",
        cwd=tmp_path,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert 0 <= json.loads((run_dir / "eval_epoch=0000" / "metrics.json").read_text())["knn_top1"] <= 100


def test_run_dir_name_is_one_folder() -> None:
    assert short_name("data.root=/data/cifar,loss.temperature=0.2") == "data.root=%2Fdata%2Fcifar,loss.temperature=0.2"
    assert short_name("data.root=a%2Fb") == "data.root=a%252Fb"  # distinct from data.root=a/b


def test_eval_on_checkpoint(cli, tmp_path: Path) -> None:
    out = cli("contrastive-train", *SHRINK, "trainer.max_epochs=1", "hydra.run.dir=run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    ev = cli("contrastive-eval", f"checkpoint={tmp_path / 'run/checkpoints/last.ckpt'}", "probe.epochs=5", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "eval_last" / "metrics.json").read_text())
    assert set(metrics) >= {"knn_top1", "linear_top1", "linear_train_top1"}
    for png in ("training_curves", "embedding_tsne", "similarity_histograms", "confusion_matrix"):
        assert (tmp_path / "run" / "eval_last" / f"{png}.png").stat().st_size > 5000, png
    exported = torch.load(tmp_path / "run" / "eval_last" / "backbone_torchvision.pt")
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert torch.equal(exported["0.weight"], ckpt["state_dict"]["backbone.0.weight"])
    train_metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # the same checkpoint, features and kNN rule: the same figure as at the end of training
    assert metrics["knn_top1"] == pytest.approx(train_metrics["knn_top1"], abs=1e-6)
    # Again without the probe and export: the folder then holds this evaluation only (no stale confusion matrix).
    # As a sweep: -m writes beside each checkpoint too, not into ./multirun/<date>/<time>/N. The paths are
    # typed as training prints them: run folders hold '=' and ',', periodic checkpoints are epoch=NNNN.ckpt.
    (tmp_path / "a=1,b=2").symlink_to(tmp_path / "run")
    shutil.copy(tmp_path / "run/checkpoints/last.ckpt", tmp_path / "run/checkpoints/epoch=0000.ckpt")
    ev = cli(
        "contrastive-eval",
        "-m",
        f"checkpoint={tmp_path / 'a=1,b=2/checkpoints/last.ckpt'},{tmp_path / 'run/checkpoints/epoch=0000.ckpt'}",
        "linear_probe=false",
        "export=false",
        cwd=tmp_path,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    for name in ("eval_last", "eval_epoch=0000"):
        assert sorted(p.name for p in (tmp_path / "run" / name).iterdir() if p.name != ".hydra") == [
            "cli.log",
            "embedding_tsne.png",
            "metrics.json",
            "similarity_histograms.png",
            "training_curves.png",
        ]
        assert "linear_top1" not in json.loads((tmp_path / "run" / name / "metrics.json").read_text())


def test_multirun_sweep_writes_summary(cli, tmp_path: Path) -> None:
    out = cli(
        "contrastive-train",
        "-m",
        "loss.temperature=0.2,0.5",
        *SHRINK,
        "trainer.max_epochs=1",
        "eval.final_probe=false",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = tmp_path / "multirun" / "simclr_shapes"
    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(float(r["loss.temperature"]) for r in rows) == [0.2, 0.5]
    knn = [json.loads(p.read_text())["knn_top1"] for p in sweep.glob("*/metrics.json")]
    assert sorted(float(r["knn_top1"]) for r in rows) == pytest.approx(sorted(knn))
    assert (sweep / "summary.md").is_file() and (sweep / "summary.png").stat().st_size > 5000
    # A second sweep in the same folder: its summary holds its own jobs only, and a job that fails
    # (lr 1e30: a non-finite loss) does not stop the other; the command reports it and exits with 2.
    out = cli(
        "contrastive-train",
        "-m",
        "optimizer.lr=1e30,0.3",
        *SHRINK,
        "trainer.max_epochs=1",
        "eval.final_probe=false",
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    with open(sweep / "summary.csv", newline="") as f:
        rows = {float(r["optimizer.lr"]): r for r in csv.DictReader(f)}
    assert sorted(rows) == [0.3, 1e30] and rows[1e30]["knn_top1"] == ""
    assert 0 <= float(rows[0.3]["knn_top1"]) <= 100
    (failed,) = sweep.glob("*/error.txt")
    assert "optimizer.lr=1e+30" in (failed.parent / ".hydra" / "overrides.yaml").read_text()
    assert "non-finite loss" in failed.read_text()
    assert "job optimizer.lr=1e+30 " in out.stdout + out.stderr and "error: 1 of 2 jobs failed" in out.stderr


def test_missing_cifar_is_one_clear_line(cli, tmp_path: Path) -> None:
    out = cli("contrastive-train", "data=cifar10", f"data.root={tmp_path / 'nope'}", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    (line,) = [s for s in out.stderr.splitlines() if s.startswith("error: ")]
    assert line.startswith(f"error: CIFAR10 not found: expected the folder {tmp_path / 'nope'}")
    assert "data.root=" in line and "data.download=true" in line and line.endswith("(while building data.source)")
    assert "Error in call to target" not in line


def test_invalid_constructor_argument_names_the_key(cli, tmp_path: Path) -> None:
    out = cli(
        "contrastive-train",
        "experiment=siamese_shapes",
        "regularizer=softmax_ce",
        "regularizer.weight=-1",
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    (line,) = [s for s in out.stderr.splitlines() if s.startswith("error: ")]
    assert line == "error: weight must be >= 0, got -1. (while building pipeline)"


def test_misspelt_key_is_rejected(cli, tmp_path: Path) -> None:
    """One line with the key meant (Hydra printed six lines and suggested +trainer.max_epoch=1, which then
    failed in the Trainer with a traceback)."""
    out = cli("contrastive-train", "trainer.max_epoch=1", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (
        "error: unknown config key trainer.max_epoch (did you mean trainer.max_epochs?): "
        "`--cfg job` lists the keys with their values"
    )
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("*.ckpt"))


def test_hydra_hint_and_missing_option_are_one_line(config, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Hydra's hint for the misspelt key, +trainer.max_epoch=1, failed in the Trainer with a traceback."""
    from hydra.errors import MissingConfigException

    from contrastive.cli.run import make_trainer
    from contrastive.cli.shell import run_hydra

    with pytest.raises(ConfigError, match="unexpected keyword argument 'max_epoch': trainer.* keys are the arguments"):
        make_trainer(config("train", ["+trainer.max_epoch=1"]), tmp_path)

    def missing() -> None:
        raise MissingConfigException(
            "In 'train': Could not find 'experiment/simclr_cifar'\n\nAvailable options in "
            "'experiment':\n\tsimclr_cifar10\nConfig search path:\n\tprovider=hydra"
        )

    with pytest.raises(SystemExit) as exit_:
        run_hydra(missing, "train")
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "error: In 'train': Could not find 'experiment/simclr_cifar'  Available options "
        "in 'experiment': simclr_cifar10\n"
    )


def test_the_key_suggested_is_one_of_the_chosen_experiment(monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """Suggestions came from the default experiment: pipeline.bn_split under moco_shapes got pipeline.knn_k."""
    import sys

    from hydra.errors import ConfigCompositionException

    from contrastive.cli.shell import run_hydra

    def misspelt() -> None:
        raise ConfigCompositionException("Could not override 'pipeline.bn_split'.")

    monkeypatch.setattr(sys, "argv", ["contrastive-train", "experiment=moco_shapes", "pipeline.bn_split=2"])
    with pytest.raises(SystemExit):
        run_hydra(misspelt, "train")
    assert "unknown config key pipeline.bn_split (did you mean pipeline.bn_splits?)" in capsys.readouterr().err


def test_corrupt_checkpoint_is_refused(cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    out = cli("contrastive-eval", f"checkpoint={bad}", cwd=tmp_path)
    assert out.returncode == 2 and "truncated or not a PyTorch file" in out.stderr
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    out = cli("contrastive-eval", f"checkpoint={foreign}", cwd=tmp_path)
    assert out.returncode == 2 and "not a contrastive training checkpoint" in out.stderr
    assert not list(tmp_path.glob("eval_*"))  # refused before Hydra makes the output folder


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("device=gpu", "device='gpu' is invalid: it must be auto, cpu or cuda"),
        ("batch_size=0", "batch_size=0 is invalid: it must be a positive integer"),
        ("knn_k=abc", "knn_k='abc' is invalid: it must be a positive integer"),
        ("probe.epochs=0", "probe.epochs=0 is invalid: it must be a positive integer"),
        ("knn_temperature=-1", "knn_temperature=-1 is invalid: it must be a positive number"),
    ],
)
def test_bad_eval_values_are_refused(config, override: str, message: str) -> None:
    cfg = config("eval", ["checkpoint=x.ckpt", override])
    with pytest.raises(ConfigError) as error:
        check_eval_config(cfg)
    assert str(error.value) == message
    check_eval_config(config("eval", ["checkpoint=x.ckpt"]))  # the shipped defaults pass


def test_bad_eval_value_is_one_line(cli, tmp_path: Path) -> None:
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "contrastive_config": {}}, ckpt)  # passes the file check; never loaded
    out = cli("contrastive-eval", f"checkpoint={ckpt}", "batch_size=0", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    (line,) = [s for s in out.stderr.splitlines() if s.startswith("error: ")]
    assert line == "error: batch_size=0 is invalid: it must be a positive integer"


def test_corrupt_last_checkpoint_stops_the_resume_with_one_line(cli, tmp_path: Path) -> None:
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    out = cli("contrastive-train", *SHRINK, "hydra.run.dir=run", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    (line,) = [s for s in out.stderr.splitlines() if s.startswith("error: ")]
    assert "cannot resume from" in line and "last.ckpt" in line and "resume=never" in line


def test_missing_checkpoint_leaves_no_folder_behind(cli, tmp_path: Path) -> None:
    missing = tmp_path / "typo_run" / "checkpoints" / "last.ckpt"
    out = cli("contrastive-eval", f"checkpoint={missing}", cwd=tmp_path)
    assert out.returncode == 2 and f"checkpoint not found: {missing}" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "typo_run").exists()


@pytest.mark.slow
def test_simclr_cifar10_few_steps_then_eval(cli, cifar10_root: Path, tmp_path: Path) -> None:
    """The real experiment config on a CIFAR-10 subset, then contrastive-eval on its checkpoint."""
    out = cli(
        "contrastive-train",
        "experiment=simclr_cifar10",
        f"data.root={cifar10_root}",
        "data.subset=256",
        "data.test_subset=128",
        "data.batch_size=64",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "probe.epochs=5",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # the rebuilt copy's warning, as one log line on the console and in the run's log
    assert "[WARNING] - " in out.stdout and "checksums differ from the official archive" in out.stdout
    assert "checksums differ" in (tmp_path / "run" / "cli.log").read_text()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and 0 <= metrics["knn_top1"] <= 100
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ev = cli("contrastive-eval", f"checkpoint={ckpt}", "probe.epochs=5", f"data_root={cifar10_root}", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    moved = cli("contrastive-eval", f"checkpoint={ckpt}", f"data_root={tmp_path / 'moved'}", cwd=tmp_path)
    (line,) = [s for s in moved.stderr.splitlines() if s.startswith("error: ")]
    assert moved.returncode == 2 and line.startswith("error: CIFAR10 not found")
    # eval's own key, and no download advice (contrastive-eval has neither data.root nor data.download)
    assert line.endswith(
        "Point data_root at the folder that contains cifar-10-batches-py/ (e.g. data_root=/path/to/data)."
    )
    assert 0 <= json.loads((tmp_path / "run" / "eval_last" / "metrics.json").read_text())["linear_top1"] <= 100
    # the exported backbone + probe loads into plain torchvision (CIFAR stem) and classifies like the probe
    import torchvision

    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
    net.load_state_dict(torch.load(tmp_path / "run" / "eval_last" / "backbone_torchvision.pt"), strict=True)


@pytest.mark.slow
def test_simclr_cifar10_probe_beats_untrained_network(cli, cifar10_root: Path, tmp_path: Path) -> None:
    """CPU subset of the CIFAR-10 copy: 4,000 train / 1,000 test images, the small CNN, 8 epochs
    (about 50 s). kNN of the trained checkpoint, run by contrastive-eval, beats the untrained network's
    by 5 points, its linear probe beats the untrained probe (seeds 0-2: kNN +7.1 to +9.4, probe
    +0.6 to +2.7; docs/benchmarks.md), and both equal the run's own final figures."""
    out = cli(
        "contrastive-train",
        "experiment=simclr_cifar10",
        "model=convnet",
        f"data.root={cifar10_root}",
        "data.subset=4000",
        "data.test_subset=1000",
        "data.batch_size=128",
        "trainer.max_epochs=8",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "eval.every_n_epochs=4",
        "scheduler.warmup_epochs=1",
        "optimizer.lr=0.3",
        "loss.temperature=0.2",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    trained = json.loads((tmp_path / "run" / "metrics.json").read_text())
    ev = cli("contrastive-eval", f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    evaluated = json.loads((tmp_path / "run" / "eval_last" / "metrics.json").read_text())
    assert evaluated["linear_top1"] > trained["linear_top1_untrained"], (evaluated, trained)
    assert evaluated["knn_top1"] >= trained["knn_top1_untrained"] + 5, (evaluated, trained)
    # the same features and probe recipe as the run's own final kNN and probe
    assert evaluated["knn_top1"] == pytest.approx(trained["knn_top1"], abs=0.5)
    assert evaluated["linear_top1"] == pytest.approx(trained["linear_top1"], abs=0.5)


def test_many_overrides_give_a_short_run_dir(cli, tmp_path: Path) -> None:
    many = [f"data.source.num_train={200 + i}" for i in range(1)] + [
        "data.source.num_test=100",
        "data.batch_size=50",
        "trainer.max_epochs=0",
        "trainer.enable_progress_bar=false",
        "eval.final_probe=false",
        "eval.knn_k=200",
        "eval.knn_temperature=0.1",
        "checkpoint.every_n_epochs=7",
        "optimizer.momentum=0.9",
        "optimizer.weight_decay=0.0005",
        "scheduler.warmup_epochs=10",
        "loss.temperature=0.5",
        "aug.flip_p=0.5",
        "aug.gray_p=0.2",
        "aug.jitter_p=0.8",
    ]
    out = cli("contrastive-train", *many, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    (run,) = (tmp_path / "outputs" / "simclr_shapes").iterdir()
    assert len(run.name) <= 120 and (run / "metrics.json").is_file()


@pytest.mark.slow
def test_builtin_default_beats_untrained_by_10_points(cli, tmp_path: Path) -> None:
    """`contrastive-train` with no arguments, exactly as the README's first command runs it."""
    out = cli("contrastive-train", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "outputs" / "simclr_shapes" / "metrics.json").read_text())
    assert metrics["epochs"] == 25
    assert metrics["knn_top1"] >= metrics["knn_top1_untrained"] + 10, metrics
    assert metrics["linear_top1"] > metrics["linear_top1_untrained"], metrics


# --------------------------------------------------------------------------- eval edge cases (in process)


def _features(n_train: int = 30, n_test: int = 12, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        split: (torch.randn(n, 8, generator=g), torch.arange(n) % 3)
        for split, n in (("train", n_train), ("test", n_test))
    }


def test_nan_features_are_refused_not_scored() -> None:
    """One NaN row made kNN predict class 0 everywhere and the probe score chance, silently."""
    from contrastive.cli.run import final_metrics
    from contrastive.evaluation import knn_top1, linear_probe, retrieval_metrics
    from contrastive.io import CheckpointError

    features = _features()
    features["train"][0][4, 2] = float("nan")
    with pytest.raises(
        CheckpointError,
        match="features of the train images hold NaN/Inf in 1 of 30 rows, so no "
        r"metric .*Evaluate an earlier checkpoint",
    ):
        final_metrics(features, 3, True, 5, 0.1, None)
    (xtr, ytr), (xte, yte) = features["train"], features["test"]
    for call in (
        lambda: knn_top1(xtr, ytr, xte, yte, 3, 5),
        lambda: retrieval_metrics(xtr, ytr),
        lambda: linear_probe(xtr, ytr, xte, yte, num_classes=3, epochs=1),
    ):
        with pytest.raises(ValueError, match="NaN/Inf in 1 of 30 rows"):
            call()


def test_knn_k_0_skips_the_knn_classifier_but_not_the_probe() -> None:
    from contrastive.evaluation import feature_metrics, knn_top1, linear_probe

    features = _features()
    probe = partial(linear_probe, epochs=2)
    out = feature_metrics(features, 3, True, 0, 0.1, probe)
    assert "knn_top1" not in out and {"linear_top1", "map_at_r"} <= set(out)
    with_knn = feature_metrics(features, 3, True, 5, 0.1, probe)
    assert with_knn["knn_top1"] == knn_top1(*features["train"], *features["test"], 3, 5, 0.1)
    assert {k: v for k, v in with_knn.items() if k != "knn_top1"} == out


def test_class_disjoint_splits_need_the_map_at_r_monitor(config) -> None:
    from contrastive.cli.checks import check_config

    check_config(config("train", ["experiment=siamese_cifar10_disjoint"]))  # sets eval.knn_k=0
    for overrides in (
        ["experiment=siamese_cifar10_disjoint", "eval.knn_k=200"],
        ["experiment=siamese_shapes", "data.train_classes=[0,1,2,3,4]", "data.num_classes=5"],
    ):
        with pytest.raises(ConfigError, match="class-disjoint retrieval.*pass eval.knn_k=0"):
            check_config(config("train", overrides))


def test_a_regulariser_weight_without_its_head_is_refused(config, run_checks) -> None:
    from contrastive.data import shapes

    splits = shapes(num_train=200, num_test=8, size=32)
    run_checks(
        config("train", ["experiment=siamese_shapes", "regularizer=softmax_ce", "regularizer.weight=0.5"]),
        splits,
        world=1,
    )
    run_checks(config("train", ["experiment=siamese_shapes"]), splits, world=1)  # regularizer=none: weight 0
    with pytest.raises(ConfigError, match=r"regularizer.weight=0.5 has no effect.*add regularizer=softmax_ce"):
        run_checks(config("train", ["experiment=siamese_shapes", "regularizer.weight=0.5"]), splits, world=1)


def test_supcon_export_carries_the_probe_as_fc(config) -> None:
    """SupCon (pipeline.eval_features=backbone) probes the backbone: its export gets ``fc`` too."""
    from contrastive.cli.run import build_pipeline
    from contrastive.models import export_backbone

    classifier = torch.nn.Linear(512, 10)
    for eval_features, has_fc in (("backbone", True), ("embedding", False)):
        pipeline = build_pipeline(
            config("train", ["experiment=supcon_cifar10", f"pipeline.eval_features={eval_features}"])
        )
        state = export_backbone(pipeline, classifier)
        assert ("fc.weight" in state) is has_fc, eval_features
    assert torch.equal(
        state_fc := export_backbone(build_pipeline(config("train", ["experiment=supcon_cifar10"])), classifier)[
            "fc.weight"
        ],
        classifier.weight.detach(),
    )
    assert state_fc.shape == (10, 512)


def test_tiny_or_collapsed_test_sets_still_get_their_plots(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """2 test images: t-SNE skipped with a warning; identical features: drawn by PCA (t-SNE crashed)."""
    from contrastive.cli.evaluate import write_plots
    from contrastive.data import ImageTensors, Splits
    from contrastive.evaluation import plot_embedding_2d

    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    splits = Splits(ImageTensors(images, torch.tensor([0, 1]), 2), ImageTensors(images, torch.tensor([0, 1]), 2))
    features = {"train": (torch.randn(2, 4), torch.tensor([0, 1])), "test": (torch.randn(2, 4), torch.tensor([0, 1]))}
    with caplog.at_level("WARNING"):
        write_plots(tmp_path, features, {}, splits, run_dir=tmp_path)
    assert "t-SNE needs at least 3 test images, there are 2" in caplog.text
    assert (tmp_path / "similarity_histograms.png").is_file() and not (tmp_path / "embedding_tsne.png").exists()
    out = plot_embedding_2d(torch.ones(20, 6), torch.arange(20) % 2, tmp_path / "collapsed.png")
    assert out.stat().st_size > 0


def test_eval_without_a_checkpoint_says_what_to_pass(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import sys

    from contrastive.cli import evaluate

    for argv in ([], ["checkpoint=null"]):
        monkeypatch.setattr(sys, "argv", ["contrastive-eval", *argv])
        with pytest.raises(SystemExit) as exit_info:
            evaluate()
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == (
            "error: contrastive-eval needs the checkpoint to evaluate: pass "
            "checkpoint=RUN_DIR/checkpoints/last.ckpt (printed at the end of "
            "contrastive-train)\n"
        )


def test_eval_on_data_with_another_class_count_is_refused(config) -> None:
    """data_root at another data set was scored silently (100% on a 4-class set for a 3-class run)."""
    from contrastive.cli.checks import check_eval_data
    from contrastive.data import Splits, shapes

    run_cfg, data = config("train"), shapes(num_train=40, num_test=20, size=8)
    check_eval_data(run_cfg, data, None)  # 10 classes, as trained
    four = Splits(data.train.select_classes([0, 1, 2, 3]), data.test.select_classes([0, 1, 2, 3]))
    with pytest.raises(
        ConfigError,
        match="the run trained on 10 classes, but the data at data_root=/other has 4: "
        "point data_root at the data set the run trained on",
    ):
        check_eval_data(run_cfg, four, "/other")


def test_an_l2_probe_exports_no_fc(caplog: pytest.LogCaptureFixture) -> None:
    """Its classifier takes unit-length features: as a ResNet's fc on the raw features it predicts otherwise."""
    from contrastive.evaluation.linear import exportable_classifier

    fc = torch.nn.Linear(4, 3)
    assert exportable_classifier({"normalize": "standardize", "classifier": fc}) is fc
    assert exportable_classifier({"normalize": "none", "classifier": fc}) is fc
    assert exportable_classifier({}) is None  # no probe
    with caplog.at_level("WARNING", logger="contrastive"):
        assert exportable_classifier({"normalize": "l2", "classifier": fc}) is None
    assert "holds no fc: the probe was trained on L2-normalised features" in caplog.text


def test_a_checkpoint_path_with_a_comma_is_one_path_unless_m(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import sys

    from contrastive.cli import evaluate
    from contrastive.cli.shell import quote_paths

    assert quote_paths(["checkpoint=/r/a,b/last.ckpt"], ("checkpoint",)) == ["checkpoint='/r/a,b/last.ckpt'"]
    assert quote_paths(["-m", "checkpoint=/r/a.ckpt,/r/b.ckpt"], ("checkpoint",)) == [
        "-m",
        "checkpoint=/r/a.ckpt,/r/b.ckpt",
    ]  # a sweep where asked for (paths that do not exist: as typed)
    monkeypatch.setattr(sys, "argv", ["contrastive-eval", "checkpoint=/nowhere/a.ckpt,/nowhere/b.ckpt"])
    with pytest.raises(SystemExit):
        evaluate()
    err = capsys.readouterr().err
    assert "checkpoint not found: /nowhere/a.ckpt,/nowhere/b.ckpt" in err  # not 'needs the checkpoint'
    assert err.rstrip().endswith("To evaluate several checkpoints, add -m: contrastive-eval -m checkpoint=A,B")
    monkeypatch.setattr(sys, "argv", ["contrastive-eval", "-m", "checkpoint=/nowhere/a.ckpt,/nowhere/b.ckpt"])
    with pytest.raises(SystemExit):
        evaluate()
    assert "checkpoint not found: /nowhere/a.ckpt;" in capsys.readouterr().err  # each checked before the sweep


def test_the_tuning_keys_the_docs_name_are_plain_overrides(config) -> None:
    """docs/benchmarks.md names loss.chunk_size and aug.cuda_graph: no ``+`` needed, and they arrive."""
    from hydra.utils import instantiate

    for loss in ("nt_xent", "info_nce", "sup_con"):
        assert instantiate(config("train", [f"loss={loss}", "loss.chunk_size=64"]).loss).chunk_size == 64, loss
    assert instantiate(config("train", ["aug.cuda_graph=false"]).aug).cuda_graph is False
    assert instantiate(config("train").aug).cuda_graph is True
    probe = instantiate(
        config(
            "eval",
            [
                "checkpoint=x.ckpt",
                "probe.lr=0.5",
                "probe.normalize=l2",
                "probe.weight_decay=0",
                "probe.optimizer=adamw",
            ],
        ).probe
    )
    assert probe.keywords == dict(
        epochs=100, lr=0.5, weight_decay=0, batch_size=512, optimizer="adamw", normalize="l2", seed=0
    )  # every linear_probe setting, without a '+'


def test_settings_the_network_cannot_run_are_refused_before_training(config, run_checks) -> None:
    """A wrong model.feature_dim failed at the first step (after the untrained measurement); MoCo's
    BatchNorm groups of one image, or a last batch they cannot split, failed mid-epoch."""
    from contrastive.cli.checks import warmup_warning
    from contrastive.cli.run import build_pipeline
    from contrastive.data import shapes

    with pytest.raises(
        ConfigError,
        match=r"model.feature_dim=128, but the backbone outputs 256 features per image: "
        r"pass model.feature_dim=256",
    ):
        build_pipeline(config("train", ["model.backbone.width=64"]))
    build_pipeline(config("train", ["model.backbone.width=64", "model.feature_dim=256"]))
    splits = shapes(num_train=70, num_test=8, size=32)
    moco = ["experiment=moco_shapes", "data.batch_size=16", "pipeline.bn_splits=4"]
    run_checks(config("train", moco), splits, world=1)  # drop_last: 70 = 4 x 16 + 6 dropped
    with pytest.raises(
        ConfigError,
        match=r"last batch of 6 image\(s\), which the network cannot split into "
        r"pipeline.bn_splits=4 BatchNorm groups",
    ):
        run_checks(config("train", [*moco, "sampler.drop_last=false"]), splits, world=1)
    with pytest.raises(ConfigError, match="leaves one image per BatchNorm group"):
        run_checks(
            config("train", ["experiment=moco_shapes", "data.batch_size=4", "pipeline.bn_splits=4"]), splits, world=1
        )
    with pytest.raises(ConfigError, match=r"last batch of 1 image\(s\), which the network cannot normalise"):
        run_checks(config("train", ["sampler.drop_last=false", "data.batch_size=23"]), splits, world=1)
    run_checks(config("train", ["sampler.drop_last=false", "data.batch_size=34"]), splits, world=1)  # 2 left

    quick = ["experiment=simclr_cifar10", "data.subset=5000", "trainer.max_epochs=5"]
    assert "scheduler.warmup_epochs=10 >= trainer.max_epochs=5: the whole run is warm-up" in warmup_warning(
        config("train", quick)
    )
    assert warmup_warning(config("train", [*quick, "scheduler.warmup_epochs=1"])) is None  # README's quick run
    assert warmup_warning(config("train", [])) is None
    # the suggested value silences the warning, also in a one-epoch run (the old suggestion, 1, did not)
    for epochs, warmup, expected in ((1, 1, "0.1"), (5, 10, "0.5")):
        run = [*quick[:2], f"trainer.max_epochs={epochs}"]
        line = warmup_warning(config("train", [*run, f"scheduler.warmup_epochs={warmup}"]))
        suggested = line.split("e.g. ")[1].split()[0]
        assert suggested == f"scheduler.warmup_epochs={expected}"
        assert warmup_warning(config("train", [*run, suggested])) is None


def test_apple_mps_is_not_picked_by_auto_and_refused_by_name(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """MPS has no float64 (the fixed temperature buffer, kNN votes): Lightning's auto picked it on a Mac."""
    from contrastive.cli.run import resolve_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_accelerator("auto") == "cpu" and resolve_accelerator("cpu") == "cpu"
    with pytest.raises(
        ConfigError, match="trainer.accelerator=mps: Apple's GPU backend has no float64.*accelerator=cpu"
    ):
        resolve_accelerator("mps")
    with pytest.raises(ConfigError, match="trainer.accelerator=gpu: Apple's GPU backend"):
        resolve_accelerator("gpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_accelerator("auto") == "auto"  # Lightning resolves CUDA or the CPU


def test_a_folder_given_as_checkpoint_names_the_file_inside(tmp_path: Path) -> None:
    """A run folder passed to contrastive-eval was 'checkpoint not found', though it exists."""
    from contrastive.io import CheckpointError, check_checkpoint_file

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(
        CheckpointError,
        match=rf"{tmp_path / 'run'} is a folder, not a checkpoint: pass "
        rf"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}",
    ):
        check_checkpoint_file(tmp_path / "run")


def test_a_failed_download_says_what_to_do(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import urllib.error

    import torchvision

    from contrastive import data
    from contrastive.data import DataError

    def offline(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    with pytest.raises(
        DataError,
        match=r"could not download CIFAR10 into .*Name or service not known.*check the "
        r"network, or put cifar-10-batches-py/ under data.root yourself",
    ):
        data.cifar10(str(tmp_path), download=True)


# Config values that deliberately differ from the Python default of their target, and why.
DELIBERATE = {
    "gather": "on in the configs, so a DDP run scores the global batch; off in Python (as lightly), where one "
    "process makes it the identity anyway",
    "optimizer/lars.yaml:lr": "SimCLR's 0.3 x batch / 256 at the configs' batch of 512",
    "scheduler/constant.yaml:warmup_epochs": "the constant schedule is warmup_cosine with no warm-up ...",
    "scheduler/constant.yaml:final_lr_fraction": "... and no decay",
    "loss/cosface.yaml:margin": "the configs use the Reality Check's tuned range (0.34-0.62)",
    "loss/cosface.yaml:scale": "the Reality Check's tuned range (88-161)",
    "loss/arcface.yaml:margin": "the configs use the Reality Check's tuned range (18.6-23.2 degrees)",
    "loss/arcface.yaml:scale": "the Reality Check's tuned range (50-220)",
    "regularizer/softmax_ce.yaml:temperature": "the Reality Check's tuned normalised-softmax T (0.06-0.11)",
    "pipeline/siamese.yaml:memory_start": "XBM's 1k warm-up steps in the configs; 0 (memory from the start) in Python",
    "loss/dino.yaml:warmup_teacher_temperature": "the configs spell out a warm-up start (equal to T_t: none); "
    "None in Python means the same",
    "model/resnet18_dino.yaml:out_dim": "solo-learn's CIFAR head, 4096 prototypes; the authors' 65536 in Python",
    "model/resnet18_dino.yaml:batchnorm": "solo-learn's CIFAR head has BN; the authors' ViT head (Python) has none",
    "experiment/dino_shapes.yaml:hidden_dim": "the CPU demo's head, sized to the small CNN",
    "experiment/dino_shapes.yaml:bottleneck_dim": "the CPU demo's head, sized to the small CNN",
    "experiment/dino_shapes.yaml:out_dim": "the CPU demo's head, sized to the small CNN",
    "experiment/dino_shapes.yaml:batchnorm": "the CPU demo's head, as the CIFAR recipe's, has BN",
}


def test_config_literals_are_the_python_defaults() -> None:
    """A value a config spells out for one of our classes or functions is its Python default, so the
    Python API and the CLI give the same recipe (torch's own classes, e.g. SGD, are not ours: skipped)."""
    import inspect

    import yaml
    from hydra.utils import _locate

    import contrastive
    from contrastive.evaluation import knn_predict, knn_top1
    from contrastive.pipelines import Pipeline

    root = Path(contrastive.__file__).parent / "configs"
    checked, differ = 0, set()

    def walk(node: object, file: str) -> None:
        nonlocal checked
        if not isinstance(node, dict):
            return
        target = node.get("_target_", "")
        if target.startswith("contrastive."):
            params = inspect.signature(_locate(target)).parameters
            for key, value in node.items():
                default = params[key].default if key in params else inspect.Parameter.empty
                if key.startswith("_") or "${" in str(value) or default is inspect.Parameter.empty:
                    continue
                checked += 1
                if (list(default) if isinstance(default, tuple) else default) != value:
                    differ.add(key if key in DELIBERATE else f"{file}:{key}")
        for value in node.values():
            walk(value, file)

    for f in sorted(root.rglob("*.yaml")):
        walk(yaml.safe_load(f.read_text()), f.relative_to(root).as_posix())
    assert checked > 60
    assert differ == set(DELIBERATE), f"config values that are not the Python default: {differ - set(DELIBERATE)}"
    for name in ("train.yaml", "eval.yaml"):
        cfg = yaml.safe_load((root / name).read_text())
        ev = cfg.get("eval", cfg)
        for fn, k, t in (
            (knn_predict, "k", "temperature"),
            (knn_top1, "k", "temperature"),
            (Pipeline, "knn_k", "knn_temperature"),
        ):
            params = inspect.signature(fn).parameters
            assert (params[k].default, params[t].default) == (ev["knn_k"], ev["knn_temperature"]) == (200, 0.1)


def test_m_splits_commas_into_the_existing_paths_they_join_into(tmp_path: Path) -> None:
    """Under -m, 'A,B' names the files that exist: a run folder's own commas stay inside its path."""
    from contrastive.cli.shell import quote_paths

    a = tmp_path / "x=1,y=2" / "checkpoints" / "last.ckpt"
    b = tmp_path / "x=1" / "checkpoints" / "epoch=0003.ckpt"  # a prefix of a's folder name, also a folder
    for p in (a, b):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"")
    assert quote_paths(["-m", f"checkpoint={a},{b}", "data_root=/d"], ("checkpoint",)) == [
        "-m",
        f"checkpoint='{a}','{b}'",
        "data_root=/d",
    ]
    assert quote_paths(["-m", f"checkpoint={b}"], ("checkpoint",)) == ["-m", f"checkpoint='{b}'"]
    # a piece that belongs to no existing path: the value goes to Hydra as before (and fails as 'not found')
    assert quote_paths(["-m", f"checkpoint={a},/nowhere.ckpt"], ("checkpoint",)) == [
        "-m",
        f"checkpoint='{a},/nowhere.ckpt'",
    ]


def test_starting_over_or_rolling_back_sets_the_abandoned_checkpoints_aside(cli, tmp_path: Path) -> None:
    """resume=never and a rollback left the old epoch=NNNN.ckpt under the names the README tells users to
    evaluate (the new run's came out as epoch=NNNN-v1.ckpt), and last.ckpt for the next plain call."""
    run = tmp_path / "run" / "checkpoints"
    args = [
        *SHRINK,
        "trainer.max_epochs=2",
        "checkpoint.every_n_epochs=1",
        "eval.final_probe=false",
        "hydra.run.dir=run",
    ]

    def train(*extra: str) -> dict[str, str]:
        out = cli("contrastive-train", *args, *extra, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in run.glob("*.ckpt")}

    first = train()
    assert sorted(first) == ["epoch=0000.ckpt", "epoch=0001.ckpt", "last.ckpt"]
    again = train("resume=never", "seed=1")  # another seed: other weights, so a stale file would show
    assert sorted(again) == sorted(first) and all(again[n] != first[n] for n in first)
    (aside,) = run.glob("set_aside_*")
    assert {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in aside.iterdir()} == first  # nothing lost
    rolled = train(f"resume={run / 'epoch=0000.ckpt'}", "seed=1", "trainer.max_epochs=2")
    assert sorted(rolled) == sorted(first) and rolled["epoch=0000.ckpt"] == again["epoch=0000.ckpt"]
    (second,) = set(run.glob("set_aside_*")) - {aside}
    assert sorted(p.name for p in second.iterdir()) == ["epoch=0001.ckpt", "last.ckpt"]
    assert hashlib.md5((second / "epoch=0001.ckpt").read_bytes()).hexdigest() == again["epoch=0001.ckpt"]
