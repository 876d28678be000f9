"""Data augmentation and fixed-shape preparation of one sample, in NumPy/OpenCV.

Transforms run on the host, in grain workers, one sample at a time. A *sample*
is a dict:

* ``image``: ``[H, W, 3]`` uint8 or float32, RGB pixels in 0..255 (float32
  after :class:`PhotometricDistort`, normalised after :class:`Normalize`).
* ``boxes``: ``[N, 4]`` float32 ``[x1, y1, x2, y2]`` in pixels of ``image``,
  ``0 <= x1 < x2 <= W``.
* ``labels``: ``[N]`` int32 class index (``-1`` where padded by :func:`pad_boxes`).
* ``crowd``, ``difficult``: ``[N]`` bool, COCO ``iscrowd`` and VOC ``difficult``.
* ``image_size``: ``[2]`` int32 ``(h, w)`` of the real image inside the padded one.
* ``scale_factor``: ``[2]`` float32 ``(sy, sx)``, the product of the resizes applied.
* ``dropped_boxes``: int (int32 after :func:`pad_boxes`), boxes removed by
  geometric transforms (see below).
* ``truncated_boxes``: int32, boxes cut by :func:`pad_boxes` beyond ``max_boxes``.
* ``image_id``, ``orig_size`` (``[2]`` int32 ``(h, w)`` as stored): passed through.

Any other key passes through unchanged. :func:`sample_from_example` builds a
sample from a source's :class:`~jdet.data.records.Example`.

Every transform is a callable ``(sample, rng) -> sample`` where ``rng`` is a
``np.random.Generator``; given the same generator state the result is the same
(the pipeline gives each (seed, epoch, index) its own generator, e.g. through
grain's ``random_map``). Deterministic transforms accept and ignore ``rng``.
Transforms never modify their input arrays; they return a new dict.

Box bookkeeping: every geometric transform clips the boxes to the new image
and removes the boxes that are outside it (e.g. centre outside a crop), that
became degenerate, or whose width or height is below ``min_size`` pixels,
together with their ``labels``, ``crowd`` and ``difficult`` rows. How many it
removed is added to ``sample["dropped_boxes"]`` (an int), so the pipeline can
sum it over samples. :func:`pad_boxes` then fixes the number of boxes to M and
records how many it had to cut in ``sample["truncated_boxes"]``.

Two recipes are provided (and built by :func:`ssd_train_transforms` & co.):

* SSD / RefineDet (Liu et al. 2016; the ssd.pytorch recipe): photometric
  distortion -> expand (zoom out) -> min-IoU random crop -> flip -> resize to a
  fixed square -> normalise -> pad boxes.
* Faster / Sparse R-CNN (MMDetection's ``Resize(keep_ratio=True)``): keep-ratio
  resize with multi-scale training -> flip -> normalise -> pad to a fixed canvas
  or to the smallest fitting size bucket (bottom/right) -> pad boxes.

Order matters in one place: :class:`Normalize` comes before :class:`Pad`, so
that the padding value 0 is the mean colour.

Detections map back to the stored image with
``resize_boxes(boxes, 1 / sample["scale_factor"])`` (no crop or expand happens at
evaluation), which equals ``image_size / orig_size`` up to float rounding.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import cv2
import numpy as np

__all__ = [
    # Constants.
    "IMAGENET_MEAN", "IMAGENET_STD", "DEFAULT_MIN_SIZE", "BOX_KEYS",
    # Pure box helpers.
    "hflip_boxes", "resize_boxes", "translate_boxes", "clip_boxes", "box_iou",
    "rescale_size", "choose_bucket",
    # Sample-level deterministic operations.
    "sample_from_example", "drop_boxes", "clean_boxes", "hflip", "resize", "crop",
    "expand", "pad", "normalize", "pad_boxes",
    # Transforms.
    "Transform", "Compose", "ToFloat", "PhotometricDistort", "Expand", "MinIoURandomCrop",
    "RandomHFlip", "Resize", "KeepRatioResize", "Normalize", "Pad", "PadBoxes",
    # Recipes.
    "ssd_train_transforms", "ssd_eval_transforms", "rcnn_train_transforms",
    "rcnn_eval_transforms",
]

Sample = dict[str, Any]
Transform = Callable[[Sample, np.random.Generator], Sample]

# ImageNet statistics of RGB pixels in 0..255 (torchvision's, times 255).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

# Boxes narrower or shorter than this many pixels are dropped by geometric transforms.
DEFAULT_MIN_SIZE = 1.0

# Per-box arrays: filtered, reordered and padded together.
BOX_KEYS = ("boxes", "labels", "crowd", "difficult")


# ----------------------------------------------------------------------------
# Pure box helpers (NumPy, host side). Also used by test-time augmentation.
# ----------------------------------------------------------------------------


def _f32(boxes) -> np.ndarray:
  return np.asarray(boxes, np.float32).reshape(-1, 4)


def hflip_boxes(boxes, width: float) -> np.ndarray:
  """Mirrors ``[N, 4]`` xyxy boxes in an image ``width`` pixels wide: ``x -> W - x``."""
  b = _f32(boxes)
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
  b = _f32(boxes).astype(np.float64) * np.array([sx, sy, sx, sy])
  return b.astype(np.float32)


def translate_boxes(boxes, dx: float, dy: float) -> np.ndarray:
  """Shifts ``[N, 4]`` xyxy boxes by ``(dx, dy)`` pixels."""
  return (_f32(boxes) + np.array([dx, dy, dx, dy], np.float32)).astype(np.float32)


def clip_boxes(boxes, size: Sequence[int]) -> np.ndarray:
  """Clips ``[N, 4]`` xyxy boxes to an image of ``size = (h, w)``."""
  h, w = size
  b = _f32(boxes)
  return np.clip(b, 0.0, np.array([w, h, w, h], np.float32)).astype(np.float32)


def box_iou(a, b) -> np.ndarray:
  """Pairwise IoU of ``[..., 4]`` and ``[N, 4]`` xyxy boxes -> ``[..., N]`` float32."""
  a = np.asarray(a, np.float32)[..., None, :]
  b = _f32(b)
  lt = np.maximum(a[..., :2], b[:, :2])
  rb = np.minimum(a[..., 2:], b[:, 2:])
  wh = np.maximum(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  area_a = np.prod(np.maximum(a[..., 2:] - a[..., :2], 0.0), axis=-1)
  area_b = np.prod(np.maximum(b[:, 2:] - b[:, :2], 0.0), axis=-1)
  union = area_a + area_b - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0).astype(np.float32)


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
# Sample-level deterministic operations.
# ----------------------------------------------------------------------------


def _hw(image: np.ndarray) -> tuple[int, int]:
  return int(image.shape[0]), int(image.shape[1])


def sample_from_example(example) -> Sample:
  """The sample dict of a source's :class:`~jdet.data.records.Example`.

  ``image_size = orig_size`` (the image's ``(h, w)``), ``scale_factor = (1, 1)``,
  ``dropped_boxes = 0``. The arrays are the example's (transforms do not modify
  them in place).
  """
  size = np.array(example.orig_size, np.int32)
  return dict(
      image=example.image,
      boxes=_f32(example.boxes),
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


def clean_boxes(sample: Sample, keep: np.ndarray | None = None, *,
                min_size: float = DEFAULT_MIN_SIZE) -> Sample:
  """Clips ``boxes`` to ``image`` and drops degenerate and small ones (and those not in ``keep``).

  A box survives when ``x2 - x1 >= min_size``, ``y2 - y1 >= min_size`` (and
  both > 0) after clipping. Removed boxes are counted in ``dropped_boxes``.
  """
  boxes = clip_boxes(sample["boxes"], _hw(sample["image"]))
  w = boxes[:, 2] - boxes[:, 0]
  h = boxes[:, 3] - boxes[:, 1]
  ok = (w > 0) & (h > 0) & (w >= min_size) & (h >= min_size)
  if keep is not None:
    ok &= np.asarray(keep, bool)
  return drop_boxes({**sample, "boxes": boxes}, ok)


def _with_image(sample: Sample, image: np.ndarray, boxes: np.ndarray) -> Sample:
  """A new sample with a new image (and ``image_size``) and boxes."""
  return {**sample, "image": image, "boxes": boxes,
          "image_size": np.array(_hw(image), np.int32)}


def hflip(sample: Sample, *, min_size: float = DEFAULT_MIN_SIZE) -> Sample:
  """Mirrors the image and the boxes left-right."""
  image = sample["image"]
  flipped = np.ascontiguousarray(image[:, ::-1])
  boxes = hflip_boxes(sample["boxes"], image.shape[1])
  return clean_boxes(_with_image(sample, flipped, boxes), min_size=min_size)


def resize(sample: Sample, size: Sequence[int], *, min_size: float = DEFAULT_MIN_SIZE,
           interpolation: int = cv2.INTER_LINEAR) -> Sample:
  """Resizes the image to ``size = (h, w)`` (bilinear) and scales the boxes with it.

  ``scale_factor`` is multiplied by ``(new_h / h, new_w / w)``.
  """
  image = sample["image"]
  h, w = _hw(image)
  nh, nw = int(size[0]), int(size[1])
  if (nh, nw) != (h, w):
    image = cv2.resize(image, (nw, nh), interpolation=interpolation)
  scale = np.array([nh / h, nw / w], np.float64)
  boxes = resize_boxes(sample["boxes"], scale)
  out = _with_image(sample, image, boxes)
  out["scale_factor"] = (np.asarray(sample.get("scale_factor", (1.0, 1.0)), np.float64)
                         * scale).astype(np.float32)
  return clean_boxes(out, min_size=min_size)


def crop(sample: Sample, rect: Sequence[int], *, center_only: bool = True,
         min_size: float = DEFAULT_MIN_SIZE) -> Sample:
  """Crops the image to the integer ``rect = (x1, y1, x2, y2)``.

  With ``center_only`` a box is kept only if its centre is strictly inside the
  rectangle (the SSD rule); otherwise any box that still has ``min_size`` after
  clipping is kept. Boxes are shifted into the crop and clipped to it.
  """
  x1, y1, x2, y2 = (int(v) for v in rect)
  h, w = _hw(sample["image"])
  if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
    raise ValueError(f"crop rectangle {rect} is not inside the image of (h, w) = {(h, w)}")
  image = sample["image"][y1:y2, x1:x2]
  keep = None
  if center_only:
    b = sample["boxes"]
    cx = (b[:, 0] + b[:, 2]) * 0.5
    cy = (b[:, 1] + b[:, 3]) * 0.5
    keep = (cx > x1) & (cx < x2) & (cy > y1) & (cy < y2)
  boxes = translate_boxes(sample["boxes"], -x1, -y1)
  return clean_boxes(_with_image(sample, image, boxes), keep, min_size=min_size)


def expand(sample: Sample, size: Sequence[int], offset: Sequence[int], fill: Sequence[float], *,
           min_size: float = DEFAULT_MIN_SIZE) -> Sample:
  """Places the image on a ``size = (H, W)`` canvas of colour ``fill`` at ``offset = (top, left)``."""
  image = sample["image"]
  h, w = _hw(image)
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
  return clean_boxes(_with_image(sample, canvas, boxes), min_size=min_size)


def pad(sample: Sample, size: Sequence[int], *, value: float = 0.0) -> Sample:
  """Pads the image at the bottom and right to ``size = (H, W)`` with ``value``.

  Boxes do not move; ``image_size`` keeps the real image's ``(h, w)``.
  """
  image = sample["image"]
  h, w = _hw(image)
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


def normalize(sample: Sample, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> Sample:
  """``(image - mean) / std`` per RGB channel, as float32 (mean/std in 0..255 units)."""
  mean = np.asarray(mean, np.float32)
  inv_std = (1.0 / np.asarray(std, np.float64)).astype(np.float32)
  image = (np.asarray(sample["image"], np.float32) - mean) * inv_std
  return {**sample, "image": image.astype(np.float32, copy=False)}


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
  boxes = _f32(sample["boxes"])
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
    areas = np.prod(np.maximum(boxes[:, 2:] - boxes[:, :2], 0.0), axis=1)
    largest = np.sort(np.argsort(-areas, kind="stable")[:max_boxes])
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


# ----------------------------------------------------------------------------
# Transforms: callables (sample, rng) -> sample.
# ----------------------------------------------------------------------------


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


class _Repr:
  def __repr__(self) -> str:
    fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
    return f"{type(self).__name__}({fields})"


class ToFloat(_Repr):
  """Casts the image to float32 (pixel values unchanged)."""

  def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
    return {**sample, "image": np.asarray(sample["image"], np.float32)}


class PhotometricDistort(_Repr):
  """SSD's photometric distortion on float32 RGB pixels in 0..255 (boxes untouched).

  Per the ssd.pytorch / MMDetection recipe, each step happens with probability
  1/2: brightness ``+ U(-delta, delta)``; then contrast ``* U(lo, hi)`` either
  first or last (coin flip) around the HSV steps: saturation ``S * U(lo, hi)``
  and hue ``H + U(-delta, delta)`` degrees; finally (``channel_swap``) a random
  permutation of the channels. Unlike the recipe, pixels are clipped to
  ``[0, 255]`` after every step so the HSV conversion sees valid colours and
  the output stays in range. Always draws the same amount of randomness.

  Output: ``image [H, W, 3] float32`` in ``[0, 255]``.
  """

  def __init__(self, brightness_delta: float = 32.0, contrast_range=(0.5, 1.5),
               saturation_range=(0.5, 1.5), hue_delta: float = 18.0, channel_swap: bool = True):
    self.brightness_delta = brightness_delta
    self.contrast_range = tuple(contrast_range)
    self.saturation_range = tuple(saturation_range)
    self.hue_delta = hue_delta
    self.channel_swap = channel_swap

  def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
    u = rng.random(10)
    perm = rng.permutation(3)
    img = np.array(sample["image"], np.float32)  # a copy: edited in place below

    def contrast():
      if u[3] < 0.5:
        lo, hi = self.contrast_range
        img[...] *= lo + (hi - lo) * u[4]
        np.clip(img, 0.0, 255.0, out=img)

    if u[0] < 0.5:
      img += np.float32((2.0 * u[1] - 1.0) * self.brightness_delta)
      np.clip(img, 0.0, 255.0, out=img)
    contrast_first = u[2] < 0.5
    if contrast_first:
      contrast()
    do_sat, do_hue = u[5] < 0.5, u[7] < 0.5
    if do_sat or do_hue:
      hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)  # H in [0, 360), S in [0, 1], V = max(R, G, B)
      if do_sat:
        lo, hi = self.saturation_range
        hsv[..., 1] = np.clip(hsv[..., 1] * np.float32(lo + (hi - lo) * u[6]), 0.0, 1.0)
      if do_hue:
        hsv[..., 0] = np.mod(hsv[..., 0] + np.float32((2.0 * u[8] - 1.0) * self.hue_delta), 360.0)
      img[...] = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
      np.clip(img, 0.0, 255.0, out=img)
    if not contrast_first:
      contrast()
    if self.channel_swap and u[9] < 0.5:
      img = np.ascontiguousarray(img[..., perm])
    return {**sample, "image": img}


class Expand(_Repr):
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
    h, w = _hw(sample["image"])
    ratio = 1.0 + (self.max_ratio - 1.0) * u[1]
    ch, cw = int(h * ratio), int(w * ratio)
    top = min(int(u[2] * (ch - h + 1)), ch - h)
    left = min(int(u[3] * (cw - w + 1)), cw - w)
    return expand(sample, (ch, cw), (top, left), self.fill, min_size=self.min_size)


class MinIoURandomCrop(_Repr):
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
    boxes = _f32(boxes)
    if boxes.shape[0] == 0:
      return np.ones(rects.shape[:-1], bool)
    r = rects.astype(np.float32)[..., None, :]  # [..., T, 1, 4]
    cx = (boxes[:, 0] + boxes[:, 2]) * 0.5
    cy = (boxes[:, 1] + boxes[:, 3]) * 0.5
    inside = (cx > r[..., 0]) & (cx < r[..., 2]) & (cy > r[..., 1]) & (cy < r[..., 3])  # [..., T, N]
    ok_iou = box_iou(rects.astype(np.float32), boxes) >= min_iou[..., None]  # [..., T, N]
    ok_iou = ok_iou.all(-1) if self.all_boxes else ok_iou.any(-1)
    return inside.any(-1) & ok_iou

  def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
    h, w = _hw(sample["image"])
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


class RandomHFlip(_Repr):
  """Mirrors image and boxes left-right with probability ``prob``."""

  def __init__(self, prob: float = 0.5, min_size: float = DEFAULT_MIN_SIZE):
    self.prob = prob
    self.min_size = min_size

  def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
    if rng.random() >= self.prob:
      return sample
    return hflip(sample, min_size=self.min_size)


class Resize(_Repr):
  """Resizes to a fixed ``size = (h, w)`` regardless of aspect ratio (SSD: 300, 320, 512)."""

  def __init__(self, size: int | Sequence[int], min_size: float = DEFAULT_MIN_SIZE):
    self.size = (int(size), int(size)) if np.isscalar(size) else tuple(int(s) for s in size)
    self.min_size = min_size

  def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
    return resize(sample, self.size, min_size=self.min_size)


class KeepRatioResize(_Repr):
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
    size = rescale_size(_hw(sample["image"]), short, max_long)
    return resize(sample, size, min_size=self.min_size)


class Normalize(_Repr):
  """``(image - mean) / std`` per RGB channel -> float32; mean/std in 0..255 units."""

  def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
    self.mean = tuple(mean)
    self.std = tuple(std)

  def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
    return normalize(sample, self.mean, self.std)


class Pad(_Repr):
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
    size = self.size or choose_bucket(_hw(sample["image"]), self.buckets)
    return pad(sample, size, value=self.value)


class PadBoxes(_Repr):
  """:func:`pad_boxes` as a transform."""

  def __init__(self, max_boxes: int, drop_ignored: bool = True):
    self.max_boxes = max_boxes
    self.drop_ignored = drop_ignored

  def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
    return pad_boxes(sample, self.max_boxes, drop_ignored=self.drop_ignored)


# ----------------------------------------------------------------------------
# Recipes.
# ----------------------------------------------------------------------------


def ssd_train_transforms(size: int = 300, *, max_boxes: int = 100,
                         mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                         channel_swap: bool = True, min_size: float = DEFAULT_MIN_SIZE,
                         expand_ratio: float = 4.0, photometric: bool = True,
                         crop: bool = True) -> Compose:
  """SSD / RefineDet training: distort, expand, min-IoU crop, flip, resize, normalise, pad boxes.

  ``expand_ratio`` is the zoom-out's largest canvas (4 in the paper; 1 or less
  turns it off), ``photometric`` the colour distortion and ``crop`` the
  min-IoU crop. Generated data with an unlimited supply of images (the
  shapes quickstart) learns faster with flips alone.
  """
  steps = [PhotometricDistort(channel_swap=channel_swap)] if photometric else []
  if expand_ratio > 1:
    steps.append(Expand(fill=mean, max_ratio=expand_ratio, min_size=min_size))
  if crop:
    steps.append(MinIoURandomCrop(min_size=min_size))
  return Compose(steps + [
      RandomHFlip(min_size=min_size),
      Resize(size, min_size=min_size),
      Normalize(mean, std),
      PadBoxes(max_boxes),
  ])


def ssd_eval_transforms(size: int = 300, *, max_boxes: int = 100,
                        mean: Sequence[float] = IMAGENET_MEAN,
                        std: Sequence[float] = IMAGENET_STD) -> Compose:
  """SSD / RefineDet evaluation: resize to the square, normalise, pad boxes."""
  return Compose([Resize(size), Normalize(mean, std), PadBoxes(max_boxes)])


def rcnn_train_transforms(scales: Sequence[Sequence[int]] = ((800, 1333),), *, mode: str = "value",
                          canvas: Sequence[int] | None = (1344, 1344),
                          buckets: Sequence[Sequence[int]] | None = None, max_boxes: int = 100,
                          mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                          flip_prob: float = 0.5, min_size: float = DEFAULT_MIN_SIZE) -> Compose:
  """Faster / Sparse R-CNN training: multi-scale keep-ratio resize, flip, normalise, pad.

  ``buckets``, when given, replace ``canvas``.
  """
  return Compose([
      KeepRatioResize(scales, mode, min_size=min_size),
      RandomHFlip(flip_prob, min_size=min_size),
      Normalize(mean, std),
      Pad(size=None if buckets else canvas, buckets=buckets),
      PadBoxes(max_boxes),
  ])


def rcnn_eval_transforms(scale: Sequence[int] = (800, 1333), *,
                         canvas: Sequence[int] | None = (1344, 1344),
                         buckets: Sequence[Sequence[int]] | None = None, max_boxes: int = 100,
                         mean: Sequence[float] = IMAGENET_MEAN,
                         std: Sequence[float] = IMAGENET_STD) -> Compose:
  """Faster / Sparse R-CNN evaluation: one keep-ratio resize, normalise, pad."""
  return Compose([
      KeepRatioResize((tuple(scale),)),
      Normalize(mean, std),
      Pad(size=None if buckets else canvas, buckets=buckets),
      PadBoxes(max_boxes),
  ])
