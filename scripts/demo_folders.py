"""Write the folders of the unlabelled-images demo (``experiment=simclr_unlabelled_demo``).

``OUT/unlabelled/``: the built-in shapes (contrastive.data.shapes) as PNG and JPEG files of varying
sizes and aspect ratios in nested folders, without labels; ``OUT/labelled/{train,test}/<shape>/``:
other shapes of the same kinds, labelled, at 32 px, to evaluate on.

    python scripts/demo_folders.py demo [--unlabelled 1000] [--train 500] [--test 300]
    contrastive-train experiment=simclr_unlabelled_demo data.root=demo/unlabelled eval_data.root=demo/labelled
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from contrastive.data import SHAPE_NAMES, shapes


def write_demo_folders(out: Path, unlabelled: int = 1000, train: int = 500, test: int = 300, seed: int = 0) -> None:
    """The two folders of the demo under ``out`` (module docstring)."""
    rng = np.random.default_rng(seed)
    pool = shapes(num_train=unlabelled, num_test=max(train + test, 1), size=64, seed=seed)
    for i, image in enumerate(pool.train.images.permute(0, 2, 3, 1).numpy()):
        scale, aspect = rng.uniform(0.6, 1.6), rng.uniform(0.75, 1.33)  # any size, aspect ratios up to 4:3
        width, height = int(64 * scale * aspect**0.5), int(64 * scale / aspect**0.5)
        folder = out / "unlabelled" / f"batch{i % 4}" / ("jpeg" if i % 3 == 0 else "png")
        folder.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR)
        picture.save(folder / f"{i:05d}.{'jpg' if i % 3 == 0 else 'png'}", quality=95)
    labelled = pool.test.subset(train + test) if train + test else None
    for i, (image, label) in enumerate(
        zip(labelled.images.permute(0, 2, 3, 1).numpy(), labelled.labels.tolist()) if labelled else []
    ):
        folder = out / "labelled" / ("train" if i < train else "test") / SHAPE_NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).resize((32, 32), Image.Resampling.BILINEAR).save(folder / f"{i:05d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--unlabelled", type=int, default=1000)
    parser.add_argument("--train", type=int, default=500)
    parser.add_argument("--test", type=int, default=300)
    args = parser.parse_args()
    write_demo_folders(args.out, args.unlabelled, args.train, args.test)
    print(f"wrote {args.out / 'unlabelled'} and {args.out / 'labelled'}")


if __name__ == "__main__":
    main()
