"""The Hydra entry points ``contrastive-train`` and ``contrastive-eval``.

This package is the only one that touches Hydra / OmegaConf: it turns a config into finished
objects (data, networks, loss, augmentation, optimiser factory) and hands them to a pipeline
and a Lightning ``Trainer``. It knows no pipeline, loss or data set by name: a pipeline states
its own rules (:meth:`contrastive.pipelines.Pipeline.check_run`), a loss its input form.

- :mod:`~contrastive.cli.shell`: one-line errors and exit statuses, signals, argv rewriting, resolvers;
- :mod:`~contrastive.cli.checks`: configuration checks, before any work;
- :mod:`~contrastive.cli.run`: building the run's objects, the Trainer, resume, the sweep summary;
- :mod:`~contrastive.cli.train` and :mod:`~contrastive.cli.evaluate`: the two flows.
"""

from contrastive.cli.evaluate import evaluate
from contrastive.cli.shell import ConfigError
from contrastive.cli.train import train

__all__ = ["ConfigError", "evaluate", "train"]
