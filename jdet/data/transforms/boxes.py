"""NumPy box maths for the host-side data pipeline: the one copy beside :mod:`jdet.boxes`.

Transforms run in grain workers, one sample at a time, where JAX has no place
(a device dispatch per box operation, and no JAX in forked workers), so the
few operations they need are here in NumPy, with the conventions of
:mod:`jdet.boxes`: ``[N, 4]`` float32 ``[x1, y1, x2, y2]`` in pixels, pixel
``i`` covering ``[i, i + 1)``; :func:`clip_boxes` is ``jdet.boxes.clip``,
:func:`box_area` ``jdet.boxes.area`` and :func:`box_iou` ``jdet.boxes.iou``
(IoU 0 where the union is empty), as ``tests/data/test_transforms.py`` checks.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["as_boxes", "box_area", "box_centres", "hflip_boxes", "resize_boxes",
           "translate_boxes", "clip_boxes", "box_iou"]


def as_boxes(boxes) -> np.ndarray:
  """Anything box-like -> ``[N, 4]`` float32."""
  return np.asarray(boxes, np.float32).reshape(-1, 4)


def box_area(boxes) -> np.ndarray:
  """``[..., 4]`` xyxy -> ``[...]`` area, 0 for degenerate boxes."""
  b = np.asarray(boxes, np.float32)
  return np.prod(np.maximum(b[..., 2:] - b[..., :2], 0.0), axis=-1)


def box_centres(boxes) -> tuple[np.ndarray, np.ndarray]:
  """``[..., 4]`` xyxy -> ``(cx, cy)``, each ``[...]``."""
  b = np.asarray(boxes, np.float32)
  return (b[..., 0] + b[..., 2]) * 0.5, (b[..., 1] + b[..., 3]) * 0.5


def hflip_boxes(boxes, width: float) -> np.ndarray:
  """Mirrors ``[N, 4]`` xyxy boxes in an image ``width`` pixels wide: ``x -> W - x``."""
  b = as_boxes(boxes)
  out = b.copy()
  out[:, 0] = width - b[:, 2]
  out[:, 2] = width - b[:, 0]
  return out


def resize_boxes(boxes, scale) -> np.ndarray:
  """Scales ``[N, 4]`` xyxy boxes by ``scale``: a number or ``(sy, sx)``.

  Pixel ``i`` covers ``[i, i + 1)``, so boxes follow ``cv2.resize`` exactly with
  ``sx = new_w / w`` and ``sy = new_h / h``.
  """
  sy, sx = np.broadcast_to(np.asarray(scale, np.float64), (2,))
  b = as_boxes(boxes).astype(np.float64) * np.array([sx, sy, sx, sy])
  return b.astype(np.float32)


def translate_boxes(boxes, dx: float, dy: float) -> np.ndarray:
  """Shifts ``[N, 4]`` xyxy boxes by ``(dx, dy)`` pixels."""
  return (as_boxes(boxes) + np.array([dx, dy, dx, dy], np.float32)).astype(np.float32)


def clip_boxes(boxes, size: Sequence[int]) -> np.ndarray:
  """Clips ``[N, 4]`` xyxy boxes to an image of ``size = (h, w)``."""
  h, w = size
  return np.clip(as_boxes(boxes), 0.0, np.array([w, h, w, h], np.float32)).astype(np.float32)


def box_iou(a, b) -> np.ndarray:
  """Pairwise IoU of ``[..., 4]`` and ``[N, 4]`` xyxy boxes -> ``[..., N]`` float32."""
  a = np.asarray(a, np.float32)[..., None, :]
  b = as_boxes(b)
  lt = np.maximum(a[..., :2], b[:, :2])
  rb = np.minimum(a[..., 2:], b[:, 2:])
  wh = np.maximum(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = box_area(a) + box_area(b) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0).astype(np.float32)
