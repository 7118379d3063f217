"""Backbones, projection heads and the momentum (EMA) copy."""

from __future__ import annotations

import copy
from typing import cast

import torch
import torchvision
from torch import nn


def resnet(name: str = "resnet18", cifar_stem: bool = True) -> nn.Module:
    """A torchvision ResNet without its classifier; returns (B, F) features.

    ``cifar_stem`` replaces the 7x7 stride-2 stem and the max-pool with one 3x3
    stride-1 convolution, the usual change for 32x32 images (SimCLR appendix B.9).
    The result loads into ``torchvision.models.<name>(num_classes=...)`` with the
    same stem change (only ``fc`` is missing), see ``export_backbone``.
    """
    net = getattr(torchvision.models, name)(weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def convnet(width: int = 32, in_channels: int = 3) -> nn.Module:
    """A small VGG-style CNN for the built-in demo: 4 conv-BN-ReLU stages, global pool.

    Output features: (B, 4 * width). Fast enough to train on a laptop CPU.
    """
    layers: list[nn.Module] = []
    c_in = in_channels
    for i, c_out in enumerate([width, 2 * width, 4 * width, 4 * width]):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        if i < 3:
            layers.append(nn.MaxPool2d(2))
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


def mlp(
    in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, batchnorm: bool = True, last_bn: bool = False
) -> nn.Module:
    """Projection / embedding head: ``num_layers`` linear layers, BN + ReLU between them.

    ``num_layers=1`` is a plain linear map. ``last_bn`` ends the head with a BatchNorm without
    affine parameters (SimCLR v2's head, MoCo v3's projector). Built on ``torchvision.ops.MLP``.
    """
    if num_layers < 1:
        raise ValueError(f"a head needs at least one layer, got num_layers={num_layers}")
    hidden = [hidden_dim] * (num_layers - 1) + [out_dim]
    norm = nn.BatchNorm1d if batchnorm else None
    head = torchvision.ops.MLP(in_dim, hidden, norm_layer=norm, activation_layer=nn.ReLU, inplace=None)
    if last_bn:
        head.append(nn.BatchNorm1d(out_dim, affine=False))
    return head


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy of ``module`` to be updated by :func:`ema_update`."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """``xi <- m * xi + (1 - m) * theta`` for every parameter (MoCo, He et al. 2020, eq. 2).

    Buffers (BN running statistics) are not averaged: the key encoder keeps the
    statistics of its own forward passes, as in MoCo.
    """
    t: list[torch.Tensor] = [p for p in target.parameters()]
    s = [p.detach() for p in source.parameters()]
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, torch._foreach_mul(s, 1.0 - momentum))  # not alpha=: that may fuse into an FMA


def export_backbone(pipeline: nn.Module, classifier: nn.Linear | None) -> dict[str, torch.Tensor]:
    """The weights of ``pipeline.backbone`` under torchvision's names, plus ``fc`` from the linear probe if given.

    ``fc`` is added only where the probe saw backbone features (not for pipelines whose
    evaluation features are an embedding head's output, such as Siamese).

    A ResNet from ``contrastive.models.resnet`` then loads into
    ``torchvision.models.resnet18(num_classes=C)`` (with the CIFAR stem) with ``strict=True``.
    """
    backbone = cast(nn.Module, pipeline.backbone)  # every Pipeline has one; nn.Module's __getattr__ says Tensor too
    state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    probes_backbone = getattr(pipeline, "eval_features", "backbone") == "backbone"  # not a Siamese embedding
    headless = isinstance(getattr(pipeline.backbone, "fc", None), torch.nn.Identity)
    if probes_backbone and headless and classifier is not None:
        state["fc.weight"] = classifier.weight.detach().cpu().clone()
        state["fc.bias"] = classifier.bias.detach().cpu().clone()
    return state
