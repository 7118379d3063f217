"""``contrastive-eval checkpoint=PATH``: frozen features of a trained run -> metrics, plots, torchvision export."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from contrastive.cli.checks import check_eval_config, check_eval_data, knn_k_warning
from contrastive.cli.shell import (
    RUN_LOGS,
    ConfigError,
    exit_with,
    is_multirun,
    log_data_warnings,
    override_paths,
    quote_paths,
    register_resolvers,
    run_dir_of,
    run_guarded,
    run_hydra,
    say,
    wants_help,
    warn_once,
)

if TYPE_CHECKING:
    import torch

    from contrastive.data import Splits

log = logging.getLogger("contrastive")


def run_evaluation(cfg: DictConfig) -> dict[str, float]:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    RUN_LOGS[:] = [out_dir / "cli.log", Path(run_dir_of(cfg.checkpoint)) / "cli.log"]  # the training run's too
    check_eval_config(cfg)
    # The settings passed: now torch and Lightning (seconds to import; --help and config errors go without)
    import torch
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from contrastive.cli.console import results_table
    from contrastive.cli.run import build_pipeline, build_splits, final_metrics
    from contrastive.data import DOWNLOAD_HINT, DataError
    from contrastive.evaluation.linear import exportable_classifier
    from contrastive.io import CheckpointError, load_checkpoint, save_torch_atomic, write_json_atomic
    from contrastive.models import export_backbone
    from contrastive.pipelines.base import channels_last

    ckpt = load_checkpoint(cfg.checkpoint)
    run_cfg = OmegaConf.create(ckpt["contrastive_config"])
    run_cfg.compile = False  # a one-off compile would cost more than the few forward passes it speeds up
    if cfg.data_root is not None:
        if "root" not in run_cfg.data:
            raise ConfigError(f"data_root given, but the run's data set ({run_cfg.data.source._target_}) has no root")
        run_cfg.data.root = cfg.data_root
        run_cfg.data.source.root = cfg.data_root
    for key in ("subset", "test_subset"):
        if cfg[key] is not None:
            run_cfg.data[key] = cfg[key]
    device = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg.device == "auto" else cfg.device)
    )

    pipeline = build_pipeline(run_cfg)
    try:
        pipeline.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{cfg.checkpoint}: weights do not match the run's model: {e}") from None
    pipeline.to(device).eval()
    if channels_last(device):  # the layout the run trained and evaluated in
        pipeline.to(memory_format=torch.channels_last)
    try:
        splits = build_splits(run_cfg.data, int(run_cfg.seed))
    except InstantiationException as e:
        if not isinstance(e.__cause__, DataError):
            raise
        # the message names contrastive-train's keys; contrastive-eval's is data_root, and it does not download
        message = str(e.__cause__).replace(DOWNLOAD_HINT, "").replace("data.root", "data_root")
        raise DataError(message) from None
    if not splits.evaluated:
        raise ConfigError(
            "this run trained on unlabelled images without an evaluation set (eval_data=none): there are no labels "
            "to evaluate on. Its label-free monitors are in its metrics.json; contrastive-embed exports embeddings"
        )
    check_eval_data(run_cfg, splits, cfg.data_root)
    bank = splits.bank or splits.train  # training on unlabelled images: the evaluation set's labelled train split
    if warning := knn_k_warning("knn_k", cfg.knn_k, len(bank)):
        warn_once(warning)

    features = {}
    for split, data in (("train", bank), ("test", splits.test)):
        data = data.to(device)
        feats = [pipeline.features(data.images[i : i + cfg.batch_size]) for i in range(0, len(data), cfg.batch_size)]
        features[split] = (torch.cat(feats), data.labels)

    closed_set = run_cfg.data.train_classes == run_cfg.data.test_classes
    probe_out: dict[str, Any] = {}

    def probe(*args: Any, **kwargs: Any) -> dict[str, Any]:  # keep the classifier for plots and export
        probe_out.update(instantiate(cfg.probe)(*args, **kwargs))
        return probe_out

    metrics = final_metrics(
        features,
        splits.num_classes,
        closed_set,
        cfg.knn_k,
        cfg.knn_temperature,
        probe if cfg.linear_probe else None,
        pipeline.retrieval_metric,
    )
    write_json_atomic(out_dir / "metrics.json", metrics)
    written = (
        write_plots(out_dir, features, probe_out, splits, run_dir=Path(run_dir_of(cfg.checkpoint))) if cfg.plots else []
    )
    if cfg.export:
        written.append(
            save_torch_atomic(
                export_backbone(pipeline, exportable_classifier(probe_out)), out_dir / "backbone_torchvision.pt"
            )
        )
        log.info("backbone state dict written to %s", written[-1])
    for name in set(EVAL_OUTPUTS) - {p.name for p in written}:  # an earlier eval's, e.g. before linear_probe=false
        (out_dir / name).unlink(missing_ok=True)
    say(results_table(metrics))
    log.info("written to %s", out_dir / "metrics.json")
    return metrics


EVAL_OUTPUTS = (
    "training_curves.png",
    "embedding_tsne.png",
    "similarity_histograms.png",
    "confusion_matrix.png",
    "backbone_torchvision.pt",
)


def write_plots(
    out_dir: Path,
    features: dict[str, tuple[torch.Tensor, torch.Tensor]],
    probe_out: dict[str, Any],
    splits: Splits,
    run_dir: Path,
) -> list[Path]:
    """Training curves, 2-D embedding, similarity histograms and the probe's confusion matrix as PNGs; their paths."""
    from contrastive.evaluation import (  # here: matplotlib
        plot_confusion_matrix,
        plot_embedding_2d,
        plot_similarity_histograms,
        plot_training_curves,
    )

    xte, yte = (t.cpu() for t in features["test"])
    names = splits.test.class_names or None
    written = []
    curves = run_dir / "logs" / "metrics.csv"
    if curves.is_file():
        written.append(plot_training_curves(curves, out_dir / "training_curves.png"))
    if len(xte) >= 3:
        written.append(plot_embedding_2d(xte, yte, out_dir / "embedding_tsne.png", class_names=names))
    else:
        log.warning("embedding_tsne.png skipped: t-SNE needs at least 3 test images, there are %d", len(xte))
    written.append(plot_similarity_histograms(xte, yte, out_dir / "similarity_histograms.png"))
    if "test_predictions" in probe_out:
        written.append(
            plot_confusion_matrix(
                yte,
                probe_out["test_predictions"].cpu(),
                splits.test.num_classes,
                out_dir / "confusion_matrix.png",
                class_names=names,
            )
        )
    return written


@hydra.main(version_base="1.3", config_path="pkg://contrastive.configs", config_name="eval")
@run_guarded
def _eval_main(cfg: DictConfig) -> None:
    run_evaluation(cfg)


def _check_settings(overrides: list[str]) -> None:
    """The overrides composed and their values checked as the job will, before the checkpoint is read
    (which imports torch and Lightning: seconds): a misspelt key or a bad value is answered at once."""
    GlobalHydra.instance().clear()
    with initialize_config_module("contrastive.configs", version_base="1.3"):
        cfg = compose("eval", overrides=overrides)
    GlobalHydra.instance().clear()
    try:
        check_eval_config(cfg)
    except ConfigError as e:
        exit_with(e)


def evaluate() -> None:
    """``contrastive-eval checkpoint=PATH [overrides]``."""
    if wants_help(sys.argv[1:]):
        from contrastive.cli.help import help_text

        print(help_text("eval", sys.argv[1:]))
        return
    register_resolvers()
    log_data_warnings()
    sys.argv[1:] = quote_paths(sys.argv[1:], ("checkpoint", "data_root"))
    # Hydra creates the output folder (beside the checkpoint) before the job runs: check the
    # checkpoint first (memory-mapped, so cheap), so that a typo or a foreign or truncated file
    # leaves no eval_* folder (or parent folders) behind.
    paths = [p for arg in sys.argv[1:] if arg.startswith("checkpoint=") for p in override_paths(arg)]
    flags = any(arg.startswith("-") for arg in sys.argv[1:])  # -m, --cfg job, --info: Hydra's own
    if not paths and not flags:
        exit_with(
            ConfigError(
                "contrastive-eval needs the checkpoint to evaluate: pass "
                "checkpoint=RUN_DIR/checkpoints/last.ckpt (printed at the end of contrastive-train)"
            )
        )
    if not flags:
        run_hydra(lambda: _check_settings(sys.argv[1:]), "eval")
    from contrastive.io import CheckpointError, load_checkpoint

    for path in paths:
        try:
            load_checkpoint(path, mmap=True)
        except CheckpointError as e:
            several = "," in path and not Path(path).expanduser().exists() and not is_multirun(sys.argv[1:])
            exit_with(
                CheckpointError(
                    f"{str(e).rstrip('.')}. To evaluate several checkpoints, add -m: contrastive-eval -m checkpoint=A,B"
                )
                if several
                else e
            )
    run_hydra(_eval_main, "eval")
