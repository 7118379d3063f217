"""Atomic file writes and checkpoint reading with clear errors."""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or was not written by ``contrastive``."""


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename over it.

    A reader (or a run killed half-way) sees either the old file or the new one,
    never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _plain(obj: Any) -> Any:
    """Floats that JSON can hold: NaN/Inf become None (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        obj = obj.item() if obj.numel() == 1 else obj.tolist()
        return _plain(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """``json.dump`` through :func:`write_bytes_atomic`, sorted keys, indented."""
    text = json.dumps(_plain(obj), indent=2, sort_keys=True) + "\n"
    return write_bytes_atomic(path, text.encode())


def save_torch_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through :func:`write_bytes_atomic`."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes_atomic(path, buf.getvalue())


def check_checkpoint_file(path: str | Path) -> Path:
    """``path`` as a Path if it is a file, else a :class:`CheckpointError` naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint not found: {path}; pass checkpoint=RUN_DIR/checkpoints/last.ckpt "
            "(or an epoch*.ckpt) of a contrastive-train run"
        )
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a Lightning checkpoint written by ``contrastive``, or raise :class:`CheckpointError`.

    The checkpoint must hold ``state_dict`` and the run's ``config`` (added by the
    CLI); anything else is called foreign rather than half-loaded.
    """
    path = check_checkpoint_file(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, pickle error, not a torch file
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is truncated or not a PyTorch file ({type(e).__name__}: {e}). "
            "Use another checkpoint of the run (checkpoints/last.ckpt or an epoch*.ckpt)."
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "contrastive_config" not in ckpt:
        raise CheckpointError(
            f"{path} is not a contrastive training checkpoint (no state_dict or run config in it); "
            "pass a .ckpt written by contrastive-train"
        )
    return ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that never leaves a partial ``.ckpt`` behind."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        save_torch_atomic(checkpoint, path)
