"""Stopping a run cleanly at a step boundary on SIGTERM (preemption, ``kill``) or Ctrl-C.

:class:`StopRequest` turns SIGTERM and a first Ctrl-C into a flag that the
training loop polls: it saves and exits cleanly at the end of the step instead
of dying mid-write. A second Ctrl-C raises ``KeyboardInterrupt`` as usual.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import jax
import numpy as np

__all__ = ["StopRequest"]

log = logging.getLogger(__name__)


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
