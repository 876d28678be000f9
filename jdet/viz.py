"""Drawing for people: boxes with class names on images, grids of images, PNG files.

Everything here works on host NumPy arrays and returns ``[H, W, 3]`` uint8 RGB
images; nothing is drawn in place. OpenCV does the text and the file writing.

Box outlines are drawn *inside* the box: a box ``[x1, y1, x2, y2]`` in pixels
(pixel ``i`` covers ``[i, i + 1)``) covers the pixel columns
``floor(x1) .. ceil(x2) - 1`` and rows ``floor(y1) .. ceil(y2) - 1``, and its
outline is the band of ``thickness`` pixels along the border of that block, in
the colour of its class (:func:`class_colour`). The caption (class name, and
score when given) sits on a filled strip of the same colour just above the
box, or just inside its top edge when there is no room above.

Example::

  image = viz.draw_boxes(batch["image"][0], batch["boxes"][0], batch["labels"][0],
                         class_names, mean=IMAGENET_MEAN, std=IMAGENET_STD)
  viz.save_png("sample.png", viz.image_grid([image, image], cols=2))
"""

from __future__ import annotations

import colorsys
import math
import os
from typing import Sequence

import cv2
import numpy as np

__all__ = ["class_colour", "to_uint8", "draw_boxes", "image_grid", "save_png"]

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_GOLDEN = 0.6180339887498949


def class_colour(label: int) -> tuple[int, int, int]:
  """A bright, saturated RGB colour for class ``label``; neighbouring labels differ in hue."""
  hue = (int(label) * _GOLDEN) % 1.0
  r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
  return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def to_uint8(image, mean: Sequence[float] | None = None,
             std: Sequence[float] | None = None) -> np.ndarray:
  """An image as ``[H, W, 3]`` uint8 RGB.

  Args:
    image: ``[H, W, 3]`` (or ``[H, W]`` grey) uint8, or float. A float image
      is un-normalised as ``image * std + mean`` when ``mean`` and ``std`` (per
      RGB channel, in 0..255 units) are given, and is otherwise taken as pixels
      in 0..255; it is then rounded and clipped to 0..255.
    mean, std: the :class:`jdet.data.transforms.Normalize` statistics to undo.
  Returns:
    ``[H, W, 3]`` uint8, a new array.
  """
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"expected an [H, W, 3] image, got shape {image.shape}")
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  if (mean is None) != (std is None):
    raise ValueError("give both mean and std to un-normalise, or neither")
  if image.dtype == np.uint8:
    if mean is not None:
      raise ValueError("mean and std undo a normalisation; a uint8 image is not normalised")
    return image.copy()
  pixels = image.astype(np.float32)
  if mean is not None:
    pixels = pixels * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _font_scale(size: tuple[int, int]) -> float:
  """Text scale that stays readable from 128-pixel to 1333-pixel images."""
  return float(np.clip(min(size) / 640, 0.3, 0.6))


def _caption(image: np.ndarray, text: str, x: int, y_top: int, colour: tuple[int, int, int],
             scale: float) -> None:
  """Writes ``text`` on a strip of ``colour`` above row ``y_top`` (or from it down, if no room)."""
  h, w = image.shape[:2]
  (tw, th), baseline = cv2.getTextSize(text, _FONT, scale, 1)
  strip_h = th + baseline + 2
  top = y_top - strip_h if y_top >= strip_h else min(y_top, max(h - strip_h, 0))
  left = min(max(x, 0), max(w - tw - 2, 0))
  bottom, right = min(top + strip_h, h), min(left + tw + 2, w)
  image[top:bottom, left:right] = colour
  # Dark text on light colours, light text on dark ones (perceived brightness).
  luma = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
  ink = (0, 0, 0) if luma > 140 else (255, 255, 255)
  cv2.putText(image, text, (left + 1, top + th + 1), _FONT, scale, ink, 1, cv2.LINE_AA)


def draw_boxes(image, boxes, labels, class_names: Sequence[str], *, scores=None, valid=None,
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
               thickness: int | None = None, captions: bool = True) -> np.ndarray:
  """Draws class-coloured box outlines and captions on a copy of ``image``.

  Args:
    image: ``[H, W, 3]`` uint8, or float (normalised: pass ``mean``/``std``;
      see :func:`to_uint8`).
    boxes: ``[N, 4]`` ``[x1, y1, x2, y2]`` in pixels of ``image``; clipped to
      it for drawing.
    labels: ``[N]`` int class indices into ``class_names``; ``-1`` marks padding.
    class_names: the name of each class (ASCII: OpenCV's fonts have no other glyphs).
    scores: optional ``[N]`` float; the caption then reads ``"name 0.87"``.
    valid: optional ``[N]`` bool; boxes with ``valid`` False or a negative
      label are not drawn, nor are boxes with no area inside the image.
    mean, std: normalisation to undo for a float image.
    thickness: outline width in pixels; by default 1 below 256 pixels (short
      side), 2 below 640, else 3.
    captions: write the class names (and scores).
  Returns:
    ``[H, W, 3]`` uint8 RGB. Boxes are drawn in the given order, later ones on top.
  """
  out = to_uint8(image, mean, std)
  h, w = out.shape[:2]
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  n = len(boxes)
  labels = np.asarray(labels).astype(np.int64).reshape(n)
  keep = labels >= 0
  if valid is not None:
    keep &= np.asarray(valid, bool).reshape(n)
  if scores is not None:
    scores = np.asarray(scores, np.float32).reshape(n)
  if keep.any() and labels[keep].max() >= len(class_names):
    raise ValueError(f"label {labels[keep].max()} is outside the {len(class_names)} class names")
  if thickness is None:
    thickness = 1 if min(h, w) < 256 else 2 if min(h, w) < 640 else 3
  scale = _font_scale((h, w))
  finite = np.isfinite(boxes).all(axis=1)
  safe = np.where(finite[:, None], boxes, 0.0)
  # Pixel blocks covered by each box: columns x1i..x2i-1, rows y1i..y2i-1.
  x1i = np.clip(np.floor(safe[:, 0]), 0, w).astype(np.int64)
  y1i = np.clip(np.floor(safe[:, 1]), 0, h).astype(np.int64)
  x2i = np.clip(np.ceil(safe[:, 2]), 0, w).astype(np.int64)
  y2i = np.clip(np.ceil(safe[:, 3]), 0, h).astype(np.int64)
  keep &= finite & (x2i > x1i) & (y2i > y1i)
  for i in np.flatnonzero(keep):
    colour = class_colour(labels[i])
    a, b, c, d = x1i[i], y1i[i], x2i[i], y2i[i]
    t = thickness
    out[b:min(b + t, d), a:c] = colour  # top
    out[max(d - t, b):d, a:c] = colour  # bottom
    out[b:d, a:min(a + t, c)] = colour  # left
    out[b:d, max(c - t, a):c] = colour  # right
    if captions:
      text = str(class_names[labels[i]])
      if scores is not None:
        text += f" {scores[i]:.2f}"
      _caption(out, text, int(a), int(b), colour, scale)
  return out


def image_grid(images, cols: int, *, gap: int = 2, background: int = 255) -> np.ndarray:
  """Tiles images row by row into one image.

  Args:
    images: ``[N, H, W, 3]`` uint8 or a sequence of ``[H_i, W_i, 3]`` uint8
      (cells take the largest height and width; smaller images sit top-left).
    cols: images per row (at most N are used).
    gap: pixels between cells.
    background: grey level of the gaps and of empty cells.
  Returns:
    ``[rows * H + (rows - 1) * gap, cols * W + (cols - 1) * gap, 3]`` uint8
    with ``rows = ceil(N / cols)``.
  """
  images = [np.asarray(im) for im in images]
  if not images:
    raise ValueError("image_grid needs at least one image")
  for im in images:
    if im.ndim != 3 or im.shape[-1] != 3 or im.dtype != np.uint8:
      raise ValueError(f"image_grid takes [H, W, 3] uint8 images, got {im.shape} {im.dtype}")
  if cols < 1:
    raise ValueError(f"cols must be at least 1, got {cols}")
  cols = min(cols, len(images))
  rows = math.ceil(len(images) / cols)
  ch = max(im.shape[0] for im in images)
  cw = max(im.shape[1] for im in images)
  grid = np.full((rows * ch + (rows - 1) * gap, cols * cw + (cols - 1) * gap, 3), background,
                 np.uint8)
  for k, im in enumerate(images):
    r, c = divmod(k, cols)
    top, left = r * (ch + gap), c * (cw + gap)
    grid[top:top + im.shape[0], left:left + im.shape[1]] = im
  return grid


def save_png(path: str | os.PathLike, image) -> str:
  """Writes an ``[H, W, 3]`` uint8 RGB image as PNG (creating folders); returns the path."""
  path = os.fspath(path)
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"save_png takes an [H, W, 3] uint8 image, got {image.shape} {image.dtype}")
  folder = os.path.dirname(path)
  if folder:
    os.makedirs(folder, exist_ok=True)
  ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
  if not ok:
    raise OSError(f"could not encode {path} as PNG")
  with open(path, "wb") as f:
    f.write(data.tobytes())
  return path
