"""What jdet's programs log, and the library chatter they keep out of the way.

By default a program shows jdet's own INFO lines (progress, evaluations, the
input summary) and every library's warnings and errors; the INFO lines of
orbax, absl and jax (about 30 lines per checkpoint save, a repr of the whole
checkpoint manager at start-up) appear with absl's ``--verbosity=0`` (or
``-v 0``), debug output with ``--verbosity=1``. :func:`configure` applies
that; ``train.py``, ``eval.py``, ``predict.py`` and ``python -m
jdet.inference.export`` call it through :func:`jdet.cli.start`.

:func:`quiet_orbax` and :func:`quiet_failure` drop the few orbax and asyncio
messages that are noise whatever the verbosity (see their docstrings).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import warnings
from typing import Iterator

__all__ = ["configure", "quiet_orbax", "quiet_failure", "quiet_abandoned_futures"]


def configure(verbosity: int | None = None) -> None:
  """Levels for a program: the root logger at absl's ``verbosity`` (-1: WARNING, 0: INFO,
  1: DEBUG; None, when ``--verbosity`` was not given: WARNING), jdet's loggers at INFO
  or lower."""
  verbosity = -1 if verbosity is None else int(verbosity)
  level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG if verbosity > 0
                                                     else logging.ERROR)
  logging.getLogger().setLevel(level)
  logging.getLogger("jdet").setLevel(min(level, logging.INFO) if verbosity >= -1 else level)


class _NoMetricsWarning(logging.Filter):
  """Drops orbax's warning for a save without metrics: most saves have none, on purpose."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Requested `tracked_metric`")


class _DiskFullReports(logging.Filter):
  """Drops orbax's error reports (with tracebacks) of a write that found the disk full:
  the training loop reports that in one line (:class:`jdet.engine.workdir.DiskFullError`)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or "orbax" not in record.pathname:
      return True
    error = record.exc_info[1] if record.exc_info else None
    return not ("No space left on device" in record.getMessage()
                or "No space left on device" in str(error))


def quiet_orbax() -> None:
  """Drops orbax's warning for saves without metrics, and the "Event loop is closed" errors
  that a failed restore leaves behind (installed once)."""
  absl_logger = logging.getLogger("absl")  # where orbax's absl logging ends up
  if not any(isinstance(f, _NoMetricsWarning) for f in absl_logger.filters):
    absl_logger.addFilter(_NoMetricsWarning())
  if not any(isinstance(f, _DiskFullReports) for f in absl_logger.filters):
    absl_logger.addFilter(_DiskFullReports())
  if not getattr(sys.unraisablehook, "_jdet_drops_closed_loop", False):
    sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)


def _drop_closed_loop_callbacks(previous):
  """An unraisable hook that drops the "Event loop is closed" errors of tensorstore
  callbacks (reads still pending when a failed orbax restore closed its loop)."""

  def hook(unraisable) -> None:
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
      return
    previous(unraisable)

  hook._jdet_drops_closed_loop = True
  return hook


class _AbandonedReads(logging.Filter):
  """Drops asyncio's "exception was never retrieved" reports of a failed orbax restore or save."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "exception was never retrieved" not in str(record.msg)


def quiet_abandoned_futures() -> None:
  """Drops asyncio's "exception was never retrieved" reports from now on: after a failed
  orbax restore or save, whose error jdet has reported already."""
  asyncio_logger = logging.getLogger("asyncio")
  if not any(isinstance(f, _AbandonedReads) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_AbandonedReads())


@contextlib.contextmanager
def quiet_failure() -> Iterator[None]:
  """Runs an orbax restore; if it fails, its abandoned reads are collected quietly now,
  so that their reports neither bury nor follow the error raised about it."""
  try:
    yield
  except Exception:
    quiet_abandoned_futures()
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                            category=RuntimeWarning)
    with warnings.catch_warnings():  # also where the filters above are reset (pytest)
      warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                              category=RuntimeWarning)
      gc.collect()
    raise
