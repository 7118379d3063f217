"""First-run decode of an image folder: one thread against ``workers`` threads, in ONE run.

Writes a synthetic folder (``--images`` JPEGs of ``--width`` x ``--height``, smooth random
colours, in 4 classes) under ``--dir``, then times ``contrastive.data.image_folder`` without its
cache, decoding and resizing to ``--size``, with ``workers=1`` and with ``--workers`` threads
(default: every usable core). Prints images/s of each and their ratio. The images are the same in
both; the script checks that the decoded tensors are equal.

    python scripts/bench_decode.py --images 2000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from contrastive.data.folders import _usable_cpus, image_folder


def write_folder(root: Path, images: int, width: int, height: int, seed: int = 0) -> None:
    """``images`` JPEGs (quality 90) split evenly over ``root/{train,test}/c0..c3``; 5/6 to train."""
    rng = np.random.default_rng(seed)
    for i in range(images):
        split = "test" if i % 6 == 5 else "train"
        folder = root / split / f"c{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        walk = rng.normal(0, 30, (height, width, 3)).cumsum(1) / 20  # smooth rows: JPEG-like content
        pixels = (rng.integers(0, 255, (1, 1, 3)) + walk).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)


def _timed(root: Path, size: int, workers: int) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    splits = image_folder(str(root), size=size, cache=False, workers=workers)
    seconds = time.perf_counter() - start
    return (len(splits.train) + len(splits.test)) / seconds, splits.train.images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--size", type=int, default=64, help="decoded side (data.image_size)")
    p.add_argument("--workers", type=int, default=_usable_cpus())
    p.add_argument("--dir", default=None, help="where to write the images (default: a temporary folder)")
    args = p.parse_args()
    if args.images < 6 or args.workers < 1:
        p.error("--images must be >= 6 (both splits need images) and --workers >= 1")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        write_folder(root, args.images, args.width, args.height)
        _timed(root, args.size, args.workers)  # warm-up: file cache and lazy imports
        serial, serial_images = _timed(root, args.size, 1)
        threaded, threaded_images = _timed(root, args.size, args.workers)
    if not torch.equal(serial_images, threaded_images):
        raise SystemExit("the threaded decode differs from the serial one")
    print(f"{args.images} JPEGs {args.width}x{args.height} -> {args.size}x{args.size}, {_usable_cpus()} usable cores")
    print("| workers | images/s | ratio |\n|---|---|---|")
    print(f"| 1 | {serial:,.0f} | 1.00 |")
    print(f"| {args.workers} | {threaded:,.0f} | {threaded / serial:.2f} |")


if __name__ == "__main__":
    main()
