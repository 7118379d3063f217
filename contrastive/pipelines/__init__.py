"""Training pipelines: thin LightningModules built from finished parts."""

from contrastive.pipelines.base import NonFiniteLossError, Pipeline, warmup_cosine
from contrastive.pipelines.moco import MoCo
from contrastive.pipelines.simclr import SimCLR
from contrastive.pipelines.siamese import Siamese

__all__ = ["MoCo", "NonFiniteLossError", "Pipeline", "SimCLR", "Siamese", "warmup_cosine"]
