"""Box maths in pure jax.numpy.

Conventions used everywhere in jdet:

* ``xyxy``: ``[x1, y1, x2, y2]`` in pixels, ``0 <= x1 < x2 <= W`` for a valid box.
  This is the format of the data, of anchors and of detections.
* ``cxcywh``: ``[cx, cy, w, h]`` (centre and size).
* ``xywh``: ``[x1, y1, w, h]`` (COCO's annotation format).

Every function takes boxes with any number of leading dimensions (``[..., 4]``),
computes in float32 whatever the input dtype (so a bfloat16 model still does
its box maths in float32), and works under ``jax.jit`` and ``jax.vmap``.

Degenerate boxes (``x2 <= x1`` or ``y2 <= y1``, e.g. padding rows of zeros) have
area 0, and their IoU and GIoU with anything is 0 and -1 at worst; no NaN is
produced for them.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp

__all__ = [
    "as_f32", "xyxy_to_cxcywh", "cxcywh_to_xyxy", "xyxy_to_xywh", "xywh_to_xyxy",
    "convert", "area", "is_valid", "clip", "iou", "giou", "aligned_iou",
    "aligned_giou", "encode", "decode", "DEFAULT_SCALE_CLAMP",
]

# Decoding clamps log-size deltas at log(1000 / 16), as torchvision and MMDetection do,
# so that exp() cannot overflow for an untrained model.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def as_f32(x) -> jnp.ndarray:
  """Returns ``x`` as a float32 array (box maths is float32 whatever the network's dtype).

  float64 stays float64 (only possible with ``jax_enable_x64``, as reference tests use it).
  """
  x = jnp.asarray(x)
  return x if x.dtype == jnp.float64 else x.astype(jnp.float32)


# ----------------------------------------------------------------------------
# Format conversions.
# ----------------------------------------------------------------------------


def xyxy_to_cxcywh(boxes) -> jnp.ndarray:
  """``[..., 4]`` xyxy -> ``[..., 4]`` cxcywh."""
  b = as_f32(boxes)
  x1, y1, x2, y2 = jnp.moveaxis(b, -1, 0)
  return jnp.stack([(x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1, y2 - y1], axis=-1)


def cxcywh_to_xyxy(boxes) -> jnp.ndarray:
  """``[..., 4]`` cxcywh -> ``[..., 4]`` xyxy."""
  b = as_f32(boxes)
  cx, cy, w, h = jnp.moveaxis(b, -1, 0)
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_xywh(boxes) -> jnp.ndarray:
  """``[..., 4]`` xyxy -> ``[..., 4]`` xywh (COCO)."""
  b = as_f32(boxes)
  return jnp.concatenate([b[..., :2], b[..., 2:] - b[..., :2]], axis=-1)


def xywh_to_xyxy(boxes) -> jnp.ndarray:
  """``[..., 4]`` xywh (COCO) -> ``[..., 4]`` xyxy."""
  b = as_f32(boxes)
  return jnp.concatenate([b[..., :2], b[..., :2] + b[..., 2:]], axis=-1)


_TO_XYXY = {"xyxy": as_f32, "cxcywh": cxcywh_to_xyxy, "xywh": xywh_to_xyxy}
_FROM_XYXY = {"xyxy": as_f32, "cxcywh": xyxy_to_cxcywh, "xywh": xyxy_to_xywh}


def convert(boxes, src: str, dst: str) -> jnp.ndarray:
  """Converts ``[..., 4]`` boxes between ``"xyxy"``, ``"cxcywh"`` and ``"xywh"``."""
  for fmt in (src, dst):
    if fmt not in _TO_XYXY:
      raise ValueError(f"unknown box format {fmt!r}; expected one of {sorted(_TO_XYXY)}")
  return _FROM_XYXY[dst](_TO_XYXY[src](boxes))


# ----------------------------------------------------------------------------
# Area, validity, clipping.
# ----------------------------------------------------------------------------


def _wh(b: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Width and height clamped at 0, so degenerate boxes have no area."""
  return (jnp.maximum(b[..., 2] - b[..., 0], 0.0), jnp.maximum(b[..., 3] - b[..., 1], 0.0))


def area(boxes) -> jnp.ndarray:
  """``[..., 4]`` xyxy -> ``[...]`` area; 0 for degenerate boxes (x2 <= x1 or y2 <= y1)."""
  w, h = _wh(as_f32(boxes))
  return w * h


def is_valid(boxes) -> jnp.ndarray:
  """``[..., 4]`` xyxy -> ``[...]`` bool: finite with ``x1 < x2`` and ``y1 < y2``."""
  b = as_f32(boxes)
  finite = jnp.all(jnp.isfinite(b), axis=-1)
  return finite & (b[..., 2] > b[..., 0]) & (b[..., 3] > b[..., 1])


def clip(boxes, size) -> jnp.ndarray:
  """Clips ``[..., 4]`` xyxy boxes to an image.

  Args:
    boxes: ``[..., 4]`` xyxy.
    size: ``(h, w)``; a ``[..., 2]`` array broadcasting against ``boxes[..., :2]``
      clips each box to its own image (e.g. ``image_size[:, None]`` for ``[B, N, 4]``).
  Returns:
    ``[..., 4]`` with ``0 <= x <= w`` and ``0 <= y <= h``.
  """
  b = as_f32(boxes)
  size = as_f32(size)
  h, w = size[..., 0], size[..., 1]
  x1 = jnp.clip(b[..., 0], 0.0, w)
  y1 = jnp.clip(b[..., 1], 0.0, h)
  x2 = jnp.clip(b[..., 2], 0.0, w)
  y2 = jnp.clip(b[..., 3], 0.0, h)
  return jnp.stack([x1, y1, x2, y2], axis=-1)


# ----------------------------------------------------------------------------
# IoU and GIoU.
# ----------------------------------------------------------------------------


def _safe_div(num: jnp.ndarray, den: jnp.ndarray) -> jnp.ndarray:
  """num / den, and 0 where den <= 0 (gradient-safe)."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _iou_parts(a: jnp.ndarray, b: jnp.ndarray):
  """Intersection, union and enclosing area of broadcast-compatible xyxy boxes."""
  lt = jnp.maximum(a[..., :2], b[..., :2])
  rb = jnp.minimum(a[..., 2:], b[..., 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = area(a) + area(b) - inter
  elt = jnp.minimum(a[..., :2], b[..., :2])
  erb = jnp.maximum(a[..., 2:], b[..., 2:])
  ewh = jnp.maximum(erb - elt, 0.0)
  enclose = ewh[..., 0] * ewh[..., 1]
  return inter, union, enclose


def aligned_iou(a, b) -> jnp.ndarray:
  """IoU of aligned pairs: ``[..., 4]`` and ``[..., 4]`` -> ``[...]``."""
  inter, union, _ = _iou_parts(as_f32(a), as_f32(b))
  return _safe_div(inter, union)


def aligned_giou(a, b) -> jnp.ndarray:
  """Generalized IoU (Rezatofighi et al. 2019) of aligned pairs: ``[...]`` in [-1, 1]."""
  inter, union, enclose = _iou_parts(as_f32(a), as_f32(b))
  return _safe_div(inter, union) - _safe_div(enclose - union, enclose)


def iou(a, b) -> jnp.ndarray:
  """Pairwise IoU: ``[..., N, 4]`` x ``[..., M, 4]`` -> ``[..., N, M]``."""
  a, b = as_f32(a), as_f32(b)
  return aligned_iou(a[..., :, None, :], b[..., None, :, :])


def giou(a, b) -> jnp.ndarray:
  """Pairwise GIoU: ``[..., N, 4]`` x ``[..., M, 4]`` -> ``[..., N, M]``."""
  a, b = as_f32(a), as_f32(b)
  return aligned_giou(a[..., :, None, :], b[..., None, :, :])


# ----------------------------------------------------------------------------
# Box coding (deltas against anchors).
# ----------------------------------------------------------------------------


def encode(boxes, anchors, *, stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
           means: Sequence[float] = (0.0, 0.0, 0.0, 0.0)) -> jnp.ndarray:
  """Encodes xyxy boxes as deltas against xyxy anchors (R-CNN parameterisation).

  ``d = ((gx - ax) / aw, (gy - ay) / ah, log(gw / aw), log(gh / ah))``, then
  ``(d - means) / stds``. SSD's variances 0.1/0.2 and Faster R-CNN's weights
  10/10/5/5 are both ``stds=(0.1, 0.1, 0.2, 0.2)``.

  Args:
    boxes: ``[..., 4]`` xyxy targets.
    anchors: ``[..., 4]`` xyxy anchors, broadcasting against ``boxes``; must have
      positive width and height.
    stds, means: per-coordinate normalisation.
  Returns:
    ``[..., 4]`` float32 deltas ``(dx, dy, dw, dh)``. Targets of zero size give
    ``-inf`` in dw/dh: encode only boxes that are valid (``is_valid``).
  """
  g = xyxy_to_cxcywh(boxes)
  a = xyxy_to_cxcywh(anchors)
  d = jnp.stack([
      (g[..., 0] - a[..., 0]) / a[..., 2],
      (g[..., 1] - a[..., 1]) / a[..., 3],
      jnp.log(g[..., 2] / a[..., 2]),
      jnp.log(g[..., 3] / a[..., 3]),
  ], axis=-1)
  return (d - as_f32(means)) / as_f32(stds)


def decode(deltas, anchors, *, stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
           means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
           scale_clamp: float = DEFAULT_SCALE_CLAMP) -> jnp.ndarray:
  """Inverse of :func:`encode`: ``[..., 4]`` deltas on ``[..., 4]`` anchors -> xyxy.

  ``dw`` and ``dh`` are clamped at ``scale_clamp`` (after de-normalisation) before
  ``exp``, so an untrained model cannot produce infinite boxes.
  """
  d = as_f32(deltas) * as_f32(stds) + as_f32(means)
  a = xyxy_to_cxcywh(anchors)
  dw = jnp.minimum(d[..., 2], scale_clamp)
  dh = jnp.minimum(d[..., 3], scale_clamp)
  cx = d[..., 0] * a[..., 2] + a[..., 0]
  cy = d[..., 1] * a[..., 3] + a[..., 1]
  w = jnp.exp(dw) * a[..., 2]
  h = jnp.exp(dh) * a[..., 3]
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)
