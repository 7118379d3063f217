"""What a user of the CLI reads and waits for: per-epoch lines, the results table, warnings said once,
what a refused or stopped run leaves behind, exit statuses, --help. The CLI runs in a subprocess
with its output redirected, as in a batch job."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

SHRINK = [
    "data.source.num_train=200",
    "data.source.num_test=100",
    "data.batch_size=50",
    "trainer.max_epochs=2",
    "eval.every_n_epochs=2",
    "checkpoint.every_n_epochs=1",
    "probe.epochs=5",
]


def _logged(stdout: str) -> list[str]:
    """The messages of the contrastive log lines (``[time][contrastive][LEVEL] - message``)."""
    return [line.split(" - ", 1)[1] for line in stdout.splitlines() if line.startswith("[") and " - " in line]


def _csv_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "logs" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_results_table_puts_untrained_and_trained_side_by_side() -> None:
    from contrastive.cli.console import results_table

    metrics = {
        "knn_top1_untrained": 24.7,
        "knn_top1": 75.6,
        "recall_at_2_untrained": 40.0,
        "recall_at_2": 81.25,
        "map_at_r_untrained": 5.5,
        "map_at_r": 30.125,
        "epochs": 12.5,
        "train_seconds": 41.96,
    }
    assert results_table(metrics, max_epochs=25) == (
        "test split, percent  untrained  trained    gain\n"
        "kNN top-1                24.70    75.60  +50.90\n"
        "MAP@R                     5.50    30.12  +24.62\n"
        "Recall@2                 40.00    81.25  +41.25\n"
        "trained 12.5 of 25 epochs in 42.0 s"
    )
    assert results_table({"knn_top1": 50.0, "precision_at_1": 40.0}) == (
        "test split, percent  value\nkNN top-1            50.00\nP@1                  40.00"
    )


def test_a_batch_job_reads_one_line_per_epoch_and_a_results_table(cli, tmp_path: Path) -> None:
    """The progress bar is on in the config, but the output is a file: its frames ('\\r'-joined, escape
    residue) gave way to one plain line per epoch, and the final 22-key dict to a table."""
    out = cli("contrastive-train", *SHRINK, "hydra.run.dir=run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "\r" not in out.stdout + out.stderr and "\x1b[" not in out.stdout + out.stderr
    assert "Validation DataLoader" not in out.stdout + out.stderr
    logged = _logged(out.stdout)
    untrained = (
        "measuring the untrained network (the results table's baseline) on the test split: kNN, linear probe, retrieval"
    )
    epochs = [m for m in logged if m.startswith("epoch ")]
    assert logged.index(untrained) < logged.index(epochs[0])
    rows = _csv_rows(tmp_path / "run")
    loss = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    speed = [float(r["train/images_per_s"]) for r in rows if r.get("train/images_per_s")]
    knn = [float(r["val/knn_top1"]) for r in rows if r.get("val/knn_top1")]
    first = re.fullmatch(r"epoch 1/2, loss (\S+), lr (\S+), (\d+) images/s", epochs[0])
    second = re.fullmatch(r"epoch 2/2, loss (\S+), lr 0, (\d+) images/s, kNN top-1 (\S+)", epochs[1])
    assert first and second and len(epochs) == 2, epochs
    assert float(first[1]) == round(loss[0], 4) and float(second[1]) == round(loss[1], 4)
    assert int(first[3]) == round(speed[0]) and int(second[2]) == round(speed[1])
    assert float(second[3]) == round(knn[-1], 2)  # the monitor of epoch 2 (the first row is the untrained one)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    lines = out.stdout.splitlines()
    top = lines.index("test split, percent               untrained  trained    gain")
    table = {" ".join(line.split()[:-3]): [float(v) for v in line.split()[-3:]] for line in lines[top + 1 : top + 11]}
    for key, name in (("knn_top1", "kNN top-1"), ("linear_top1", "linear probe top-1"), ("map_at_r", "MAP@R")):
        before, after = round(metrics[f"{key}_untrained"], 2), round(metrics[key], 2)
        assert table[name] == [before, after, round(after - before, 2)], name
    assert lines[top + 11] == f"trained 2 of 2 epochs in {metrics['train_seconds']:.1f} s"
    assert "metrics: {" not in out.stdout
    log = (tmp_path / "run" / "cli.log").read_text()
    assert epochs[1] in log and "\ntest split, percent               untrained  trained    gain\n" in log
    # 4 steps per epoch, log_every_n_steps=10: the lr and the per-step loss are still logged in every epoch
    for column in ("lr-SGD/pg1", "train/loss_step"):  # steps 0-3 are epoch 0, 4-7 epoch 1
        assert {int(float(r["step"])) // 4 for r in rows if r.get(column)} == {0, 1}, column
    assert "smaller than the logging interval" not in out.stderr


def test_a_warning_is_said_once_per_run(cli, fake_cifar10, tmp_path: Path) -> None:
    """The CIFAR copy's checksum warning (and every other) repeated on every call: each resume, each
    evaluation. Lightning's 'checkpoint directory exists and is not empty' came with every resume."""
    root = fake_cifar10(tmp_path / "data", n_train=100, n_test=40)
    args = ["data=cifar10", f"data.root={root}", "data.batch_size=50", "eval.every_n_epochs=1"]
    args += ["eval.final_probe=false", "scheduler.warmup_epochs=0", "hydra.run.dir=run"]
    checksum = f"{root / 'cifar-10-batches-py'}: checksums differ from the official archive; using this copy as is"
    too_many = "eval.knn_k=200 is more than the 100 training images"
    first = cli("contrastive-train", *args, "trainer.max_epochs=1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    warned = [m for m in _logged(first.stdout) if m.startswith((checksum, too_many))]
    assert [m[:20] for m in warned] == [checksum[:20], too_many[:20]]
    again = cli("contrastive-train", *args, "trainer.max_epochs=2", cwd=tmp_path)  # resumes the run
    assert again.returncode == 0, again.stderr[-3000:]
    said = again.stdout + again.stderr
    assert "Restoring states from the checkpoint" in said and "exists and is not empty" not in said
    assert checksum not in said and too_many not in said
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ev = cli("contrastive-eval", f"checkpoint={ckpt}", "knn_k=20", "plots=false", "export=false", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert checksum not in ev.stdout + ev.stderr
    log = (tmp_path / "run" / "cli.log").read_text()
    assert log.count(f"[WARNING] - {checksum}") == 1  # said once, then noted in the log only
    assert log.count(f"[WARNING] - (said before in this run, not repeated on the console) {checksum}") == 1
    assert (
        "(said before in this run, not repeated on the console) " + checksum
        in (tmp_path / "run" / "eval_last" / "cli.log").read_text()
    )


def _image_folder(root: Path, train: list[str], test: list[str], per_class: int = 6) -> Path:
    import torch
    import torchvision

    for split, names in (("train", train), ("test", test)):
        for c, name in enumerate(names):
            (root / split / name).mkdir(parents=True)
            for j in range(per_class):
                image = torch.full((3, 8, 8), 20 * c + j, dtype=torch.uint8)
                torchvision.io.write_png(image, str(root / split / name / f"{j}.png"))
    return root


def test_image_folder_classes_are_counted_and_unseen_ones_explained_until_set_up(cli, tmp_path: Path) -> None:
    """With a class only in test/, the error named the wrong count; data.num_classes had to be given
    though the folders are counted; the warning's advice, once followed, still printed the warning."""
    import torch

    root = _image_folder(tmp_path / "images", ["cat", "dog"], ["ant", "cat", "dog"])
    args = ["data=image_folder", f"data.root={root}", "data.image_size=8", "data.batch_size=4"]
    args += ["trainer.max_epochs=1", "scheduler.warmup_epochs=0", "eval.every_n_epochs=1", "eval.final_probe=false"]
    args += ["eval.knn_k=5"]
    wrong = cli("contrastive-train", *args, "data.num_classes=2", cwd=tmp_path)
    assert wrong.returncode == 2 and wrong.stderr.splitlines()[-1] == (
        "error: data.num_classes=2 but the data set has 3 classes (2 in the training split, 1 only in the test "
        "split): pass data.num_classes=3, or leave data.num_classes out (null): it is then counted"
    )
    counted = cli("contrastive-train", *args, "hydra.run.dir=counted", cwd=tmp_path)
    assert counted.returncode == 0, counted.stderr[-3000:]
    hint = "data.train_classes=[0,1] data.test_classes=[0,1,2] data.num_classes=2 eval.knn_k=0"
    assert (
        _logged(counted.stdout).count(
            "the test split holds 1 class(es) without training images (ant), labelled after the training classes, so "
            "the data set has 3 classes and kNN and the linear probe cannot predict those. For class-disjoint "
            f"retrieval pass {hint}"
        )
        == 1
    )
    assert "data.num_classes=3: counted from the data set" in _logged(counted.stdout)
    ckpt = torch.load(tmp_path / "counted" / "checkpoints" / "last.ckpt", weights_only=False)
    saved = ckpt["contrastive_config"]
    assert saved["data"]["num_classes"] == saved["pipeline"]["num_classes"] == 3
    args = [a for a in args if not a.startswith("eval.knn_k")]
    fixed = cli("contrastive-train", *args, *hint.split(), "hydra.run.dir=disjoint", cwd=tmp_path)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "[WARNING]" not in fixed.stdout and "MAP@R" in fixed.stdout


def test_a_refused_run_leaves_nothing_and_cli_log_keeps_errors_and_stops(cli, tmp_path: Path) -> None:
    """A refused run left an empty run folder with an empty cli.log; errors and the SIGTERM message never
    reached cli.log."""
    import signal
    import subprocess
    import sys
    import time

    refused = cli("contrastive-train", "data.batch_size=5000", cwd=tmp_path)
    assert refused.returncode == 2 and "larger than the training set" in refused.stderr
    assert list(tmp_path.iterdir()) == []  # not even outputs/

    run = tmp_path / "run"
    args = [*SHRINK, "trainer.max_epochs=200", "eval.every_n_epochs=100", "hydra.run.dir=run"]
    bin_dir = Path(sys.executable).parent
    proc = subprocess.Popen(
        [str(bin_dir / "contrastive-train"), *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.ckpt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    stop = (
        "error: stopped by SIGTERM; checkpoints/last.ckpt keeps the last whole epoch: run the same command to continue"
    )
    assert proc.returncode == 128 + signal.SIGTERM and err.splitlines()[-1] == stop
    assert f"[ERROR] - {stop}\n" in (run / "cli.log").read_text()

    # refused on an existing run: the run keeps its folder, and its cli.log the error
    again = cli("contrastive-train", *args[:-1], "data.batch_size=5000", "hydra.run.dir=run", cwd=tmp_path)
    assert again.returncode == 2 and (run / "checkpoints" / "last.ckpt").is_file()
    error = again.stderr.splitlines()[-1]
    assert error.startswith("error: data.batch_size=5000 x 1 process(es) is larger than the training set")
    assert f"[ERROR] - {error}\n" in (run / "cli.log").read_text()
    # an evaluation refused after Hydra made its folder (a bad value) takes the folder back
    ev = cli("contrastive-eval", f"checkpoint={run / 'checkpoints' / 'last.ckpt'}", "batch_size=0", cwd=tmp_path)
    assert ev.returncode == 2 and ev.stderr.splitlines()[-1] == (
        "error: batch_size=0 is invalid: it must be a positive integer"
    )
    assert not (run / "eval_last").exists()


def test_a_max_time_stop_says_unfinished_with_exit_75_and_a_rerun_of_a_finished_run_says_complete(
    cli, tmp_path: Path
) -> None:
    """A trainer.max_time stop exited 0, so a job script could not tell the run was unfinished; rerunning a
    finished command re-evaluated without saying the run was complete."""
    args = [*SHRINK, "eval.final_probe=false", "scheduler=constant", "hydra.run.dir=run"]
    first = cli("contrastive-train", *args, "trainer.max_epochs=1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    again = cli("contrastive-train", *args, "trainer.max_epochs=1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (
        f"this run is complete: {tmp_path / 'run' / 'checkpoints' / 'last.ckpt'} holds all of its 1 epoch(s), so "
        "nothing is trained; the untrained and the trained network are evaluated again, into metrics.json (raise "
        "trainer.max_epochs to train on, or pass resume=never to start over)"
    ) in _logged(again.stdout)
    assert "trained 1 of 1 epochs" in again.stdout
    stopped = cli("contrastive-train", *args, "trainer.max_epochs=100", "trainer.max_time=00:00:00:01", cwd=tmp_path)
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    epochs = json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"]
    assert 1 < epochs < 100
    (line,) = [m for m in _logged(stopped.stdout) if m.startswith("unfinished: ")]
    assert line == (
        f"unfinished: trainer.max_time=00:00:00:01 stopped the run after {epochs:g} of 100 epochs (the figures "
        "above are of the unfinished network); checkpoints/last.ckpt keeps the last whole epoch. To continue, run "
        "the command again with a larger trainer.max_time, or without it (the limit counts over all the calls of a "
        "run). Exit status 75 says so to a job script."
    )
    assert f"[WARNING] - {line}" in (tmp_path / "run" / "cli.log").read_text()


def options_of(help_text: str, group: str) -> list[str]:
    """The options --help lists for a config group."""
    line = next(line for line in help_text.splitlines() if line.startswith(f"  {group}: "))
    return line.split(": ", 1)[1].split(", ")


def test_help_describes_the_tool_its_experiments_and_exit_statuses(cli, tmp_path: Path) -> None:
    """--help was Hydra's generic text ("cli is powered by Hydra"), listed the internal _common entries and no
    experiment's purpose; contrastive-eval --help listed the training groups."""
    import contrastive

    out = cli("contrastive-train", "--help", cwd=tmp_path)
    assert out.returncode == 0 and out.stderr == ""
    text = out.stdout
    assert text.startswith("contrastive-train: trains an image representation by contrastive or self-supervised")
    assert "powered by Hydra" not in text and "_common" not in text
    listed = dict(
        line.split(maxsplit=1)
        for line in text.split("experiments (experiment=NAME")[1].split("\n\n")[0].splitlines()[1:]
    )
    shipped = sorted(p.stem for p in (Path(contrastive.__file__).parent / "configs" / "experiment").glob("*.yaml"))
    assert sorted(listed) == shipped and all(len(d) > 15 for d in listed.values()), listed
    assert listed["simclr_shapes"].startswith("The built-in default: SimCLR on the generated shapes")
    examples = text.split("examples:\n")[1].split("\n\n")[0]
    assert [line.split()[0] for line in examples.splitlines() if not line.startswith("      ")] == [
        "contrastive-train"
    ] * 3
    configs = Path(contrastive.__file__).parent / "configs"
    for group in ("data", "loss", "pipeline"):  # every shipped option, the internal _common ones left out
        options = sorted(p.stem for p in (configs / group).glob("*.yaml") if not p.stem.startswith("_"))
        assert f"  {group}: {', '.join(options)}\n" in text
    assert "shapes" in options_of(text, "data") and "_common" not in options_of(text, "data")
    assert "  75   stopped by trainer.max_time before the last epoch: continue with a larger limit or none\n" in text
    assert list(tmp_path.iterdir()) == []
    ev = cli("contrastive-eval", "--help", cwd=tmp_path)
    assert ev.returncode == 0 and ev.stdout.startswith("contrastive-eval: evaluates a checkpoint of contrastive-train")
    assert "  checkpoint=???" in ev.stdout and "  probe.epochs=100" in ev.stdout
    assert "experiment" not in ev.stdout and "trainer" not in ev.stdout and "75" not in ev.stdout


def test_help_and_config_errors_import_neither_torch_nor_lightning(tmp_path: Path) -> None:
    """Every command took about 8 s before it did anything, --help and config errors included: 7.4 s of
    it importing Lightning (docs/benchmarks.md has the times before and after)."""
    import subprocess
    import sys

    probe = (
        "import sys, atexit\n"
        "atexit.register(lambda: print(sorted(m for m in ('torch', 'pytorch_lightning', 'lightning_fabric') "
        "if m in sys.modules), file=sys.stderr))\n"
        "from contrastive.cli import {entry}\n"
        "sys.argv = ['contrastive-x', *{argv!r}]\n"
        "{entry}()\n"
    )
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"never read")
    cases = [
        ("train", ["--help"], 0, "contrastive-train: trains"),
        ("train", ["trainer.max_epoch=1"], 2, "error: unknown config key trainer.max_epoch (did you mean"),
        ("train", ["data.batch_size=abc"], 2, "error: data.batch_size='abc' is invalid"),
        ("train", ["probe.optimizer=adam"], 2, "error: probe.optimizer='adam' is invalid: it must be sgd or adamw"),
        ("evaluate", ["--help"], 0, "contrastive-eval: evaluates"),
        ("evaluate", [f"checkpoint={ckpt}", "probe.epoch=5"], 2, "error: unknown config key probe.epoch (did you"),
        ("evaluate", [f"checkpoint={ckpt}", "batch_size=0"], 2, "error: batch_size=0 is invalid"),
    ]
    for entry, argv, status, said in cases:
        out = subprocess.run(
            [sys.executable, "-c", probe.format(entry=entry, argv=argv)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == status and said in out.stdout + out.stderr, (argv, out.stderr[-2000:])
        assert out.stderr.splitlines()[-1] == "[]", (argv, out.stderr[-2000:])  # none of the three imported
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and not (tmp_path / "run" / "eval_last").exists()


def test_the_probe_choices_checked_up_front_are_the_probes() -> None:
    """The CLI refuses a probe typo before importing torch, from its own copy of the choices."""
    from typing import get_args

    from contrastive.cli.checks import PROBE_CHOICES
    from contrastive.evaluation.linear import Normalize, ProbeOptimizer

    assert PROBE_CHOICES == {"probe.optimizer": get_args(ProbeOptimizer), "probe.normalize": get_args(Normalize)}
