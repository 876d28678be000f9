"""Samples and their box bookkeeping; :class:`Compose`; fixing the number of boxes.

See :mod:`jdet.data.transforms` for the sample dict and the rules every
transform follows.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np

from jdet.data.transforms.boxes import as_boxes, box_area, clip_boxes

__all__ = ["Sample", "Transform", "BOX_KEYS", "DEFAULT_MIN_SIZE", "sample_from_example",
           "drop_boxes", "clip_sample_boxes", "pad_boxes", "Compose", "PadBoxes"]

Sample = dict[str, Any]
Transform = Callable[[Sample, np.random.Generator], Sample]

# Boxes narrower or shorter than this many pixels are dropped by geometric transforms.
DEFAULT_MIN_SIZE = 1.0

# Per-box arrays: filtered, reordered and padded together.
BOX_KEYS = ("boxes", "labels", "crowd", "difficult")


def image_hw(image: np.ndarray) -> tuple[int, int]:
  """``(h, w)`` of an ``[H, W, C]`` image."""
  return int(image.shape[0]), int(image.shape[1])


def with_image(sample: Sample, image: np.ndarray, boxes: np.ndarray) -> Sample:
  """A new sample with a new image (and ``image_size``) and boxes."""
  return {**sample, "image": image, "boxes": boxes,
          "image_size": np.array(image_hw(image), np.int32)}


class Repr:
  """``Name(field=value, ...)`` of a transform's fields."""

  def __repr__(self) -> str:
    fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
    return f"{type(self).__name__}({fields})"


def sample_from_example(example) -> Sample:
  """The sample dict of a source's :class:`~jdet.data.records.Example`.

  ``image_size = orig_size`` (the image's ``(h, w)``), ``scale_factor = (1, 1)``,
  ``dropped_boxes = 0``. The arrays are the example's (transforms do not modify
  them in place).
  """
  size = np.array(example.orig_size, np.int32)
  return dict(
      image=example.image,
      boxes=as_boxes(example.boxes),
      labels=np.asarray(example.labels, np.int32).reshape(-1),
      crowd=np.asarray(example.crowd, bool).reshape(-1),
      difficult=np.asarray(example.difficult, bool).reshape(-1),
      image_id=np.int32(example.image_id),
      orig_size=size,
      image_size=size.copy(),
      scale_factor=np.ones(2, np.float32),
      dropped_boxes=0,
  )


def drop_boxes(sample: Sample, keep: np.ndarray) -> Sample:
  """Keeps the rows ``keep`` ([N] bool) of every per-box array; counts the others.

  Returns a new dict with ``dropped_boxes`` increased by the number removed.
  """
  keep = np.asarray(keep, bool)
  out = dict(sample)
  for k in BOX_KEYS:
    if k in sample:
      out[k] = sample[k][keep]
  out["dropped_boxes"] = int(sample.get("dropped_boxes", 0)) + int(keep.size - keep.sum())
  return out


def clip_sample_boxes(sample: Sample, keep: np.ndarray | None = None, *,
                min_size: float = DEFAULT_MIN_SIZE) -> Sample:
  """Clips ``boxes`` to ``image`` and drops degenerate and small ones (and those not in ``keep``).

  A box survives when ``x2 - x1 >= min_size``, ``y2 - y1 >= min_size`` (and
  both > 0) after clipping. Removed boxes are counted in ``dropped_boxes``.
  """
  boxes = clip_boxes(sample["boxes"], image_hw(sample["image"]))
  w = boxes[:, 2] - boxes[:, 0]
  h = boxes[:, 3] - boxes[:, 1]
  ok = (w > 0) & (h > 0) & (w >= min_size) & (h >= min_size)
  if keep is not None:
    ok &= np.asarray(keep, bool)
  return drop_boxes({**sample, "boxes": boxes}, ok)


def pad_boxes(sample: Sample, max_boxes: int, *, drop_ignored: bool = True) -> Sample:
  """Fixes the number of boxes to ``M = max_boxes``.

  Args:
    sample: with ``boxes [N, 4]``, ``labels [N]``, and optionally ``crowd [N]``,
      ``difficult [N]``.
    max_boxes: M.
    drop_ignored: remove crowd and difficult boxes first (training targets);
      they are not counted as dropped or truncated.
  Returns:
    A new sample with ``boxes [M, 4]`` float32 (zeros where padded), ``labels
    [M]`` int32 (-1 where padded), ``crowd [M]`` and ``difficult [M]`` bool
    (False where padded), ``dropped_boxes`` as an int32 scalar, and
    ``truncated_boxes`` int32: how many boxes beyond M were cut. When there are
    more than M, the M largest by area are kept (ties: the earlier), in their
    original order.
  """
  boxes = as_boxes(sample["boxes"])
  n = boxes.shape[0]
  labels = np.asarray(sample["labels"], np.int32).reshape(-1)
  crowd = np.asarray(sample.get("crowd", np.zeros(n, bool)), bool).reshape(-1)
  difficult = np.asarray(sample.get("difficult", np.zeros(n, bool)), bool).reshape(-1)
  if drop_ignored:
    keep = ~(crowd | difficult)
    boxes, labels, crowd, difficult = boxes[keep], labels[keep], crowd[keep], difficult[keep]
    n = boxes.shape[0]
  truncated = max(n - max_boxes, 0)
  if truncated:
    largest = np.sort(np.argsort(-box_area(boxes), kind="stable")[:max_boxes])
    boxes, labels, crowd, difficult = boxes[largest], labels[largest], crowd[largest], difficult[largest]
    n = max_boxes
  out = dict(sample)
  out["boxes"] = np.zeros((max_boxes, 4), np.float32)
  out["boxes"][:n] = boxes
  out["labels"] = np.full((max_boxes,), -1, np.int32)
  out["labels"][:n] = labels
  out["crowd"] = np.zeros((max_boxes,), bool)
  out["crowd"][:n] = crowd
  out["difficult"] = np.zeros((max_boxes,), bool)
  out["difficult"][:n] = difficult
  out["dropped_boxes"] = np.int32(sample.get("dropped_boxes", 0))
  out["truncated_boxes"] = np.int32(int(sample.get("truncated_boxes", 0)) + truncated)
  return out


class Compose:
  """Applies transforms in order, all drawing from the same generator."""

  def __init__(self, transforms: Iterable[Transform]):
    self.transforms = list(transforms)

  def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
    for t in self.transforms:
      sample = t(sample, rng)
    return sample

  def __repr__(self) -> str:
    inner = ",\n  ".join(repr(t) for t in self.transforms)
    return f"Compose([\n  {inner}])"


class PadBoxes(Repr):
  """The last step of every recipe: :func:`pad_boxes` to ``max_boxes`` (the pipeline's M)."""

  def __init__(self, max_boxes: int, drop_ignored: bool = True):
    self.max_boxes = max_boxes
    self.drop_ignored = drop_ignored

  def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
    return pad_boxes(sample, self.max_boxes, drop_ignored=self.drop_ignored)
