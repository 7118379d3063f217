"""``contrastive-embed checkpoint=PATH data.root=FOLDER``: the embedding of every image of a folder.

Every image under ``data.root`` (subfolders too; any size, read as ``data=image_folder_unlabelled``
reads: shorter side to the run's ``data.image_size``, centre crop) through the trained network,
batched on the device. Written to the output folder (beside the checkpoint, ``embed_<checkpoint>/``;
``hydra.run.dir=...`` elsewhere):

- ``embeddings.pt``: ``{"paths": [N], "embeddings": (N, D) float32}``, and ``"labels"`` (N,) with
  ``"class_names"`` when the folder holds only class folders (the first folder of each path is its class);
- ``embeddings.csv``: one row per image: path[, label], then the D values;
- with ``neighbors=K``: ``neighbors.csv`` (path, rank, neighbour's path, cosine similarity), each
  image's K nearest others, and ``neighbors.png``: ``grid_queries`` query images beside their neighbours.

``features=backbone`` (default) or ``projector`` (the projection head's output).
"""

from __future__ import annotations

import csv
import io
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from contrastive.cli.shell import (
    RUN_LOGS,
    ConfigError,
    exit_with,
    log_data_warnings,
    quote_paths,
    register_resolvers,
    run_guarded,
    run_hydra,
    wants_help,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger("contrastive")


def folder_labels(paths: list[str], root: Path) -> tuple[list[int], list[str]] | None:
    """Labels by class folder (the first component of each relative path, sorted names), or None where
    ``root`` itself holds image files (then the folders are not classes)."""
    if any("/" not in p for p in paths):
        return None
    names = sorted({p.split("/", 1)[0] for p in paths})
    index = {name: i for i, name in enumerate(names)}
    return [index[p.split("/", 1)[0]] for p in paths], names


def run_embedding(cfg: DictConfig) -> Path:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    RUN_LOGS[:] = [out_dir / "cli.log"]
    if cfg.features not in ("backbone", "projector"):
        raise ConfigError(f"features={cfg.features}: use features=backbone or features=projector")
    if not isinstance(cfg.neighbors, int) or cfg.neighbors < 0:
        raise ConfigError(f"neighbors={cfg.neighbors}: use an integer >= 0 (0: none)")
    import torch

    from contrastive.cli.run import build_pipeline, report_skipped
    from contrastive.data import unlabelled_folder
    from contrastive.io import CheckpointError, load_checkpoint, save_torch_atomic, write_bytes_atomic

    ckpt = load_checkpoint(cfg.checkpoint)
    run_cfg = OmegaConf.create(ckpt["contrastive_config"])
    run_cfg.compile = False
    pipeline = build_pipeline(run_cfg)
    try:
        pipeline.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{cfg.checkpoint}: weights do not match the run's model: {e}") from None
    projector = getattr(pipeline, "projector", None)
    if cfg.features == "projector" and not isinstance(projector, torch.nn.Module):
        raise ConfigError(f"features=projector, but the {type(pipeline).__name__} pipeline has no projector")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else "cpu")
    device = device if cfg.device == "auto" else torch.device(cfg.device)
    pipeline.to(device).eval()

    folder = unlabelled_folder(cfg.data.root, int(run_cfg.data.image_size), cfg.data.cache, cfg.data.workers)
    report_skipped(out_dir, folder.skipped)
    with torch.no_grad():
        parts = []
        for i in range(0, len(folder.paths), cfg.batch_size):
            h = pipeline.features(folder.images[i : i + cfg.batch_size].to(device))
            parts.append((projector(h) if cfg.features == "projector" else h).float().cpu())  # type: ignore[misc]
    embeddings = torch.cat(parts)  # (N, D)
    result: dict[str, object] = {"paths": folder.paths, "embeddings": embeddings}
    labelled = folder_labels(folder.paths, folder.root)
    if labelled is not None:
        result |= {"labels": torch.tensor(labelled[0]), "class_names": labelled[1]}
    save_torch_atomic(result, out_dir / "embeddings.pt")
    labels = labelled[0] if labelled else None
    values = embeddings.tolist()
    rows = [[p, *([labels[i]] if labels else []), *values[i]] for i, p in enumerate(folder.paths)]
    header = ["path", *(["label"] if labelled else []), *(f"e{j}" for j in range(embeddings.shape[1]))]
    write_bytes_atomic(out_dir / "embeddings.csv", _csv([header, *rows]))
    log.info("%d embeddings of %d values: %s", len(embeddings), embeddings.shape[1], out_dir / "embeddings.pt")
    if cfg.neighbors > 0:
        write_neighbors(out_dir, folder.paths, folder.images, embeddings, cfg.neighbors, cfg.grid_queries)
    return out_dir


def _csv(rows: Sequence[Sequence[object]]) -> bytes:
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    return text.getvalue().encode()


def nearest(embeddings: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k`` most cosine-similar other rows: similarities and indices, (N, k) each, most
    similar first, ties to the lower index; ``k`` is clamped to N - 1."""
    import torch

    from contrastive.evaluation.neighbors import prepare_features, topk_neighbors

    n = len(embeddings)
    k = min(k, n - 1)
    x = prepare_features(embeddings)
    sims, idx = [], []
    for start in range(0, n, 1024):  # (c, N) similarities at a time
        chunk = x[start : start + 1024]
        s, i = topk_neighbors(chunk, x, k, self_index=torch.arange(start, start + len(chunk)))
        sims.append(s)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


def write_neighbors(
    out_dir: Path, paths: list[str], images: torch.Tensor, embeddings: torch.Tensor, k: int, queries: int
) -> None:
    """``neighbors.csv`` (path, rank, neighbour, cosine) and ``neighbors.png`` (queries beside their neighbours)."""
    import torch
    from torchvision.utils import save_image

    from contrastive.data import seeded_indices
    from contrastive.io import write_bytes_atomic

    if len(paths) < 2:
        log.warning("neighbors=%d skipped: the folder holds one image", k)
        return
    sims, idx = nearest(embeddings, k)
    rows = [["path", "rank", "neighbor", "cosine"]] + [
        [paths[i], r + 1, paths[j], f"{s:.6f}"]
        for i in range(len(paths))
        for r, (j, s) in enumerate(zip(idx[i].tolist(), sims[i].tolist()))
    ]
    write_bytes_atomic(out_dir / "neighbors.csv", _csv(rows))
    shown = seeded_indices(len(paths), queries, 0)
    grid = torch.cat([torch.stack([images[q], *images[idx[q]]]) for q in shown.tolist()])  # (Q * (1 + k), 3, S, S)
    png = io.BytesIO()
    save_image(grid.float() / 255, png, nrow=1 + idx.shape[1], padding=2, format="png")
    write_bytes_atomic(out_dir / "neighbors.png", png.getvalue())
    log.info("each image's %d nearest: %s, %s", idx.shape[1], out_dir / "neighbors.csv", out_dir / "neighbors.png")


@hydra.main(version_base="1.3", config_path="pkg://contrastive.configs", config_name="embed")
@run_guarded
def _embed_main(cfg: DictConfig) -> None:
    run_embedding(cfg)


def embed() -> None:
    """``contrastive-embed checkpoint=PATH data.root=FOLDER [features=projector] [neighbors=K]``."""
    if wants_help(sys.argv[1:]):
        print(__doc__)
        return
    register_resolvers()
    log_data_warnings()
    sys.argv[1:] = quote_paths(sys.argv[1:], ("checkpoint", "data.root"))
    if not any(arg.startswith("checkpoint=") for arg in sys.argv[1:]):
        exit_with(ConfigError("contrastive-embed needs a checkpoint: pass checkpoint=RUN_DIR/checkpoints/last.ckpt"))
    run_hydra(_embed_main, "embed")
