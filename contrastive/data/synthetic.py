"""The built-in data set *shapes*: ten classes of coloured shapes, generated (no download)."""

from __future__ import annotations

import torch
from torch import Tensor

from contrastive.data.tensors import ImageTensors, Splits

SHAPE_NAMES = [
    "disk",
    "square",
    "diamond",
    "ring",
    "plus",
    "triangle",
    "x",
    "frame",
    "two-dots",
    "half-disk",
]


def _shape_masks(kind: Tensor, dx: Tensor, dy: Tensor, radius: Tensor) -> Tensor:
    """Boolean masks (N, H, W) of shape ``kind`` centred at offsets ``dx, dy`` (N, H, W)."""
    r = radius[:, None, None]
    ax, ay = dx.abs(), dy.abs()
    dist = (dx**2 + dy**2).sqrt()
    cheb = torch.maximum(ax, ay)
    masks = torch.stack(
        [
            dist < r,
            cheb < 0.8 * r,
            ax + ay < r,
            (dist < r) & (dist > 0.55 * r),
            ((ax < r / 3) & (ay < r)) | ((ay < r / 3) & (ax < r)),
            (dy < 0.8 * r) & (ax < (dy + r) / 2),
            (((dx - dy).abs() < r / 3) | ((dx + dy).abs() < r / 3)) & (cheb < 0.8 * r),
            (cheb < 0.85 * r) & (cheb > 0.5 * r),
            ((dx - r / 2) ** 2 + dy**2 < (r / 2.2) ** 2) | ((dx + r / 2) ** 2 + dy**2 < (r / 2.2) ** 2),
            (dist < r) & (dy < 0),
        ]
    )  # (10, N, H, W)
    return masks.gather(0, kind[None, :, None, None].expand(1, *dx.shape)).squeeze(0)


def _make_shapes(n: int, size: int, generator: torch.Generator) -> ImageTensors:
    g = generator
    kind = torch.arange(n) % len(SHAPE_NAMES)
    kind = kind[torch.randperm(n, generator=g)]
    radius = size * (0.22 + 0.16 * torch.rand(n, generator=g))
    centre = size / 2 + (torch.rand(n, 2, generator=g) - 0.5) * size * 0.3
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dy = coords[None, :, None] - centre[:, 1, None, None]
    dx = coords[None, None, :] - centre[:, 0, None, None]
    dx, dy = torch.broadcast_tensors(dx, dy)
    mask = _shape_masks(kind, dx, dy, radius)[:, None]  # (N, 1, H, W)
    # Colours from a small palette, dark on light or light on dark: many images share a
    # colour pair, so colour cannot tell instances apart and contrastive training must use shape.
    dark = torch.tensor([[0.1, 0.1, 0.5], [0.5, 0.1, 0.1], [0.1, 0.4, 0.1], [0.2, 0.2, 0.2]])
    light = torch.tensor([[0.95, 0.85, 0.3], [0.5, 0.85, 0.95], [0.95, 0.6, 0.8], [0.85, 0.85, 0.85]])
    pick = torch.randint(0, 4, (2, n), generator=g)
    dark_fg = torch.rand(n, generator=g) < 0.5
    fg = torch.where(dark_fg[:, None], dark[pick[0]], light[pick[0]])[:, :, None, None]
    bg = torch.where(dark_fg[:, None], light[pick[1]], dark[pick[1]])[:, :, None, None]
    noise = 0.04 * torch.randn(n, 3, size, size, generator=g)
    img = torch.where(mask, fg, bg) + noise
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageTensors(images, kind, len(SHAPE_NAMES), list(SHAPE_NAMES))


def shapes(num_train: int = 2000, num_test: int = 1000, size: int = 32, seed: int = 0) -> Splits:
    """The built-in data set: ten classes of coloured shapes, generated (no download).

    Each image is one shape (disk, square, ring, ...) of random size and position in
    one of a few colours on a contrasting background with pixel noise; the class is
    the shape. Colour and position are nuisances, so a network must learn shape to
    classify it: a small stand-in for CIFAR that trains in a minute or two on a CPU.
    """
    g = torch.Generator().manual_seed(seed)
    return Splits(_make_shapes(num_train, size, g), _make_shapes(num_test, size, g))
