"""Batched image augmentations as tensor ops, with per-sample parameters.

Every op takes a ``(B, C, H, W)`` float batch in ``[0, 1]`` and per-sample
parameters as tensors, so each op is testable given its parameters and runs on
whichever device holds the images. Samplers draw those parameters from a CPU
``torch.Generator``: the same seed gives the same batch on CPU and GPU, and the
small parameter tensors travel to the device in one asynchronous copy.

The ops follow ``torchvision.transforms.v2.functional`` on float images
(clamping to ``[0, 1]`` after each colour op); the samplers follow
``RandomResizedCrop.get_params``, ``ColorJitter`` and ``GaussianBlur``. Every
op runs in exact float32 element-wise arithmetic (no matmul or convolution), so
TF32 settings cannot change the result. Images have 1 or 3 channels; on one
channel saturation, hue and grayscale are the identity, as in torchvision.

SimCLR: Chen et al., "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020 (appendix A gives the augmentation recipe).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Augment",
    "AugmentParams",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "apply_where",
    "color_jitter",
    "gaussian_blur",
    "gaussian_kernels",
    "hflip",
    "normalize",
    "normalize_uint8",
    "resized_crop",
    "rgb_to_grayscale",
    "sample_blur_sigma",
    "sample_crop_boxes",
    "sample_jitter",
    "sample_mask",
    "solarize",
    "to_float",
]

Pair = Sequence[float] | tuple[float, float]
LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601-2, as torchvision
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


# --------------------------------------------------------------------------- ops


def to_float(images: Tensor) -> Tensor:
    """uint8 ``[0, 255]`` -> float32 ``[0, 1]`` (``x / 255``); float input is cast to float32."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")
    return images.to(torch.float32)


def apply_where(mask: Tensor, transformed: Tensor, images: Tensor) -> Tensor:
    """Per-sample choice: ``transformed[b]`` where ``mask[b]`` else ``images[b]`` (bit-exact).

    Args:
        mask: (B,) bool.
        transformed: (B, C, H, W).
        images: (B, C, H, W).
    """
    return torch.where(mask.view(-1, 1, 1, 1), transformed, images)


def _resample_weights(
    start: Tensor, length: Tensor, in_size: int, out_size: int, antialias: bool
) -> tuple[Tensor, Tensor]:
    """Taps and weights resizing the window ``[start, start + length)`` to ``out_size`` samples.

    Reproduces ``F.interpolate(mode="bilinear", align_corners=False)`` on the cropped
    window, with ``antialias`` as PyTorch/PIL do it: output ``i`` sits at source
    coordinate ``c = s (i + 0.5) - 0.5`` with ``s = length / out_size``; tap ``x`` of the
    window gets ``max(0, 1 - |x - c| / a)`` with ``a = max(s, 1)`` if antialias else 1,
    normalised over the taps inside the window (so edges clamp, as PyTorch does).

    Args:
        start: (B,) float, first row/column of the window in the image.
        length: (B,) float, window length (>= 1).
        in_size: image length along this axis.
        out_size: output length.
        antialias: widen the triangle filter when downsampling.

    Returns:
        index (B, out_size, K) long into the image axis, weight (B, out_size, K) float32,
        with ``K = ceil(2 * max support)`` taps.
    """
    support_max = max(in_size / out_size, 1.0) if antialias else 1.0
    taps = max(math.ceil(2 * support_max), 2)
    device = start.device
    scale = (length / out_size)[:, None, None]  # (B, 1, 1)
    support = scale.clamp(min=1.0) if antialias else torch.ones_like(scale)
    centre = scale * (torch.arange(out_size, device=device, dtype=torch.float32)[None, :, None] + 0.5) - 0.5
    first = torch.floor(centre - support) + 1  # (B, S, 1) first tap strictly inside the support
    rel = first + torch.arange(taps, device=device, dtype=torch.float32)  # (B, S, K) tap within window
    weight = (1 - (rel - centre).abs() / support).clamp(min=0)
    inside = (rel >= 0) & (rel < length[:, None, None])
    weight = torch.where(inside, weight, torch.zeros_like(weight))
    weight = weight / weight.sum(-1, keepdim=True)
    index = (rel + start[:, None, None]).clamp(0, in_size - 1).long()  # (B, S, K)
    return index, weight


def _resample_rows(images: Tensor, index: Tensor, weight: Tensor) -> Tensor:
    """``out[b, c, i, w] = sum_k weight[b, i, k] * images[b, c, index[b, i, k], w]``.

    Args:
        images: (B, C, H, W).
        index: (B, S, K) long rows.
        weight: (B, S, K).

    Returns:
        (B, C, S, W).
    """
    b, c, _, w = images.shape
    s, k = index.shape[1:]
    gathered = images.gather(2, index.reshape(b, 1, s * k, 1).expand(b, c, s * k, w))  # (B, C, S*K, W)
    return (gathered.view(b, c, s, k, w) * weight.view(b, 1, s, k, 1)).sum(3)


def resized_crop(images: Tensor, boxes: Tensor, size: int | Sequence[int], antialias: bool = True) -> Tensor:
    """Crop each image to its box and resize it bilinearly to ``size``.

    Per sample this is ``torchvision.transforms.v2.functional.resized_crop(img, top, left,
    height, width, size, InterpolationMode.BILINEAR, antialias)`` on a float image: separable
    triangle-filter resampling with ``align_corners=False`` (see ``_resample_weights``).
    Matches it to 1e-5 (float rounding only); upsampling (CIFAR crops) is identical with and
    without ``antialias``.

    Args:
        images: (B, C, H, W) float.
        boxes: (B, 4) integer ``(top, left, height, width)``, inside the image.
        size: output side, or ``(height, width)``.
        antialias: as torchvision's ``antialias`` (default True, as torchvision v2).

    Returns:
        (B, C, size_h, size_w).
    """
    out_h, out_w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    height, width = images.shape[-2:]
    boxes = boxes.to(device=images.device, dtype=torch.float32)
    top, left, box_h, box_w = boxes.unbind(1)  # (B,) each
    row_index, row_weight = _resample_weights(top, box_h, height, out_h, antialias)
    col_index, col_weight = _resample_weights(left, box_w, width, out_w, antialias)
    rows = _resample_rows(images, row_index, row_weight)  # (B, C, out_h, W)
    cols = _resample_rows(rows.transpose(2, 3), col_index, col_weight)  # (B, C, out_w, out_h)
    return cols.transpose(2, 3).contiguous()  # (B, C, out_h, out_w)


def hflip(images: Tensor, mask: Tensor) -> Tensor:
    """Mirror the width axis of the images where ``mask`` (B,) bool is set."""
    return apply_where(mask, images.flip(-1), images)


def rgb_to_grayscale(images: Tensor) -> Tensor:
    """Luma ``0.2989 R + 0.587 G + 0.114 B`` (ITU-R 601-2), (B, 3, H, W) -> (B, 1, H, W).

    One-channel input is returned as it is.
    """
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(1)
    return r.mul(LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(1)


def _blend_one(images: Tensor, factor: Tensor, op: int) -> Tensor:
    """One blend op for the whole batch with per-sample ``factor`` (B,)."""
    return _blend_steps(images, factor.view(-1, 1), torch.full_like(factor.view(-1, 1), op, dtype=torch.long))


def adjust_brightness(images: Tensor, factor: Tensor) -> Tensor:
    """``clamp(f x, 0, 1)`` per sample; ``factor`` (B,) >= 0."""
    return _blend_one(images, factor, BRIGHTNESS)


def adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    """``clamp(f x + (1 - f) mean(gray(x)), 0, 1)`` per sample; ``factor`` (B,) >= 0."""
    return _blend_one(images, factor, CONTRAST)


def adjust_saturation(images: Tensor, factor: Tensor) -> Tensor:
    """``clamp(f x + (1 - f) gray(x), 0, 1)`` per sample; identity on one channel."""
    if images.shape[1] == 1:
        return images
    return _blend_one(images, factor, SATURATION)


def _rgb_to_hsv(images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, 3, H, W) RGB -> hue in [0, 1), saturation, value, each (B, H, W)."""
    r, g, b = images.unbind(1)
    low, value = images.aminmax(dim=1)
    delta = value - low
    grey = delta == 0
    saturation = delta / torch.where(grey, torch.ones_like(value), value)
    span = torch.where(grey, torch.ones_like(delta), delta)
    hue = torch.where(
        value == r, (g - b) / span, torch.where(value == g, 2 + (b - r) / span, 4 + (r - g) / span)
    )  # sextant units, R's sector first as in PIL/torchvision
    return torch.remainder(hue / 6, 1.0), saturation, value


def _hsv_to_rgb(hue: Tensor, saturation: Tensor, value: Tensor) -> Tensor:
    """(B, H, W) each -> (B, 3, H, W): channel ``n`` in (5, 3, 1) is ``v - v s clamp(min(k, 4 - k), 0, 1)``
    with ``k = (n + 6 h) mod 6`` (the closed form of the piecewise HSV map)."""
    n = 5 - 2 * torch.arange(3, device=hue.device, dtype=hue.dtype).view(1, 3, 1, 1)  # 5, 3, 1
    k = torch.remainder(n + 6 * hue.unsqueeze(1), 6)  # (B, 3, H, W)
    ramp = torch.minimum(k, 4 - k).clamp_(0, 1)
    v = value.unsqueeze(1)
    return v - v * saturation.unsqueeze(1) * ramp


def adjust_hue(images: Tensor, factor: Tensor) -> Tensor:
    """Rotate the hue by ``factor`` (B,) in [-0.5, 0.5] turns: RGB -> HSV, ``h <- (h + f) mod 1``, -> RGB.

    Matches torchvision's ``adjust_hue`` to 1e-5 (another, equivalent HSV -> RGB formula).
    Identity on one channel.
    """
    if images.shape[1] == 1:
        return images
    hue, saturation, value = _rgb_to_hsv(images)
    hue = torch.remainder(hue + factor.view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(hue, saturation, value)


def color_jitter(images: Tensor, factors: Tensor, order: Tensor, hue: bool = True) -> Tensor:
    """torchvision's ``ColorJitter`` with per-sample factors and a per-sample order of the four ops.

    Step ``t`` applies op ``order[b, t]`` (0 brightness, 1 contrast, 2 saturation, 3 hue) to
    sample ``b``. Brightness, contrast and saturation are one blend
    ``clamp(f x + (1 - f) o, 0, 1)`` towards ``o`` = 0, ``mean(gray)`` or ``gray``, where factor 1
    is the exact identity. Every sample rotates its hue exactly once, so the batch runs the
    blends before its hue step, one hue pass, then the blends after it (6 blend passes and
    1 hue pass instead of 4 of each).

    Args:
        images: (B, C, H, W) float in [0, 1].
        factors: (B, 4) float32, brightness, contrast, saturation (>= 0) and hue (in [-0.5, 0.5]).
        order: (B, 4) long, a permutation of 0..3 per row.
        hue: False skips the hue op (torchvision skips it when ``hue=0``), saving its cost.

    Returns:
        (B, C, H, W).
    """
    blend = factors[:, :3]
    if images.shape[1] == 1:  # saturation is the identity on one channel
        blend = torch.cat([blend[:, :SATURATION], torch.ones_like(blend[:, SATURATION:])], dim=1)
    step_factor = torch.where(order < HUE, blend.gather(1, order.clamp(max=SATURATION)), 1.0)  # (B, 4)
    if not hue:
        return _blend_steps(images, step_factor, order)
    hue_step = (order == HUE).to(torch.int8).argmax(1, keepdim=True)  # (B, 1)
    step = torch.arange(4, device=order.device)
    images = _blend_steps(images, torch.where(step < hue_step, step_factor, 1.0)[:, :3], order[:, :3])
    images = adjust_hue(images, factors[:, HUE])
    return _blend_steps(images, torch.where(step > hue_step, step_factor, 1.0)[:, 1:], order[:, 1:])


def _blend_steps(images: Tensor, factor: Tensor, op: Tensor) -> Tensor:
    """Step ``t``: ``clamp(f x + (1 - f) [op = contrast] mean(gray) + (1 - f) [op = saturation] gray, 0, 1)``.

    torchvision's ``_blend`` for brightness (towards 0), contrast and saturation, per sample.

    Args:
        images: (B, C, H, W).
        factor: (B, T) blend factor per step (1 = identity).
        op: (B, T) op per step.
    """
    rest = 1 - factor
    to_mean = (rest * (op == CONTRAST)).view(*op.shape, 1, 1, 1).unbind(1)  # T x (B, 1, 1, 1)
    to_gray = (rest * (op == SATURATION)).view(*op.shape, 1, 1, 1).unbind(1)
    scale = factor.view(*op.shape, 1, 1, 1).unbind(1)
    for t in range(op.shape[1]):
        gray = rgb_to_grayscale(images)  # (B, 1, H, W)
        mixed = torch.addcmul(images * scale[t], gray.mean((1, 2, 3), keepdim=True), to_mean[t])
        images = torch.addcmul(mixed, gray, to_gray[t]).clamp_(0, 1)
    return images


def gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """1-D Gaussian kernels ``w_t ∝ exp(-d_t^2 / (2 sigma^2))``, ``d_t = t - (k - 1) / 2``.

    Args:
        sigma: (B,) positive.
        kernel_size: odd ``k``.

    Returns:
        (B, k), each row summing to 1.
    """
    d = torch.arange(kernel_size, device=sigma.device, dtype=torch.float32) - (kernel_size - 1) / 2
    return torch.softmax(-(d[None, :] ** 2) / (2 * sigma[:, None].float() ** 2), dim=1)


def gaussian_blur(images: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with per-sample ``sigma`` (B,) and reflect padding, as torchvision.

    torchvision convolves with the outer product of the same 1-D kernel; this applies it as two
    passes of shifted sums (exact float32, no TF32 convolution). Matches to 1e-5.

    Args:
        images: (B, C, H, W), with ``kernel_size // 2 < min(H, W)``.
        sigma: (B,).
        kernel_size: odd.

    Returns:
        (B, C, H, W).
    """
    _check_kernel_size(kernel_size)
    height, width = images.shape[-2:]
    pad = kernel_size // 2
    kernel = gaussian_kernels(sigma.to(images.device), kernel_size).view(-1, 1, 1, 1, kernel_size)
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")  # (B, C, H + 2p, W + 2p)
    # sum() of tensors is a tensor (0 + the first term + ...); typeshed's sum() adds int for an empty iterable.
    # rows: (B, C, H + 2p, W), then the result (B, C, H, W)
    rows = cast(Tensor, sum(kernel[..., t] * padded[..., t : t + width] for t in range(kernel_size)))
    return cast(Tensor, sum(kernel[..., t] * rows[..., t : t + height, :] for t in range(kernel_size)))


def solarize(images: Tensor, threshold: float = 0.5) -> Tensor:
    """``1 - x`` where ``x >= threshold``, else ``x``."""
    return torch.where(images >= threshold, 1 - images, images)


def normalize(images: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """``(x - mean_c) / std_c`` per channel; images (B, C, H, W) float, ``mean``/``std`` C floats (or one
    for every channel).

    The statistics enter as Python scalars, not as a tensor copied from the host: ``Augment``
    runs this inside a captured CUDA graph, which would keep reading that host buffer at
    every replay after its memory was freed and reused.
    """
    pairs = [(float(m), float(s)) for m, s in zip(mean, std, strict=True)]
    if len(pairs) == 1:
        return (images - pairs[0][0]) / pairs[0][1]
    if len(pairs) != images.shape[1]:
        raise ValueError(f"normalize: {len(pairs)} mean/std entries for {images.shape[1]} channels")
    return torch.stack([(images[:, c] - m) / s for c, (m, s) in enumerate(pairs)], dim=1)


def normalize_uint8(images: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """Evaluation transform: uint8 (B, C, H, W) -> float32 ``(x / 255 - mean) / std``, no augmentation."""
    return normalize(to_float(images), mean, std)


# ---------------------------------------------------------------------- samplers


def _check_generator(generator: torch.Generator | None) -> None:
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU torch.Generator (parameters are drawn on the CPU), got {generator.device}"
        )


def sample_mask(batch: int, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Per-sample Bernoulli(p) mask (B,) bool, ``u < p`` with ``u ~ U[0, 1)``: p=0 never, p=1 always."""
    _check_generator(generator)
    return torch.rand(batch, generator=generator) < p


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: Pair = (0.08, 1.0),
    ratio: Pair = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> Tensor:
    """``RandomResizedCrop.get_params`` for a batch, vectorised over samples and attempts.

    Per attempt: area ``A = H W U(scale)``, aspect ``r = exp(U(log ratio))``,
    ``w = round(sqrt(A r))``, ``h = round(sqrt(A / r))``; the first attempt with
    ``0 < w <= W`` and ``0 < h <= H`` wins and its offset is uniform; a sample with no
    valid attempt gets the central crop of the aspect ratio clamped to ``ratio``.

    Returns:
        (B, 4) long ``(top, left, height, width)`` on the CPU.
    """
    _check_generator(generator)
    (s_lo, s_hi), (r_lo, r_hi) = _pair("scale", scale, 0.0), _pair("ratio", ratio, 0.0)
    u = torch.rand(2, batch, attempts, generator=generator, dtype=torch.float64)
    area = height * width * (s_lo + (s_hi - s_lo) * u[0])  # (B, A)
    log_lo, log_hi = math.log(r_lo), math.log(r_hi)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[1])  # (B, A)
    w = torch.round(torch.sqrt(area * aspect))  # (B, A); round half to even, as Python's round
    h = torch.round(torch.sqrt(area / aspect))
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (B, A)
    first = valid.to(torch.int8).argmax(1, keepdim=True)  # first valid attempt
    found = valid.any(1)
    fallback_h, fallback_w = _central_crop(height, width, r_lo, r_hi)
    h = torch.where(found, h.gather(1, first).squeeze(1), torch.full((batch,), float(fallback_h), dtype=torch.float64))
    w = torch.where(found, w.gather(1, first).squeeze(1), torch.full((batch,), float(fallback_w), dtype=torch.float64))
    offsets = torch.rand(batch, 2, generator=generator, dtype=torch.float64)
    top = torch.where(found, torch.floor(offsets[:, 0] * (height - h + 1)), torch.floor((height - h) / 2))
    left = torch.where(found, torch.floor(offsets[:, 1] * (width - w + 1)), torch.floor((width - w) / 2))
    return torch.stack([top, left, h, w], dim=1).long()


def _central_crop(height: int, width: int, r_lo: float, r_hi: float) -> tuple[int, int]:
    """torchvision's fallback crop size: the whole image with its aspect clamped to ``[r_lo, r_hi]``."""
    in_ratio = width / height
    if in_ratio < r_lo:
        return int(round(width / r_lo)), width
    if in_ratio > r_hi:
        return height, int(round(height * r_hi))
    return height, width


def sample_jitter(
    batch: int,
    brightness: Pair | None = (0.6, 1.4),
    contrast: Pair | None = (0.6, 1.4),
    saturation: Pair | None = (0.6, 1.4),
    hue: Pair | None = (-0.1, 0.1),
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """``ColorJitter.make_params`` per sample: uniform factors and a uniform random order.

    A ``None`` range disables its op (factor 1 for the blends, 0 for hue).

    Returns:
        factors (B, 4) float32 (brightness, contrast, saturation, hue) and order (B, 4) long,
        each row a permutation of 0..3, both on the CPU.
    """
    _check_generator(generator)
    order = torch.rand(batch, 4, generator=generator).argsort(1)
    u = torch.rand(batch, 4, generator=generator)
    columns = []
    for column, (bounds, identity) in enumerate(zip((brightness, contrast, saturation, hue), (1.0, 1.0, 1.0, 0.0))):
        lo, hi = (identity, identity) if bounds is None else (float(bounds[0]), float(bounds[1]))
        columns.append(lo + (hi - lo) * u[:, column])
    return torch.stack(columns, dim=1), order


def sample_blur_sigma(batch: int, sigma: Pair = (0.1, 2.0), generator: torch.Generator | None = None) -> Tensor:
    """``GaussianBlur``'s sigma per sample, ``U(sigma)`` (B,) float32 on the CPU."""
    _check_generator(generator)
    lo, hi = _pair("blur_sigma", sigma, 0.0)
    return lo + (hi - lo) * torch.rand(batch, generator=generator)


# ------------------------------------------------------------- composed pipeline


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """Everything random about one augmented batch, one row per sample."""

    boxes: Tensor  # (B, 4) long: top, left, height, width
    flip: Tensor  # (B,) bool
    jitter: Tensor  # (B,) bool
    factors: Tensor  # (B, 4) float32: brightness, contrast, saturation, hue
    order: Tensor  # (B, 4) long
    gray: Tensor  # (B,) bool
    blur: Tensor  # (B,) bool
    sigma: Tensor  # (B,) float32
    solarize: Tensor  # (B,) bool

    def to(self, device: torch.device | str) -> AugmentParams:
        """Move to ``device`` in one packed, asynchronous (pinned) copy; no host-device sync."""
        device = torch.device(device)
        fields = _fields(self)
        if all(t.device == device for t in fields):
            return self
        batch = fields[0].shape[0]
        columns = [t.reshape(batch, -1) for t in fields]
        packed = _to_device(torch.cat([c.to(torch.float32) for c in columns], dim=1), device)  # (B, 19)
        moved = packed.split([c.shape[1] for c in columns], dim=1)
        return AugmentParams(*(m.reshape(t.shape).to(t.dtype) for m, t in zip(moved, fields)))


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """CPU tensor -> ``device`` without blocking the host: a pageable copy would sync the stream."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class Augment:
    """SimCLR-style view generator on uint8 batches, all samples at once on the images' device.

    crop+resize -> flip(p) -> colour jitter(p) -> grayscale(p) -> blur(p) -> solarise(p) -> normalise,
    the order of torchvision's SimCLR/BYOL recipes. Parameters are drawn from a CPU generator
    (``None`` uses torch's default CPU RNG), so a seed fixes the batch on every device.

    Args:
        size: output side.
        scale: crop area fraction range, ``0 < lo <= hi <= 1``.
        ratio: crop aspect ratio range (sampled log-uniformly), ``0 < lo <= hi``.
        flip_p: horizontal flip probability.
        jitter: ColorJitter's (brightness, contrast, saturation, hue); each a number ``v``
            (range ``[max(0, 1 - v), 1 + v]``, hue ``[-v, v]``) or a ``(lo, hi)`` pair; 0 disables.
        jitter_p: probability of applying the jitter.
        gray_p: random grayscale probability (identity on one channel).
        blur_p: Gaussian blur probability.
        blur_kernel: odd blur kernel size.
        blur_sigma: sigma range.
        solarize_p: solarise (threshold 0.5) probability.
        mean: per-channel mean for normalisation.
        std: per-channel std for normalisation.
        antialias: antialias when a crop is larger than ``size`` (as torchvision's default).
        cuda_graph: on a GPU, replay the augmentation as one CUDA graph per batch shape
            (same result; removes the host's kernel-launch overhead from the training step).
    """

    def __init__(
        self,
        size: int = 32,
        scale: Pair = (0.08, 1.0),
        ratio: Pair = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        jitter: Sequence[float | Pair] = (0.4, 0.4, 0.4, 0.1),
        jitter_p: float = 0.8,
        gray_p: float = 0.2,
        blur_p: float = 0.0,
        blur_kernel: int = 3,
        blur_sigma: Pair = (0.1, 2.0),
        solarize_p: float = 0.0,
        mean: Sequence[float] = (0.4914, 0.4822, 0.4465),
        std: Sequence[float] = (0.2470, 0.2435, 0.2616),
        antialias: bool = True,
        cuda_graph: bool = True,
    ) -> None:
        if int(size) != size or size < 1:
            raise ValueError(f"size must be a positive integer, got {size}")
        self.size = int(size)
        self.scale = _pair("scale", scale, 0.0, 1.0)
        self.ratio = _pair("ratio", ratio, 0.0)
        self.flip_p, self.jitter_p, self.gray_p, self.blur_p, self.solarize_p = (
            _probability(name, p)
            for name, p in (
                ("flip_p", flip_p),
                ("jitter_p", jitter_p),
                ("gray_p", gray_p),
                ("blur_p", blur_p),
                ("solarize_p", solarize_p),
            )
        )
        if len(jitter) != 4:
            raise ValueError(f"jitter must be (brightness, contrast, saturation, hue), got {jitter}")
        brightness, contrast, saturation, hue = (
            _jitter_range(name, value, hue=name == "hue")
            for name, value in zip(("brightness", "contrast", "saturation", "hue"), jitter)
        )
        self.jitter = (brightness, contrast, saturation, hue)  # four ranges, as sample_jitter takes them
        _check_kernel_size(blur_kernel)
        self.blur_kernel = int(blur_kernel)
        if self.blur_p > 0 and self.blur_kernel // 2 >= self.size:  # reflect padding needs pad < side, as torchvision
            raise ValueError(
                f"blur_kernel={self.blur_kernel} is too large for size={self.size}: its half-width "
                f"{self.blur_kernel // 2} must be < {self.size}; pass blur_kernel <= {2 * self.size - 1} "
                "(SimCLR: about 10% of the image side, odd)"
            )
        self.blur_sigma = _pair("blur_sigma", blur_sigma, 0.0)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != len(self.std) or len(self.mean) not in (1, 3):
            raise ValueError(f"mean and std need 1 or 3 equal-length entries, got {self.mean} and {self.std}")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        self.antialias = bool(antialias)
        self.cuda_graph = bool(cuda_graph)
        self._graphs: dict[tuple, tuple[Tensor, AugmentParams, torch.cuda.CUDAGraph, Tensor]] = {}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"

    def sample(self, batch: int, height: int, width: int, generator: torch.Generator | None = None) -> AugmentParams:
        """Draw the parameters of one batch on the CPU, in a fixed order."""
        boxes = sample_crop_boxes(batch, height, width, self.scale, self.ratio, generator)
        flip = sample_mask(batch, self.flip_p, generator)
        jitter = sample_mask(batch, self.jitter_p, generator)
        factors, order = sample_jitter(batch, *self.jitter, generator=generator)
        gray = sample_mask(batch, self.gray_p, generator)
        blur = sample_mask(batch, self.blur_p, generator)
        sigma = sample_blur_sigma(batch, self.blur_sigma, generator)
        solar = sample_mask(batch, self.solarize_p, generator)
        return AugmentParams(boxes, flip, jitter, factors, order, gray, blur, sigma, solar)

    def apply(self, images: Tensor, params: AugmentParams) -> Tensor:
        """Augment ``images`` (B, C, H, W), uint8 or float in [0, 1], with given parameters.

        Returns:
            (B, C, size, size) float32, normalised, on the images' device.
        """
        if images.ndim != 4 or images.shape[1] != len(self.mean):
            raise ValueError(f"images must be (B, {len(self.mean)}, H, W), got {tuple(images.shape)}")
        x = resized_crop(to_float(images), params.boxes, self.size, self.antialias)  # (B, C, S, S)
        if self.flip_p > 0:
            x = hflip(x, params.flip)
        if self.jitter_p > 0 and any(r is not None for r in self.jitter):
            x = apply_where(params.jitter, color_jitter(x, params.factors, params.order, self.jitter[3] is not None), x)
        if self.gray_p > 0 and x.shape[1] == 3:
            x = apply_where(params.gray, rgb_to_grayscale(x).expand_as(x), x)
        if self.blur_p > 0:
            x = apply_where(params.blur, gaussian_blur(x, params.sigma, self.blur_kernel), x)
        if self.solarize_p > 0:
            x = apply_where(params.solarize, solarize(x), x)
        return normalize(x, self.mean, self.std)

    def __call__(
        self,
        images: Tensor,
        generator: torch.Generator | None = None,
        rows: Tensor | None = None,
        of: int | None = None,
    ) -> Tensor:
        """Augment a batch: (B, C, H, W) uint8 on any device -> (B, C, size, size) float32 there.

        ``rows`` (B,) and ``of``: draw the parameters of a batch of ``of`` samples and use
        rows ``rows`` of them, i.e. one process's share of the global batch under DDP, so
        W processes together augment exactly as one process holding the global batch.
        """
        if rows is None:
            params = self.sample(images.shape[0], images.shape[-2], images.shape[-1], generator)
        else:
            if of is None or len(rows) != images.shape[0]:
                raise ValueError(
                    f"rows ({len(rows)},) needs of= (the global batch size) and one row per image ({images.shape[0]})"
                )
            full = self.sample(int(of), images.shape[-2], images.shape[-1], generator)
            params = AugmentParams(*(t[rows] for t in _fields(full)))
        if self.cuda_graph and images.is_cuda and not torch.cuda.is_current_stream_capturing():
            return self._replay(images, params.to(images.device))
        return self.apply(images, params.to(images.device))

    def _replay(self, images: Tensor, params: AugmentParams) -> Tensor:
        """``apply`` as one CUDA graph per input shape: ~100 kernel launches become one.

        The augmentation is a fixed sequence of small kernels whose cost on a GPU is
        the host's launch overhead, paid inside the training step; a graph replays them
        all for the cost of one launch. Inputs are copied into the graph's static
        buffers; the output is cloned so the next replay cannot overwrite it.
        """
        key = (tuple(images.shape), images.dtype, images.device)
        if key not in self._graphs:
            static_in = images.clone()
            static_params = AugmentParams(*(t.clone() for t in _fields(params)))
            side = torch.cuda.Stream(images.device)
            side.wait_stream(torch.cuda.current_stream(images.device))
            with torch.cuda.stream(side):  # warm-up outside the graph, as CUDA graphs require
                for _ in range(2):
                    self.apply(static_in, static_params)
            torch.cuda.current_stream(images.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.apply(static_in, static_params)
            self._graphs[key] = (static_in, static_params, graph, static_out)
        static_in, static_params, graph, static_out = self._graphs[key]
        static_in.copy_(images)
        for dst, src in zip(_fields(static_params), _fields(params)):
            dst.copy_(src)
        graph.replay()
        return static_out.clone()


def _fields(params: AugmentParams) -> list[Tensor]:
    """The parameter tensors themselves (``dataclasses.astuple`` would copy them)."""
    return [getattr(params, f.name) for f in dataclasses.fields(params)]


# -------------------------------------------------------------------- validation


def _probability(name: str, p: float) -> float:
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    return p


def _pair(name: str, value: Pair, low: float, high: float = math.inf) -> tuple[float, float]:
    """A ``(lo, hi)`` pair with ``low < lo <= hi <= high`` (``low`` exclusive)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"{name} must be a (low, high) pair, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not low < lo <= hi <= high:
        raise ValueError(f"{name} must satisfy {low} < low <= high <= {high}, got ({lo}, {hi})")
    return lo, hi


def _jitter_range(name: str, value: float | Pair, hue: bool) -> tuple[float, float] | None:
    """ColorJitter's range for one op; ``None`` when it is the identity (so it is skipped).

    A number ``v`` gives ``[max(0, 1 - v), 1 + v]`` (hue: ``[-v, v]``); ranges must lie in
    ``[0, inf)`` (hue: ``[-0.5, 0.5]``).
    """
    centre, low, high = (0.0, -0.5, 0.5) if hue else (1.0, 0.0, math.inf)
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"jitter {name} must be non-negative, got {value}")
        lo, hi = max(centre - float(value), low), centre + float(value)
    else:
        lo, hi = _pair(f"jitter {name}", value, -math.inf)
    if not low <= lo <= hi <= high:
        raise ValueError(f"jitter {name} range must lie in [{low}, {high}], got ({lo}, {hi})")
    return None if lo == hi == centre else (lo, hi)


def _check_kernel_size(kernel_size: int) -> None:
    if int(kernel_size) != kernel_size or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"blur kernel size must be a positive odd integer, got {kernel_size}")
