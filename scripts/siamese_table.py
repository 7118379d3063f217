"""Triplet vs triplet + softmax-CE regulariser: one Hydra multirun per arm, then a mean ± std table.

    python scripts/siamese_table.py --data-root /tmp/cifar --out /tmp/siamese_table

runs ``contrastive-train -m experiment=siamese_cifar10 <budget> seed=... regularizer=...`` (the
triplet-only arm and the regularised arm at each weight, same budget and seeds), then
``contrastive.evaluation.summarize_runs`` over all runs (summary.md/csv/png in ``--out``) and
prints the table of mean ± std over seeds. The default budget is a CPU-sized CIFAR-10 subset
with the small CNN (build the data with ``python /work/shared/data/build_cifar10.py /tmp/cifar``);
``--budget`` replaces it (e.g. the full recipe on a GPU: ``--budget model=resnet18 data.subset=null``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from contrastive.evaluation import read_run, summarize_runs
from contrastive.evaluation.report import markdown_table, seed_table

BUDGET = [
    "model=convnet",
    "data.subset=1500",
    "data.test_subset=1000",
    "data.batch_size=128",
    "sampler.classes_per_batch=8",
    "sampler.samples_per_class=16",
    "trainer.max_epochs=5",
    "scheduler.warmup_epochs=1",
    "optimizer.lr=2e-3",
    "eval.every_n_epochs=5",
    "probe.epochs=30",
    "trainer.enable_progress_bar=false",
]
METRICS = ["precision_at_1", "map_at_r", "r_precision", "recall_at_4", "knn_top1", "linear_top1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="folder holding cifar-10-batches-py/")
    parser.add_argument("--out", type=Path, required=True, help="sweep folder (runs and summary)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--weights", default="0.1,0.5,1.0", help="regularizer.weight values")
    parser.add_argument("--experiment", default="siamese_cifar10")
    parser.add_argument("--budget", nargs="*", default=BUDGET, help="overrides shared by every run")
    args = parser.parse_args()

    earlier = sorted(args.out.glob("*/*/metrics.json"))
    if earlier:
        # its runs are numbered by job, not named by their settings: they would resume (or be read)
        # as the runs of this call and be reported under its settings
        sys.exit(
            f"--out {args.out} already holds runs of an earlier call ({earlier[0].parent}, ...): "
            "pass a new --out, or delete that folder to run again"
        )
    train = str(Path(sys.executable).parent / "contrastive-train")
    common = [
        f"experiment={args.experiment}",
        f"data.root={args.data_root}",
        *args.budget,
        f"seed={args.seeds}",
        "resume=never",
        "hydra.sweep.subdir=${hydra.job.num}",
    ]  # the override names would pass 255 bytes
    arms = {
        "none": ["regularizer=none"],
        "softmax_ce": ["regularizer=softmax_ce", f"regularizer.weight={args.weights}"],
    }
    for name, arm in arms.items():
        subprocess.run([train, "-m", *common, *arm, f"hydra.sweep.dir={args.out / name}"], check=True)

    runs = sorted(p.parent for p in args.out.glob("*/*/metrics.json"))
    params = ["regularizer", "regularizer.weight"]
    summarize_runs(runs, args.out, params=params)  # every metric, per run and over seeds
    header, rows = seed_table([read_run(r) for r in runs], params, METRICS)
    if not rows:
        sys.exit(f"mean ± std needs two seeds or more (--seeds 0,1,2); the runs are in {args.out / 'summary.md'}")
    print(markdown_table(header, rows), end="")


if __name__ == "__main__":
    main()
