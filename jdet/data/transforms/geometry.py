"""Geometric transforms: flips, resizes, crops, zoom out and padding, boxes kept in step.

Deterministic operations on a sample (:func:`hflip`, :func:`resize`,
:func:`crop`, :func:`expand`, :func:`pad`), the size rules of keep-ratio
resizing and bucketing (:func:`rescale_size`, :func:`choose_bucket`), and the
transforms ``(sample, rng) -> sample`` that draw their parameters and call
them. Every geometric operation clips the boxes to the new image and drops
(and counts) the ones that leave it or shrink below ``min_size``
(:func:`~jdet.data.transforms.core.clip_sample_boxes`).
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from jdet.data.transforms.boxes import (as_boxes, box_centres, box_iou, hflip_boxes,
                                        resize_boxes, translate_boxes)
from jdet.data.transforms.core import (DEFAULT_MIN_SIZE, Repr, Sample, clip_sample_boxes, image_hw,
                                       with_image)
from jdet.data.transforms.photometric import IMAGENET_MEAN

__all__ = ["rescale_size", "choose_bucket", "hflip", "resize", "crop", "expand", "pad",
           "Expand", "MinIoURandomCrop", "RandomSizeCrop", "RandomHFlip", "Resize",
           "KeepRatioResize", "Pad"]


# ----------------------------------------------------------------------------
# Sizes.
# ----------------------------------------------------------------------------


def rescale_size(size: Sequence[int], short: float, max_long: float) -> tuple[int, int]:
  """Keep-ratio output size (MMDetection's ``Resize(keep_ratio=True)`` rule).

  The image is scaled by ``min(short / short_side, max_long / long_side)``: the
  short side becomes ``short`` unless the long side would exceed ``max_long``.

  Args:
    size: ``(h, w)`` of the input.
    short, max_long: target short side and bound on the long side.
  Returns:
    ``(new_h, new_w)``, each at least 1.
  """
  h, w = size
  scale = min(short / min(h, w), max_long / max(h, w))
  return max(int(h * scale + 0.5), 1), max(int(w * scale + 0.5), 1)


def choose_bucket(size: Sequence[int], buckets: Sequence[Sequence[int]]) -> tuple[int, int]:
  """The smallest (by area, then by order) ``(H, W)`` bucket that holds ``size = (h, w)``."""
  h, w = size
  fits = [(bh * bw, i) for i, (bh, bw) in enumerate(buckets) if bh >= h and bw >= w]
  if not fits:
    raise ValueError(f"an image of size (h, w) = {(h, w)} fits none of the buckets {list(buckets)}; "
                     "make the largest bucket at least as large as the resize bound")
  _, i = min(fits)
  return int(buckets[i][0]), int(buckets[i][1])


# ----------------------------------------------------------------------------
# Deterministic operations on a sample.
# ----------------------------------------------------------------------------


def hflip(sample: Sample, *, min_size: float = DEFAULT_MIN_SIZE) -> Sample:
  """Mirrors the image and the boxes left-right."""
  image = sample["image"]
  flipped = np.ascontiguousarray(image[:, ::-1])
  boxes = hflip_boxes(sample["boxes"], image.shape[1])
  return clip_sample_boxes(with_image(sample, flipped, boxes), min_size=min_size)


def resize(sample: Sample, size: Sequence[int], *, min_size: float = DEFAULT_MIN_SIZE,
           interpolation: int = cv2.INTER_LINEAR) -> Sample:
  """Resizes the image to ``size = (h, w)`` (bilinear) and scales the boxes with it.

  ``scale_factor`` is multiplied by ``(new_h / h, new_w / w)``.
  """
  image = sample["image"]
  h, w = image_hw(image)
  nh, nw = int(size[0]), int(size[1])
  if (nh, nw) != (h, w):
    image = cv2.resize(image, (nw, nh), interpolation=interpolation)
  scale = np.array([nh / h, nw / w], np.float64)
  boxes = resize_boxes(sample["boxes"], scale)
  out = with_image(sample, image, boxes)
  out["scale_factor"] = (np.asarray(sample.get("scale_factor", (1.0, 1.0)), np.float64)
                         * scale).astype(np.float32)
  return clip_sample_boxes(out, min_size=min_size)


def crop(sample: Sample, rect: Sequence[int], *, center_only: bool = True,
         min_size: float = DEFAULT_MIN_SIZE) -> Sample:
  """Crops the image to the integer ``rect = (x1, y1, x2, y2)``.

  With ``center_only`` a box is kept only if its centre is strictly inside the
  rectangle (the SSD rule); otherwise any box that still has ``min_size`` after
  clipping is kept. Boxes are shifted into the crop and clipped to it.
  """
  x1, y1, x2, y2 = (int(v) for v in rect)
  h, w = image_hw(sample["image"])
  if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
    raise ValueError(f"crop rectangle {rect} is not inside the image of (h, w) = {(h, w)}")
  image = sample["image"][y1:y2, x1:x2]
  keep = None
  if center_only:
    cx, cy = box_centres(sample["boxes"])
    keep = (cx > x1) & (cx < x2) & (cy > y1) & (cy < y2)
  boxes = translate_boxes(sample["boxes"], -x1, -y1)
  return clip_sample_boxes(with_image(sample, image, boxes), keep, min_size=min_size)


def expand(sample: Sample, size: Sequence[int], offset: Sequence[int], fill: Sequence[float], *,
           min_size: float = DEFAULT_MIN_SIZE) -> Sample:
  """Places the image on a ``size = (H, W)`` canvas of colour ``fill`` at ``offset = (top, left)``."""
  image = sample["image"]
  h, w = image_hw(image)
  ch, cw = int(size[0]), int(size[1])
  top, left = int(offset[0]), int(offset[1])
  if not (0 <= top and top + h <= ch and 0 <= left and left + w <= cw):
    raise ValueError(f"an image of (h, w) = {(h, w)} at (top, left) = {(top, left)} "
                     f"does not fit a canvas of {(ch, cw)}")
  fill = [float(v) for v in np.broadcast_to(np.asarray(fill, np.float64), (image.shape[2],))]
  # One OpenCV call: several times faster than filling a broadcast NumPy canvas.
  # Integer images get the fill rounded and saturated.
  canvas = cv2.copyMakeBorder(image, top, ch - h - top, left, cw - w - left, cv2.BORDER_CONSTANT,
                              value=fill)
  boxes = translate_boxes(sample["boxes"], left, top)
  return clip_sample_boxes(with_image(sample, canvas, boxes), min_size=min_size)


def pad(sample: Sample, size: Sequence[int], *, value: float = 0.0) -> Sample:
  """Pads the image at the bottom and right to ``size = (H, W)`` with ``value``.

  Boxes do not move; ``image_size`` keeps the real image's ``(h, w)``.
  """
  image = sample["image"]
  h, w = image_hw(image)
  ph, pw = int(size[0]), int(size[1])
  if h > ph or w > pw:
    raise ValueError(f"cannot pad an image of (h, w) = {(h, w)} to the smaller size {(ph, pw)}")
  out = dict(sample)
  if "image_size" not in sample:
    out["image_size"] = np.array([h, w], np.int32)
  if (h, w) != (ph, pw):
    out["image"] = cv2.copyMakeBorder(image, 0, ph - h, 0, pw - w, cv2.BORDER_CONSTANT,
                                      value=[float(value)] * image.shape[2])
  return out


# ----------------------------------------------------------------------------
# Transforms: callables (sample, rng) -> sample.
# ----------------------------------------------------------------------------


class Expand(Repr):
  """SSD's zoom out: with probability ``prob``, places the image at a random spot
  of a canvas ``U(1, max_ratio)`` times larger, filled with ``fill`` (the mean
  colour in 0..255, so it normalises to 0)."""

  def __init__(self, fill: Sequence[float] = IMAGENET_MEAN, max_ratio: float = 4.0,
               prob: float = 0.5, min_size: float = DEFAULT_MIN_SIZE):
    self.fill = tuple(fill)
    self.max_ratio = max_ratio
    self.prob = prob
    self.min_size = min_size

  def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
    u = rng.random(4)
    if u[0] >= self.prob:
      return sample
    h, w = image_hw(sample["image"])
    ratio = 1.0 + (self.max_ratio - 1.0) * u[1]
    ch, cw = int(h * ratio), int(w * ratio)
    top = min(int(u[2] * (ch - h + 1)), ch - h)
    left = min(int(u[3] * (cw - w + 1)), cw - w)
    return expand(sample, (ch, cw), (top, left), self.fill, min_size=self.min_size)


class MinIoURandomCrop(Repr):
  """SSD's IoU-constrained random crop (Caffe SSD ``batch_sampler``), vectorised.

  For each minimum IoU in ``min_ious`` other than ``None``, ``max_trials``
  rectangles are drawn at once: side scale ``s ~ U(min_scale, 1)`` and aspect
  ratio ``a ~ U(lo, hi)`` (``a`` in ``aspect_range``, limited so the crop fits),
  giving a crop ``s * sqrt(a) * W`` wide and ``s / sqrt(a) * H`` high at a
  uniform position. A trial is acceptable if some box centre is inside it and
  the IoU of the crop with any box (with all boxes when ``all_boxes``) is at
  least the minimum. An image without boxes accepts every trial. The first
  acceptable trial of each minimum becomes a candidate; ``None`` in
  ``min_ious`` adds the uncropped image as a candidate; one candidate is picked
  uniformly. If there is none, the sample is returned unchanged.

  Boxes whose centre is outside the crop are removed (and counted in
  ``dropped_boxes``), the rest are clipped to the crop.
  """

  def __init__(self, min_ious: Sequence[float | None] = (None, 0.1, 0.3, 0.5, 0.7, 0.9),
               min_scale: float = 0.3, aspect_range=(0.5, 2.0), max_trials: int = 50,
               all_boxes: bool = False, min_size: float = DEFAULT_MIN_SIZE):
    self.min_ious = tuple(min_ious)
    self.min_scale = min_scale
    self.aspect_range = tuple(aspect_range)
    self.max_trials = max_trials
    self.all_boxes = all_boxes
    self.min_size = min_size

  def sample_rects(self, rng: np.random.Generator, size: Sequence[int], shape) -> np.ndarray:
    """``shape + [4]`` int xyxy crop rectangles inside an image of ``size = (h, w)``."""
    h, w = size
    u = rng.random(tuple(shape) + (4,))
    s = self.min_scale + (1.0 - self.min_scale) * u[..., 0]
    lo = np.maximum(self.aspect_range[0], s**2)
    hi = np.minimum(self.aspect_range[1], 1.0 / s**2)
    a = lo + (hi - lo) * u[..., 1]
    cw = np.clip(np.round(w * s * np.sqrt(a)), 1, w).astype(np.int64)
    ch = np.clip(np.round(h * s / np.sqrt(a)), 1, h).astype(np.int64)
    x1 = np.minimum((u[..., 2] * (w - cw + 1)).astype(np.int64), w - cw)
    y1 = np.minimum((u[..., 3] * (h - ch + 1)).astype(np.int64), h - ch)
    return np.stack([x1, y1, x1 + cw, y1 + ch], axis=-1)

  def acceptable(self, rects: np.ndarray, boxes: np.ndarray, min_iou: np.ndarray) -> np.ndarray:
    """``[..., T]`` bool: which of ``rects [..., T, 4]`` satisfy ``min_iou [..., 1]``."""
    boxes = as_boxes(boxes)
    if boxes.shape[0] == 0:
      return np.ones(rects.shape[:-1], bool)
    r = rects.astype(np.float32)[..., None, :]  # [..., T, 1, 4]
    cx, cy = box_centres(boxes)
    inside = (cx > r[..., 0]) & (cx < r[..., 2]) & (cy > r[..., 1]) & (cy < r[..., 3])  # [..., T, N]
    ok_iou = box_iou(rects.astype(np.float32), boxes) >= min_iou[..., None]  # [..., T, N]
    ok_iou = ok_iou.all(-1) if self.all_boxes else ok_iou.any(-1)
    return inside.any(-1) & ok_iou

  def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
    h, w = image_hw(sample["image"])
    mins = np.array([m for m in self.min_ious if m is not None], np.float32)
    rects = self.sample_rects(rng, (h, w), (mins.size, self.max_trials))  # [K, T, 4]
    pick = rng.random()
    ok = self.acceptable(rects, sample["boxes"], mins[:, None])  # [K, T]
    found = ok.any(1)
    candidates = [rects[k, int(np.argmax(ok[k]))] for k in np.flatnonzero(found)]
    if any(m is None for m in self.min_ious):
      candidates.insert(0, None)
    if not candidates:
      return sample
    rect = candidates[min(int(pick * len(candidates)), len(candidates) - 1)]
    if rect is None:
      return sample
    return crop(sample, rect, center_only=True, min_size=self.min_size)


class RandomSizeCrop(Repr):
  """A crop of random size at a random place, boxes clipped to it (DETR's ``RandomSizeCrop``).

  MMDetection's ``RandomCrop(crop_type="absolute_range", crop_size=(lo, hi),
  allow_negative_crop=True)``, the crop of Sparse R-CNN's 300-proposal recipe
  (``crop_size=(384, 600)``). For an image of ``(h, w)``, four integers are
  drawn uniformly, in this order:

  * ``crop_h`` in ``[min(h, lo), min(h, hi)]``, ``crop_w`` in ``[min(w, lo), min(w, hi)]``
    (a side shorter than ``lo`` is kept whole);
  * ``top`` in ``[0, h - crop_h]``, ``left`` in ``[0, w - crop_w]``.

  The image becomes ``image[top:top + crop_h, left:left + crop_w]``. Every box
  is shifted by ``(-left, -top)`` and clipped to the crop (no centre rule);
  the boxes then narrower or shorter than ``min_size`` pixels (at ``0``: those
  left with no area, MMDetection's rule) are removed with their labels, crowd
  and difficult flags and counted in ``dropped_boxes``. A crop may remove
  every box: the sample is kept, with no boxes. ``scale_factor`` does not
  change; ``image_size`` becomes ``(crop_h, crop_w)``.
  """

  def __init__(self, crop_size: Sequence[int] = (384, 600), min_size: float = DEFAULT_MIN_SIZE):
    lo, hi = (int(v) for v in crop_size)
    if not 0 < lo <= hi:
      raise ValueError(f"crop_size must be (lo, hi) with 0 < lo <= hi, not {tuple(crop_size)}")
    self.crop_size = (lo, hi)
    self.min_size = min_size

  def sample_rect(self, rng: np.random.Generator, size: Sequence[int]) -> tuple[int, int, int, int]:
    """The integer ``(x1, y1, x2, y2)`` crop of an image of ``size = (h, w)``."""
    h, w = int(size[0]), int(size[1])
    lo, hi = self.crop_size
    crop_h = int(rng.integers(min(h, lo), min(h, hi) + 1))
    crop_w = int(rng.integers(min(w, lo), min(w, hi) + 1))
    top = int(rng.integers(0, h - crop_h + 1))
    left = int(rng.integers(0, w - crop_w + 1))
    return left, top, left + crop_w, top + crop_h

  def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
    rect = self.sample_rect(rng, image_hw(sample["image"]))
    return crop(sample, rect, center_only=False, min_size=self.min_size)


class RandomHFlip(Repr):
  """Mirrors image and boxes left-right with probability ``prob``."""

  def __init__(self, prob: float = 0.5, min_size: float = DEFAULT_MIN_SIZE):
    self.prob = prob
    self.min_size = min_size

  def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
    if rng.random() >= self.prob:
      return sample
    return hflip(sample, min_size=self.min_size)


class Resize(Repr):
  """Resizes to a fixed ``size = (h, w)`` regardless of aspect ratio (SSD: 300, 320, 512)."""

  def __init__(self, size: int | Sequence[int], min_size: float = DEFAULT_MIN_SIZE):
    self.size = (int(size), int(size)) if np.isscalar(size) else tuple(int(s) for s in size)
    self.min_size = min_size

  def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
    return resize(sample, self.size, min_size=self.min_size)


class KeepRatioResize(Repr):
  """Keep-ratio resize to ``(short, max_long)`` with multi-scale training.

  ``scales`` is a list of ``(short, max_long)`` pairs (see :func:`rescale_size`):

  * ``mode="value"``: one pair is picked uniformly (one pair: a fixed resize,
    for evaluation).
  * ``mode="range"``: ``short`` is drawn uniformly from the integers between the
    smallest and largest ``short`` of the list, ``max_long`` likewise.
  """

  def __init__(self, scales: Sequence[Sequence[int]] = ((800, 1333),), mode: str = "value",
               min_size: float = DEFAULT_MIN_SIZE):
    self.scales = tuple((int(s), int(l)) for s, l in scales)
    if not self.scales:
      raise ValueError("KeepRatioResize needs at least one (short, max_long) scale")
    if mode not in ("value", "range"):
      raise ValueError(f"mode must be 'value' or 'range', not {mode!r}")
    self.mode = mode
    self.min_size = min_size

  def pick_scale(self, rng: np.random.Generator | None) -> tuple[int, int]:
    """The ``(short, max_long)`` used for one sample."""
    if len(self.scales) == 1:
      return self.scales[0]
    if rng is None:
      raise ValueError("a multi-scale KeepRatioResize needs a random generator")
    if self.mode == "value":
      return self.scales[int(rng.integers(len(self.scales)))]
    shorts = [s for s, _ in self.scales]
    longs = [l for _, l in self.scales]
    short = int(rng.integers(min(shorts), max(shorts) + 1))
    long = int(rng.integers(min(longs), max(longs) + 1))
    return short, long

  def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
    short, max_long = self.pick_scale(rng)
    size = rescale_size(image_hw(sample["image"]), short, max_long)
    return resize(sample, size, min_size=self.min_size)


class Pad(Repr):
  """Pads bottom/right to a fixed ``size = (H, W)``, or to the smallest of ``buckets`` that fits.

  Exactly one of ``size`` and ``buckets`` is given. An image larger than the
  canvas (or every bucket) raises ``ValueError``: the resize bound and the
  canvas of a config disagree.
  """

  def __init__(self, size: Sequence[int] | None = None, buckets: Sequence[Sequence[int]] | None = None,
               value: float = 0.0):
    if (size is None) == (buckets is None):
      raise ValueError("give exactly one of size and buckets")
    self.size = None if size is None else (int(size[0]), int(size[1]))
    self.buckets = None if buckets is None else tuple((int(h), int(w)) for h, w in buckets)
    self.value = value

  def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
    size = self.size or choose_bucket(image_hw(sample["image"]), self.buckets)
    return pad(sample, size, value=self.value)
