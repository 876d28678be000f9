"""Running an exported detector (``.jdet`` file of :mod:`jdet.inference.export`) without jdet's model code.

::

  from jdet.inference.exported import ExportedDetector

  detector = ExportedDetector.load("model.jdet")
  result = detector(image)          # [H, W, 3] uint8 RGB (or greyscale / RGBA), or a file path
  for box, score, name in zip(result["boxes"], result["scores"], result["class_names"]):
    print(name, score, box)          # box: [x1, y1, x2, y2] in the image's own pixels
  results = detector([a, b, c])     # a list in, a list out

  python -m jdet.inference.exported model.jdet photo.jpg more.png   # prints the detections as JSON

This module imports only NumPy, JAX, OpenCV (the resize the evaluation
transform uses), :mod:`jdet.inference.images` (Pillow, to read image files) and
the standard library: it never imports Flax or ``jdet.models``, so it can be
copied, with ``images.py`` beside it, next to an exported file and used on its
own (``jax``, ``flatbuffers``, ``numpy``, ``opencv-python-headless`` and
``pillow`` installed).

The file is a zip archive:

* ``meta.json``: the format and its version, class names, the preprocessing
  (resize rule, interpolation, normalisation mean and std, padding canvas or
  buckets), the batch size, the inputs and outputs of the function, the
  weights' names, shapes and dtypes, the platforms it was lowered for, the JAX
  and jdet versions that wrote it;
* ``module_<H>x<W>.bin``: the serialized ``jax.export.Exported`` (StableHLO) of
  the model's ``predict`` for input canvas ``H x W``, one per canvas;
* ``weights/<i>.bin``: the raw bytes (C order) of weight ``i``.

The function takes ``(weights, image, image_size, orig_size, scale_factor,
valid)`` (the batch keys of the data contract that ``predict`` reads) and
returns ``boxes`` in the original image's pixels, ``scores``, ``labels`` and
``valid``, exactly what :class:`jdet.inference.Predictor` gets from the model.
This module does the evaluation transform on the host (keep-ratio or fixed
resize with OpenCV's bilinear ``cv2.resize``, normalisation, padding) and keeps
the valid detections scoring at least ``score_threshold``, highest first.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from typing import Any, Sequence

import cv2
import jax
import numpy as np


def _sibling_images_module():
  """``images.py`` beside this file: the copy that a standalone install carries."""
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "images.py")
  spec = importlib.util.spec_from_file_location("_exported_images", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


try:
  from jdet.inference.images import ImageReadError, read_image, to_rgb8
except ImportError:  # copied beside images.py, without jdet
  _images = _sibling_images_module()
  ImageReadError, read_image, to_rgb8 = _images.ImageReadError, _images.read_image, _images.to_rgb8

__all__ = ["ExportedDetector", "ExportedFileError", "ImageReadError", "FORMAT", "FORMAT_VERSION",
           "INPUTS", "OUTPUTS", "module_name", "preprocess", "read_image", "to_rgb8"]

FORMAT = "jdet-exported-detector"
FORMAT_VERSION = 1
# The batch keys the exported function takes (after the weights), and what it returns.
INPUTS = ("image", "image_size", "orig_size", "scale_factor", "valid")
OUTPUTS = ("boxes", "scores", "labels", "valid")
# OpenCV interpolation flags by the names meta.json uses.
INTERPOLATIONS = {"linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST,
                  "cubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA}


class ExportedFileError(ValueError):
  """An exported file that cannot be used; the message names the file and the reason."""

  def __init__(self, file: str, reason: str):
    self.file, self.reason = file, reason
    super().__init__(f"{file}: {reason}")


def module_name(canvas: Sequence[int]) -> str:
  """The archive member holding the function for input canvas ``(H, W)``."""
  return f"module_{int(canvas[0])}x{int(canvas[1])}.bin"


# ----------------------------------------------------------------------------
# Images and preprocessing (the evaluation transform, in NumPy/OpenCV).
# ----------------------------------------------------------------------------


def _resized_size(size: tuple[int, int], resize: dict) -> tuple[int, int]:
  """``(new_h, new_w)`` of the evaluation resize of an image of ``size = (h, w)``."""
  if resize["kind"] == "fixed":
    return int(resize["size"][0]), int(resize["size"][1])
  # Keep-ratio (MMDetection's rule, jdet.data.transforms.rescale_size).
  h, w = size
  short, max_long = float(resize["short"]), float(resize["max_long"])
  scale = min(short / min(h, w), max_long / max(h, w))
  return max(int(h * scale + 0.5), 1), max(int(w * scale + 0.5), 1)


def _canvas(size: tuple[int, int], pad: dict | None) -> tuple[int, int]:
  """The padded input ``(H, W)`` of a resized image of ``size = (h, w)``."""
  h, w = size
  if pad is None:
    return h, w
  if pad.get("canvas") is not None:
    return int(pad["canvas"][0]), int(pad["canvas"][1])
  fits = [(bh * bw, i) for i, (bh, bw) in enumerate(pad["buckets"]) if bh >= h and bw >= w]
  if not fits:
    raise ValueError(f"a resized image of (h, w) = {(h, w)} fits none of the buckets "
                     f"{pad['buckets']}")
  _, i = min(fits)
  return int(pad["buckets"][i][0]), int(pad["buckets"][i][1])


def preprocess(image: np.ndarray, spec: dict) -> dict[str, np.ndarray]:
  """One ``[H, W, 3]`` uint8 RGB image -> the function's per-image inputs (no batch axis).

  ``spec`` is ``meta.json``'s ``preprocess``: resize (``cv2.resize``, bilinear by
  default, on the uint8 image), ``(pixels - mean) / std`` in float32, padding
  at the bottom and right to the canvas (or the smallest bucket that holds it)
  with ``pad_value``. The same arithmetic as the evaluation transform.
  """
  h, w = int(image.shape[0]), int(image.shape[1])
  nh, nw = _resized_size((h, w), spec["resize"])
  if (nh, nw) != (h, w):
    image = cv2.resize(image, (nw, nh), interpolation=INTERPOLATIONS[spec["interpolation"]])
  scale_factor = (np.ones(2, np.float64) * np.array([nh / h, nw / w], np.float64)).astype(np.float32)
  norm = spec.get("normalize")
  pixels = np.asarray(image, np.float32)
  if norm is not None:
    mean = np.asarray(norm["mean"], np.float32)
    inv_std = (1.0 / np.asarray(norm["std"], np.float64)).astype(np.float32)
    pixels = ((pixels - mean) * inv_std).astype(np.float32, copy=False)
  ch, cw = _canvas((nh, nw), spec.get("pad"))
  if (ch, cw) != (nh, nw):
    if nh > ch or nw > cw:
      raise ValueError(f"a resized image of (h, w) = {(nh, nw)} is larger than the canvas "
                       f"{(ch, cw)}")
    canvas = np.full((ch, cw, pixels.shape[2]), np.float32(spec.get("pad_value", 0.0)), np.float32)
    canvas[:nh, :nw] = pixels
    pixels = canvas
  return dict(image=np.ascontiguousarray(pixels, np.float32),
              image_size=np.array([nh, nw], np.int32), orig_size=np.array([h, w], np.int32),
              scale_factor=scale_factor, valid=np.bool_(True))


# ----------------------------------------------------------------------------
# The detector.
# ----------------------------------------------------------------------------


class ExportedDetector:
  """An exported detector: its compiled function, weights and preprocessing.

  Build it with :meth:`load`; call it on one image (a dict back) or a list (a
  list of dicts back). Each dict: ``boxes [K, 4]`` float32 ``[x1, y1, x2, y2]``
  in the image's own pixels, ``scores [K]`` float32 (highest first),
  ``classes [K]`` int32 class ids, ``class_names`` (one name per detection),
  ``image_size`` ``(h, w)``.

  Attributes:
    meta: the file's ``meta.json``.
    class_names: one name per class id.
    batch_size: images per call of the compiled function.
    score_threshold: detections scoring below it are left out (default the
      predictor's, recorded at export; change it freely).
  """

  def __init__(self, file: str, meta: dict, functions: dict, weights: tuple):
    self.file = file
    self.meta = meta
    self.class_names = tuple(meta["class_names"])
    self.batch_size = int(meta["batch_size"])
    self.score_threshold = float(meta.get("score_threshold", 0.0))
    self._functions = functions  # (H, W) -> jitted Exported.call
    self._weights = weights

  @classmethod
  def load(cls, path: str | os.PathLike) -> "ExportedDetector":
    """Reads a ``.jdet`` file.

    Raises:
      ExportedFileError: missing, truncated or corrupt file, another format or a
        newer version, or no function lowered for this machine's platform.
    """
    from jax import export as jax_export
    file = os.fspath(path)
    if not os.path.isfile(file):
      raise ExportedFileError(file, "no such file" if not os.path.exists(file) else "not a file")
    try:
      with zipfile.ZipFile(file) as zf:
        names = set(zf.namelist())
        if "meta.json" not in names:
          raise ExportedFileError(file, "not an exported jdet detector (no meta.json)")
        meta = json.loads(zf.read("meta.json").decode("utf-8"))
        _check_meta(file, meta)
        for item in list(meta["modules"]) + list(meta["weights"]):
          if item["file"] not in names:
            raise ExportedFileError(file, f"{item['file']} is missing (truncated or damaged "
                                          "file?)")
        weights = []
        for item in meta["weights"]:
          dtype = np.dtype(jax.numpy.dtype(item["dtype"]))
          data = zf.read(item["file"])
          shape = tuple(int(d) for d in item["shape"])
          if len(data) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise ExportedFileError(file, f"{item['file']} ({item['name']}) holds {len(data)} "
                                          f"bytes, not those of {item['dtype']}{list(shape)}")
          weights.append(np.frombuffer(data, dtype).reshape(shape))
        modules = {}
        for item in meta["modules"]:
          try:
            exported = jax_export.deserialize(bytearray(zf.read(item["file"])))
          except ExportedFileError:
            raise
          except Exception as e:  # flatbuffers / MLIR errors of a damaged module
            raise ExportedFileError(file, f"{item['file']} cannot be deserialized: "
                                          f"{type(e).__name__}: {e}") from e
          modules[tuple(int(v) for v in item["canvas"])] = exported
    except ExportedFileError:
      raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, UnicodeDecodeError,
            json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
      raise ExportedFileError(file, f"not a readable exported detector (truncated or corrupt? "
                                    f"{type(e).__name__}: {e})") from e
    platform = jax.default_backend()
    functions = {}
    for canvas, exported in modules.items():
      if platform not in exported.platforms:
        raise ExportedFileError(file, f"exported for {list(exported.platforms)}, not for this "
                                      f"machine's {platform!r} (export again with "
                                      f"platforms including {platform!r})")
      functions[canvas] = jax.jit(exported.call)
    device_weights = tuple(jax.device_put(w) for w in weights)
    return cls(file, meta, functions, device_weights)

  @property
  def canvases(self) -> list[tuple[int, int]]:
    """The input canvases ``(H, W)`` there is a function for."""
    return sorted(self._functions)

  def read(self, image: Any) -> np.ndarray:
    """A file path or an array -> ``[H, W, 3]`` uint8 RGB."""
    if isinstance(image, (str, os.PathLike)):
      return read_image(image)
    return to_rgb8(image)

  def __call__(self, images: Any):
    """Detections of one image (a dict) or of a list of images (a list of dicts)."""
    single = isinstance(images, (str, os.PathLike)) or (
        isinstance(images, np.ndarray) and images.ndim in (2, 3) and images.dtype != object)
    inputs = [images] if single else list(images)
    results = self.predict_arrays([self.read(x) for x in inputs])
    return results[0] if single else results

  def predict_arrays(self, arrays: Sequence[np.ndarray]) -> list[dict]:
    """Detections of ``[H, W, 3]`` uint8 RGB images, in order, ``batch_size`` at a time
    per canvas (the last batch completed with filler images)."""
    samples = [preprocess(a, self.meta["preprocess"]) for a in arrays]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(samples):
      groups.setdefault(tuple(s["image"].shape[:2]), []).append(i)
    results: list[dict | None] = [None] * len(arrays)
    for canvas, indices in groups.items():
      if canvas not in self._functions:
        raise ValueError(f"{self.file}: no function for the input canvas {canvas} "
                         f"(exported: {self.canvases})")
      for start in range(0, len(indices), self.batch_size):
        chunk = indices[start:start + self.batch_size]
        batch = {k: np.stack([samples[i][k] for i in chunk]) for k in INPUTS}
        out = self.run_batch(_pad_batch(batch, self.batch_size))
        for row, i in enumerate(chunk):
          results[i] = self._one(out, row, arrays[i].shape[:2])
    return results  # type: ignore[return-value]

  def run_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The exported function on one prepared batch (``INPUTS``, batch axis ``batch_size``):
    the model's fixed-size ``boxes``, ``scores``, ``labels``, ``valid`` (host arrays)."""
    canvas = tuple(int(v) for v in batch["image"].shape[1:3])
    out = self._functions[canvas](self._weights, *(batch[k] for k in INPUTS))
    return {k: np.asarray(v) for k, v in jax.device_get(out).items()}

  def _one(self, out: dict, row: int, size: tuple[int, int]) -> dict:
    scores = np.asarray(out["scores"][row], np.float32)
    keep = np.asarray(out["valid"][row], bool) & (scores >= self.score_threshold)
    scores = scores[keep]
    order = np.argsort(-scores, kind="stable")
    classes = np.asarray(out["labels"][row], np.int32)[keep][order]
    names = [self.class_names[k] if 0 <= k < len(self.class_names) else f"class {k}"
             for k in classes.tolist()]
    return dict(boxes=np.asarray(out["boxes"][row], np.float32)[keep][order],
                scores=scores[order], classes=classes, class_names=names,
                image_size=(int(size[0]), int(size[1])))


def _pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """A short batch completed with zero filler images (``valid=False``)."""
  n = batch["valid"].shape[0]
  if n == batch_size:
    return batch
  return {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
          for k, v in batch.items()}


def _check_meta(file: str, meta: Any) -> None:
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise ExportedFileError(file, f"not an exported jdet detector (format "
                                  f"{meta.get('format') if isinstance(meta, dict) else None!r})")
  version = meta.get("format_version")
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise ExportedFileError(file, f"format version {version!r}; this reader knows versions up to "
                                  f"{FORMAT_VERSION} (a newer jdet wrote it)")
  for key in ("class_names", "batch_size", "preprocess", "modules", "weights"):
    if key not in meta:
      raise ExportedFileError(file, f"meta.json has no {key!r}")
  if tuple(meta.get("inputs", INPUTS)) != INPUTS or tuple(meta.get("outputs", OUTPUTS)) != OUTPUTS:
    raise ExportedFileError(file, f"the function takes {meta.get('inputs')} and returns "
                                  f"{meta.get('outputs')}; this reader expects {list(INPUTS)} "
                                  f"and {list(OUTPUTS)}")


def _main(argv: Sequence[str]) -> int:
  """``python -m jdet.inference.exported FILE.jdet IMAGE...``: the detections as JSON lines."""
  import argparse
  parser = argparse.ArgumentParser(prog="python -m jdet.inference.exported", description=_main.__doc__)
  parser.add_argument("model", help="an exported detector (.jdet)")
  parser.add_argument("images", nargs="+", help="image files")
  parser.add_argument("--score_threshold", type=float, default=None,
                      help="leave out detections scoring below this (default: the file's)")
  args = parser.parse_args(argv)
  try:
    detector = ExportedDetector.load(args.model)
  except ExportedFileError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if args.score_threshold is not None:
    detector.score_threshold = args.score_threshold
  status = 0
  for file in args.images:
    try:
      r = detector(file)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      status = 1
      continue
    print(json.dumps(dict(file=file, image_size=list(r["image_size"]), detections=[
        dict(box=[round(float(v), 3) for v in b], score=round(float(s), 5), class_id=int(c),
             class_name=n)
        for b, s, c, n in zip(r["boxes"], r["scores"], r["classes"], r["class_names"])])))
  return status


if __name__ == "__main__":
  sys.exit(_main(sys.argv[1:]))
