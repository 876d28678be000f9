"""A procedural detection dataset of filled shapes on textured backgrounds.

:class:`ShapesSource` draws every image on the fly: image ``i`` of a split is a
pure function of ``(seed, split, i)`` and of the constructor's arguments, so
the same source built in another process (a grain worker, a later evaluation)
yields the same pixels and boxes, and no file is ever read. It follows
:class:`jdet.data.records.DetectionSource`, so the pipeline, training and the
COCO evaluator treat it like COCO; :meth:`ShapesSource.export_coco` writes it
to disk as PNG files and a COCO JSON for tools that want files.

What an image holds:

* Five classes (:data:`CLASS_NAMES`): ellipse, rectangle, triangle, star and
  cross, filled with a random colour (never a cue to the class), scaled with a
  random aspect ratio and rotated by a random angle.
* Sizes log-uniform between ``min_size`` and ``max_size`` (fractions of the
  shorter image side, measured as ``sqrt(box_w * box_h)``), so that COCO's
  small, medium and large area ranges (32**2 and 96**2 pixels) all occur at
  ``image_size=256``; at 128 the large range is rare (see the tests).
* A box is the full extent of its shape, ``[x1, y1, x2, y2]`` in pixels, and
  every shape lies wholly inside the image. Shapes may overlap: shapes drawn
  later cover earlier ones, but a layout is accepted only if every object keeps
  at least ``min_visible`` (default half) of its pixels visible; an object that
  cannot be placed that way in a few tries is left out, so an image may hold
  fewer than ``min_objects`` objects, though in practice it does not.
* Backgrounds are smooth colour clouds or gradients, with stripes, lines and
  unfilled outlines in colours like the shapes' (hard negatives), and every
  image gets pixel noise of a random strength.

The COCO ``area`` of an annotation is its box area. Image ids are ``index + 1``;
category ids are ``label + 1``.
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Sequence

import cv2
import numpy as np

from jdet.data.records import Example

__all__ = ["ShapesSource", "CLASS_NAMES"]

CLASS_NAMES = ("ellipse", "rectangle", "triangle", "star", "cross")

_SPLITS = {"train": 0, "val": 1, "test": 2}
_SHIFT = 4  # cv2 sub-pixel bits: vertices are given in 1/16 pixel.
_BACKGROUND = 255  # Label-map value of pixels that no shape covers.


def _unit_polygon(label: int, rng: np.random.Generator) -> np.ndarray:
  """The outline of class ``label`` around the origin, radius about 1: ``[P, 2]``."""
  name = CLASS_NAMES[label]
  if name == "ellipse":
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], -1)
  if name == "rectangle":
    return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64)
  if name == "triangle":
    t = np.deg2rad(np.array([90.0, 210.0, 330.0]) + rng.uniform(-20, 20, 3))
    return np.stack([np.cos(t), np.sin(t)], -1)
  if name == "star":
    points = int(rng.integers(5, 7))
    inner = rng.uniform(0.38, 0.5)
    t = np.linspace(0, 2 * np.pi, 2 * points, endpoint=False)
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], -1)
  if name == "cross":
    a = rng.uniform(0.28, 0.42)  # Half the thickness of an arm.
    return np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1],
                     [-a, a], [-1, a], [-1, -a], [-a, -a]], np.float64)
  raise ValueError(f"unknown shape class {label}")


_MAX_ASPECT = {"ellipse": 2.5, "rectangle": 2.5, "triangle": 2.0, "star": 1.4, "cross": 1.6}


class ShapesSource:
  """Generated shapes: a deterministic, file-free :class:`DetectionSource`.

  Args:
    num_images: ``len(source)``.
    image_size: ``(h, w)``, or one int for a square image.
    seed: with ``split`` and the index, all that an image depends on.
    split: ``"train"``, ``"val"`` or ``"test"``; each draws from its own
      random streams, so splits never share images.
    min_objects, max_objects: the number of objects is uniform in this range
      (see the module docstring for when an image holds fewer).
    min_size, max_size: the range of ``sqrt(box_w * box_h)``, as fractions of
      the shorter image side (sampled log-uniformly).
    min_visible: the fraction of its pixels that every object keeps visible
      when later shapes overlap it.
    noise: the range of the standard deviation of the pixel noise, in 0..255
      units; each image draws one value.
  """

  class_names: Sequence[str] = CLASS_NAMES

  def __init__(self, num_images: int, *, image_size: int | tuple[int, int] = 128, seed: int = 0,
               split: str = "train", min_objects: int = 1, max_objects: int = 6,
               min_size: float = 0.08, max_size: float = 0.85, min_visible: float = 0.5,
               noise: tuple[float, float] = (2.0, 14.0)):
    if split not in _SPLITS:
      raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    if isinstance(image_size, int):
      image_size = (image_size, image_size)
    h, w = (int(s) for s in image_size)
    if min(h, w) < 16:
      raise ValueError(f"image_size must be at least 16 pixels a side, got {(h, w)}")
    if not 0 <= min_objects <= max_objects < _BACKGROUND:
      raise ValueError(f"need 0 <= min_objects <= max_objects < 255, got {min_objects}, {max_objects}")
    if not 0 < min_size <= max_size <= 1:
      raise ValueError(f"need 0 < min_size <= max_size <= 1, got {min_size}, {max_size}")
    if not 0 <= min_visible <= 1:
      raise ValueError(f"min_visible must be in [0, 1], got {min_visible}")
    self.num_images = int(num_images)
    self.image_size = (h, w)
    self.seed = int(seed)
    self.split = split
    self.min_objects, self.max_objects = int(min_objects), int(max_objects)
    self.min_size, self.max_size = float(min_size), float(max_size)
    self.min_visible = float(min_visible)
    self.noise = (float(noise[0]), float(noise[1]))
    self._ground_truth: dict | None = None

  def __repr__(self) -> str:
    return (f"ShapesSource({self.num_images}, image_size={self.image_size}, seed={self.seed}, "
            f"split={self.split!r})")

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return self.num_images

  def _check_index(self, index: int) -> int:
    index = int(index)
    if not 0 <= index < self.num_images:
      raise IndexError(f"index {index} out of range for {self!r}")
    return index

  def _rngs(self, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent streams for the layout and for the paint of image ``index``."""
    seq = np.random.SeedSequence([self.seed, _SPLITS[self.split], index])
    layout, paint = seq.spawn(2)
    return np.random.default_rng(layout), np.random.default_rng(paint)

  # --------------------------------------------------------------------------
  # Layout: which shapes, where. Needs no colours, so annotations are cheap.
  # --------------------------------------------------------------------------

  def _layout(self, index: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Returns (polygons, boxes [N, 4] float32, labels [N] int32, label map [H, W] uint8).

    Polygons are ``[P, 2]`` float64 vertices in pixel coordinates, where pixel
    ``(r, c)`` covers ``[c, c + 1) x [r, r + 1)``. The label map holds, at each
    pixel, the index of the top object there, or 255.
    """
    rng, _ = self._rngs(index)
    h, w = self.image_size
    side = min(h, w)
    n = int(rng.integers(self.min_objects, self.max_objects + 1))
    labels = rng.integers(0, len(CLASS_NAMES), n)
    sizes = np.exp(rng.uniform(math.log(self.min_size * side), math.log(self.max_size * side), n))
    order = np.argsort(-sizes, kind="stable")  # Large ones first, so small ones fit on top.
    label_map = np.full((h, w), _BACKGROUND, np.uint8)
    polygons, kept_labels, full_area, visible = [], [], [], []
    for j in order:
      label = int(labels[j])
      for _ in range(12):
        poly = self._sample_polygon(rng, label, float(sizes[j]))
        # Rasterise the shape in its own window (integer origin, so the pixels
        # are those of the same shape drawn on the whole image).
        x0, y0 = (max(int(v) - 1, 0) for v in poly.min(0))
        x1, y1 = min(int(poly[:, 0].max()) + 2, w), min(int(poly[:, 1].max()) + 2, h)
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(mask, [_cv_points(poly - (x0, y0))], 1, lineType=cv2.LINE_8, shift=_SHIFT)
        inside = mask.astype(bool)
        window = label_map[y0:y1, x0:x1]
        lost = np.bincount(window[inside], minlength=256)[:len(polygons)]
        left = np.asarray(visible, np.int64) - lost
        if np.any(left < self.min_visible * np.asarray(full_area, np.float64)):
          continue
        visible = left.tolist() + [int(inside.sum())]
        full_area.append(visible[-1])
        window[inside] = len(polygons)
        polygons.append(poly)
        kept_labels.append(label)
        break
    boxes = np.array([[p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()] for p in polygons],
                     np.float32).reshape(-1, 4)
    boxes = np.clip(boxes, 0, np.array([w, h, w, h], np.float32))
    return polygons, boxes, np.array(kept_labels, np.int32), label_map

  def _sample_polygon(self, rng: np.random.Generator, label: int, size: float) -> np.ndarray:
    """One shape of class ``label`` with ``sqrt(box_w * box_h) ~ size``, inside the image."""
    h, w = self.image_size
    max_aspect = _MAX_ASPECT[CLASS_NAMES[label]]
    aspect = math.exp(rng.uniform(-math.log(max_aspect), math.log(max_aspect)))
    angle = rng.uniform(0, 2 * np.pi)
    poly = _unit_polygon(label, rng) * np.array([math.sqrt(aspect), 1 / math.sqrt(aspect)])
    c, s = math.cos(angle), math.sin(angle)
    poly = poly @ np.array([[c, s], [-s, c]])
    lo, hi = poly.min(0), poly.max(0)
    extent = hi - lo  # [2] (w, h)
    scale = size / math.sqrt(extent[0] * extent[1])
    scale = min(scale, (w - 1) / extent[0], (h - 1) / extent[1])
    poly = (poly - lo) * scale  # Box now [0, 0, ew, eh].
    ew, eh = extent * scale
    offset = np.array([rng.uniform(0, w - ew), rng.uniform(0, h - eh)])
    return poly + offset

  # --------------------------------------------------------------------------
  # Paint: background, colours, noise.
  # --------------------------------------------------------------------------

  def _paint(self, index: int, polygons: list[np.ndarray], boxes: np.ndarray) -> np.ndarray:
    _, rng = self._rngs(index)
    h, w = self.image_size
    image = _background(rng, h, w)
    for poly, box in zip(polygons, boxes):
      x1, y1, x2, y2 = (int(v) for v in np.round(box))
      local = np.array(cv2.mean(image[y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)])[:3])
      colour = _contrasting_colour(rng, local)
      pts = _cv_points(poly)
      cv2.fillPoly(image, [pts], colour, lineType=cv2.LINE_AA, shift=_SHIFT)
      if rng.random() < 0.3:  # A darker or lighter rim on some shapes.
        rim = tuple(int(v) for v in np.clip(np.array(colour) * rng.uniform(0.5, 1.4), 0, 255))
        cv2.polylines(image, [pts], True, rim, 1, lineType=cv2.LINE_AA, shift=_SHIFT)
    # Pixel noise: the difference of two uniform bytes (triangular, std 255 / sqrt(6)),
    # scaled to a standard deviation of sigma; much faster than normal samples.
    sigma = rng.uniform(*self.noise)
    pair = np.frombuffer(rng.bytes(2 * h * w * 3), np.uint8).reshape(2, h, w, 3)
    noise = cv2.subtract(pair[0], pair[1], dtype=cv2.CV_16S)
    return cv2.addWeighted(image, 1.0, noise, sigma * math.sqrt(6) / 255, 0.0, dtype=cv2.CV_8U)

  # --------------------------------------------------------------------------
  # DetectionSource.
  # --------------------------------------------------------------------------

  def __getitem__(self, index: int) -> Example:
    index = self._check_index(index)
    polygons, boxes, labels, _ = self._layout(index)
    image = self._paint(index, polygons, boxes)
    n = len(labels)
    return Example(image=image, boxes=boxes, labels=labels, crowd=np.zeros((n,), bool),
                   difficult=np.zeros((n,), bool), image_id=index + 1,
                   file=f"shapes:{self.split}:seed={self.seed}:{index}")

  def annotations(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes ``[N, 4]`` float32 xyxy and labels ``[N]`` int32 of image ``index``, without drawing it."""
    _, boxes, labels, _ = self._layout(self._check_index(index))
    return boxes, labels

  def instance_masks(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """The masks of the objects of image ``index``.

    Returns:
      full: ``[N, H, W]`` bool, each shape as if nothing covered it.
      visible: ``[N, H, W]`` bool, the pixels where the shape is on top.
    """
    polygons, _, _, label_map = self._layout(self._check_index(index))
    h, w = self.image_size
    full = np.zeros((len(polygons), h, w), np.uint8)
    for k, poly in enumerate(polygons):
      cv2.fillPoly(full[k], [_cv_points(poly)], 1, lineType=cv2.LINE_8, shift=_SHIFT)
    visible = label_map[None] == np.arange(len(polygons), dtype=np.uint8)[:, None, None]
    return full.astype(bool), visible

  def category_id(self, label: int) -> int:
    return int(label) + 1

  def coco_ground_truth(self) -> dict:
    """COCO-format ground truth of all images (``area`` is the box area).

    Computed once (layouts only, no drawing) and cached; each call returns a copy.
    """
    if self._ground_truth is None:
      self._ground_truth = self._make_ground_truth()
    return copy.deepcopy(self._ground_truth)

  def _make_ground_truth(self) -> dict:
    h, w = self.image_size
    images, annotations = [], []
    for index in range(self.num_images):
      boxes, labels = self.annotations(index)
      images.append(dict(id=index + 1, file_name=_file_name(index + 1), height=h, width=w))
      for box, label in zip(boxes.tolist(), labels.tolist()):
        bw, bh = box[2] - box[0], box[3] - box[1]
        annotations.append(dict(id=len(annotations) + 1, image_id=index + 1,
                                category_id=self.category_id(label),
                                bbox=[box[0], box[1], bw, bh], area=bw * bh, iscrowd=0))
    categories = [dict(id=self.category_id(k), name=name, supercategory="shape")
                  for k, name in enumerate(self.class_names)]
    return dict(images=images, annotations=annotations, categories=categories)

  def export_coco(self, directory: str | os.PathLike, *, image_dir: str = "images",
                  annotation_file: str = "annotations.json") -> str:
    """Writes the images as PNG under ``directory/image_dir`` and the COCO JSON.

    Returns the path of the JSON file; its ``file_name`` entries are relative
    to ``directory/image_dir``.
    """
    directory = os.fspath(directory)
    os.makedirs(os.path.join(directory, image_dir), exist_ok=True)
    for index in range(self.num_images):
      image = self[index].image
      path = os.path.join(directory, image_dir, _file_name(index + 1))
      if not cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    json_path = os.path.join(directory, annotation_file)
    with open(json_path, "w") as f:
      json.dump(self.coco_ground_truth(), f)
    return json_path


def _file_name(image_id: int) -> str:
  return f"{image_id:06d}.png"


def _cv_points(poly: np.ndarray) -> np.ndarray:
  """Pixel-coordinate vertices -> cv2's fixed-point points about pixel centres: ``[P, 1, 2]`` int32."""
  return np.round((poly - 0.5) * (1 << _SHIFT)).astype(np.int32).reshape(-1, 1, 2)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
  return rng.integers(0, 256, 3).astype(np.float64)


def _contrasting_colour(rng: np.random.Generator, against: np.ndarray) -> tuple[int, int, int]:
  """A random colour, redrawn a few times if it is too close to ``against`` ([3])."""
  best, best_gap = None, -1.0
  for _ in range(8):
    colour = _random_colour(rng)
    gap = float(np.abs(colour - against).sum())
    if gap > best_gap:
      best, best_gap = colour, gap
    if gap >= 90:
      break
  return tuple(int(v) for v in best)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """A textured background: ``[H, W, 3]`` uint8."""
  # Both kinds are drawn at a low resolution and resized (uint8 resizing is fast).
  if rng.random() < 1 / 3:  # Smooth colour cloud.
    gh, gw = (int(v) for v in rng.integers(2, 7, 2))
    low = rng.integers(0, 256, (gh, gw, 3), dtype=np.uint8)
    image = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
  else:  # Linear gradient between two colours, in a random direction.
    a, b = _random_colour(rng), _random_colour(rng)
    angle = rng.uniform(0, 2 * np.pi)
    g = 9
    centres = (np.arange(g) + 0.5) / g  # Where the low-res pixel centres land, in [0, 1].
    t = np.add.outer(centres * math.sin(angle), centres * math.cos(angle))  # [g, g]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    low = np.clip(a + t[..., None] * (b - a), 0, 255).astype(np.uint8)
    image = cv2.resize(low, (w, h), interpolation=cv2.INTER_LINEAR)
  side = min(h, w)
  if rng.random() < 0.35:  # Stripes in a colour near the background's.
    base = image.reshape(-1, 3).mean(0)
    colour = tuple(int(v) for v in np.clip(base + rng.normal(0, 40, 3), 0, 255))
    period = rng.uniform(0.05, 0.2) * side
    thickness = max(1, int(period * rng.uniform(0.2, 0.5)))
    angle = rng.uniform(0, np.pi)
    d = np.array([math.cos(angle), math.sin(angle)])
    normal = np.array([-d[1], d[0]])
    reach = h + w
    for k in np.arange(-reach, reach, period):
      p = np.array([w / 2, h / 2]) + k * normal
      q1, q2 = p - reach * d, p + reach * d
      cv2.line(image, (int(q1[0]), int(q1[1])), (int(q2[0]), int(q2[1])), colour, thickness,
               lineType=cv2.LINE_AA)
  for _ in range(int(rng.integers(0, 6))):  # Clutter: lines and unfilled outlines.
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    thickness = int(rng.integers(1, 3))
    if rng.random() < 0.5:
      p, q = rng.uniform(0, [w, h]), rng.uniform(0, [w, h])
      cv2.line(image, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), colour, thickness,
               lineType=cv2.LINE_AA)
    else:
      n = int(rng.integers(3, 7))
      centre = rng.uniform(0, [w, h])
      pts = centre + rng.normal(0, 0.12 * side, (n, 2))
      cv2.polylines(image, [np.round(pts).astype(np.int32).reshape(-1, 1, 2)], True, colour,
                    thickness, lineType=cv2.LINE_AA)
  return image
