"""The Hydra entry points ``contrastive-train``, ``contrastive-eval`` and ``contrastive-embed``.

This package is the only one that touches Hydra / OmegaConf: it turns a config into finished
objects (data, networks, loss, augmentation, optimiser factory) and hands them to a pipeline
and a Lightning ``Trainer``. It knows no pipeline, loss or data set by name: a pipeline states
its own rules (:meth:`contrastive.pipelines.Pipeline.check_run`), a loss its input form.

- :mod:`~contrastive.cli.shell`: one-line errors and exit statuses, signals, argv rewriting, resolvers;
- :mod:`~contrastive.cli.checks`: configuration checks, before any work;
- :mod:`~contrastive.cli.callbacks`: Hydra's callbacks (the folder of a refused run, the sweep summary);
- :mod:`~contrastive.cli.help`: the entry points' ``--help``;
- :mod:`~contrastive.cli.run`: building the run's objects, the Trainer, resume;
- :mod:`~contrastive.cli.console`: the per-epoch lines and the results table;
- :mod:`~contrastive.cli.train`, :mod:`~contrastive.cli.evaluate` and :mod:`~contrastive.cli.embed`: the flows;
- :mod:`~contrastive.cli.summary`: a sweep's summary on demand.

Importing the package, ``--help`` and the checks of the settings load neither torch nor Lightning
(seconds): the flows import them once the settings passed, so that a typo is answered at once.
"""

from contrastive.cli.embed import embed
from contrastive.cli.evaluate import evaluate
from contrastive.cli.shell import ConfigError
from contrastive.cli.summary import summary
from contrastive.cli.train import train

__all__ = ["ConfigError", "embed", "evaluate", "summary", "train"]
