"""Retrieval metrics of a large gallery in bounded memory: time and peak memory, no faiss.

    python scripts/retrieval_at_scale.py --n 100000 --dim 512 --classes 100

Draws ``n`` embeddings of ``dim`` dimensions in ``classes`` equal classes (unit class centres plus
Gaussian noise, float32), then times ``contrastive.evaluation.retrieval_metrics`` on the set against
itself (leave-one-out: n queries x n references, each query's own row excluded), the exact search
the training runs use. Prints one JSON line: the figures, the wall and CPU seconds, the resident
memory just before the call (the features included) and this process's peak (``ru_maxrss``), whose
difference bounds what the call itself held (the peak may also be the data's generation, before it).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from contrastive.evaluation import retrieval_metrics


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--noise", type=float, default=0.1, help="per-coordinate std around the unit class centre")
    parser.add_argument("--chunk-size", type=int, default=None, help="queries per block (default: the function's)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(args.classes, args.dim, generator=g), dim=1)
    labels = torch.arange(args.n) % args.classes
    features = centres[labels] + args.noise * torch.randn(args.n, args.dim, generator=g)  # (n, dim)
    del centres
    before = resident_bytes()  # now: the interpreter, torch and the features

    start, cpu_start = time.perf_counter(), time.process_time()
    kwargs = {} if args.chunk_size is None else {"chunk_size": args.chunk_size}
    metrics = retrieval_metrics(features, labels, **kwargs)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {
        "n": args.n,
        "dim": args.dim,
        "classes": args.classes,
        "threads": torch.get_num_threads(),
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu, 1),  # user + system of every thread: under contention wall time is not the cost
        "peak_rss_gib": round(peak / 2**30, 3),
        "rss_before_gib": round(before / 2**30, 3),
        "call_peak_gib": round((peak - before) / 2**30, 3),  # the most the call held beyond that (a bound)
        "features_gib": round(features.numel() * 4 / 2**30, 3),
        **{k: round(v, 3) for k, v in metrics.items()},
    }
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
