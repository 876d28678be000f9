"""Anchors (default boxes, priors) for single-stage and two-stage detectors.

Two families:

* SSD default boxes (Liu et al. 2016), also used by RefineDet: per level a min
  size ``s_k`` (and optionally a max size ``s_{k+1}``) and a list of aspect
  ratios, centred at ``((j + offset) * step, (i + offset) * step)``.
  :func:`ssd_default_boxes`, :func:`ssd_sizes`. The models build their
  anchors from their own fields (``SSD``, ``RefineDet``); the papers' presets
  (SSD300, SSD512, RefineDet320) are the tests' references, in ``tests/helpers/anchor_presets.py``.
* Grid anchors for RPN / FPN heads, as torchvision's ``AnchorGenerator`` makes
  them: zero-centred base anchors from sizes x ratios, rounded to integers,
  shifted by ``(x * stride, y * stride)``. :func:`grid_anchors`,
  :func:`multilevel_grid_anchors`, :func:`num_anchors_per_location`.

Every function returns ``[A, 4]`` float32 xyxy boxes in input-image pixels,
ordered location-major (row ``y``, then column ``x``) and anchor-minor, which is
the order of a conv head whose output channels are ``[A_per_loc * 4]`` at each
location once reshaped to ``[B, H * W * A_per_loc, 4]``.

Anchors depend only on static configuration (image size, feature-map sizes,
strides, sizes, ratios), never on data. They are therefore computed with NumPy
on the host, at trace time, and returned as ``np.ndarray``: under ``jax.jit``
they become constants of the compiled program, cost nothing per step and never
cause a retrace. This is deliberate; do not pass traced values to these
functions. The few conversions taken from :mod:`jdet.boxes` run under
``jax.ensure_compile_time_eval`` so that they stay concrete inside a trace.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np

from jdet import boxes as box_ops

__all__ = [
    "ssd_sizes", "ssd_default_boxes", "num_default_boxes_per_location",
    "grid_anchors", "multilevel_grid_anchors", "num_anchors_per_location",
]


def _pair(x) -> tuple[float, float]:
  """``v`` -> ``(v, v)``; a length-2 sequence is returned as a tuple."""
  if isinstance(x, (tuple, list, np.ndarray)):
    if len(x) != 2:
      raise ValueError(f"expected a number or an (h, w) pair, got {x!r}")
    return (x[0], x[1])
  return (x, x)


def _cxcywh_to_xyxy(cxcywh: np.ndarray) -> np.ndarray:
  """``[N, 4]`` cxcywh -> ``[N, 4]`` float32 xyxy as NumPy, concrete even inside a trace."""
  with jax.ensure_compile_time_eval():
    return np.asarray(box_ops.cxcywh_to_xyxy(cxcywh.astype(np.float32)), dtype=np.float32)


def _clip(xyxy: np.ndarray, image_size) -> np.ndarray:
  """Clips ``[N, 4]`` xyxy to an ``(h, w)`` image, as NumPy float32."""
  with jax.ensure_compile_time_eval():
    return np.asarray(box_ops.clip(xyxy, _pair(image_size)), dtype=np.float32)


# ----------------------------------------------------------------------------
# SSD default boxes.
# ----------------------------------------------------------------------------


def ssd_sizes(image_size: int, num_levels: int, s_min: float = 0.2, s_max: float = 0.9,
              first: float = 0.1) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Min and max box sizes per level from the SSD paper's scale rule.

  The paper spaces the scales of levels ``k = 1 .. m`` evenly,
  ``s_k = s_min + (s_max - s_min) (k - 1) / (m - 1)``, and the extra 1:1 box of
  level ``k`` has size ``sqrt(s_k s_{k+1})``. The released Caffe models apply it
  to all levels but the first, in whole percent: ``step = floor((s_max - s_min)
  * 100 / (num_levels - 2))`` percent, the scales are ``s_min, s_min + step, ...``
  and each level's max size is the next level's min size; the first level gets
  ``first`` as its min and ``s_min`` as its max. Sizes are ``image_size * percent / 100``.

  Example (SSD300, VOC): ``ssd_sizes(300, 6)`` gives min sizes
  ``(30, 60, 111, 162, 213, 264)`` and max sizes ``(60, 111, 162, 213, 264, 315)``
  (the step is ``floor(70 / 4) = 17`` percent). COCO uses ``s_min=0.15, first=0.07``:
  ``(21, 45, 99, 153, 207, 261)`` and ``(45, 99, 153, 207, 261, 315)``.

  Args:
    image_size: the shorter side of the input, in pixels (300 or 512).
    num_levels: number of feature levels, at least 3.
    s_min, s_max: scale of the second level and upper end of the range (the last
      level's scale when the step is whole), as fractions of ``image_size``; they
      are used in whole percent.
    first: scale of the first level (conv4_3), a fraction of ``image_size``.
  Returns:
    ``(min_sizes, max_sizes)``, each a tuple of ``num_levels`` floats in pixels.
  """
  if num_levels < 3:
    raise ValueError(f"the SSD size rule needs at least 3 levels, got {num_levels}")
  lo, hi, head = round(s_min * 100), round(s_max * 100), round(first * 100)
  step = (hi - lo) // (num_levels - 2)
  if step <= 0:
    raise ValueError(f"s_max={s_max} must exceed s_min={s_min} by at least "
                     f"{num_levels - 2} percent")
  percents = list(range(lo, hi + 1, step))[:num_levels - 1]
  min_sizes = [image_size * head / 100.0] + [image_size * p / 100.0 for p in percents]
  max_sizes = [image_size * lo / 100.0] + [image_size * (p + step) / 100.0 for p in percents]
  return tuple(min_sizes), tuple(max_sizes)


def _ssd_wh(min_size: float, max_size: float | None, ratios: Sequence[float]) -> np.ndarray:
  """``[P, 2]`` (w, h) of the boxes at one location, in the SSD order."""
  wh = [(min_size, min_size)]
  if max_size is not None:
    s = math.sqrt(min_size * max_size)
    wh.append((s, s))
  for a in ratios:
    r = math.sqrt(a)
    wh.append((min_size * r, min_size / r))
    wh.append((min_size / r, min_size * r))
  return np.asarray(wh, dtype=np.float64)


def num_default_boxes_per_location(aspect_ratios: Sequence[Sequence[float]],
                                   with_max_size: bool = True) -> list[int]:
  """Boxes per location of each SSD level: ``1 + with_max_size + 2 * len(ratios)``."""
  return [1 + int(with_max_size) + 2 * len(r) for r in aspect_ratios]


def ssd_default_boxes(
    image_size,
    feature_sizes: Sequence,
    strides: Sequence,
    min_sizes: Sequence[float],
    max_sizes: Sequence[float] | None,
    aspect_ratios: Sequence[Sequence[float]],
    *,
    offset: float = 0.5,
    clip: bool = False,
    clamp_size: bool = False,
) -> np.ndarray:
  """SSD default boxes (Caffe ``PriorBox`` with ``flip=True``) for all levels.

  At each location of level ``k`` the boxes are, in this order: the 1:1 box of
  size ``s_k = min_sizes[k]``; if ``max_sizes`` is given, the 1:1 box of size
  ``sqrt(s_k * max_sizes[k])``; then for each ratio ``a`` in ``aspect_ratios[k]``
  the boxes ``(w, h) = (s_k sqrt(a), s_k / sqrt(a))`` and ``(s_k / sqrt(a), s_k sqrt(a))``.
  Their centre is ``((j + offset) * stride_w, (i + offset) * stride_h)`` for row ``i``
  and column ``j``. Sizes are in pixels, so boxes are square in pixels whatever
  the image's shape (as in Caffe; torchvision's ``DefaultBoxGenerator`` scales
  by each side instead, which differs only for non-square images).

  Example: one 2x2 level, stride 10, min size 8, no max size, no ratios gives
  ``[[1, 1, 9, 9], [11, 1, 19, 9], [1, 11, 9, 19], [11, 11, 19, 19]]``.

  Args:
    image_size: ``(h, w)`` or ``s`` for a square input; used by ``clip`` and ``clamp_size``.
    feature_sizes: per level ``f`` or ``(f_h, f_w)``.
    strides: per level the boxes' stride in pixels (Caffe's ``step``), ``s`` or ``(s_h, s_w)``.
    min_sizes: per level ``s_k`` in pixels.
    max_sizes: per level ``s_{k+1}`` in pixels, or ``None`` for no extra 1:1 box
      (RefineDet).
    aspect_ratios: per level a list of ratios ``a >= 1`` (each gives two boxes).
    offset: centre offset in units of the stride (Caffe's ``offset``).
    clip: clip the xyxy boxes to the image (Caffe's ``clip``; off in the
      released SSD and RefineDet models).
    clamp_size: clamp each box's width and height to the image's before the
      centre is applied, as torchvision's ``DefaultBoxGenerator(clip=True)`` does
      (the default of its ``ssd300_vgg16``).
  Returns:
    ``[sum_k f_h f_w P_k, 4]`` float32 xyxy in input-image pixels.
  """
  n = len(feature_sizes)
  if max_sizes is not None and len(max_sizes) != n:
    raise ValueError(f"max_sizes has {len(max_sizes)} levels, feature_sizes {n}")
  for name, v in (("strides", strides), ("min_sizes", min_sizes), ("aspect_ratios", aspect_ratios)):
    if len(v) != n:
      raise ValueError(f"{name} has {len(v)} levels, feature_sizes {n}")
  img_h, img_w = _pair(image_size)
  out = []
  for k in range(n):
    fh, fw = _pair(feature_sizes[k])
    sh, sw = _pair(strides[k])
    wh = _ssd_wh(min_sizes[k], None if max_sizes is None else max_sizes[k], aspect_ratios[k])
    if clamp_size:
      wh = np.minimum(wh, [img_w, img_h])
    cy, cx = np.meshgrid((np.arange(fh) + offset) * sh, (np.arange(fw) + offset) * sw,
                         indexing="ij")                               # [fh, fw]
    centres = np.stack([cx, cy], axis=-1).reshape(-1, 1, 2)          # [fh * fw, 1, 2]
    centres = np.broadcast_to(centres, (fh * fw, len(wh), 2))        # [fh * fw, P, 2]
    sizes = np.broadcast_to(wh[None], (fh * fw, len(wh), 2))         # [fh * fw, P, 2]
    out.append(np.concatenate([centres, sizes], axis=-1).reshape(-1, 4))
  xyxy = _cxcywh_to_xyxy(np.concatenate(out, axis=0))                # [A, 4]
  return _clip(xyxy, (img_h, img_w)) if clip else xyxy


# ----------------------------------------------------------------------------
# Grid anchors (RPN, FPN).
# ----------------------------------------------------------------------------


def _base_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float],
                  round_base: bool) -> np.ndarray:
  """``[R * S, 4]`` zero-centred xyxy anchors, ratio-major, size-minor."""
  # float32 throughout, so that rounding (half to even) agrees with torchvision's.
  h_ratio = np.sqrt(np.asarray(aspect_ratios, np.float32))             # [R]
  w_ratio = np.float32(1.0) / h_ratio
  s = np.asarray(sizes, np.float32)                                     # [S]
  w = (w_ratio[:, None] * s[None, :]).reshape(-1)                       # [R * S]
  h = (h_ratio[:, None] * s[None, :]).reshape(-1)
  zeros = np.zeros_like(w)
  base = _cxcywh_to_xyxy(np.stack([zeros, zeros, w, h], axis=-1))       # [R * S, 4]
  return np.round(base) if round_base else base


def grid_anchors(feature_size, stride, sizes: Sequence[float], aspect_ratios: Sequence[float],
                 *, offset: float = 0.0, round_base: bool = True) -> np.ndarray:
  """Anchors of one feature level, as torchvision's ``AnchorGenerator``.

  Base anchors are centred at 0 with, for ratio ``r = h / w`` and size ``s``,
  ``w = s / sqrt(r)`` and ``h = s * sqrt(r)`` (area ``s^2``), ordered ratio-major
  then size-minor, and rounded to integers (``round_base``). They are shifted to
  ``((x + offset) * stride_w, (y + offset) * stride_h)``.

  Example: ``grid_anchors((1, 2), 16, (32,), (1.0,))`` is
  ``[[-16, -16, 16, 16], [0, -16, 32, 16]]``.

  Args:
    feature_size: ``(h, w)`` of the feature map, or ``f`` for a square one.
    stride: ``s`` or ``(s_h, s_w)`` in pixels.
    sizes: anchor sizes (square root of the area) in pixels.
    aspect_ratios: ratios ``h / w``.
    offset: centre offset in units of the stride; torchvision uses 0.
    round_base: round the base anchors to integers, as torchvision does.
  Returns:
    ``[H * W * len(aspect_ratios) * len(sizes), 4]`` float32 xyxy, location-major.
  """
  fh, fw = _pair(feature_size)
  sh, sw = _pair(stride)
  base = _base_anchors(sizes, aspect_ratios, round_base)               # [P, 4]
  sy, sx = np.meshgrid((np.arange(fh) + offset) * sh, (np.arange(fw) + offset) * sw,
                       indexing="ij")                                   # [fh, fw]
  shifts = np.stack([sx, sy, sx, sy], axis=-1).reshape(-1, 1, 4)        # [fh * fw, 1, 4]
  return (shifts.astype(np.float32) + base[None]).reshape(-1, 4).astype(np.float32)


def _per_level(value, n: int, name: str) -> list[tuple[float, ...]]:
  """Per-level tuples: a flat sequence of numbers is shared by all levels."""
  if len(value) and not isinstance(value[0], (tuple, list, np.ndarray)):
    return [tuple(value)] * n
  if len(value) != n:
    raise ValueError(f"{name} has {len(value)} levels, expected {n}")
  return [tuple(v) for v in value]


def _sizes_per_level(sizes_per_level, n: int) -> list[tuple[float, ...]]:
  if len(sizes_per_level) != n:
    raise ValueError(f"sizes_per_level has {len(sizes_per_level)} levels, expected {n}")
  return [tuple(s) if isinstance(s, (tuple, list, np.ndarray)) else (s,) for s in sizes_per_level]


def num_anchors_per_location(sizes_per_level: Sequence, aspect_ratios: Sequence) -> list[int]:
  """Anchors per location of each level: ``len(sizes) * len(ratios)``.

  Takes the same ``sizes_per_level`` and ``aspect_ratios`` as
  :func:`multilevel_grid_anchors`.
  """
  n = len(sizes_per_level)
  sizes = _sizes_per_level(sizes_per_level, n)
  ratios = _per_level(aspect_ratios, n, "aspect_ratios")
  return [len(s) * len(r) for s, r in zip(sizes, ratios)]


def multilevel_grid_anchors(
    feature_sizes: Sequence,
    strides: Sequence,
    sizes_per_level: Sequence,
    aspect_ratios: Sequence,
    *,
    offset: float = 0.0,
    round_base: bool = True,
    concat: bool = True,
) -> np.ndarray | list[np.ndarray]:
  """:func:`grid_anchors` for every level (FPN), as torchvision's ``AnchorGenerator``.

  Example (Faster R-CNN R50-FPN on an 800x1216 input)::

    multilevel_grid_anchors([(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)],
                            [4, 8, 16, 32, 64], [32, 64, 128, 256, 512], [0.5, 1.0, 2.0])

  Args:
    feature_sizes: per level ``(h, w)`` or ``f``.
    strides: per level ``s`` or ``(s_h, s_w)``.
    sizes_per_level: per level a tuple of sizes, or one number.
    aspect_ratios: one tuple of ratios ``h / w`` shared by every level, or one per level.
    offset, round_base: as in :func:`grid_anchors`.
    concat: return one array (levels in order) rather than a list of them.
  Returns:
    ``[sum_l H_l W_l A_l, 4]`` float32 xyxy, or the list of per-level ``[H_l W_l A_l, 4]``.
  """
  n = len(feature_sizes)
  if len(strides) != n:
    raise ValueError(f"strides has {len(strides)} levels, feature_sizes {n}")
  sizes = _sizes_per_level(sizes_per_level, n)
  ratios = _per_level(aspect_ratios, n, "aspect_ratios")
  levels = [grid_anchors(f, s, sz, r, offset=offset, round_base=round_base)
            for f, s, sz, r in zip(feature_sizes, strides, sizes, ratios)]
  return np.concatenate(levels, axis=0) if concat else levels
