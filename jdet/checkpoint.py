"""Checkpoints of the training state and the input position, and clean stops.

:class:`Checkpointer` wraps an orbax ``CheckpointManager`` over
``WORKDIR/checkpoints``. Each step directory holds two items::

  checkpoints/<step>/state     # the TrainState leaves (StandardSave)
  checkpoints/<step>/data      # the grain iterator position, one JSON per process
  checkpoints/<step>/metrics   # the evaluation metrics given to ``save``, if any

so that a resumed run continues with the exact next batch. Saves are
asynchronous: ``save`` returns once the arrays are copied off the devices
(the state can then be donated to the next step) and the files are written in
a background thread; ``wait()`` (or ``close()``) blocks until they are
committed.

Retention: the last ``keep_last`` checkpoints and the ``keep_best`` best ones
by ``metrics[best_metric]`` (higher is better) are kept, with orbax's
preservation policies ``AnyPreservationPolicy([LatestN, BestN])``. A step
saved without that metric is never "best".

Restoring needs a template: a concrete state of the same structure (a freshly
created ``TrainState``). Its shapes, dtypes and shardings say how the arrays
are read back, and its static fields (the optimiser ``tx``) are kept.

:class:`StopRequest` turns SIGTERM (preemption, ``kill``) and a first Ctrl-C
into a flag that the training loop polls: it saves and exits cleanly at the
end of the step instead of dying mid-write. A second Ctrl-C raises
``KeyboardInterrupt`` as usual.
"""

from __future__ import annotations

import logging
import math
import signal
from typing import Any, Mapping

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

__all__ = ["Checkpointer", "StopRequest"]

log = logging.getLogger("jdet.checkpoint")

_policies = ocp.checkpoint_managers


class _NoMetricsWarning(logging.Filter):
  """Drops orbax's warning for a save without metrics: most saves have none, on purpose."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Requested `tracked_metric`")


def _quiet_orbax() -> None:
  absl_logger = logging.getLogger("absl")  # where orbax's absl logging ends up
  if not any(isinstance(f, _NoMetricsWarning) for f in absl_logger.filters):
    absl_logger.addFilter(_NoMetricsWarning())


class Checkpointer:
  """Saves and restores ``(state, data iterator)`` pairs under ``directory``.

  Args:
    directory: the checkpoint directory, normally ``WORKDIR/checkpoints``.
    keep_last: how many of the most recent checkpoints to keep (>= 1).
    keep_best: how many of the best checkpoints by ``best_metric`` to keep, on
      top of the last ones (0: none).
    best_metric: the key of ``metrics`` that ranks checkpoints, higher is better.
    async_save: write in a background thread.

  Usage::

    with Checkpointer(workdir / "checkpoints") as ckpt:
      if ckpt.latest_step() is not None:
        state = ckpt.restore(state, data_iterator=train_iter)
      ...
      ckpt.save(step, state, data_iterator=train_iter, metrics={"AP": ap})
  """

  def __init__(self, directory: str | epath.PathLike, *, keep_last: int = 2, keep_best: int = 1,
               best_metric: str = "AP", async_save: bool = True):
    if keep_last < 1:
      raise ValueError(f"keep_last must be >= 1 (the latest checkpoint is needed to resume), "
                       f"got {keep_last}")
    if keep_best < 0:
      raise ValueError(f"keep_best must be >= 0, got {keep_best}")
    path = epath.Path(directory)
    if "://" not in str(directory):
      path = epath.Path(path.expanduser().absolute())  # orbax wants absolute paths
    self.directory = path
    self.best_metric = best_metric
    policies = [_policies.LatestN(n=keep_last)]
    if keep_best:
      policies.append(_policies.BestN(get_metric_fn=self._metric, reverse=False, n=keep_best,
                                      keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=_policies.AnyPreservationPolicy(policies),
        # best_fn makes orbax write the metrics with each step and rank them
        # in best_step(); retention is left to the policy above.
        best_fn=self._metric, best_mode="max",
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(path, options=options)
    _quiet_orbax()

  def _metric(self, metrics: Mapping[str, Any]) -> float:
    return float(metrics.get(self.best_metric, -math.inf))

  def _orbax_metrics(self, metrics: Mapping[str, Any] | None) -> dict[str, float] | None:
    """The metrics to record, or None unless they rank the step (``best_metric`` is a number)."""
    if not metrics or self.best_metric not in metrics:
      return None
    if math.isnan(float(metrics[self.best_metric])):
      return None
    return {k: float(v) for k, v in metrics.items()}

  def save(self, step: int, state: Any, *, data_iterator: grain.DatasetIterator | None = None,
           metrics: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Starts saving ``state`` (and the iterator's position) as ``step``.

    Args:
      step: the training step, normally ``int(state.step)``.
      state: a pytree of arrays (a ``TrainState``); static fields are not saved.
      data_iterator: a grain ``DatasetIterator`` whose position to save.
      metrics: scalars such as ``{"AP": 0.31}``. Recorded with the step and
        used for ``keep_best`` only if they contain ``best_metric``.
      force: save even if orbax's save-decision policy would skip this step.

    Returns:
      Whether a save was started (False when ``step`` already exists, e.g. a
      final save right after resuming).
    """
    step = int(step)
    if step in self._manager.all_steps():
      log.info("checkpoint %d already exists in %s; not saving it again", step, self.directory)
      return False
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items),
                              metrics=self._orbax_metrics(metrics), force=force)

  def restore(self, state_template: Any, *, step: int | None = None,
              data_iterator: grain.DatasetIterator | None = None) -> Any:
    """The state saved at ``step`` (default: the latest).

    Args:
      state_template: a concrete state with the saved structure; its shapes,
        dtypes and shardings are used, its values ignored, its static fields kept.
      step: which checkpoint; ``None`` for the latest.
      data_iterator: if given and the step saved one, its position is restored
        in place.

    Raises:
      FileNotFoundError: no checkpoint at ``step`` (or none at all).
    """
    self._manager.wait_until_finished()
    steps = list(self._manager.all_steps())
    if step is None:
      step = self._manager.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
    step = int(step)
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                              f"available steps: {sorted(steps)}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)
    items = {"state": ocp.args.StandardRestore(abstract)}
    if data_iterator is not None:
      if "data" in (self._manager.item_metadata(step) or {}):
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      else:
        log.warning("checkpoint %d has no data iterator state; the input starts afresh", step)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def latest_step(self) -> int | None:
    """The most recent saved step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """All kept steps, increasing."""
    return sorted(self._manager.all_steps())

  def best_step(self) -> int | None:
    """The kept step with the highest ``best_metric``, or None if no step has it."""
    return self._manager.best_step()

  def metrics(self, step: int) -> dict[str, float] | None:
    """The metrics recorded with ``step``, or None."""
    return self._manager.metrics(step)

  def wait(self) -> None:
    """Blocks until every started save is committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class StopRequest:
  """A flag set by SIGTERM or SIGINT, so that training stops at a step boundary.

  Attributes:
    requested: True once a stop signal arrived.
    signal: the number of the first such signal (``signal.SIGTERM``...), or None.

  Usage::

    with StopRequest() as stop:
      for step in ...:
        state = train_step(state, batch)
        if stop.requested_on_any_process():
          ckpt.save(step, state, data_iterator=it, force=True)
          break

  Handlers can only be installed from the main thread. A second SIGINT
  (Ctrl-C) while a stop is pending puts the previous handlers back and raises
  ``KeyboardInterrupt``.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self.signal: int | None = None
    self._previous: dict[int, Any] = {}

  def install(self) -> StopRequest:
    """Installs the handlers (remembering the previous ones)."""
    if not self._previous:
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def uninstall(self) -> None:
    """Puts the previous handlers back."""
    previous, self._previous = self._previous, {}
    for sig, handler in previous.items():
      signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

  def _handle(self, signum: int, frame) -> None:
    del frame
    if self.requested and signum == signal.SIGINT:
      self.uninstall()
      raise KeyboardInterrupt
    if not self.requested:
      self.requested, self.signal = True, signum
    log.warning("received %s: stopping after this step (Ctrl-C again to abort now)",
                signal.Signals(signum).name)

  def requested_on_any_process(self) -> bool:
    """Whether any process got a stop signal: a collective, call it on every process.

    With one process it is just :attr:`requested`; with several, every process
    must agree to save and stop at the same step.
    """
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray(self.requested))
    return bool(np.any(flags))

  def __enter__(self) -> StopRequest:
    return self.install()

  def __exit__(self, *exc) -> None:
    self.uninstall()
