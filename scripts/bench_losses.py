"""Peak memory and time of NT-Xent, plain vs chunked, against batch size.

    python scripts/bench_losses.py                                   # CPU, small sizes
    python scripts/bench_losses.py --device cuda --sizes 4096 16384 65536 --chunk 4096

Each measurement is one forward + backward of ``nt_xent`` on (N, D) views (2N rows).
Peak memory is the extra memory over the inputs, after one tiny warm-up step has done
the one-time set-up: on CUDA ``max_memory_allocated``; on the CPU the growth of the
process's peak RSS (``ru_maxrss``), so every CPU measurement runs in a fresh subprocess. Time is the median of
``--repeats`` runs (CUDA-synchronised). Prints a markdown table with chunked / plain ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from contrastive.losses import nt_xent


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _step(z1: torch.Tensor, z2: torch.Tensor, chunk: int | None) -> None:
    nt_xent(z1, z2, 0.1, chunk_size=chunk).backward()
    z1.grad = z2.grad = None


def measure(two_n: int, dim: int, chunk: int | None, device: str, repeats: int) -> dict[str, float]:
    """Peak extra memory (MiB) and median time (ms) of one forward+backward."""
    g = torch.Generator(device=device).manual_seed(0)
    warm = [torch.randn(2, dim, device=device, generator=g).requires_grad_() for _ in range(2)]
    _step(*warm, chunk)  # one-time set-up (autograd engine, BLAS workspaces) is not the loss's memory
    z1, z2 = (torch.randn(two_n // 2, dim, device=device, generator=g).requires_grad_() for _ in range(2))
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _step(z1, z2, chunk)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_bytes()
        _step(z1, z2, chunk)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        _step(z1, z2, chunk)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"peak_mib": peak / 2**20, "ms": 1e3 * statistics.median(times)}


def _measure_isolated(args: argparse.Namespace, two_n: int, chunk: int | None) -> dict[str, float] | None:
    """CPU: run in a fresh process so ru_maxrss is this measurement's peak. CUDA: in process."""
    if args.device == "cuda":
        try:
            return measure(two_n, args.dim, chunk, "cuda", args.repeats)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return None
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        str(two_n),
        str(chunk or 0),
        "--dim",
        str(args.dim),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode in (-9, 137):  # the kernel's OOM killer
        return None
    if done.returncode != 0:
        sys.exit(f"the measurement of 2N={two_n}, chunk={chunk} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def _mib(peak: float) -> str:
    """A peak below 1 MiB is below what ru_maxrss (updated lazily by the kernel) resolves."""
    return f"{peak:.1f}" if peak >= 1 else "< 1"


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", type=_positive, nargs="+", default=[1024, 2048, 4096, 8192], help="2N values")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--chunk", type=_positive, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--worker", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        two_n, chunk = args.worker
        print(json.dumps(measure(two_n, args.dim, chunk or None, "cpu", args.repeats)))
        return
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"nt_xent forward+backward, D={args.dim}, chunk={args.chunk}, float32, {name}\n")
    print("| 2N | plain peak MiB | chunked peak MiB | memory ratio | plain ms | chunked ms | time ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for two_n in args.sizes:
        plain = _measure_isolated(args, two_n, None)
        chunked = _measure_isolated(args, two_n, args.chunk)
        p_mem, p_ms = (_mib(plain["peak_mib"]), f"{plain['ms']:.1f}") if plain else ("OOM", "-")
        c_mem, c_ms = (_mib(chunked["peak_mib"]), f"{chunked['ms']:.1f}") if chunked else ("OOM", "-")
        resolved = plain and chunked and min(plain["peak_mib"], chunked["peak_mib"]) >= 1
        mem_ratio = f"{chunked['peak_mib'] / plain['peak_mib']:.3f}" if resolved else "-"
        time_ratio = f"{chunked['ms'] / plain['ms']:.2f}" if plain and chunked else "-"
        print(f"| {two_n} | {p_mem} | {c_mem} | {mem_ratio} | {p_ms} | {c_ms} | {time_ratio} |", flush=True)


if __name__ == "__main__":
    main()
