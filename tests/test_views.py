"""Views of several sizes (contrastive.views) and the pipeline's views() / crops().

``views(images, n)`` with one Augment is compared bit for bit with a copy of the implementation it
replaced; multi-crop is checked for its layout, its order of draws, and for W processes drawing
exactly what one process holding the global batch draws (world_size / rank monkeypatched, as in
tests/test_pipeline_base.py).
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from torch import Tensor, nn

from contrastive.augment import Augment
from contrastive.losses import NTXent
from contrastive.pipelines import Pipeline, SimCLR, base
from contrastive.pipelines.base import channels_last
from contrastive.views import MultiCrop, ViewGroup, draw_views

GLOBAL = {"size": 32, "scale": (0.4, 1.0)}
LOCAL = {"size": 16, "scale": (0.05, 0.4)}


class _MultiCropPipeline(Pipeline):
    multi_crop: ClassVar[bool] = True


def _images(batch: int = 8, seed: int = 0) -> Tensor:
    return torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _pipeline(augment: Augment | MultiCrop, seed: int = 0) -> Pipeline:
    cls = _MultiCropPipeline if isinstance(augment, MultiCrop) else Pipeline
    return cls(
        backbone=nn.Flatten(), augment=augment, optimizer=torch.optim.SGD, feature_dim=4, num_classes=2, seed=seed
    )


def _dino(solarize_p: float = 0.0) -> MultiCrop:
    """DINO's layout at CIFAR's scale: 2 global 32 px crops at scale (0.4, 1), 6 local 16 px at (0.05, 0.4)."""
    return MultiCrop([ViewGroup(Augment(**GLOBAL, solarize_p=solarize_p), 2), ViewGroup(Augment(**LOCAL), 6)])


def _views_before(p: Pipeline, images: Tensor, n: int, w: int, r: int) -> list[Tensor]:
    """Pipeline.views as it was before contrastive.views (commit a36e98e), verbatim but for world_size()/rank()."""
    b = len(images)
    rows = None
    if w > 1:
        rows = torch.cat([torch.arange(v * b * w + r * b, v * b * w + (r + 1) * b) for v in range(n)])
    out = p.augment(images.repeat(n, 1, 1, 1), p.generator, rows=rows, of=n * b * w).to(p.dtype)
    out = list(out.chunk(n))  # float32 unless the module was cast (precision="bf16-true" or "64-true")
    if channels_last(images.device):
        out = [v.contiguous(memory_format=torch.channels_last) for v in out]
    return out


def _as_rank(monkeypatch: pytest.MonkeyPatch, w: int, r: int) -> None:
    monkeypatch.setattr(base, "world_size", lambda: w)
    monkeypatch.setattr(base, "rank", lambda: r)


def _same(a: list[Tensor], b: list[Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape and x.stride() == y.stride()
        assert torch.equal(x, y)


# --------------------------------------------------------------------------- views() with one Augment


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize(("w", "seed"), [(1, 0), (1, 7), (2, 0), (3, 5)])
def test_views_are_bitwise_the_former_implementation(
    monkeypatch: pytest.MonkeyPatch, n: int, w: int, seed: int
) -> None:
    """Same generator draws in the same order, rows/of included: three steps in a row, on every rank."""
    augment = Augment(blur_p=0.5, solarize_p=0.2)  # every op drawn and applied
    images = _images(4 * w, seed)
    for r in range(w):
        _as_rank(monkeypatch, w, r)
        new, old = _pipeline(augment, seed), _pipeline(augment, seed)
        mine = images[4 * r : 4 * r + 4]
        for _ in range(3):
            _same(new.views(mine, n), _views_before(old, mine, n, w, r))
        assert torch.equal(new.generator.get_state(), old.generator.get_state())


def test_views_of_a_cast_module_are_bitwise_the_former_implementation() -> None:
    new, old = _pipeline(Augment(), 3).double(), _pipeline(Augment(), 3).double()
    got = new.views(_images(), 2)
    _same(got, _views_before(old, _images(), 2, 1, 0))
    assert got[0].dtype == torch.float64


# --------------------------------------------------------------------------- crops()


def test_crops_are_two_global_then_six_local_views() -> None:
    images = _images(5)
    crops = _pipeline(_dino()).crops(images)
    assert [tuple(c.shape) for c in crops] == [(5, 3, 32, 32)] * 2 + [(5, 3, 16, 16)] * 6
    assert all(c.dtype == torch.float32 and c.is_contiguous(memory_format=torch.channels_last) for c in crops)
    assert _dino().sizes == [32, 32, 16, 16, 16, 16, 16, 16] and _dino().num_views == 8
    for a in range(8):  # independent views: no two alike
        for b in range(a + 1, 8):
            if crops[a].shape == crops[b].shape:
                assert not torch.equal(crops[a], crops[b])


def test_crops_draw_each_group_in_one_call_in_group_order() -> None:
    """The groups in order from one generator, each group as draw_views draws it (its n-fold batch)."""
    images, multicrop = _images(), _dino(solarize_p=0.3)
    g = torch.Generator().manual_seed(11)
    want = [
        *draw_views(multicrop.groups[0].augment, images, 2, g),
        *draw_views(multicrop.groups[1].augment, images, 6, g),
    ]
    _same(multicrop(images, torch.Generator().manual_seed(11)), want)
    p = _pipeline(multicrop, seed=11)
    _same([c.contiguous() for c in p.crops(images)], want)  # the pipeline: the same values, channels-last
    assert torch.equal(p.generator.get_state(), g.get_state())


def test_crops_are_determined_by_the_seed() -> None:
    images = _images()
    first, again, other = (_pipeline(_dino(), seed).crops(images) for seed in (4, 4, 5))
    _same(first, again)
    assert not any(torch.equal(a, b) for a, b in zip(first, other))
    p = _pipeline(_dino(), 4)
    p.crops(images)
    assert not any(torch.equal(a, b) for a, b in zip(first, p.crops(images)))  # the next step draws anew


@pytest.mark.parametrize("w", [2, 3])
def test_processes_together_draw_the_crops_of_one_process(monkeypatch: pytest.MonkeyPatch, w: int) -> None:
    """W ranks (generators in step), each with its B rows: their crops are one process's crops of the W B batch."""
    images = _images(3 * w, seed=2)
    one = _pipeline(_dino(solarize_p=0.5), 9)
    whole = [one.crops(images) for _ in range(2)]  # two steps of one process
    for r in range(w):
        _as_rank(monkeypatch, w, r)
        p = _pipeline(_dino(solarize_p=0.5), 9)
        for step in range(2):
            mine = p.crops(images[3 * r : 3 * r + 3])
            for v in range(8):
                assert torch.equal(mine[v], whole[step][v][3 * r : 3 * r + 3]), (r, step, v)
        assert torch.equal(p.generator.get_state(), one.generator.get_state())  # every rank ends in step


def test_a_single_group_multicrop_is_the_plain_augment_bitwise(monkeypatch: pytest.MonkeyPatch) -> None:
    augment = Augment(blur_p=0.5, solarize_p=0.2)
    images = _images(6, seed=1)
    _same(_pipeline(MultiCrop([ViewGroup(augment, 3)]), 2).crops(images), _pipeline(augment, 2).views(images, 3))
    _as_rank(monkeypatch, 2, 1)
    _same(
        _pipeline(MultiCrop({"global": ViewGroup(augment, 2)}), 2).crops(images[3:]),
        _pipeline(augment, 2).views(images[3:], 2),
    )


def test_features_normalise_with_the_shared_statistics() -> None:
    images = _images()
    assert torch.equal(_pipeline(_dino()).features(images), _pipeline(Augment()).features(images))


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ([], r"MultiCrop: no groups; give at least one ViewGroup"),
        ("global", r"MultiCrop: groups must be a list of ViewGroup .*got str"),
        ([Augment()], r"MultiCrop: group '0' must be a ViewGroup \(an Augment and num_views\), got Augment"),
        (
            [ViewGroup(Augment(**GLOBAL), 2), ViewGroup(Augment(**LOCAL, mean=(0.5,), std=(0.5,)), 6)],
            r"group '1' normalises with mean=\(0.5,\), std=\(0.5,\) but group '0' with mean=\(0.4914, "
            r".*must share them",
        ),
        (
            {"local": ViewGroup(Augment(**LOCAL), 6), "global": ViewGroup(Augment(**GLOBAL), 2)},
            r"group 'global' \(32 px\) follows the smaller group 'local' \(16 px\): order the groups from the largest",
        ),
    ],
)
def test_bad_multicrops_are_refused(groups: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MultiCrop(groups)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_views", [0, -1, 2.0, True, "2", None])
def test_a_view_group_needs_a_positive_integer_of_views(num_views: object) -> None:
    with pytest.raises(ValueError, match=rf"ViewGroup: num_views must be a positive integer, got {num_views!r}"):
        ViewGroup(Augment(), num_views)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"ViewGroup: augment must be a contrastive.augment.Augment, got dict"):
        ViewGroup({"size": 32}, 2)  # type: ignore[arg-type]


def test_pipelines_that_draw_one_augment_refuse_a_multicrop_at_once() -> None:
    with pytest.raises(
        ValueError,
        match=r"the SimCLR pipeline draws its views from one Augment, not a MultiCrop of "
        r"\[32, 32, 16, 16, 16, 16, 16, 16\] px views: use an Augment \(aug=simclr\)",
    ):
        SimCLR(
            projector=nn.Linear(4, 2),
            loss=NTXent(),
            backbone=nn.Flatten(),
            augment=_dino(),
            optimizer=torch.optim.SGD,
            feature_dim=4,
            num_classes=2,
        )
    with pytest.raises(ValueError, match=r"views\(\) draws n views of one Augment, but augment is a MultiCrop"):
        _pipeline(_dino()).views(_images(), 2)
    with pytest.raises(ValueError, match=r"crops\(\) draws the groups of a contrastive.views.MultiCrop"):
        _pipeline(Augment()).crops(_images())


# --------------------------------------------------------------------------- the config


def test_the_multicrop_config_is_dino_at_cifar_scale(config) -> None:  # type: ignore[no-untyped-def]
    """aug=multicrop: 2 x 32 px at (0.4, 1), 6 x 16 px at (0.05, 0.4), every other value aug/simclr's."""
    from hydra.utils import instantiate

    cfg = config("train", ["experiment=simclr_cifar10", "aug=multicrop"])
    multicrop = instantiate(cfg.aug)
    assert isinstance(multicrop, MultiCrop) and multicrop.names == ("global", "local")
    assert multicrop.sizes == [32] * 2 + [16] * 6
    assert [g.augment.scale for g in multicrop.groups] == [(0.4, 1.0), (0.05, 0.4)]
    simclr = instantiate(config("train", ["experiment=simclr_cifar10"]).aug)
    for g in multicrop.groups:
        for key, value in vars(simclr).items():
            if key not in ("size", "scale", "_graphs"):
                assert getattr(g.augment, key) == value, key
    cfg = config(
        "train",
        [
            "experiment=simclr_cifar10",
            "aug=multicrop",
            "data.image_size=64",
            "aug.groups.local.num_views=8",
            "aug.groups.global.augment.solarize_p=0.2",
        ],
    )
    multicrop = instantiate(cfg.aug)
    assert multicrop.sizes == [64] * 2 + [32] * 8
    assert [g.augment.solarize_p for g in multicrop.groups] == [0.2, 0.0]  # BYOL/DINO: one global view solarised


def test_a_bad_multicrop_config_names_the_fault(config) -> None:  # type: ignore[no-untyped-def]
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    mean = "aug.groups.local.augment.mean=[0.5,0.5,0.5]"
    cfg = config("train", ["experiment=simclr_cifar10", "aug=multicrop", mean])
    with pytest.raises(InstantiationException, match=r"group 'local' normalises with mean=\(0.5, 0.5, 0.5\).*share"):
        instantiate(cfg.aug)
    cfg = config("train", ["experiment=simclr_cifar10", "aug=multicrop", "aug.groups.local.num_views=0"])
    with pytest.raises(InstantiationException, match=r"ViewGroup: num_views must be a positive integer, got 0"):
        instantiate(cfg.aug)
