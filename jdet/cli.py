"""Command-line plumbing shared by jdet's programs.

``train.py``, ``eval.py``, ``predict.py`` and ``python -m jdet.inference.export``
define their common flags with :func:`define_flags`: ``--config FILE[:variant]``
(ml_collections, with ``--config.a.b=value`` overrides), ``--workdir DIR`` and,
as a program needs them, ``--step`` (a checkpoint), ``--weights`` (a weights file
instead of a run's checkpoints) and the flags that join several processes.
:func:`start` checks the arguments, sets the log levels (:mod:`jdet.engine.logs`:
jdet's progress and every warning by default, the libraries' INFO lines with
``--verbosity=0``) and joins the other processes when asked.
"""

from __future__ import annotations

import contextlib
import sys

from absl import app, flags
from ml_collections import config_flags

from jdet.data import builder
from jdet.engine import logs

__all__ = ["define_flags", "parse_flags", "start", "config_of", "exit_on_errors", "predictor_from_flags"]


def define_flags(workdir_help: str, *, step: bool = False, weights: bool = False,
                 distributed: bool = True, saved_config: bool = False):
  """Defines ``--config`` and ``--workdir`` (and ``--step``, ``--weights``, the
  multi-process flags, as asked); returns the config flag.

  With ``weights``, ``--workdir`` or ``--weights`` names the detector (one of
  them, checked by :func:`predictor_from_flags`); else ``--workdir`` is required.
  With ``saved_config``, ``--config`` may be left out where the workdir holds the
  config its run saved (:func:`config_of`).
  Call at import time of the program, before anything parses flags.
  ``configs/`` is put on ``sys.path`` first, so config files can say
  ``from configs import common`` from any working directory.
  """
  builder.put_configs_on_path()
  config = config_flags.DEFINE_config_file("config", None, "config file[:variant]",
                                           lock_config=True)
  flags.DEFINE_string("workdir", None, workdir_help)
  if step:
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
  if weights:
    flags.DEFINE_string("weights", None, "weights file instead of --workdir's checkpoints (a jdet "
                        ".npz, or a torchvision / MMDetection checkpoint jdet.convert reads)")
  if distributed:
    flags.DEFINE_bool("distributed", False, "join other processes (jax.distributed)")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
    flags.DEFINE_integer("num_processes", None, "number of processes")
    flags.DEFINE_integer("process_id", None, "index of this process")
  if not (weights or saved_config):
    flags.mark_flags_as_required(["config", "workdir"])
  elif not weights:
    flags.mark_flags_as_required(["workdir"])
  # Listed by the program's --help (absl lists the flags of the module that runs).
  names = ["config", "workdir", "step", "weights", "distributed", "coordinator_address",
           "num_processes", "process_id", "verbosity"]
  for name in names:
    if name in flags.FLAGS:
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
  return config


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for :func:`absl.app.run` (``flags_parser=cli.parse_flags``), with a
  one-line error where a ``--config.a.b=value`` override names no field of the config
  (ml_collections raises ``AttributeError`` / ``KeyError`` there)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}\nPass --help to see the flags.")
  except (AttributeError, KeyError) as e:
    key = str(e.args[0] if e.args else e).strip("'\"")
    given = [a for a in argv[1:] if a.startswith("--config.")]
    named = [a for a in given if f".{key}" in a.split("=")[0]] or given
    sys.exit(f"error: {', '.join(named) or 'an override'}: the config has no field {key!r} "
             f"(python -m jdet.config SPEC prints its fields)")


def start(argv, *, positional: bool = False) -> None:
  """Refuses stray arguments (unless the program takes ``positional`` ones), sets the
  log levels from ``--verbosity``, joins other processes if ``--distributed``."""
  if len(argv) > 1 and not positional:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  logs.configure(f.verbosity if f["verbosity"].present else None)
  if "distributed" in f and f.distributed:
    from jdet import parallel
    parallel.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)


def config_of(config, workdir: str | None):
  """``config`` (the ``--config`` flag's value), or else the config that ``train.py`` saved
  in ``workdir``; a usage error if there is neither."""
  if config is not None:
    return config
  from jdet.engine.workdir import CONFIG_FILE, saved_config
  found = saved_config(workdir) if workdir else None
  if found is None:
    where = f"{workdir} has no {CONFIG_FILE}" if workdir else "no --workdir"
    raise app.UsageError(f"give --config ({where} to take the config of its run from)")
  return found


def predictor_from_flags(config, **kwargs):
  """The :class:`jdet.inference.Predictor` that ``--workdir`` (with ``--step``) or
  ``--weights`` names, for the model of ``config`` (with ``--workdir``, None: the config
  its run saved); ``kwargs`` go to its constructor."""
  from jdet.inference.predictor import Predictor
  f = flags.FLAGS
  if bool(f.workdir) == bool(f.weights):
    raise app.UsageError("give --workdir (a train.py run) or --weights (a weights file)")
  if f.workdir:
    return Predictor.from_workdir(f.workdir, config=config, step=f.step, **kwargs)
  if config is None:
    raise app.UsageError("--weights needs --config (the model the weights are for)")
  return Predictor.from_weights(config, f.weights, **kwargs)


@contextlib.contextmanager
def exit_on_errors():
  """Errors of the user's making end the program with their message as the last line,
  not a traceback: a mistake in the config or missing data
  (:class:`jdet.data.builder.ConfigError`), no checkpoint or weights file where the
  flags point, a workdir held by another run, a resume that changes the model or the
  data (status 1), a full disk (status
  :data:`jdet.engine.workdir.DISK_FULL_STATUS`, 28)."""
  from jdet.data.builder import ConfigError
  from jdet.engine import workdir
  from jdet.engine.restore import NoCheckpointError
  try:
    yield
  except (ConfigError, NoCheckpointError, workdir.WorkdirBusyError,
          workdir.ConfigChangedError) as e:
    sys.exit(f"error: {e}")
  except workdir.DiskFullError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(workdir.DISK_FULL_STATUS)
