"""Helpers for users testing their own ops (and for jdet's tests and benchmarks).

Retrace checks (:class:`TraceCounter`, :func:`assert_traces_once`) and random
valid boxes (:func:`random_boxes`). Helpers that only jdet's own tests use
live in ``tests/helpers/`` (one module per topic).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import numpy as np


class TraceCounter:
  """Wraps a function and counts how often JAX traces it.

  Example::

    counted = TraceCounter(my_op)
    f = jax.jit(counted)
    f(x); f(x + 1)          # same shapes: one trace
    assert counted.count == 1
  """

  def __init__(self, fn: Callable[..., Any]):
    self.fn = fn
    self.count = 0
    functools.update_wrapper(self, fn)

  def __call__(self, *args, **kwargs):
    self.count += 1
    return self.fn(*args, **kwargs)


def assert_traces_once(fn: Callable[..., Any], *arg_sets: tuple, **jit_kwargs) -> list[Any]:
  """Runs ``jax.jit(fn)`` on each tuple of arguments and asserts a single trace.

  Every tuple in ``arg_sets`` must have the same shapes and dtypes (different
  values). Returns the outputs, as NumPy trees, one per argument set.
  """
  if len(arg_sets) < 2:
    raise ValueError("give at least two argument sets of the same shapes")
  counted = TraceCounter(fn)
  jitted = jax.jit(counted, **jit_kwargs)
  outs = [jax.tree.map(np.asarray, jitted(*args)) for args in arg_sets]
  assert counted.count == 1, f"{getattr(fn, '__name__', fn)} traced {counted.count} times for one input shape"
  return outs


def random_boxes(rng: np.random.Generator, n: int, *, size: float | Sequence[float] = 512.0,
                 min_side: float = 1.0, max_side: float = 200.0) -> np.ndarray:
  """``[n, 4]`` float32 valid xyxy boxes inside an image of ``size`` (a side, or ``(h, w)``),
  with sides uniform in ``[min_side, max_side]``."""
  h, w = (size, size) if np.isscalar(size) else size
  wh = rng.uniform(min_side, max_side, size=(n, 2))
  x1y1 = rng.uniform(0.0, 1.0, size=(n, 2)) * np.maximum(np.array([w, h]) - wh, 0.0)
  return np.concatenate([x1y1, x1y1 + wh], axis=1).astype(np.float32)
