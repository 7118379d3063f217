"""Contrastive and metric losses: pure functions plus thin nn.Module wrappers (torch only)."""

from contrastive.losses._common import Temperature, l2_normalize
from contrastive.losses.dcl import DCL, dcl
from contrastive.losses.dino import DINOLoss, dino_center_update, dino_loss
from contrastive.losses.forms import LOSS_FORMS, LossForm, input_forms
from contrastive.losses.logsumexp import row_logsumexp
from contrastive.losses.margin_softmax import ArcFace, CosFace, arcface_logits, cosface_logits
from contrastive.losses.metric import contrastive_margin, pairwise_distance, triplet_margin
from contrastive.losses.mocov3 import MoCoV3Loss, mocov3_loss
from contrastive.losses.modules import ContrastiveMargin, InfoNCE, NTXent, SupCon, TripletMargin
from contrastive.losses.proxy_anchor import ProxyAnchor, proxy_anchor
from contrastive.losses.regularizer import RegularizedMetricLoss, SoftmaxCERegularizer
from contrastive.losses.softmax import info_nce, nt_xent, sup_con

__all__ = [
    "ArcFace",
    "ContrastiveMargin",
    "CosFace",
    "DCL",
    "DINOLoss",
    "InfoNCE",
    "LOSS_FORMS",
    "LossForm",
    "MoCoV3Loss",
    "NTXent",
    "ProxyAnchor",
    "RegularizedMetricLoss",
    "SoftmaxCERegularizer",
    "SupCon",
    "Temperature",
    "TripletMargin",
    "arcface_logits",
    "contrastive_margin",
    "cosface_logits",
    "dcl",
    "dino_center_update",
    "dino_loss",
    "info_nce",
    "input_forms",
    "l2_normalize",
    "mocov3_loss",
    "nt_xent",
    "pairwise_distance",
    "proxy_anchor",
    "row_logsumexp",
    "sup_con",
    "triplet_margin",
]
