"""contrastive: exact, fast contrastive and self-supervised representation learning."""

__version__ = "0.1.0"
