"""Reading images for inference: a file or an array -> ``[H, W, 3]`` uint8 RGB.

The one home of the input-image checks that the predictor
(:mod:`jdet.inference.predictor`) and the exported-model loader
(:mod:`jdet.inference.exported`) share. Like the loader, it imports only NumPy,
Pillow and the standard library: no Flax, grain or tensorflow-datasets, and no
other jdet module, so that ``exported.py`` and this file can be copied beside an
exported model and used without jdet.

The training data sources decode through :func:`jdet.data.images.decode_image`
(which counts and reports every fix); :func:`read_image` converts the same
modes the same way for a standalone program.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["ImageReadError", "to_rgb8", "read_image"]


class ImageReadError(ValueError):
  """An input image that cannot be used; the message names the file and the reason."""

  def __init__(self, file: str, reason: str):
    self.file, self.reason = file, reason
    super().__init__(f"{file}: {reason}")


def to_rgb8(image: Any, *, file: str = "array") -> np.ndarray:
  """An image array -> ``[H, W, 3]`` uint8 RGB (also :func:`jdet.inference.to_rgb8`).

  ``[H, W]`` / ``[H, W, 1]`` greyscale and ``[H, W, 4]`` RGBA are accepted; other
  dtypes than uint8 are taken as 0..255, or 0..1 when every value is within it.

  Raises:
    ImageReadError: not a 2-D image with 1, 3 or 4 channels, empty, or not finite.
  """
  a = np.asarray(image)
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.ndim == 2:
    a = np.stack([a] * 3, axis=-1)
  elif a.ndim == 3 and a.shape[-1] == 4:
    a = a[..., :3]
  if a.ndim != 3 or a.shape[-1] != 3:
    raise ImageReadError(file, f"expected an [H, W, 3], [H, W, 4] or [H, W] image, got shape "
                               f"{np.shape(image)}")
  if a.shape[0] < 1 or a.shape[1] < 1:
    raise ImageReadError(file, f"empty image of shape {np.shape(image)}")
  if a.dtype != np.uint8:
    if a.dtype == bool or not np.issubdtype(a.dtype, np.number):
      raise ImageReadError(file, f"pixels of dtype {a.dtype} are not numbers")
    f = a.astype(np.float64)
    if not np.all(np.isfinite(f)):
      raise ImageReadError(file, "the image has NaN or infinite pixels")
    if np.issubdtype(a.dtype, np.floating) and f.min() >= 0.0 and f.max() <= 1.0:
      f = f * 255.0
    a = np.clip(np.rint(f), 0, 255).astype(np.uint8)
  return np.ascontiguousarray(a)


def read_image(path: str | os.PathLike) -> np.ndarray:
  """An image file -> ``[H, W, 3]`` uint8 RGB, upright (EXIF orientation applied), with
  Pillow, converting as jdet's data sources do: 16-bit greyscale scaled to 8 bits with
  rounding, alpha dropped, greyscale and palette images to RGB."""
  from PIL import Image, ImageOps
  file = os.fspath(path)
  try:
    with Image.open(file) as im:
      im = ImageOps.exif_transpose(im)
      mode = im.mode
      if mode.startswith("I;16") or mode == "I":
        a = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        return to_rgb8(((a * 255 + 32767) // 65535).astype(np.uint8), file=file)
      if mode in ("RGBA", "RGBX"):
        return to_rgb8(np.asarray(im)[:, :, :3], file=file)
      if mode in ("L", "1"):
        return to_rgb8(np.asarray(im.convert("L")), file=file)
      if mode in ("LA", "La"):
        return to_rgb8(np.asarray(im.getchannel("L")), file=file)
      if mode in ("P", "PA") and (mode == "PA" or "transparency" in im.info):
        return to_rgb8(np.asarray(im.convert("RGBA"))[:, :, :3], file=file)
      return to_rgb8(np.asarray(im.convert("RGB")), file=file)
  except FileNotFoundError:
    raise ImageReadError(file, "no such file") from None
  except OSError as e:
    raise ImageReadError(file, f"cannot be read as an image ({e})") from None
