"""``python -m contrastive.cli [overrides]`` == ``contrastive-train``."""

from contrastive.cli.train import train

train()
