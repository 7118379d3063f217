"""CPC on images (CPC v2, Hénaff et al. 2020; CPC, Oord et al. 2018): predict the latents of the patches below.

One step: each image is cut into a G x G grid of overlapping patches (:func:`patch_grid`); every patch is
augmented on its own (CPC v2: so that the patches of an image share no low-level cue, such as its colour or
brightness, that would predict the patches below without seeing shape) and encoded,
``z = projector(backbone(patch))`` (D); a masked context network over the grid gives ``c_ij`` from the latents
of rows ``u <= i`` only (:class:`MaskedContext`); a linear map ``W_k`` per offset predicts ``z_{i+k, j}`` from
``c_ij`` for k = 1..K; each prediction is scored against its target and the other targets of the batch at that
offset, every image's and (under W processes) every process's, by InfoNCE (``loss=info_nce``, in-batch form),
and the K terms are averaged.

The evaluation features (kNN, linear probe) are the backbone's features of the unaugmented patches, averaged
over the grid (:meth:`CPC.features`). Deviations from CPC v2: the InfoNCE scores are cosines over a temperature
(the toolkit's ``info_nce``), not raw dot products; the backbone's BatchNorm is kept (CPC v2 replaced it by
layer norm, whose absence of batch statistics keeps patches from sharing information through them).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastive.augment import Augment, normalize_uint8
from contrastive.losses import LossForm
from contrastive.pipelines.base import Pipeline, channels_last


def patch_grid(images: Tensor, patch_size: int, stride: int) -> Tensor:
    """Overlapping square patches in a grid: (B, C, H, W) -> (B, G, G', C, P, P), G = (H - P) // stride + 1.

    Raises:
        ValueError: patches larger than the image, or a stride < 1.
    """
    h, w = images.shape[-2:]
    if stride < 1 or not 1 <= patch_size <= min(h, w):
        raise ValueError(
            f"patch_size={patch_size} and patch_stride={stride} do not cut a {h}x{w} image into a grid: give "
            f"1 <= patch_size <= {min(h, w)} and a stride >= 1 (CPC v2: patches of a quarter of the image, "
            "half-patch stride)"
        )
    x = images.unfold(2, patch_size, stride).unfold(3, patch_size, stride)  # (B, C, G, G', P, P)
    return x.permute(0, 2, 3, 1, 4, 5)


class MaskedContext(nn.Module):
    """A context network over a grid of latents, causal in rows: ``c_ij`` depends on ``z_uv`` for ``u <= i`` only.

    ``num_layers`` residual blocks ``x <- x + conv(relu(x))``, each convolution k x k over the rows ``i - k + 1
    .. i`` (padded above, none below; centred along the row), so the receptive field grows upwards only; the
    input's row i is in c's row i (CPC v2's PixelCNN-style context: the whole of rows <= i).

    Args:
        dim: D, the latents' width (in and out).
        num_layers: residual blocks, >= 1.
        kernel_size: odd k >= 1.
    """

    def __init__(self, dim: int, num_layers: int = 3, kernel_size: int = 3) -> None:
        super().__init__()
        if num_layers < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"MaskedContext needs num_layers >= 1 and an odd kernel_size, got {num_layers} and {kernel_size}"
            )
        self.kernel_size = kernel_size
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, kernel_size) for _ in range(num_layers))

    def forward(self, z: Tensor) -> Tensor:
        """(B, D, G, G') -> (B, D, G, G')."""
        k = self.kernel_size
        x = z
        for conv in self.convs:
            x = x + conv(F.pad(F.relu(x), (k // 2, k // 2, k - 1, 0)))  # rows above only: causal
        return x


class CPC(Pipeline):
    """CPC v2: patches -> ``projector(backbone(.))`` latents -> masked context -> linear predictions k rows below.

    Args:
        projector: (P, F) -> (P, D), each patch's latent from its backbone features.
        context: (B, D, G, G') -> (B, D, G, G'), causal in rows (:class:`MaskedContext`).
        loss: ``loss(predictions, targets) -> scalar`` (form ``two_views``; InfoNCE, in-batch negatives).
        latent_dim: D (the predictions' width).
        patch_size, patch_stride: the grid's patches (CIFAR's 32 px: 8 and 4, a 7 x 7 grid).
        prediction_steps: K, rows ahead to predict (1 .. G - 1).
        image_size: the images' side (``data.image_size``), which sets the grid.
        **base: the :class:`Pipeline` arguments. ``augment``: an Augment, drawn on every patch on its own at
            ``patch_size`` (its own ``size`` is replaced; its recipe is kept).
    """

    loss_forms: ClassVar[tuple[LossForm, ...]] = ("two_views",)
    loss_hint: ClassVar[str] = (
        "it calls loss(predictions, targets), each prediction against its target and the batch's other targets; "
        "use loss=info_nce"
    )

    def __init__(
        self,
        projector: nn.Module,
        context: nn.Module,
        loss: nn.Module,
        latent_dim: int,
        patch_size: int = 8,
        patch_stride: int = 4,
        prediction_steps: int = 3,
        image_size: int = 32,
        **base: Any,
    ) -> None:
        self.loss_form(loss)
        if getattr(loss, "symmetric", False):
            raise ValueError(
                "loss.symmetric=true also scores targets against predictions, which CPC does not: "
                "pass loss.symmetric=false"
            )
        augment = base.get("augment")
        if isinstance(augment, Augment) and augment.size != patch_size:  # its recipe, drawn at the patches' side
            augment = copy.copy(augment)
            augment.size = patch_size
            if augment.blur_p > 0 and augment.blur_kernel // 2 >= patch_size:
                raise ValueError(
                    f"aug.blur_kernel={augment.blur_kernel} is too large for {patch_size} px patches: pass "
                    f"aug.blur_kernel <= {2 * patch_size - 1} or aug.blur_p=0"
                )
            base["augment"] = augment
        super().__init__(**base)
        grid = (image_size - patch_size) // max(patch_stride, 1) + 1
        patch_grid(torch.zeros(1, 1, image_size, image_size), patch_size, patch_stride)  # the grid's own error first
        if not 1 <= prediction_steps < grid:
            raise ValueError(
                f"pipeline.prediction_steps={prediction_steps}: a {grid}-row grid ({image_size} px images, patch "
                f"{patch_size}, stride {patch_stride}) leaves rows to predict for 1 <= K <= {grid - 1}"
            )
        self.projector, self.context, self.loss = projector, context, loss
        self.predictors = nn.ModuleList(nn.Linear(latent_dim, latent_dim) for _ in range(prediction_steps))
        self.patch_size, self.patch_stride = patch_size, patch_stride

    def patches(self, images: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        """The grid's patches of a batch, flat: (B, C, H, W) -> (B G G', C, P, P), and (B, G, G')."""
        grid = patch_grid(images, self.patch_size, self.patch_stride)  # (B, G, G', C, P, P)
        b, g, g2 = grid.shape[:3]
        return grid.reshape(b * g * g2, *grid.shape[3:]), (b, g, g2)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """The backbone's features of the unaugmented patches averaged over the grid, (B, F), of a uint8 batch."""
        flat, shape = self.patches(images)
        x = normalize_uint8(flat, self.augment.mean, self.augment.std).to(self.dtype)
        if channels_last(x.device):
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x).view(*shape, -1).mean(dim=(1, 2)).float()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        flat, shape = self.patches(images)  # (B G G', C, P, P) uint8
        (view,) = self.views(flat, n=1)  # every patch augmented on its own (CPC v2): no shortcut shared by a grid
        h = self.backbone(view).view(*shape, -1)  # (B, G, G', F)
        z = self.projector(h.flatten(0, 2)).view(*h.shape[:3], -1).permute(0, 3, 1, 2)  # (B, D, G, G')
        c = self.context(z)  # (B, D, G, G'): row i from rows <= i
        terms = []
        for k, predictor in enumerate(self.predictors, start=1):
            pred = predictor(c[:, :, :-k].permute(0, 2, 3, 1).flatten(0, 2))  # (B (G - k) G', D)
            target = z[:, :, k:].permute(0, 2, 3, 1).flatten(0, 2)  # (B (G - k) G', D): the patch k rows below
            terms.append(self.loss(pred, target))
        loss = torch.stack(terms).mean()
        return self.finish_step({"loss": loss}, self.online_probe_loss(h.mean(dim=(1, 2)), labels))
