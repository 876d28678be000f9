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

Precision-recall curves (:func:`plot_pr_curves`) are drawn the same way, as
an image: axes from 0 to 1 with ticks every 0.2, one polyline per class in its
class colour, and a legend of class names (and APs) in the lower left, where
curves of a useful detector seldom go.

Example::

  image = viz.draw_boxes(batch["image"][0], batch["boxes"][0], batch["labels"][0],
                         class_names, mean=IMAGENET_MEAN, std=IMAGENET_STD)
  viz.save_image("sample.png", viz.image_grid([image, image], cols=2))
"""

from __future__ import annotations

import colorsys
import math
import os
from typing import Sequence

import cv2
import numpy as np

__all__ = ["class_colour", "to_uint8", "draw_boxes", "detection_grid", "image_grid", "plot_pr_curves", "plot_lines",
           "save_image"]

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


def detection_grid(examples: Sequence[dict], class_names: Sequence[str], *, score: float,
                   mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None) -> np.ndarray | None:
  """Evaluation images with their detections scoring at least ``score``, drawn and laid out
  in a square-ish grid (None without examples).

  Args:
    examples: dicts of ``image [H, W, 3]`` (normalised input pixels), ``boxes [K, 4]``
      in input pixels, ``scores [K]``, ``labels [K]``, ``valid [K]``
      (:class:`jdet.evaluation.loop.EvalResult`'s ``examples``).
    class_names: one name per class id.
    score: the lowest score drawn.
    mean, std: the normalisation to undo (:func:`to_uint8`).
  """
  drawn = [draw_boxes(e["image"], e["boxes"], e["labels"], class_names, scores=e["scores"],
                      valid=np.asarray(e["valid"]) & (np.asarray(e["scores"]) >= score),
                      mean=mean, std=std)
           for e in examples]
  if not drawn:
    return None
  return image_grid(drawn, int(np.ceil(np.sqrt(len(drawn)))))


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


def _text_width(text: str, scale: float) -> int:
  return cv2.getTextSize(text, _FONT, scale, 1)[0][0]


def _legend(image: np.ndarray, entries: list[tuple[tuple[int, int, int] | None, str]],
            box: tuple[int, int, int, int], scale: float) -> None:
  """Draws ``(colour, text)`` entries in columns inside the lower left of ``box`` (x0, y0, x1, y1).

  Entries that do not fit in 60% of the box's height and its width are
  summarised by a last entry ``"+N more"``.
  """
  x0, y0, x1, y1 = box
  (_, th), baseline = cv2.getTextSize("Ag", _FONT, scale, 1)
  pad, swatch, row_h = 6, 18, th + baseline + 4
  texts = [t for _, t in entries] + [f"+{len(entries)} more"]
  col_w = swatch + 6 + max(_text_width(t, scale) for t in texts) + pad
  rows_max = max(1, (int(0.6 * (y1 - y0)) - 2 * pad) // row_h)
  cols_max = max(1, (x1 - x0 - 16 - pad) // col_w)
  if len(entries) > rows_max * cols_max:
    keep = rows_max * cols_max - 1
    entries = entries[:keep] + [(None, f"+{len(entries) - keep} more")]
  n_cols = math.ceil(len(entries) / rows_max)
  n_rows = math.ceil(len(entries) / n_cols)
  left, bottom = x0 + 8, y1 - 8
  top = bottom - (n_rows * row_h + 2 * pad)
  right = left + pad + n_cols * col_w
  image[top:bottom + 1, left:right + 1] = 255
  cv2.rectangle(image, (left, top), (right, bottom), (160, 160, 160), 1)
  for i, (colour, text) in enumerate(entries):  # column by column
    c, r = divmod(i, n_rows)
    x, y = left + pad + c * col_w, top + pad + r * row_h
    middle = y + row_h // 2
    if colour is not None:
      image[middle - 2:middle + 2, x:x + swatch] = colour
    cv2.putText(image, text, (x + swatch + 6, middle + th // 2), _FONT, scale, (0, 0, 0), 1,
                cv2.LINE_AA)


def plot_pr_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], *, title: str,
                   size: tuple[int, int] = (480, 640), ap: dict[str, float] | None = None,
                   class_names: Sequence[str] | None = None) -> np.ndarray:
  """Draws precision-recall curves, one per class, on white axes from 0 to 1.

  Args:
    curves: ``{class_name: (recall [N], precision [N])}`` (what the
      evaluators' ``pr_curves()`` return); points with a NaN are left out.
    title: written above the axes.
    size: ``(H, W)`` of the image.
    ap: optional ``{class_name: AP}``; the legend then reads ``"name 0.523"``.
    class_names: optional full list of class names, so that a curve takes the
      colour of its class's label (``class_colour(class_names.index(name))``),
      as :func:`draw_boxes` does, also when some classes have no curve. By
      default a curve takes the colour of its position in ``curves``.
  Returns:
    ``[H, W, 3]`` uint8 RGB, for :func:`save_image`.
  """
  labels = {}
  for k, name in enumerate(curves):
    if class_names is not None and name not in class_names:
      raise ValueError(f"curve {name!r} is not one of the class names")
    text = name
    if ap is not None and name in ap:
      text += " nan" if ap[name] is None or math.isnan(ap[name]) else f" {ap[name]:.3f}"
    labels[name] = (class_colour(list(class_names).index(name) if class_names is not None
                                 else k), text)
  return plot_lines(curves, title=title, size=size, x_label="recall", y_label="precision",
                    x_range=(0.0, 1.0), y_range=(0.0, 1.0), labels=labels,
                    tick_format="{:.1f}")


def plot_lines(series: dict[str, tuple[np.ndarray, np.ndarray]], *, title: str,
               x_label: str, y_label: str, size: tuple[int, int] = (480, 640),
               x_range: tuple[float, float] | None = None,
               y_range: tuple[float, float] | None = None,
               labels: dict[str, tuple[tuple[int, int, int], str]] | None = None,
               tick_format: str = "{:.3g}") -> np.ndarray:
  """Draws lines ``{name: (x [N], y [N])}`` on white axes, with a legend in the lower left.

  Args:
    series: the lines; points with a NaN are left out (the line breaks there).
    title, x_label, y_label: written above the axes and beside them.
    size: ``(H, W)`` of the image.
    x_range, y_range: the axes' ``(low, high)``; by default the finite data's
      extent (y with 5 % room above and below).
    labels: ``{name: (colour, legend text)}``; by default the ``k``-th line takes
      :func:`class_colour` ``(k)`` and its name.
    tick_format: how the six ticks of each axis are written.
  Returns:
    ``[H, W, 3]`` uint8 RGB, for :func:`save_image`.
  """
  h, w = size
  out = np.full((h, w, 3), 255, np.uint8)
  scale = _font_scale((h, w))
  lows = (x_range, y_range)
  xs = [np.asarray(x, np.float64).reshape(-1) for x, _ in series.values()]
  ys = [np.asarray(y, np.float64).reshape(-1) for _, y in series.values()]
  for name, x, y in zip(series, xs, ys):
    if x.shape != y.shape:
      raise ValueError(f"{name}: x {x.shape} and y {y.shape} differ")
  (xa, xb), (ya, yb) = [r if r is not None else _extent(v, room=0.05 * k)
                        for k, (r, v) in enumerate(zip(lows, (xs, ys)))]
  ticks_x, ticks_y = np.linspace(xa, xb, 6), np.linspace(ya, yb, 6)
  tick_text = [tick_format.format(v) for v in np.concatenate([ticks_x, ticks_y])]
  (tick_w, th), baseline = cv2.getTextSize(max(tick_text[6:], key=len), _FONT, scale, 1)
  line_h = th + baseline
  # The plot box: room for the title above, tick labels and axis names left and below.
  x0, y0 = tick_w + line_h + 18, line_h + 14
  x1, y1 = w - max(16, _text_width(tick_text[5], scale) // 2 + 4), h - 2 * line_h - 16
  if x1 - x0 < 40 or y1 - y0 < 40:
    raise ValueError(f"size {size} leaves no room for the axes")

  def to_pixels(x, y) -> np.ndarray:  # [N] + [N] -> [N, 2] float
    u = np.clip((np.asarray(x, np.float64) - xa) / (xb - xa), 0.0, 1.0)
    v = np.clip((np.asarray(y, np.float64) - ya) / (yb - ya), 0.0, 1.0)
    return np.stack([x0 + u * (x1 - x0), y1 - v * (y1 - y0)], axis=-1)

  for gx, gy in to_pixels(ticks_x, ticks_y)[1:-1]:  # light grid
    out[y0:y1, int(round(gx))] = 225
    out[int(round(gy)), x0:x1] = 225

  entries = []
  for k, (name, x, y) in enumerate(zip(series, xs, ys)):
    colour, text = (labels or {}).get(name, (class_colour(k), name))
    points = to_pixels(x, y)
    finite = np.isfinite(x) & np.isfinite(y)
    # Runs of finite points; cv2 takes 1/16-pixel vertices with shift=4.
    for run in np.split(np.arange(len(points)), np.flatnonzero(np.diff(finite.astype(int))) + 1):
      if finite[run].all() and len(run):
        vertices = np.round(points[run] * 16).astype(np.int32)
        cv2.polylines(out, [vertices], False, colour, 2, cv2.LINE_AA, shift=4)
        if len(run) == 1:  # a lone point: a dot
          cv2.circle(out, tuple(int(v) for v in vertices[0]), 3 * 16, colour, -1, cv2.LINE_AA,
                     shift=4)
    entries.append((colour, text))

  black = (0, 0, 0)
  cv2.rectangle(out, (x0, y0), (x1, y1), black, 1)
  pixels = np.round(to_pixels(ticks_x, ticks_y)).astype(int)
  for (tx, ty), label_x, label_y in zip(pixels, tick_text[:6], tick_text[6:]):
    cv2.line(out, (tx, y1), (tx, y1 + 4), black, 1)
    cv2.putText(out, label_x, (tx - _text_width(label_x, scale) // 2, y1 + 6 + th), _FONT, scale,
                black, 1, cv2.LINE_AA)
    cv2.line(out, (x0 - 4, ty), (x0, ty), black, 1)
    cv2.putText(out, label_y, (x0 - 6 - _text_width(label_y, scale), ty + th // 2), _FONT, scale,
                black, 1, cv2.LINE_AA)
  name_w = _text_width(x_label, scale)
  cv2.putText(out, x_label, ((x0 + x1 - name_w) // 2, y1 + 10 + 2 * th + baseline), _FONT,
              scale, black, 1, cv2.LINE_AA)
  # The y axis' name written on its own strip, turned a quarter anticlockwise, left of the ticks.
  name_w = _text_width(y_label, scale)
  strip = np.full((line_h + 2, name_w + 2, 3), 255, np.uint8)
  cv2.putText(strip, y_label, (1, th + 1), _FONT, scale, black, 1, cv2.LINE_AA)
  strip = np.rot90(strip)[:h]
  top = max((y0 + y1 - strip.shape[0]) // 2, 0)
  out[top:top + strip.shape[0], 4:4 + strip.shape[1]] = strip[:h - top]
  title_w = _text_width(title, scale)
  cv2.putText(out, title, (max((x0 + x1 - title_w) // 2, 0), y0 - 8 - baseline), _FONT, scale,
              black, 1, cv2.LINE_AA)
  if entries:
    _legend(out, entries, (x0, y0, x1, y1), scale)
  return out


def _extent(values: Sequence[np.ndarray], *, room: float) -> tuple[float, float]:
  """``(low, high)`` of the finite values (``room`` of the span added at both ends); a
  span of at least 1e-9."""
  finite = np.concatenate([v[np.isfinite(v)] for v in values] or [np.zeros(0)])
  if not finite.size:
    return 0.0, 1.0
  low, high = float(finite.min()), float(finite.max())
  pad = max(high - low, 1e-9) * room
  if high - low < 1e-9:
    return low - 0.5, high + 0.5
  return low - pad, high + pad


def save_image(path: str | os.PathLike, image) -> str:
  """Writes an ``[H, W, 3]`` uint8 RGB image (creating folders); the format follows the
  suffix (``.png``, ``.jpg``, ...). Returns the path."""
  path = os.fspath(path)
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"save_image takes an [H, W, 3] uint8 image, got {image.shape} "
                     f"{image.dtype}")
  folder = os.path.dirname(path)
  if folder:
    os.makedirs(folder, exist_ok=True)
  ok, data = cv2.imencode(os.path.splitext(path)[1] or ".png",
                          cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
  if not ok:
    raise OSError(f"could not encode {path}")
  with open(path, "wb") as f:
    f.write(data.tobytes())
  return path
