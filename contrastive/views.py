"""Views of several sizes (multi-crop): groups of views, each group drawn by one :class:`Augment`.

SwAV (Caron et al. 2020) and DINO (Caron et al. 2021) train on two *global* crops of each image
and several smaller *local* crops (ImageNet: 2 x 224 px at scale (0.4, 1) and 6-10 x 96 px at scale
(0.05, 0.4)); the teacher sees only the global ones. A :class:`MultiCrop` is an ordered list of
:class:`ViewGroup` (an ``Augment`` and its number of views), largest crops first, so the global
views are always the first ones.

Each group is drawn by :func:`draw_views`: one ``Augment`` call on the group's n-fold batch, as
``Pipeline.views`` always drew its views, so a one-group ``MultiCrop`` gives exactly the views of
its ``Augment``. Torch only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise

import torch
from torch import Tensor

from contrastive.augment import Augment

__all__ = ["MultiCrop", "ViewGroup", "draw_views"]


def draw_views(
    augment: Augment, images: Tensor, n: int, generator: torch.Generator | None = None, world: int = 1, rank: int = 0
) -> list[Tensor]:
    """``n`` independently augmented views of a uint8 batch, from one ``augment`` call on its n-fold batch.

    One call on the n-fold batch: per-sample parameters, a fraction of the kernel launches. Under
    ``world`` W > 1 processes (generators in step on every rank, equal batches of B): the parameters
    of the global n-fold batch (n W B rows, view-major, rank-minor) and this rank's rows of each
    view, as one process holding the global batch would draw them.

    Args:
        augment: the view generator.
        images: (B, C, H, W) uint8.
        n: views per image, >= 1.
        generator: CPU generator of the parameters (advanced by one draw of n W B samples).
        world, rank: processes and this process's rank.

    Returns:
        n x (B, C, S, S) float32, view v of image b at ``[v][b]``.
    """
    b = len(images)
    rows = None
    if world > 1:
        rows = torch.cat([torch.arange(v * b * world + rank * b, v * b * world + (rank + 1) * b) for v in range(n)])
    out = augment(images.repeat(n, 1, 1, 1), generator, rows=rows, of=n * b * world)  # (n B, C, S, S)
    return list(out.chunk(n))


class ViewGroup:
    """``num_views`` views of each image drawn by one ``augment`` (e.g. DINO's 2 global crops).

    Args:
        augment: the view generator of this group (its ``size`` is the views' side).
        num_views: views per image, >= 1.
    """

    def __init__(self, augment: Augment, num_views: int) -> None:
        if not isinstance(augment, Augment):
            raise ValueError(f"ViewGroup: augment must be a contrastive.augment.Augment, got {type(augment).__name__}")
        if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
            raise ValueError(f"ViewGroup: num_views must be a positive integer, got {num_views!r}")
        self.augment = augment
        self.num_views = int(num_views)

    @property
    def size(self) -> int:
        """The side of this group's views."""
        return self.augment.size

    def __repr__(self) -> str:
        return f"ViewGroup(num_views={self.num_views}, augment={self.augment!r})"


class MultiCrop:
    """Views of several sizes: every view of every group, largest crops first (SwAV, DINO).

    Args:
        groups: the groups in order, a sequence or a mapping of names to groups (the configs name them,
            ``aug.groups.local.num_views=8``); sizes must not grow along it, so the global views come
            first. All groups share the normalisation (``mean``, ``std``): the evaluation features are
            normalised once, with it.

    Attributes:
        groups: the groups, in order; ``names``: their names (``"0"``, ``"1"``, ... for a sequence).
        mean, std: the shared normalisation statistics.
    """

    def __init__(self, groups: Sequence[ViewGroup] | Mapping[str, ViewGroup]) -> None:
        if isinstance(groups, Mapping):
            named = [(str(k), g) for k, g in groups.items()]
        elif isinstance(groups, Sequence) and not isinstance(groups, (str, bytes)):
            named = [(str(i), g) for i, g in enumerate(groups)]
        else:
            raise ValueError(
                f"MultiCrop: groups must be a list of ViewGroup (or a mapping of names to them), "
                f"got {type(groups).__name__}"
            )
        if not named:
            raise ValueError("MultiCrop: no groups; give at least one ViewGroup (e.g. 2 global crops)")
        for name, group in named:
            if not isinstance(group, ViewGroup):
                raise ValueError(
                    f"MultiCrop: group {name!r} must be a ViewGroup (an Augment and num_views), "
                    f"got {type(group).__name__}"
                )
        first_name, first = named[0]
        for name, group in named[1:]:
            a, b = first.augment, group.augment
            if (a.mean, a.std) != (b.mean, b.std):
                raise ValueError(
                    f"MultiCrop: group {name!r} normalises with mean={b.mean}, std={b.std} but group "
                    f"{first_name!r} with mean={a.mean}, std={a.std}: all groups must share them (the "
                    "evaluation features are normalised once)"
                )
        for (prev_name, prev), (name, group) in pairwise(named):
            if group.size > prev.size:
                raise ValueError(
                    f"MultiCrop: group {name!r} ({group.size} px) follows the smaller group {prev_name!r} "
                    f"({prev.size} px): order the groups from the largest crops to the smallest, so the "
                    "global views come first"
                )
        self.names = tuple(name for name, _ in named)
        self.groups = tuple(group for _, group in named)

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean of the normalisation, shared by all groups."""
        return self.groups[0].augment.mean

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel std of the normalisation, shared by all groups."""
        return self.groups[0].augment.std

    @property
    def num_views(self) -> int:
        """Views per image, all groups together."""
        return sum(g.num_views for g in self.groups)

    @property
    def sizes(self) -> list[int]:
        """The side of every view, in order (DINO's default: ``[32, 32, 16, 16, 16, 16, 16, 16]``)."""
        return [g.size for g in self.groups for _ in range(g.num_views)]

    def __call__(
        self, images: Tensor, generator: torch.Generator | None = None, world: int = 1, rank: int = 0
    ) -> list[Tensor]:
        """Every view of every group: the groups in order, each by :func:`draw_views` on its n-fold batch.

        Returns:
            ``num_views`` x (B, C, S_g, S_g) float32, group g's views after those of the groups before it.
        """
        return [
            view for g in self.groups for view in draw_views(g.augment, images, g.num_views, generator, world, rank)
        ]

    def __repr__(self) -> str:
        return "MultiCrop(" + ", ".join(f"{n}={g!r}" for n, g in zip(self.names, self.groups)) + ")"
