"""Linear probe: a softmax classifier trained on cached (frozen) features."""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastive.evaluation._common import accuracy, check_finite, check_labels

Normalize = Literal["standardize", "l2", "none"]
ProbeOptimizer = Literal["sgd", "adamw"]

log = logging.getLogger("contrastive")


def predict_linear(classifier: nn.Linear, features: Tensor, chunk_size: int = 8192) -> Tensor:
    """``argmax_c (W x + b)_c`` over features in chunks; ties go to the lowest class index.

    Args:
        classifier: maps D features to C logits.
        features: (N, D).
        chunk_size: rows per forward pass.

    Returns:
        (N,) int64 predicted classes.
    """
    with torch.no_grad():
        return torch.cat(
            [classifier(x).argmax(1) for x in features.split(chunk_size)]
            or [torch.empty(0, dtype=torch.long, device=features.device)]
        )


@torch.inference_mode(False)  # callable from Lightning's validation hooks (inference mode, no grad):
@torch.enable_grad()  # the probe trains on new tensors computed here, never on the inputs' graph
def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float | None = None,
    weight_decay: float = 1e-5,
    batch_size: int = 512,
    optimizer: ProbeOptimizer = "sgd",
    normalize: Normalize = "standardize",
    seed: int = 0,
) -> dict[str, Any]:
    """Train ``logits = W x + b`` with cross-entropy on frozen features; report top-1.

    The standard linear evaluation protocol (Zhang et al. 2016; Chen et al. 2020,
    SimCLR, Sec. B.6) run on cached feature tensors, on their device, so it takes
    seconds. Defaults:

    - features standardised per dimension with the *train* mean and std
      (``normalize="standardize"``; ``"l2"`` scales rows to unit length, ``"none"``);
    - ``W, b`` start at zero (the problem is convex; no RNG is involved);
    - SGD, momentum 0.9, Nesterov, ``lr=0.1`` (AdamW: ``lr=1e-3``), ``weight_decay=1e-5``,
      batch 512 reshuffled each epoch from ``seed``, 100 epochs, cosine decay of the
      learning rate to 0, stepped per batch, no warm-up.

    Deterministic given ``seed`` on a given device. ``linear_top1`` is the accuracy on
    the test features of the classifier after the last epoch (no model selection on
    the test set).

    Args:
        train_features: (N, D) training features.
        train_labels: (N,) integer labels in [0, num_classes).
        test_features: (M, D) test features.
        test_labels: (M,) integer labels.
        num_classes: number of classes C.
        epochs: passes over the training features.
        lr: peak learning rate; ``None`` picks the optimiser's default above.
        weight_decay: L2 penalty (SGD) or decoupled decay (AdamW) on ``W`` and ``b``.
        batch_size: mini-batch size (the last batch of an epoch may be smaller).
        optimizer: ``"sgd"`` or ``"adamw"``.
        normalize: ``"standardize"``, ``"l2"`` or ``"none"``.
        seed: seeds the shuffling.

    Returns:
        ``linear_train_top1`` and ``linear_top1`` (percent), ``linear_test_loss``
        (mean cross-entropy), ``test_predictions`` ((M,) int64), ``normalize``, and
        ``classifier``: an ``nn.Linear(D, C)``. For ``"standardize"`` and ``"none"`` it
        takes the *raw* features (the standardisation is folded into ``W`` and ``b``);
        for ``"l2"`` it takes L2-normalised features.
    """
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train_features and test_features must be (N, D) and (M, D), got "
            f"{tuple(train_features.shape)} and {tuple(test_features.shape)}"
        )
    n, d = train_features.shape
    check_labels(train_labels, num_classes, n, "train_labels")
    check_labels(test_labels, num_classes, test_features.shape[0], "test_labels")
    if n == 0 or epochs < 1 or batch_size < 1:
        raise ValueError("need training features, epochs >= 1 and batch_size >= 1")
    if normalize not in ("standardize", "l2", "none"):
        raise ValueError(f"normalize must be 'standardize', 'l2' or 'none', got {normalize!r}")
    check_finite(train_features, "train_features")
    check_finite(test_features, "test_features")
    device = train_features.device
    x_train = train_features.float()
    x_test = test_features.float().to(device)
    y_train = train_labels.to(device).long()  # any integer dtype (cross_entropy wants int64)
    y_test = test_labels.to(device).long()
    mean = torch.zeros(d, device=device)
    std = torch.ones(d, device=device)
    if normalize == "standardize":
        mean, std = x_train.mean(0), x_train.std(0, correction=0).clamp_min(1e-6)  # (D,), (D,)
    elif normalize == "l2":
        x_train, x_test = F.normalize(x_train, dim=1), F.normalize(x_test, dim=1)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std

    classifier = nn.utils.skip_init(nn.Linear, d, num_classes, device=device)  # no draw from the global RNG
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    if optimizer == "sgd":
        peak = 0.1 if lr is None else lr
        opt: torch.optim.Optimizer = torch.optim.SGD(
            classifier.parameters(), lr=peak, momentum=0.9, nesterov=True, weight_decay=weight_decay
        )
    elif optimizer == "adamw":
        peak = 1e-3 if lr is None else lr
        opt = torch.optim.AdamW(classifier.parameters(), lr=peak, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")

    generator = torch.Generator().manual_seed(seed)
    total_steps = epochs * math.ceil(n / batch_size)
    cosine = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / total_steps)))
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)  # (N,)
        for idx in order.split(batch_size):
            loss = F.cross_entropy(classifier(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            cosine.step()  # per step, from the peak to 0

    train_pred = predict_linear(classifier, x_train)
    test_pred = predict_linear(classifier, x_test)
    with torch.no_grad():
        test_loss = F.cross_entropy(classifier(x_test), y_test).item() if len(y_test) else float("nan")
        if normalize != "l2":  # fold (x - mean) / std into W and b
            classifier.weight.div_(std)
            classifier.bias.sub_(classifier.weight @ mean)
    return {
        "linear_train_top1": accuracy(train_pred, y_train),
        "linear_top1": accuracy(test_pred, y_test) if len(y_test) else float("nan"),
        "linear_test_loss": test_loss,
        "test_predictions": test_pred,
        "normalize": normalize,
        "classifier": classifier,
    }


def exportable_classifier(probe_out: dict[str, Any]) -> nn.Linear | None:
    """The probe's classifier where it takes the raw features, as a ResNet's ``fc`` does; else None, logged.

    With ``probe.normalize=l2`` it takes unit-length features, and its bias makes the argmax depend on
    the features' length, so no ``fc`` on the raw features predicts as it does.
    """
    if probe_out.get("normalize") == "l2":
        log.warning(
            "backbone_torchvision.pt holds no fc: the probe was trained on L2-normalised features "
            "(probe.normalize=l2), which an fc on the raw features cannot reproduce; "
            "probe.normalize=standardize (the default) exports it"
        )
        return None
    return probe_out.get("classifier")
