"""contrastive-embed: embeddings of a folder from a checkpoint, read back; nearest neighbours."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_unlabelled_training import _demo_folders, train_without_eval_set

from contrastive.cli.embed import folder_labels, nearest


def test_folder_labels_and_nearest() -> None:
    assert folder_labels(["b/x.png", "a/y/z.png", "b/w.png"], Path(".")) == ([1, 0, 1], ["a", "b"])
    assert folder_labels(["b/x.png", "top.png"], Path(".")) is None  # images in the root: no classes
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.1], [0.1, 3.0]])
    sims, idx = nearest(e, 2)
    assert idx.tolist() == [[2, 3], [3, 2], [0, 3], [1, 2]]
    assert sims[0, 0].item() == pytest.approx(2 / (4.01**0.5))


@pytest.mark.slow
def test_embed_writes_every_image_and_finds_an_exact_duplicate(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """One short epoch on a labelled folder, then contrastive-embed of its training images with neighbors=3."""
    _demo_folders(tmp_path / "demo", unlabelled=64, train=64, test=0)
    root = tmp_path / "demo" / "unlabelled"
    out = train_without_eval_set(cli, tmp_path, root, epochs=1)
    assert out.returncode == 0, out.stderr[-3000:]
    labelled = tmp_path / "demo" / "labelled" / "train"
    original = sorted(labelled.rglob("*.png"))[5]
    (original.parent / "copy_of_it.png").write_bytes(original.read_bytes())  # an exact duplicate, same class
    (original.parent / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = cli(
        "contrastive-embed",
        f"checkpoint={checkpoint}",
        f"data.root={labelled}",
        "neighbors=3",
        "grid_queries=4",
        "hydra.run.dir=embed",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    saved = torch.load(tmp_path / "embed" / "embeddings.pt", weights_only=True)
    assert len(saved["paths"]) == 65 and saved["embeddings"].shape == (65, 128)
    assert saved["class_names"] == sorted(p.name for p in labelled.iterdir() if not p.name.startswith("."))
    assert [saved["class_names"][y] for y in saved["labels"]] == [p.split("/")[0] for p in saved["paths"]]
    listing = (tmp_path / "embed" / "unreadable_files.txt").read_text()
    assert listing.startswith(f"{original.parent.name}/broken.jpg: a damaged")
    with (tmp_path / "embed" / "embeddings.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0][:3] == ["path", "label", "e0"] and len(rows) == 66
    assert [r[0] for r in rows[1:]] == saved["paths"]
    assert torch.allclose(torch.tensor([[float(v) for v in r[2:]] for r in rows[1:]]), saved["embeddings"], atol=1e-6)
    with (tmp_path / "embed" / "neighbors.csv").open() as f:
        neighbours = list(csv.DictReader(f))
    first = next(r for r in neighbours if r["path"] == original.relative_to(labelled).as_posix() and r["rank"] == "1")
    assert first["neighbor"] == (original.parent / "copy_of_it.png").relative_to(labelled).as_posix()
    assert float(first["cosine"]) == pytest.approx(1.0, abs=1e-5)
    with Image.open(tmp_path / "embed" / "neighbors.png") as grid:
        assert grid.size == (2 + 4 * (32 + 2), 2 + 4 * (32 + 2))  # 4 queries x (query + 3 neighbours), 32 px
