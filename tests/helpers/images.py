"""Images for tests: random PNGs written for fixtures, and the raccoon photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# The raccoon data set (VOC layout) beside the checkout; tests that need it skip without it.
RACCOON = Path(__file__).resolve().parents[3] / "shared" / "data" / "raccoon"
RACCOON_PHOTOS = RACCOON / "JPEGImages"


def write_image(path, h: int, w: int, *, seed: int = 0, orientation: int | None = None) -> None:
  """Writes an ``h x w`` PNG of random pixels, with an EXIF ``orientation`` if given."""
  from PIL import Image

  pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), np.uint8)
  kw = {}
  if orientation:
    exif = Image.Exif()
    exif[0x0112] = orientation
    kw["exif"] = exif.tobytes()
  Image.fromarray(pixels).save(path, "PNG", **kw)


def photo_batch(size: tuple[int, int] = (96, 128), count: int = 2) -> np.ndarray:
  """``[count, h, w, 3]`` float32: raccoon photos resized to ``size = (h, w)``, normalised
  with the ImageNet mean and std."""
  import pytest
  from PIL import Image

  from jdet.data.transforms import IMAGENET_MEAN, IMAGENET_STD

  if not RACCOON_PHOTOS.is_dir():
    pytest.skip(f"the raccoon photos are not at {RACCOON_PHOTOS}")
  images = []
  for i in range(1, count + 1):
    img = Image.open(RACCOON_PHOTOS / f"raccoon-{i}.jpg").convert("RGB").resize(size[::-1],
                                                                                Image.BILINEAR)
    pixels = np.asarray(img, np.float32)
    images.append((pixels - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD))
  return np.stack(images)
