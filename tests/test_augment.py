"""contrastive.augment against torchvision's per-image functional ops and samplers.

Tolerances: every op agrees with torchvision to 1e-5 (float32 rounding; the spec asks
1/255 ~ 3.9e-3), the composed pipeline to 1e-4 after normalisation (division by std ~0.25).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from contrastive.augment import (
    Augment,
    AugmentParams,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    apply_where,
    color_jitter,
    gaussian_blur,
    gaussian_kernels,
    hflip,
    normalize,
    normalize_uint8,
    resized_crop,
    rgb_to_grayscale,
    sample_blur_sigma,
    sample_crop_boxes,
    sample_jitter,
    sample_mask,
    solarize,
    to_float,
)

TOL = 1e-5
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def images(batch: int = 16, channels: int = 3, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    """Random float images on the uint8 grid (so grey pixels and channel ties occur), plus edge cases."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, channels, height, width), generator=g).float() / 255
    if batch >= 3:
        x[0] = 0.0  # black
        x[1] = 1.0  # white
        x[2, :, : height // 2] = x[2, :1, : height // 2]  # grey rows: all channels equal
    return x


def per_image(fn, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
    """torchvision reference: ``fn`` on each image with its own Python-scalar parameters."""
    return torch.stack([fn(x[b], *(p[b].tolist() for p in params)) for b in range(x.shape[0])])


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return (a - b).abs().max().item()


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov distance ``max |F_a - F_b|``."""
    values = torch.cat([a, b]).unique()
    cdf_a = (a[None, :] <= values[:, None]).double().mean(1)
    cdf_b = (b[None, :] <= values[:, None]).double().mean(1)
    return (cdf_a - cdf_b).abs().max().item()


# ------------------------------------------------------------------ crop + resize


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("size", [32, 17, (20, 44)])
def test_resized_crop_matches_torchvision(size, antialias):
    x = images(24, height=28, width=40)
    boxes = sample_crop_boxes(24, 28, 40, scale=(0.05, 1.0), generator=torch.Generator().manual_seed(1))
    out = resized_crop(x, boxes, size, antialias)
    out_size = [size, size] if isinstance(size, int) else list(size)
    ref = per_image(
        lambda img, box: TF.resized_crop(img, *box, out_size, InterpolationMode.BILINEAR, antialias=antialias),
        x,
        boxes,
    )
    assert max_err(out, ref) < TOL


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    height=st.integers(4, 40),
    width=st.integers(4, 40),
    size=st.integers(1, 48),
    antialias=st.booleans(),
)
def test_resized_crop_any_box_matches_torchvision(data, height, width, size, antialias):
    box_h = data.draw(st.integers(1, height))
    box_w = data.draw(st.integers(1, width))
    top = data.draw(st.integers(0, height - box_h))
    left = data.draw(st.integers(0, width - box_w))
    x = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(height * 41 + width))
    out = resized_crop(x, torch.tensor([[top, left, box_h, box_w]]), size, antialias)
    ref = TF.resized_crop(x[0], top, left, box_h, box_w, [size, size], InterpolationMode.BILINEAR, antialias=antialias)
    assert max_err(out[0], ref) < TOL


def test_resized_crop_whole_image_at_same_size_is_exact():
    x = images(4)
    out = resized_crop(x, torch.tensor([[0, 0, 32, 32]] * 4), 32)
    assert torch.equal(out, x)


def test_resized_crop_takes_the_box():
    x = images(2, height=8, width=8)
    out = resized_crop(x, torch.tensor([[2, 3, 4, 5], [0, 0, 1, 1]]), (4, 5))
    assert torch.equal(out[0], x[0, :, 2:6, 3:8])  # same-size box: a plain crop
    assert torch.equal(out[1], x[1, :, :1, :1].expand(3, 4, 5))  # one pixel blown up


# ------------------------------------------------------------------- colour ops


def test_hflip_follows_mask_exactly():
    x = images(6)
    mask = torch.tensor([True, False, True, True, False, False])
    out = hflip(x, mask)
    for b in range(6):
        assert torch.equal(out[b], TF.horizontal_flip(x[b]) if mask[b] else x[b])


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (adjust_brightness, TF.adjust_brightness),
        (adjust_contrast, TF.adjust_contrast),
        (adjust_saturation, TF.adjust_saturation),
    ],
)
@pytest.mark.parametrize("channels", [3, 1])
def test_blend_ops_match_torchvision(ours, theirs, channels):
    x = images(32, channels=channels)
    factor = torch.rand(32, generator=torch.Generator().manual_seed(2)) * 2.5
    factor[:3] = torch.tensor([0.0, 1.0, 2.5])
    out = ours(x, factor)
    assert max_err(out, per_image(theirs, x, factor)) < TOL
    assert out.min() >= 0 and out.max() <= 1


def test_hue_matches_torchvision():
    x = images(48)
    factor = torch.rand(48, generator=torch.Generator().manual_seed(3)) - 0.5
    factor[:3] = torch.tensor([-0.5, 0.0, 0.5])
    out = adjust_hue(x, factor)
    assert max_err(out, per_image(TF.adjust_hue, x, factor)) < TOL
    assert out.min() >= 0 and out.max() <= 1


def test_hue_keeps_grey_pixels_and_a_full_turn():
    x = images(4)
    grey = x[2, :, :16]
    assert torch.allclose(adjust_hue(x, torch.full((4,), 0.3))[2, :, :16], grey, atol=TOL)
    # +0.5 twice is a full turn
    twice = adjust_hue(adjust_hue(x, torch.full((4,), 0.5)), torch.full((4,), 0.5))
    assert torch.allclose(twice, x, atol=1e-5)
    # red -> green at a third of a turn
    red = torch.zeros(1, 3, 1, 1)
    red[0, 0] = 1.0
    assert torch.allclose(adjust_hue(red, torch.tensor([1 / 3])).flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=TOL)


def test_grayscale_matches_torchvision():
    x = images(8)
    out = rgb_to_grayscale(x)
    assert out.shape == (8, 1, 32, 32)
    ref = torch.stack([TF.rgb_to_grayscale(x[b], num_output_channels=1) for b in range(8)])
    assert max_err(out, ref) < 1e-6
    one = images(2, channels=1)
    assert rgb_to_grayscale(one) is one


def _jitter_reference(img: torch.Tensor, factors: list[float], order: list[int]) -> torch.Tensor:
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for op in order:
        img = ops[op](img, factors[op])
    return img


@pytest.mark.parametrize("channels", [3, 1])
def test_color_jitter_matches_torchvision_in_per_sample_order(channels):
    x = images(64, channels=channels)
    g = torch.Generator().manual_seed(4)
    factors, order = sample_jitter(64, (0.2, 1.8), (0.2, 1.8), (0.0, 2.0), (-0.5, 0.5), g)
    out = color_jitter(x, factors, order)
    assert max_err(out, per_image(_jitter_reference, x, factors, order)) < TOL
    assert len({tuple(row) for row in order.tolist()}) > 10  # the order really varies per sample


def test_color_jitter_order_matters():
    x = images(4)[3:].expand(2, 3, 32, 32)  # one image twice
    factors = torch.tensor([[1.8, 0.2, 1.0, 0.0]] * 2)
    order = torch.tensor([[0, 1, 2, 3], [1, 0, 2, 3]])
    out = color_jitter(x, factors, order, hue=False)
    assert (out[0] - out[1]).abs().max() > 0.05  # brightness clamps before or after contrast
    assert max_err(out, per_image(_jitter_reference, x, factors, order)) < TOL


def test_color_jitter_without_hue_and_identity_factors_is_exact():
    x = images(8)
    factors, order = sample_jitter(8, None, None, None, None)
    assert torch.equal(factors, torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 8))
    assert torch.equal(color_jitter(x, factors, order, hue=False), x)


def test_gaussian_kernels_sum_to_one_and_match_closed_form():
    sigma = torch.tensor([0.1, 1.0, 2.0])
    k = gaussian_kernels(sigma, 5)
    assert torch.allclose(k.sum(1), torch.ones(3))
    d = torch.arange(5) - 2.0
    expected = torch.exp(-(d**2) / (2 * 1.0**2))
    assert torch.allclose(k[1], expected / expected.sum(), atol=1e-7)
    assert k[0, 2] > 0.999  # sigma 0.1 is nearly a delta


@pytest.mark.parametrize("kernel_size", [3, 5, 9])
def test_gaussian_blur_matches_torchvision(kernel_size):
    x = images(16)
    sigma = sample_blur_sigma(16, (0.1, 2.0), torch.Generator().manual_seed(5))
    out = gaussian_blur(x, sigma, kernel_size)
    ref = per_image(lambda img, s: TF.gaussian_blur(img, [kernel_size, kernel_size], [s, s]), x, sigma)
    assert max_err(out, ref) < TOL


def test_solarize_and_normalize_match_torchvision_exactly():
    x = images(4)
    assert torch.equal(solarize(x), torch.stack([TF.solarize(img, 0.5) for img in x]))
    out = normalize(x, CIFAR_MEAN, CIFAR_STD)
    assert torch.equal(out, torch.stack([TF.normalize(img, list(CIFAR_MEAN), list(CIFAR_STD)) for img in x]))


def test_normalize_uint8_is_scaled_then_normalised():
    raw = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    out = normalize_uint8(raw, CIFAR_MEAN, CIFAR_STD)
    ref = TF.normalize(TF.to_dtype(raw, torch.float32, scale=True), list(CIFAR_MEAN), list(CIFAR_STD))
    assert out.dtype == torch.float32 and max_err(out, ref) < 1e-6
    assert torch.equal(to_float(raw), raw.float() / 255)


# --------------------------------------------------------------------- samplers


def _torchvision_boxes(n: int, height: int, width: int, scale, ratio) -> torch.Tensor:
    torch.manual_seed(7)
    img = torch.empty(1, height, width)
    return torch.tensor([RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)])


@pytest.mark.parametrize(("height", "width"), [(32, 32), (24, 40)])
def test_crop_sampler_matches_torchvision_distribution(height, width):
    n, scale, ratio = 3000, (0.08, 1.0), (3 / 4, 4 / 3)
    ours = sample_crop_boxes(n, height, width, scale, ratio, torch.Generator().manual_seed(8))
    theirs = _torchvision_boxes(n, height, width, scale, ratio)
    top, left, h, w = ours.T
    assert ours.dtype == torch.int64
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    # KS at alpha ~1e-3 for two samples of n: 1.95 * sqrt(2 / n)
    bound = 1.95 * math.sqrt(2 / n)
    for column in range(4):
        assert ks_statistic(ours[:, column].double(), theirs[:, column].double()) < bound, column
    area, theirs_area = (h * w).double() / (height * width), (theirs[:, 2] * theirs[:, 3]).double() / (height * width)
    assert abs(area.mean() - theirs_area.mean()) < 4 * theirs_area.std() / math.sqrt(n / 2)
    log_ratio = (w.double() / h.double()).log()
    # rounding h and w to integers widens the ranges by at most half a pixel on each side
    assert log_ratio.min() > math.log(3 / 4) - 0.15 and log_ratio.max() < math.log(4 / 3) + 0.15
    assert area.min() > 0.08 * 0.6 and area.max() <= 1.0


def test_crop_sampler_falls_back_to_torchvision_central_crop():
    # every attempt is 30x30 or larger, taller than the image: no attempt is valid
    ours = sample_crop_boxes(5, 10, 100, (0.9, 1.0), (1.0, 1.0), torch.Generator().manual_seed(9))
    theirs = _torchvision_boxes(1, 10, 100, (0.9, 1.0), (1.0, 1.0))
    assert torch.equal(ours, theirs.expand(5, 4))
    assert ours[0].tolist() == [0, 45, 10, 10]


def test_crop_sampler_full_scale_square_ratio_takes_the_whole_image():
    boxes = sample_crop_boxes(16, 32, 32, (1.0, 1.0), (1.0, 1.0))
    assert torch.equal(boxes, torch.tensor([[0, 0, 32, 32]] * 16))


def test_jitter_sampler_ranges_and_uniform_order():
    n = 8000
    ranges = [(0.6, 1.4), (0.5, 1.5), (0.0, 2.0), (-0.1, 0.1)]
    factors, order = sample_jitter(n, *ranges, generator=torch.Generator().manual_seed(10))
    assert factors.dtype == torch.float32 and order.dtype == torch.int64
    for column, (lo, hi) in enumerate(ranges):
        f = factors[:, column]
        assert f.min() >= lo and f.max() <= hi
        assert abs(f.mean().item() - (lo + hi) / 2) < 4 * (hi - lo) / math.sqrt(12 * n)
        assert f.min() < lo + 0.01 * (hi - lo) and f.max() > hi - 0.01 * (hi - lo)
    assert torch.equal(order.sort(1).values, torch.arange(4).expand(n, 4))
    counts = torch.stack([(order == op).double().mean(0) for op in range(4)])  # (op, position)
    assert (counts - 0.25).abs().max() < 0.025


def test_mask_sampler():
    g = torch.Generator().manual_seed(11)
    assert not sample_mask(1000, 0.0, g).any()
    assert sample_mask(1000, 1.0, g).all()
    assert abs(sample_mask(20000, 0.3, g).double().mean().item() - 0.3) < 0.015


def test_blur_sigma_sampler_range():
    sigma = sample_blur_sigma(5000, (0.1, 2.0), torch.Generator().manual_seed(12))
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and abs(sigma.mean().item() - 1.05) < 0.03


# ----------------------------------------------------------------------- Augment


def raw_batch(batch: int = 32, channels: int = 3, size: int = 32, seed: int = 13) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8, generator=g)


def test_augment_output_shape_dtype_range():
    raw = raw_batch(32, size=40)
    out = Augment(size=24, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), blur_p=0.5, solarize_p=0.5)(raw)
    assert out.shape == (32, 3, 24, 24) and out.dtype == torch.float32 and out.device == raw.device
    assert out.min() >= 0 and out.max() <= 1
    normalised = Augment()(raw)
    assert normalised.min() < -1 and normalised.max() > 1  # (x - mean) / std leaves [0, 1]


def test_augment_same_seed_same_batch_other_seed_differs():
    raw, augment = raw_batch(), Augment(blur_p=0.5, solarize_p=0.2)
    a = augment(raw, torch.Generator().manual_seed(0))
    b = augment(raw, torch.Generator().manual_seed(0))
    c = augment(raw, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert (a - c).abs().amax((1, 2, 3)).gt(1e-3).all()  # every sample differs


def test_augment_all_p_zero_is_bit_identical_to_normalize_uint8():
    raw = raw_batch()
    augment = Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    assert torch.equal(augment(raw), normalize_uint8(raw, CIFAR_MEAN, CIFAR_STD))


def _plain(**kwargs) -> Augment:
    """No crop, no random op, identity normalisation, except what ``kwargs`` switch on."""
    defaults = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0)
    defaults.update(mean=(0.0,) * 3, std=(1.0,) * 3)
    return Augment(**{**defaults, **kwargs})


def test_augment_p_one_always_applies():
    raw = raw_batch()
    x = to_float(raw)
    assert torch.equal(_plain(flip_p=1.0)(raw), x.flip(-1))
    assert torch.equal(_plain(solarize_p=1.0)(raw), solarize(x))
    gray = _plain(gray_p=1.0)(raw)
    assert torch.equal(gray, rgb_to_grayscale(x).expand_as(x))
    blur = _plain(blur_p=1.0, blur_kernel=5)
    params = blur.sample(32, 32, 32, torch.Generator().manual_seed(14))
    assert torch.equal(blur.apply(raw, params), gaussian_blur(x, params.sigma, 5))
    jitter = _plain(jitter_p=1.0)
    params = jitter.sample(32, 32, 32, torch.Generator().manual_seed(15))
    assert torch.equal(jitter.apply(raw, params), color_jitter(x, params.factors, params.order))


def test_augment_masks_select_per_sample():
    raw = raw_batch()
    x = to_float(raw)
    augment = _plain(flip_p=0.5, solarize_p=0.5)
    params = augment.sample(32, 32, 32, torch.Generator().manual_seed(16))
    out = augment.apply(raw, params)
    expected = apply_where(params.solarize, solarize(hflip(x, params.flip)), hflip(x, params.flip))
    assert torch.equal(out, expected)
    assert 0 < params.flip.sum() < 32 and 0 < params.solarize.sum() < 32


def test_augment_matches_torchvision_pipeline_given_parameters():
    raw = raw_batch(24, size=36)
    augment = Augment(size=32, blur_p=0.5, blur_kernel=3, solarize_p=0.3)
    params = augment.sample(24, 36, 36, torch.Generator().manual_seed(17))
    out = augment.apply(raw, params)
    for b in range(24):
        img = TF.to_dtype(raw[b], torch.float32, scale=True)
        img = TF.resized_crop(img, *params.boxes[b].tolist(), [32, 32], InterpolationMode.BILINEAR, antialias=True)
        if params.flip[b]:
            img = TF.horizontal_flip(img)
        if params.jitter[b]:
            img = _jitter_reference(img, params.factors[b].tolist(), params.order[b].tolist())
        if params.gray[b]:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if params.blur[b]:
            img = TF.gaussian_blur(img, [3, 3], [params.sigma[b].item()] * 2)
        if params.solarize[b]:
            img = TF.solarize(img, 0.5)
        img = TF.normalize(img, list(CIFAR_MEAN), list(CIFAR_STD))
        assert max_err(out[b], img) < 1e-4, b


def test_augment_single_channel():
    raw = raw_batch(16, channels=1)
    augment = Augment(mean=(0.5,), std=(0.5,), gray_p=1.0, jitter=(0.0, 0.0, 0.4, 0.1), jitter_p=1.0)
    out = augment(raw)
    assert out.shape == (16, 1, 32, 32)
    # saturation and hue are the identity on one channel, so only the crop/flip act
    plain = Augment(mean=(0.5,), std=(0.5,), gray_p=1.0, jitter_p=0.0)
    same = torch.equal(augment(raw, torch.Generator().manual_seed(3)), plain(raw, torch.Generator().manual_seed(3)))
    assert same


def test_augment_accepts_lists_and_omegaconf():
    OmegaConf = pytest.importorskip("omegaconf").OmegaConf

    cfg = OmegaConf.create({"scale": [0.2, 1.0], "ratio": [0.75, 1.33], "mean": [0.5] * 3, "std": [0.5] * 3})
    cfg.jitter = [0.4, 0.4, [0.5, 1.5], 0.1]
    augment = Augment(**cfg)
    assert augment.scale == (0.2, 1.0) and augment.jitter[2] == (0.5, 1.5) and augment.jitter[0] == (0.6, 1.4)
    assert augment(raw_batch(4)).shape == (4, 3, 32, 32)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(flip_p=1.5),
        dict(gray_p=-0.1),
        dict(scale=(0.9, 0.1)),
        dict(scale=(0.0, 1.0)),
        dict(scale=(0.5,)),
        dict(ratio=(2.0, 1.0)),
        dict(size=0),
        dict(blur_kernel=4),
        dict(blur_sigma=(0.0, 1.0)),
        dict(jitter=(0.4, 0.4, 0.4)),
        dict(jitter=(-0.1, 0.4, 0.4, 0.1)),
        dict(jitter=(0.4, 0.4, 0.4, 0.7)),
        dict(mean=(0.5, 0.5), std=(0.5, 0.5, 0.5)),
        dict(std=(0.2, 0.0, 0.2)),
    ],
)
def test_augment_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        Augment(**kwargs)


def test_a_blur_kernel_wider_than_the_image_is_refused_only_where_blur_is_on():
    """It failed on the first batch inside F.pad, with no word of blur_kernel or size."""
    with pytest.raises(ValueError, match="blur_kernel=23 is too large for size=8: .* pass blur_kernel <= 15"):
        Augment(size=8, blur_p=0.5, blur_kernel=23)
    assert Augment(size=8, blur_p=0.0, blur_kernel=23)(raw_batch(2)).shape == (2, 3, 8, 8)  # unused kernel
    assert Augment(size=8, blur_p=1.0, blur_kernel=15)(raw_batch(2)).shape == (2, 3, 8, 8)  # widest that fits


def test_apply_copies_nothing_from_the_host(monkeypatch):
    """``apply`` runs inside a captured CUDA graph: a host buffer read there is read again at every replay,
    after the caching host allocator may have handed its memory to another tensor."""
    import contrastive.augment as aug

    augment = Augment(size=16, blur_p=0.5, blur_kernel=3, solarize_p=0.5, gray_p=0.5)
    raw = raw_batch(6)
    params = augment.sample(6, 32, 32, torch.Generator().manual_seed(3))
    expected = augment.apply(raw, params)

    def no_host_copy(*args, **kwargs):
        raise AssertionError("apply copied a tensor from the host")

    monkeypatch.setattr(aug, "_to_device", no_host_copy)
    monkeypatch.setattr(torch.Tensor, "pin_memory", no_host_copy)
    assert torch.equal(augment.apply(raw, params), expected)


def test_normalize_takes_one_statistic_for_every_channel_and_names_a_mismatch():
    x = images(2)
    assert torch.equal(normalize(x, (0.5,), (0.25,)), (x - 0.5) / 0.25)
    with pytest.raises(ValueError, match="2 mean/std entries for 3 channels"):
        normalize(x, (0.5, 0.5), (0.2, 0.2))


def test_augment_rejects_channel_mismatch_and_integer_images():
    with pytest.raises(ValueError):
        Augment()(raw_batch(2, channels=1))
    with pytest.raises(ValueError):
        Augment()(raw_batch(2).to(torch.int32))


def test_params_to_same_device_is_a_no_op():
    params = Augment().sample(4, 32, 32)
    assert params.to("cpu") is params
    assert isinstance(params, AugmentParams)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_gpu_agree_for_the_same_seed_without_syncs():
    raw = raw_batch(256, size=40)
    augment = Augment(size=32, blur_p=0.5, solarize_p=0.2)
    cpu = augment(raw, torch.Generator().manual_seed(18))
    gpu_raw = raw.to("cuda")
    augment(gpu_raw, torch.Generator().manual_seed(0))  # warm up (allocator, pinned memory)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = augment(gpu_raw, torch.Generator().manual_seed(18))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    assert max_err(gpu.cpu(), cpu) < 1e-4
    params = augment.sample(256, 40, 40, torch.Generator().manual_seed(18))
    moved = params.to("cuda")
    for name in AugmentParams.__dataclass_fields__:
        a, b = getattr(params, name), getattr(moved, name)
        assert b.device.type == "cuda" and b.dtype == a.dtype and torch.equal(b.cpu(), a), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay_equals_eager() -> None:
    """The graphed path gives the eager result for fresh parameters on every call."""
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device="cuda")
    graphed, eager = Augment(cuda_graph=True), Augment(cuda_graph=False)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(3):  # capture, then two replays with new parameters and new images
        out = graphed(images, g1)
        assert torch.equal(out, eager(images, g2))
        images = images.flip(0).contiguous()


# ------------------------------------------------------- boundaries and defaults


@pytest.mark.parametrize(("height", "width"), [(40, 20), (20, 40)])
def test_crop_sampler_accepts_a_box_exactly_as_wide_or_tall_as_the_image(height, width):
    """torchvision accepts ``0 < w <= width and 0 < h <= height``: a 20x20 box (scale 1/2, ratio 1)
    spans the short side exactly, so every attempt is valid and the offset is uniform, not centred."""
    ours = sample_crop_boxes(200, height, width, (0.5, 0.5), (1.0, 1.0), torch.Generator().manual_seed(19))
    theirs = _torchvision_boxes(200, height, width, (0.5, 0.5), (1.0, 1.0))
    assert (theirs[:, 2:] == 20).all()  # torchvision takes the first attempt, full-side box
    assert (ours[:, 2:] == 20).all()
    moving = 0 if height > width else 1  # the offset along the long side
    assert (ours[:, 1 - moving] == 0).all()
    offsets = ours[:, moving]
    assert offsets.min() == 0 and offsets.max() == 20  # uniform over 0..20, both ends reached
    assert len(offsets.unique()) == 21
    assert ks_statistic(offsets.double(), theirs[:, moving].double()) < 1.95 * math.sqrt(2 / 200)


@pytest.mark.parametrize(
    ("height", "width", "ratio", "expected"),
    [
        (10, 100, (1.5, 2.0), [0, 40, 10, 20]),  # too wide: h = height, w = round(h * max(ratio))
        (10, 101, (1.5, 2.0), [0, 40, 10, 20]),  # odd margin 81: left = 81 // 2
        (100, 10, (0.5, 0.75), [40, 0, 20, 10]),  # too tall: w = width, h = round(w / min(ratio))
        (101, 10, (0.5, 0.75), [40, 0, 20, 10]),  # odd margin 81: top = 81 // 2
    ],
)
def test_crop_sampler_fallback_on_non_square_central_crop_matches_torchvision(height, width, ratio, expected):
    # scale >= 0.9 of a 1000-pixel image: every attempt is >= 21 pixels along the short side, none fits
    ours = sample_crop_boxes(4, height, width, (0.9, 1.0), ratio, torch.Generator().manual_seed(20))
    theirs = _torchvision_boxes(1, height, width, (0.9, 1.0), ratio)
    assert theirs[0].tolist() == expected
    assert torch.equal(ours, theirs.expand(4, 4))


def test_augment_jitter_without_hue_still_jitters():
    """hue=0 only drops the hue op (as torchvision); brightness, contrast and saturation still apply."""
    raw = raw_batch(8)
    x = to_float(raw)
    augment = _plain(jitter_p=1.0, jitter=(0.4, 0.4, 0.4, 0.0))
    assert augment.jitter[3] is None
    params = augment.sample(8, 32, 32, torch.Generator().manual_seed(21))
    assert (params.factors[:, 3] == 0).all()  # hue factor
    out = augment.apply(raw, params)
    assert torch.equal(out, color_jitter(x, params.factors, params.order, hue=False))
    assert (out - x).abs().amax((1, 2, 3)).gt(1e-2).all()  # every sample changed
    assert max_err(out, per_image(_jitter_reference, x, params.factors, params.order)) < TOL


@pytest.mark.parametrize(
    ("jitter", "reference"),
    [
        (((1.2, 1.2), 0, 0, 0), lambda img: TF.adjust_brightness(img, 1.2)),
        ((0, (0.7, 0.7), 0, 0), lambda img: TF.adjust_contrast(img, 0.7)),
        ((0, 0, (1.5, 1.5), 0), lambda img: TF.adjust_saturation(img, 1.5)),
        ((0, 0, 0, (0.1, 0.1)), lambda img: TF.adjust_hue(img, 0.1)),
    ],
)
def test_augment_fixed_factor_jitter_applies_that_factor(jitter, reference):
    """A degenerate range (f, f) is a fixed factor; only (1, 1) (hue (0, 0)) is the identity."""
    raw = raw_batch(4)
    x = to_float(raw)
    augment = _plain(jitter_p=1.0, jitter=jitter)
    fixed = next(r for r in augment.jitter if r is not None)
    assert fixed[0] == fixed[1] and sum(r is not None for r in augment.jitter) == 1
    out = augment(raw, torch.Generator().manual_seed(22))
    ref = torch.stack([reference(img) for img in x])
    assert max_err(out, ref) < TOL
    assert (out - x).abs().max() > 0.01
    identity = _plain(jitter_p=1.0, jitter=((1.0, 1.0), (1.0, 1.0), (1.0, 1.0), (0.0, 0.0)))
    assert identity.jitter == (None, None, None, None)
    assert torch.equal(identity(raw), x)


def test_augment_scalar_jitter_strength_clamps_the_lower_bound_at_zero():
    """torchvision: brightness=v gives [max(0, 1 - v), 1 + v]; v > 1 is allowed."""
    augment = Augment(jitter=(1.5, 2.0, 1.0, 0.5))
    assert augment.jitter == ((0.0, 2.5), (0.0, 3.0), (0.0, 2.0), (-0.5, 0.5))
    factors = augment.sample(2000, 32, 32, torch.Generator().manual_seed(23)).factors
    assert factors.min() >= -0.5 and (factors[:, :3] >= 0).all()
    assert factors[:, 0].max() <= 2.5 and factors[:, 0].min() < 0.05


@pytest.mark.parametrize("threshold", [0.25, 64 / 255, 0.75])
def test_solarize_inverts_a_pixel_exactly_at_the_threshold(threshold):
    x = torch.tensor([threshold - 1 / 255, threshold, threshold + 1 / 255]).view(1, 1, 1, 3)
    out = solarize(x, threshold)
    assert torch.equal(out, TF.solarize(x, threshold))
    assert torch.equal(out.flatten(), torch.stack([x.flatten()[0], 1 - x.flatten()[1], 1 - x.flatten()[2]]))


def test_blur_kernel_whose_half_width_equals_the_size_is_refused():
    """Reflect padding needs kernel // 2 < side: for size 8, kernel 17 (half-width 8) already fails in F.pad."""
    with pytest.raises(RuntimeError):
        torch.nn.functional.pad(torch.zeros(1, 3, 8, 8), (8, 8, 8, 8), mode="reflect")
    with pytest.raises(ValueError, match="blur_kernel=17 is too large for size=8: .* pass blur_kernel <= 15"):
        Augment(size=8, blur_p=0.5, blur_kernel=17)
    with pytest.raises(ValueError, match="blur_kernel=3 is too large for size=1"):
        Augment(size=1, blur_p=0.5, blur_kernel=3)
    assert Augment(size=1, blur_p=0.5, blur_kernel=1).blur_kernel == 1


def test_augment_defaults_are_the_simclr_config():
    """The constructor defaults are the documented SimCLR CIFAR recipe of configs/aug/simclr.yaml:
    crop scale (0.08, 1), flip 0.5, jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale 0.2, no blur/solarise."""
    import inspect
    from pathlib import Path

    import yaml

    import contrastive

    cfg = yaml.safe_load((Path(contrastive.__file__).parent / "configs" / "aug" / "simclr.yaml").read_text())
    augment = Augment()
    for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
        assert getattr(augment, name) == cfg[name], name
    assert (augment.flip_p, augment.jitter_p, augment.gray_p, augment.blur_p, augment.solarize_p) == (
        0.5,
        0.8,
        0.2,
        0.0,
        0.0,
    )
    assert augment.scale == tuple(cfg["scale"]) == (0.08, 1.0)
    assert augment.ratio == (3 / 4, 4 / 3)
    assert cfg["jitter"] == [0.4, 0.4, 0.4, 0.1]
    assert augment.jitter == Augment(jitter=cfg["jitter"]).jitter
    assert augment.jitter == ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1))
    defaults = inspect.signature(Augment).parameters
    assert tuple(defaults["jitter"].default) == (0.4, 0.4, 0.4, 0.1)
    sampler = inspect.signature(sample_jitter).parameters
    assert tuple(tuple(sampler[k].default) for k in ("brightness", "contrast", "saturation", "hue")) == augment.jitter
