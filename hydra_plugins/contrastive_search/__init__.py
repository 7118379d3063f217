"""Hydra plugins of ``contrastive``: the ``search`` sweeper (``hydra/sweeper=search``), hyper-parameter search
over Optuna's ask/tell API. Hydra instantiates sweepers only from the ``hydra_plugins`` package."""
