"""The benchmark scripts under scripts/: their refusals and the CPU table's format."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *args], capture_output=True, text=True, timeout=300
    )


def test_siamese_table_refuses_an_out_folder_with_earlier_runs(tmp_path: Path) -> None:
    """Its runs are numbered by job: a second call would resume them and report them under new settings."""
    (tmp_path / "softmax_ce" / "0").mkdir(parents=True)
    (tmp_path / "softmax_ce" / "0" / "metrics.json").write_text("{}")
    out = _script("siamese_table.py", "--data-root", str(tmp_path), "--out", str(tmp_path))
    assert out.returncode == 1 and "already holds runs of an earlier call" in out.stderr
    assert "pass a new --out" in out.stderr


def test_bench_losses_prints_the_table_and_reports_a_failed_measurement() -> None:
    out = _script("bench_losses.py", "--sizes", "512", "--chunk", "64", "--repeats", "1")
    assert out.returncode == 0, out.stderr
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| ") and "2N" not in line]
    assert [row[0].strip() for row in rows] == ["512"]
    for row in rows:
        mem_plain, mem_chunked, ratio = (c.strip() for c in row[1:4])
        assert "OOM" not in row and not mem_plain.startswith("-") and not mem_chunked.startswith("-")
        assert ratio == "-" or float(ratio) > 0  # never a negative ratio from ru_maxrss's lag
    failed = _script("bench_losses.py", "--sizes", "8", "--dim", "0")  # the worker raises: not 'OOM'
    assert failed.returncode == 1 and "the measurement of 2N=8, chunk=None failed" in failed.stderr
    refused = _script("bench_losses.py", "--chunk", "-5")
    assert refused.returncode == 2 and "must be a positive integer" in refused.stderr


def test_bench_decode_prints_both_rows_and_checks_the_tensors_agree(tmp_path: Path) -> None:
    out = _script(
        "bench_decode.py",
        "--images",
        "12",
        "--width",
        "40",
        "--height",
        "30",
        "--size",
        "8",
        "--workers",
        "3",
        "--dir",
        str(tmp_path),
    )
    assert out.returncode == 0, out.stderr
    rows = [
        line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| ") and "workers" not in line
    ]
    assert [row[0].strip() for row in rows] == ["1", "3"] and rows[0][2].strip() == "1.00"
    assert float(rows[1][2]) > 0 and "12 JPEGs 40x30 -> 8x8" in out.stdout
    assert list(tmp_path.iterdir()) == []  # the synthetic folder is removed


def test_bench_throughput_prints_every_case_and_the_ratios() -> None:
    """The CPU table of issue 5's benchmark, shrunk: every case measured (a positive rate), a/b, a/c and
    the channels_last / NCHW ratios computed from the printed rates."""
    out = _script(
        "bench_throughput.py",
        "--device",
        "cpu",
        "--batch-size",
        "8",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--model",
        "convnet",
        "--images",
        "32",
        "--workers",
        "0",
        "--nchw",
    )
    assert out.returncode == 0, out.stderr
    rates = {
        line.split()[0]: float(line.split("images/s")[0].split()[-1])
        for line in out.stdout.splitlines()
        if "images/s" in line
    }
    assert list(rates) == ["(c)", "(a)", "(a0)", "(b)", "(cN)", "(aN)"] and all(r > 0 for r in rates.values())
    summary = next(line for line in out.stdout.splitlines() if line.startswith("a/b"))
    assert "(device cpu, batch 8, model convnet" in summary
    layout = next(line for line in out.stdout.splitlines() if line.startswith("channels_last/NCHW"))
    printed = [float(w) for w in (summary + " " + layout).split() if w[0].isdigit() and "." in w]
    expected = [
        rates["(a)"] / rates["(b)"],
        rates["(a)"] / rates["(c)"],
        rates["(c)"] / rates["(cN)"],
        rates["(a)"] / rates["(aN)"],
    ]
    assert printed == pytest.approx(expected, rel=0.1, abs=0.01)  # the rates print rounded to whole images/s


@pytest.mark.slow
def test_gpu_check_runs_every_step_in_tiny_mode_and_writes_each_result(tmp_path: Path) -> None:
    """scripts/gpu_check.sh on the CPU with tiny sizes: the speedrun's figures printed, every step's file under OUT."""
    import os

    from conftest import write_fake_cifar10

    write_fake_cifar10(tmp_path / "data", n_train=500, n_test=200)
    env = {
        **os.environ,
        "TINY": "1",
        "OUT": str(tmp_path / "out"),
        "DATA_ROOT": str(tmp_path / "data"),
        "PYTHON": sys.executable,
    }
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "out"
    summary = (out / "summary.txt").read_text()
    assert "speedrun: kNN top-1 " in summary and "1 epochs" in summary and summary.rstrip().endswith("done")
    for step in ("speedrun_log", "pytest_gpu", "bench_throughput", "bench_losses"):
        assert f"{step}: exit 0" in summary, summary
    metrics = __import__("json").loads((out / "speedrun.json").read_text())
    assert metrics["epochs"] == 1 and 0 <= metrics["knn_top1"] <= 100
    assert "(c) ceiling" in (out / "bench_throughput.txt").read_text()
    assert "| 128 " in (out / "bench_losses.txt").read_text()
