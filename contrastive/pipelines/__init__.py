"""Training pipelines: thin LightningModules built from finished parts."""

from contrastive.pipelines.base import NonFiniteLossError, Pipeline, RunFacts
from contrastive.pipelines.cpc import CPC, MaskedContext
from contrastive.pipelines.dino import DINO, DINOHead
from contrastive.pipelines.moco import MoCo
from contrastive.pipelines.mocov3 import MoCoV3
from contrastive.pipelines.nnclr import NNCLR
from contrastive.pipelines.siamese import Siamese
from contrastive.pipelines.simclr import SimCLR

# the configs' former scheduler _target_, which checkpoints written before contrastive.schedules store
from contrastive.schedules import warmup_cosine

__all__ = [
    "CPC",
    "DINO",
    "DINOHead",
    "MaskedContext",
    "MoCo",
    "MoCoV3",
    "NNCLR",
    "NonFiniteLossError",
    "Pipeline",
    "RunFacts",
    "SimCLR",
    "Siamese",
    "warmup_cosine",
]
