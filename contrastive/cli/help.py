"""``--help`` of the entry points: what the tool does, its experiments with one line each, three example
commands, its own options, its exit statuses. Read from the configs with Hydra alone (no torch)."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra

TRAIN = """\
contrastive-train: trains an image representation by contrastive or self-supervised learning (SimCLR, MoCo,
Siamese metric learning, supervised contrastive, ...) from Hydra configs, on the built-in shapes, CIFAR-10/100
or your own image folders. It ends with a table of kNN, linear-probe and retrieval figures of the trained
network against the same network untrained (metrics.json in the run folder), and writes checkpoints for
contrastive-eval.

usage: contrastive-train [-m] [KEY=VALUE ...]

examples:
  contrastive-train
      SimCLR on the built-in shapes (no download): about 1-2 minutes on 2 CPU cores
  contrastive-train experiment=simclr_cifar10 data.root=/path/to/data model=convnet data.subset=5000 \\
      trainer.max_epochs=5 scheduler.warmup_epochs=1
      a quick CIFAR-10 run on the CPU (the small CNN; the experiment's ResNet-18 assumes a GPU)
  contrastive-train -m experiment=moco_shapes loss.temperature=0.1,0.2,0.5
      a sweep: one run per value, and multirun/moco_shapes/summary.{{md,csv,png}}

experiments (experiment=NAME; the default is simclr_shapes):
{experiments}

config groups (GROUP=OPTION):
{groups}

Every key of the composed config can be overridden (trainer.max_epochs=100 data.batch_size=256);
`contrastive-train [overrides] --cfg job` prints them with their values. A misspelt key or a bad value
is refused before anything runs. The same command again continues the run from its last whole epoch.

exit status:
  0    finished (also a rerun of a finished run, which evaluates it again)
  2    refused: a setting, the data or a checkpoint (one line on stderr, also in the run's cli.log)
  75   stopped by trainer.max_time before the last epoch: continue with a larger limit or none
  128+N  stopped by signal N (130 Ctrl-C, 143 SIGTERM): run the same command to continue
"""

EVAL = """\
contrastive-eval: evaluates a checkpoint of contrastive-train. The backbone is frozen, the features of the
train and test splits are extracted once, and a weighted kNN, a linear probe and retrieval metrics (P@1,
R-Precision, MAP@R, Recall@K) are computed; with plots (training curves, t-SNE, similarity histograms,
confusion matrix) and the backbone as a torchvision state dict, into <run folder>/eval_<checkpoint name>/.

usage: contrastive-eval checkpoint=PATH [KEY=VALUE ...]
       contrastive-eval -m checkpoint=PATH,PATH [KEY=VALUE ...]

examples:
  contrastive-eval checkpoint=outputs/simclr_shapes/<run>/checkpoints/last.ckpt
  contrastive-eval checkpoint=RUN/checkpoints/epoch=0049.ckpt data_root=/elsewhere/data probe.epochs=200
  contrastive-eval -m checkpoint=runs/a/checkpoints/last.ckpt,runs/b/checkpoints/last.ckpt

settings (KEY=VALUE; the default first):
{settings}

exit status:
  0    done
  2    refused: a setting, the data or the checkpoint (one line on stderr)
"""


def help_text(entry: str, argv: list[str]) -> str:
    """The ``--help`` text of ``contrastive-train`` (``entry="train"``) or ``contrastive-eval`` (``"eval"``).

    ``argv``: the command line, whose ``hydra.searchpath=[...]`` adds the experiments of its folders."""
    if entry == "eval":
        return EVAL.format(settings="\n".join(_settings()))
    searchpath = [a.lstrip("+") for a in argv if a.lstrip("+").startswith("hydra.searchpath=")]
    GlobalHydra.instance().clear()
    with initialize_config_module("contrastive.configs", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        options = {
            group: [o for o in loader.get_group_options(group, config_name="train", overrides=searchpath)]
            for group in loader.get_group_options("", results_filter=None, config_name="train", overrides=searchpath)
            if group != "hydra" and loader.get_group_options(group, config_name="train", overrides=searchpath)
        }
    GlobalHydra.instance().clear()
    folders = [_folder(a) for a in searchpath for a in a.partition("=")[2].strip("[]").split(",")]
    names = options.pop("experiment", [])
    width = max((len(n) for n in names), default=0)
    experiments = [f"  {n:<{width}}  {_describe(n, folders)}" for n in names]
    groups = [
        f"  {group}: {', '.join(o for o in opts if not o.startswith('_'))}"
        for group, opts in sorted(options.items())
        if any(not o.startswith("_") for o in opts)
    ]
    return TRAIN.format(experiments="\n".join(experiments), groups="\n".join(groups))


def _folder(source: str) -> Path | None:
    """The folder of a ``file://`` search-path entry (``pkg://`` ones are read as packages)."""
    return Path(source.removeprefix("file://")) if source.startswith("file://") else None


def _describe(experiment: str, folders: list[Path | None]) -> str:
    """The first sentence of the experiment file's header comment, without parentheses, in one short line."""
    files = [resources.files("contrastive.configs").joinpath(f"experiment/{experiment}.yaml")]
    files += [folder / "experiment" / f"{experiment}.yaml" for folder in folders if folder is not None]
    text = next((f.read_text() for f in files if f.is_file()), "")
    comment = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        if "@package" not in line:
            comment.append(line.lstrip("# ").strip())
    sentence = re.sub(r"\s*\([^()]*\)", "", " ".join(comment))  # (citations, figures) left out
    sentence = re.split(r"(?<=[a-z0-9])\.\s", sentence)[0].rstrip(".")
    head, colon, _ = sentence.partition(": ")  # "MoCo on CIFAR-10, the recipe of ...: <the recipe>"
    if colon and len(head) >= 30:
        return head
    sentence = sentence.split("; ")[0]
    return sentence if len(sentence) <= 100 else sentence[:97].rsplit(" ", 1)[0] + "..."


def _settings() -> list[str]:
    """``contrastive-eval``'s own keys with their defaults and comments, from eval.yaml and probe/default.yaml."""
    configs = resources.files("contrastive.configs")
    lines = []
    for prefix, name in (("", "eval.yaml"), ("probe.", "probe/default.yaml")):
        for line in configs.joinpath(name).read_text().splitlines():
            found = re.fullmatch(r"([a-z_]+):\s*([^#]*?)\s*(?:#\s*(.*))?", line)
            if found and found[1] not in ("defaults", "hydra", "_target_", "_partial_") and found[2]:
                lines.append((f"{prefix}{found[1]}={found[2]}", found[3] or ""))
    width = max(len(key) for key, _ in lines)
    return [f"  {key:<{width}}  {comment}".rstrip() for key, comment in lines]
