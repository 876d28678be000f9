"""Data iterators resumed from a saved state: the next batches are those of an
uninterrupted iterator."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np


def assert_resumes_through_orbax(make_iterator: Callable[[], Any], steps: int, directory,
                                 keys: Sequence[str]) -> None:
  """Asserts that a data iterator saved by orbax after ``steps`` batches and
  restored into a fresh one (``make_iterator()``) gives the same next batch."""
  import grain
  import orbax.checkpoint as ocp

  it = make_iterator()
  for _ in range(steps):
    next(it)
  with ocp.CheckpointManager(directory) as mngr:
    mngr.save(steps, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = next(it)
  fresh = make_iterator()
  with ocp.CheckpointManager(directory) as mngr:
    mngr.restore(steps, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  got = next(fresh)
  for k in keys:
    np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


def assert_resumes_from_state(make_iterator: Callable[[], Any], steps: int, count: int,
                              keys: Sequence[str]) -> None:
  """Asserts that a data iterator's ``get_state()`` after ``steps`` batches, set into a
  fresh one (``make_iterator()``), gives the same next ``count`` batches."""
  it = make_iterator()
  for _ in range(steps):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(count)]
  fresh = make_iterator()
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    for k in keys:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
