"""Helpers for jdet's tests (and for users testing their own ops).

These live in the package so that tests import them instead of copying them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

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


def random_boxes(rng: np.random.Generator, n: int, *, size: float = 512.0,
                 min_side: float = 1.0, max_side: float = 200.0) -> np.ndarray:
  """``[n, 4]`` float32 valid xyxy boxes inside a ``size`` x ``size`` image."""
  wh = rng.uniform(min_side, max_side, size=(n, 2))
  x1y1 = rng.uniform(0.0, 1.0, size=(n, 2)) * np.maximum(size - wh, 0.0)
  return np.concatenate([x1y1, x1y1 + wh], axis=1).astype(np.float32)
