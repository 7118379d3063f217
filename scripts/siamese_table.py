"""Metric-learning arms of the Siamese pipeline: one Hydra multirun per arm, then a mean ± std table.

    python scripts/siamese_table.py --data-root /tmp/cifar --out /tmp/siamese_table
    python scripts/siamese_table.py --data-root /tmp/cifar --out /tmp/dj --experiment siamese_cifar10_disjoint \
        --arms none,softmax_ce,xbm,cosface,arcface,proxy_anchor,sup_con --weights 1.0

runs ``contrastive-train -m experiment=siamese_cifar10 <budget> seed=... <arm>`` for each arm of
``--arms`` (default: the triplet-only arm and the regularised arm at each weight; :data:`ARMS` lists
them all), same budget and seeds, then ``contrastive.evaluation.summarize_runs`` over all runs
(summary.md/csv/png in ``--out``) and prints the table of mean ± std over seeds, the untrained
network (the first arm's runs before training) as its first row. The default budget is a CPU-sized CIFAR-10 subset
with the small CNN (build the data with ``python /work/shared/data/build_cifar10.py /tmp/cifar``);
``--budget`` replaces it (e.g. the full recipe on a GPU: ``--budget model=resnet18 data.subset=null``).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

from contrastive.evaluation import read_run, summarize_runs
from contrastive.evaluation.report import Run, markdown_table, seed_table

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
#: Each arm's overrides on top of the budget (``{weights}``: the ``--weights`` sweep). The memory of the XBM
#: arm holds a third of the disjoint budget's 3,000 training images and joins at step 24, when its warm-up
#: epoch (24 steps of 125) ends: the paper starts it once the embeddings drift slowly.
ARMS = {
    "none": ["regularizer=none"],
    "softmax_ce": ["regularizer=softmax_ce", "regularizer.weight={weights}"],
    "xbm": ["pipeline.memory_size=1000", "pipeline.memory_start=24"],
    "cosface": ["loss=cosface"],
    "arcface": ["loss=arcface"],
    "proxy_anchor": ["loss=proxy_anchor"],
    "sup_con": ["loss=sup_con"],
}
PARAMS = ["loss", "regularizer", "regularizer.weight", "pipeline.memory_size"]  # the columns that tell arms apart


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="folder holding cifar-10-batches-py/")
    parser.add_argument("--out", type=Path, required=True, help="sweep folder (runs and summary)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--weights", default="0.1,0.5,1.0", help="regularizer.weight values")
    parser.add_argument("--arms", default="none,softmax_ce", help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--experiment", default="siamese_cifar10")
    parser.add_argument("--budget", nargs="*", default=BUDGET, help="overrides shared by every run")
    parser.add_argument(
        "--parallel", action="store_true", help="an arm's seeds as concurrent runs (one multirun per seed)"
    )
    args = parser.parse_args()
    arms = args.arms.split(",")
    if unknown := set(arms) - set(ARMS):
        sys.exit(f"--arms: unknown {', '.join(sorted(unknown))}; the arms are {', '.join(ARMS)}")

    earlier = sorted(args.out.glob("*/*/metrics.json"))
    if earlier:
        # its runs are numbered by job, not named by their settings: they would resume (or be read)
        # as the runs of this call and be reported under its settings
        sys.exit(
            f"--out {args.out} already holds runs of an earlier call ({earlier[0].parent}, ...): "
            "pass a new --out, or delete that folder to run again"
        )
    train = str(Path(sys.executable).parent / "contrastive-train")
    common = [f"experiment={args.experiment}", f"data.root={args.data_root}", *args.budget, "resume=never"]
    # one multirun of every seed, its jobs numbered (the override names would pass 255 bytes); or, with
    # --parallel, one multirun per seed at once, each job in a folder named by its seed
    sweeps = (
        [[f"seed={s}", f"hydra.sweep.subdir=seed{s}_" + "${hydra.job.num}"] for s in args.seeds.split(",")]
        if args.parallel
        else [[f"seed={args.seeds}", "hydra.sweep.subdir=${hydra.job.num}"]]
    )
    for name in arms:
        arm = [o.format(weights=args.weights) for o in ARMS[name]]
        commands = [[train, "-m", *common, *sweep, *arm, f"hydra.sweep.dir={args.out / name}"] for sweep in sweeps]
        if any(p.wait() for p in [subprocess.Popen(c) for c in commands]):
            sys.exit(f"a run of arm {name} failed: see {args.out / name}")

    runs = [read_run(p.parent) for p in sorted(args.out.glob("*/*/metrics.json"))]
    params = [p for p in PARAMS if any(p in r.overrides for r in runs)]
    summarize_runs([r.path for r in runs], args.out, params=params)  # every metric, per run and over seeds
    header, rows = seed_table(runs, params, METRICS)
    if not rows:
        sys.exit(f"mean ± std needs two seeds or more (--seeds 0,1,2); the runs are in {args.out / 'summary.md'}")
    first = [r for r in runs if r.path.parent.name == arms[0]]
    untrained = [
        Run(r.path, dict(r.overrides), {m: r.metrics.get(f"{m}_untrained", math.nan) for m in METRICS}) for r in first
    ]
    _, before = seed_table(untrained, params, METRICS)
    print(
        markdown_table(header, [["untrained network", *[""] * (len(params) - 1), *before[0][len(params) :]], *rows]),
        end="",
    )


if __name__ == "__main__":
    main()
