"""The shell around the Hydra entry points: one-line errors and exit statuses, signals, argv rewriting,
resolvers. Nothing here knows a pipeline, a loss or a data set.

This module imports neither torch nor Lightning (seconds): ``--help`` and configuration errors are
answered without them. The errors of the heavy modules are recognised by name once those are loaded
(:func:`user_errors`).
"""

from __future__ import annotations

import difflib
import errno
import hashlib
import logging
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import QuotedString
from hydra.errors import (
    ConfigCompositionException,
    HydraException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from contrastive.cli.callbacks import remove_refused_run_folder

if TYPE_CHECKING:
    import pytorch_lightning as pl

log = logging.getLogger("contrastive")


#: The exit status of a run that ``trainer.max_time`` stopped before its last epoch: sysexits.h's
#: EX_TEMPFAIL ("try again later"), so that a job script can tell an unfinished run (continue it) from
#: a finished one (0), a user error (2) and a stop by signal N (128 + N).
EXIT_UNFINISHED = 75


#: Hydra plugins of the optional extras, by the config they register: what they are and the extra that installs them.
PLUGINS = {
    "hydra/launcher/submitit": (
        "Hydra's submitit launcher (hydra/launcher=submitit_slurm|submitit_local|slurm_gpu|slurm_ddp)",
        "slurm",
    ),
}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


#: The user errors of the modules that raise them, as (module, class): one clear line and exit status 2,
#: no traceback. By name, so that this module need not import them (torch, Lightning).
USER_ERRORS = (
    ("contrastive.data.tensors", "DataError"),
    ("contrastive.io", "CheckpointError"),
    ("contrastive.pipelines.base", "NonFiniteLossError"),
    ("pytorch_lightning.utilities.exceptions", "MisconfigurationException"),  # e.g. accelerator=gpu, no GPU
)


def _loaded(module: str, name: str) -> type[BaseException] | None:
    """``module.name`` if ``module`` is imported, else None: an error of a module not yet imported cannot have
    been raised (and importing Lightning to find that out would cost seconds)."""
    found = sys.modules.get(module)
    return getattr(found, name) if found is not None else None


def user_errors() -> tuple[type[BaseException], ...]:
    """The user-error classes: :class:`ConfigError`, Hydra's failed instantiation, and those of
    :data:`USER_ERRORS` whose modules are loaded."""
    loaded = (_loaded(module, name) for module, name in USER_ERRORS)
    return (ConfigError, InstantiationException, *(e for e in loaded if e is not None))


def _is_sigterm(error: BaseException) -> bool:
    """Lightning's SIGTERMException (a SystemExit without a code: a scheduler would read success)."""
    sigterm = _loaded("pytorch_lightning.utilities.exceptions", "SIGTERMException")
    return sigterm is not None and isinstance(error, sigterm)


def _user_message(error: Exception) -> str:
    """The message of ``error``; for a failed Hydra instantiation, the cause's own message and the
    config key that built it (Hydra's wrapper repeats the target's name and the exception's repr)."""
    key = None
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        found = re.search(r"full_key: (\S+)", str(error))
        key = found.group(1) if found else key
        error = error.__cause__  # type: ignore[assignment]
    return f"{error} (while building {key})" if key else str(error)


def one_line(error: Exception) -> str:
    return " ".join(m.strip() for m in _user_message(error).strip().splitlines())


def to_log_file(text: str, level: int = logging.INFO) -> None:
    """``text`` into the run's log file (Hydra's ``cli.log``) alone: for what the console shows in its
    own form (a table, an error line on stderr). Nothing where no log file is set up yet."""
    record = log.makeRecord(log.name, level, __file__, 0, text, (), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def say(text: str) -> None:
    """``text`` on stdout as it is (no log prefix: a table stays aligned) and in the run's ``cli.log``."""
    print(text, flush=True)
    to_log_file("\n" + text if "\n" in text else text)  # a table starts on its own line, aligned


def exit_with(error: Exception) -> NoReturn:
    """Print ``error`` as one line on stderr (and into the run's ``cli.log``) and exit with status 2.

    A run refused before any work takes back the folder Hydra made for it
    (:func:`~contrastive.cli.callbacks.remove_refused_run_folder`): it leaves nothing behind.
    """
    line = f"error: {one_line(error)}"
    to_log_file(line, logging.ERROR)
    remove_refused_run_folder()
    print(line, file=sys.stderr)
    sys.exit(2)


#: The log files of the run this call belongs to (``cli.log`` of its folder; for ``contrastive-eval``
#: also the training run's): what :func:`warn_once` looks for a warning in. Set by each flow.
RUN_LOGS: list[Path] = []


def warn_once(text: str) -> None:
    """A warning on the console and in ``cli.log``, once per run.

    A resumed run or an evaluation of its checkpoint would repeat every warning of the data and the
    settings (the CIFAR copy's checksums, a test-only class, a long warm-up): one already in the
    run's logs (:data:`RUN_LOGS`) goes to this call's ``cli.log`` alone. Only the identical text is
    held back, so no other warning can be hidden by it.
    """
    for path in RUN_LOGS:
        try:
            said = text in path.read_text(errors="replace")
        except OSError:
            said = False
        if said:
            to_log_file(f"(said before in this run, not repeated on the console) {text}", logging.WARNING)
            return
    log.warning("%s", text)


def log_data_warnings() -> None:
    """Show :class:`DataWarning` as a log line, once per run (:func:`warn_once`), not as Python's
    ``<file>:<line>: UserWarning`` pointing into Hydra's instantiate."""
    show = warnings.showwarning

    def showwarning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        data_warning = _loaded("contrastive.data.tensors", "DataWarning")
        if data_warning is not None and issubclass(category, data_warning):
            warn_once(str(message))
        else:
            show(message, category, *args, **kwargs)

    warnings.showwarning = showwarning


def quiet_library_notices() -> None:
    """Drop two lines Lightning prints in every training run that no user of this CLI can act on:
    its advertisement for litlogger and a deprecation inside its own pytree code."""
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage()
    )
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")  # batches come from tensors


def _config_keys(config_name: str, overrides: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Every dotted key of the shipped config ``config_name`` with ``overrides`` (e.g. ``experiment=...``),
    or with its defaults where those do not compose."""
    GlobalHydra.instance().clear()
    with initialize_config_module("contrastive.configs", version_base="1.3"):
        try:
            composed = compose(config_name, overrides=list(overrides))
        except Exception:  # another bad override, or a sweep's list
            composed = compose(config_name)
        tree = OmegaConf.to_container(composed, resolve=False)

    def walk(node: Any, prefix: str) -> list[str]:
        if not isinstance(node, dict):
            return [prefix]
        return [k for key, value in node.items() for k in walk(value, f"{prefix}.{key}" if prefix else str(key))]

    return walk(tree, "")


def run_hydra(main: Callable[[], Any], config_name: str) -> None:
    """Run a ``@hydra.main`` entry point; a bad override is one line (exit status 2).

    Hydra printed several lines for a misspelt key, with a hint (``+key=``) that then failed inside the run.
    """
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # composition errors reach us instead of Hydra's printout
    try:
        main()
    except (MissingConfigException, ConfigCompositionException) as e:
        for option, (what, extra) in PLUGINS.items():  # a config of a plugin (or of our presets) not installed
            if f"Could not load '{option}" in str(e) or f"Could not find '{option}" in str(e):
                exit_with(ConfigError(f'{what} is not installed: pip install "contrastive[{extra}]"'))
        if isinstance(e, MissingConfigException):
            exit_with(ConfigError(str(e).split("Config search path")[0]))  # the options, not Hydra's search path
        _unknown_key(e, config_name)
    except OverrideParseException as e:
        exit_with(ConfigError(str(e).split("Config search path")[0]))
    except (ConfigError, InstantiationException) as e:  # a plugin's settings (e.g. the search sweeper's)
        exit_with(e)
    except OSError as e:  # e.g. Hydra creating the run folder in a read-only place: one line, not three tracebacks
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM) or e.filename is None:
            raise
        exit_with(
            ConfigError(
                f"cannot write {e.filename}: {e.strerror}. contrastive-train writes its run folder under the current "
                "folder, contrastive-eval beside the checkpoint: run from a folder you can write to, or pass "
                "hydra.run.dir=/a/writable/folder"
            )
        )
    except Exception as e:
        uncompleted = _loaded("submitit.core.utils", "UncompletedJobError")  # a job of the submitit launcher
        if uncompleted is None or not isinstance(e, uncompleted):
            raise
        exit_with(ConfigError(_uncompleted_job(str(e))))


def _uncompleted_job(message: str) -> str:
    """One line for a sweep job that submitit saw end without a result (stopped by a signal, killed, or failed
    outside the task), in place of the launcher's traceback."""
    found = re.search(r"with path (\S+)", message)
    where = f"; its log: {Path(found.group(1)).parent}/" if found else ""
    return (
        f"{message.splitlines()[0].split(' with path')[0]} ended without a result{where}. Run the same command "
        "again: the jobs that have not finished continue from their checkpoints/last.ckpt, the finished ones are "
        "evaluated again (contrastive-summary MULTIRUN_DIR summarises the jobs so far)"
    )


def _unknown_key(e: ConfigCompositionException, config_name: str) -> NoReturn:
    """One line for a failed composition: the misspelt key with the closest real one, or Hydra's reason."""
    found = re.search(r"Could not override '([^']+)'", str(e))
    if found is None:
        exit_with(ConfigError(str(e).split("Config search path")[0]))
    key = found.group(1)
    others = [a for a in sys.argv[1:] if not a.startswith("-") and a.partition("=")[0].lstrip("+~") != key]
    keys = [k for k in _config_keys(config_name, others) if not k.rpartition(".")[2].startswith("_")]  # no _target_
    close = [k for k in difflib.get_close_matches(key, keys, n=2) if k != key][:1]
    exit_with(
        ConfigError(
            f"unknown config key {key}{f' (did you mean {close[0]}?)' if close else ''}: "
            f"`--cfg job` lists the keys with their values"
        )
    )


def _stopped_by(signum: signal.Signals) -> NoReturn:
    """What to do after a stop by a signal; exit status 128 + its number, as a shell reports it."""
    name = "Ctrl-C" if signum == signal.SIGINT else signum.name
    line = (
        f"error: stopped by {name}; checkpoints/last.ckpt keeps the last whole epoch: run the same command to continue"
    )
    to_log_file(line, logging.ERROR)
    print(line, file=sys.stderr)
    sys.exit(128 + signum)


def fit_interruptible(trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
    """``trainer.fit``, with Ctrl-C raised as KeyboardInterrupt: Lightning ends its graceful shutdown
    with ``sys.exit(1)``, which says neither that the run was stopped nor how to continue it. Any other exit
    passes as it is: submitit's, from its signal handler, once it requeued a sweep job at its time limit
    (its status tells submitit's local runner to start the job again)."""
    try:
        trainer.fit(*args, **kwargs)
    except SystemExit as e:
        if trainer.interrupted and not _is_sigterm(e) and e.code == 1:  # SIGTERM leaves it 'interrupted' as well
            raise KeyboardInterrupt from None
        raise


def run_guarded(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Turn user errors into one clear line on stderr and exit status 2 (no traceback).

    In a sweep (``-m``) a job's error does not stop the sweep: the line (for an unforeseen error, the
    traceback) goes to stderr and to the job's ``error.txt``, the other jobs run, and
    :class:`SweepSummary` reports it.
    """

    def wrapper(cfg: DictConfig) -> Any:
        sweep_job = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
        error_file = None
        if sweep_job:
            from contrastive.evaluation.report import JOB_ERROR_FILE  # what the sweep's report reads

            error_file = Path(HydraConfig.get().runtime.output_dir) / JOB_ERROR_FILE
            error_file.unlink(missing_ok=True)  # from an earlier failed attempt of this job
        try:
            return fn(cfg)
        except KeyboardInterrupt:  # Ctrl-C (see fit_interruptible)
            _stopped_by(signal.SIGINT)
        except SystemExit as e:
            if _is_sigterm(e):  # Lightning's is a SystemExit without a code: a scheduler would read success
                _stopped_by(signal.SIGTERM)
            raise
        except Exception as e:
            if error_file is None:
                if isinstance(e, user_errors()):
                    exit_with(e)
                raise  # a bug or an unforeseen failure: the traceback
            from contrastive.io import write_bytes_atomic

            if isinstance(e, user_errors()):
                line = one_line(e)
                print(f"error: {line}", file=sys.stderr)
                to_log_file(f"error: {line}", logging.ERROR)
                write_bytes_atomic(error_file, (line + "\n").encode())
                return None
            log.exception("job failed")  # the traceback, into the job's cli.log too (a sweep's other jobs still run)
            write_bytes_atomic(
                error_file, f"{type(e).__name__}: {one_line(e)} (traceback in the job's cli.log)\n".encode()
            )
            return None

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def quote_paths(argv: list[str], keys: tuple[str, ...]) -> list[str]:
    """``argv`` with the path overrides of ``keys`` quoted for Hydra where its grammar cannot read them.

    Run folders are named after their overrides (``a=1,b=2``) and periodic checkpoints are
    ``epoch=0049.ckpt``, so ``checkpoint=<a path the CLI printed>`` is not a valid override
    as typed, nor is a path holding a comma (a sweep to Hydra) without ``-m``. With ``-m`` the
    commas are split into the existing paths they join into (:func:`_existing_paths`), each quoted.
    A value that parses as it is (or is quoted already) is left alone.
    """
    parser = OverridesParser.create()
    multirun = is_multirun(argv)
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") in keys and value[:1] not in ("'", '"'):
            paths = _existing_paths(value) if multirun else None
            if paths is not None:
                out.append(key + "=" + ",".join("'" + p.replace("'", "\\'") + "'" for p in paths))
                continue
            try:  # a sweep (a path with a comma) is one path unless -m asks for a sweep
                quote = parser.parse_override(arg).is_sweep_override() and not multirun
            except HydraException:  # the grammar cannot read it as typed
                quote = True
            if quote:
                arg = f"{key}='" + value.replace("'", "\\'") + "'"
        out.append(arg)
    return out


def _existing_paths(value: str) -> list[str] | None:
    """``A,B,...`` read as existing paths whose own names may hold commas (run folders are named
    ``a=1,b=2``): from the left, the longest run of comma-separated pieces that exists is one path.
    None where some piece belongs to no existing path (Hydra then reads the value as typed)."""
    pieces, paths, i = value.split(","), [], 0
    while i < len(pieces):
        j = next((j for j in range(len(pieces), i, -1) if Path(",".join(pieces[i:j])).expanduser().exists()), None)
        if j is None:
            return None
        paths.append(",".join(pieces[i:j]))
        i = j
    return paths


def wants_help(argv: list[str]) -> bool:
    """``--help`` / ``-h``: the entry point's own text (:mod:`contrastive.cli.help`), not Hydra's."""
    return any(arg in ("--help", "-h") for arg in argv)


def is_multirun(argv: list[str]) -> bool:
    return any(arg in ("-m", "--multirun") for arg in argv)


def override_paths(arg: str) -> list[str]:
    """The string values of one ``key=value`` override: one, or each of a sweep's (``-m key=A,B``)."""
    override = OverridesParser.create().parse_override(arg)
    values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
    # a quoted element of a sweep ('A','B') comes as a QuotedString, not unquoted as a lone value is
    return [v.text if isinstance(v, QuotedString) else v for v in values if isinstance(v, (str, QuotedString))]


def run_dir_of(checkpoint: str) -> str:
    """The run directory of a checkpoint: the parent of its ``checkpoints/`` folder."""
    p = Path(checkpoint).expanduser().resolve()
    return str(p.parent.parent if p.parent.name == "checkpoints" else p.parent)


def short_name(name: str, limit: int = 120) -> str:
    """One folder name from the overrides: ``/`` (e.g. of ``data.root=/data``) written as ``%2F`` so that
    the run is not nested folders, and cut and suffixed with a hash when too long for a file name."""
    name = name.replace("%", "%25").replace("/", "%2F")
    if len(name.encode()) <= limit:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return f"{name.encode()[: limit - 11].decode(errors='ignore')}_{digest}"


def register_resolvers() -> None:
    resolvers = {"run_dir_of": run_dir_of, "stem_of": lambda p: Path(p).stem, "short_name": short_name}
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


# Also on import: a sweep job that submitit runs in a process of its own unpickles the task (importing this module)
# and resolves ${short_name:...} of hydra.sweep.subdir before any entry point of ours runs.
register_resolvers()
