"""Command-line plumbing shared by ``train.py`` and ``eval.py``.

Both programs take ``--config FILE[:variant]`` (ml_collections, with
``--config.a.b=value`` overrides), ``--workdir DIR`` and the flags that join
several processes (:func:`define_flags`); :func:`start` checks the
arguments, turns on INFO logging and joins the other processes when asked.
"""

from __future__ import annotations

import contextlib
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from jdet.data import builder

__all__ = ["define_flags", "start"]


def define_flags(workdir_help: str):
  """Defines ``--config``, ``--workdir`` and the multi-process flags; returns the config flag.

  Call at import time of the program, after nothing else has parsed flags.
  ``configs/`` is put on ``sys.path`` first, so config files can say
  ``from configs import common`` from any working directory.
  """
  builder.put_configs_on_path()
  config = config_flags.DEFINE_config_file("config", None, "config file[:variant]",
                                           lock_config=True)
  flags.DEFINE_string("workdir", None, workdir_help)
  flags.DEFINE_bool("distributed", False, "join other processes (jax.distributed)")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
  flags.DEFINE_integer("num_processes", None, "number of processes")
  flags.DEFINE_integer("process_id", None, "index of this process")
  flags.mark_flags_as_required(["config", "workdir"])
  return config


def start(argv) -> None:
  """Checks for stray arguments, logs at INFO, joins other processes if ``--distributed``."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  f = flags.FLAGS
  if f.distributed:
    from jdet import parallel
    parallel.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)


@contextlib.contextmanager
def config_errors_exit():
  """A mistake in the config or missing data (:class:`jdet.data.builder.ConfigError`) ends
  the program with its message as the last line and exit status 1, not a traceback."""
  from jdet.data.builder import ConfigError
  try:
    yield
  except ConfigError as e:
    sys.exit(f"error: {e}")
