"""Helpers for jdet's tests (and for users testing their own ops).

These live in the package so that tests import them instead of copying them.
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


def random_boxes(rng: np.random.Generator, n: int, *, size: float = 512.0,
                 min_side: float = 1.0, max_side: float = 200.0) -> np.ndarray:
  """``[n, 4]`` float32 valid xyxy boxes inside a ``size`` x ``size`` image."""
  wh = rng.uniform(min_side, max_side, size=(n, 2))
  x1y1 = rng.uniform(0.0, 1.0, size=(n, 2)) * np.maximum(size - wh, 0.0)
  return np.concatenate([x1y1, x1y1 + wh], axis=1).astype(np.float32)


def write_image(path, h: int, w: int, *, seed: int = 0, orientation: int | None = None) -> None:
  """Writes an ``h x w`` PNG of random pixels, with an EXIF ``orientation`` if given."""
  from PIL import Image

  pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), np.uint8)
  kw = {}
  if orientation:
    exif = Image.Exif()
    exif[0x0112] = orientation
    kw["exif"] = exif.tobytes()
  Image.fromarray(pixels).save(path, "PNG", **kw)


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


def best_iou_per_object(anchors, boxes_per_image: Sequence[np.ndarray]) -> np.ndarray:
  """``[N]`` the highest IoU of each object with any of ``anchors [A, 4]`` (xyxy), over
  the images' ground-truth boxes ``[M_i, 4]`` (images without objects add nothing)."""
  from jdet import boxes as box_lib

  return np.concatenate([np.asarray(box_lib.iou(g, anchors)).max(axis=1)
                         for g in boxes_per_image if len(g)])
