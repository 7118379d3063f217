"""Loading time and memory of an unlabelled image folder's memory-mapped cache, against a baseline.

Writes N generated images (96 to 144 px, PNG and JPEG, 100 folders) under OUT/images, then, each in a
fresh process: the first start (listing, decoding, writing the cache), the second start (the file index
checked, the cache memory-mapped), the second start followed by a pass over every image (every pixel
summed, as a training epoch reads them all), and the baseline: the same uint8 tensor saved with
torch.save and read with torch.load (how data=image_folder caches). Prints a Markdown table: seconds,
peak resident memory (VmHWM), and the anonymous (process-private) and file-backed parts of the resident
memory at the end.

    python scripts/bench_unlabelled_cache.py OUT [--n 100000] [--size 96]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def write_images(folder: Path, n: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, 144, dtype=np.float32)
    for i in range(n):
        sub = folder / f"{i % 100:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        w, h = rng.integers(96, 145, 2)
        a, b = rng.integers(0, 256, (2, 3))  # a colour gradient: compressible, unlike noise
        pixels = (a + (b - a) * ramp[:w, None][None] * ramp[None, :h, None].transpose(1, 0, 2)[:, :1]).astype(np.uint8)
        image = Image.fromarray(np.broadcast_to(pixels, (h, w, 3)).copy())
        if i % 2:
            image.save(sub / f"{i:06d}.png", compress_level=1)
        else:
            image.save(sub / f"{i:06d}.jpg", quality=90)


def _memory() -> dict[str, float]:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report its parent's peak
    mib = {k: int(status[k].split()[0]) / 1024 for k in ("VmHWM", "RssAnon", "RssFile")}
    return {"peak_rss_mib": mib.pop("VmHWM")} | mib


def measure(what: str, root: Path, size: int) -> dict[str, float]:
    """One measurement, in this (fresh) process."""
    import torch

    from contrastive.data import unlabelled_folder

    start = time.perf_counter()
    if what in ("first start", "second start", "second start + one pass"):
        images = unlabelled_folder(str(root / "images"), size, progress=False).images
    else:  # the baseline: torch.load of the same tensor
        images = torch.load(root / "baseline.pt", weights_only=True)
    if what == "second start + one pass":
        total = sum(int(images[i : i + 256].sum(dtype=torch.int64)) for i in range(0, len(images), 256))
        assert total > 0
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": float(len(images))} | _memory()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.out, args.size)))
        return
    if not (args.out / "images").is_dir():
        start = time.perf_counter()
        write_images(args.out / "images", args.n)
        print(f"wrote {args.n} images in {time.perf_counter() - start:.0f} s", file=sys.stderr)

    def run(what: str) -> dict[str, float]:
        command = [sys.executable, __file__, str(args.out), "--size", str(args.size), "--measure", what]
        return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)

    rows = {"first start": run("first start")}
    import torch

    from contrastive.data import unlabelled_folder

    torch.save(
        unlabelled_folder(str(args.out / "images"), args.size, progress=False).images.clone(), args.out / "baseline.pt"
    )
    for what in ("second start", "second start + one pass", "baseline: torch.load of a .pt cache"):
        rows[what] = run(what)
    n = int(rows["first start"]["images"])
    print(f"| {n} images, {args.size} px | seconds | peak RSS (MiB) | anonymous (MiB) | file-backed (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for what, r in rows.items():
        print(f"| {what} | {r['seconds']:.2f} | {r['peak_rss_mib']:.0f} | {r['RssAnon']:.0f} | {r['RssFile']:.0f} |")


if __name__ == "__main__":
    main()
