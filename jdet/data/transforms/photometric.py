"""Photometric transforms: pixel values change, boxes do not.

:class:`ToFloat`, SSD's :class:`PhotometricDistort` and :class:`Normalize`
(ImageNet statistics of RGB pixels in 0..255 by default).
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from jdet.data.transforms.core import Repr, Sample

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ToFloat", "PhotometricDistort", "Normalize"]

# ImageNet statistics of RGB pixels in 0..255 (torchvision's, times 255).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


class ToFloat(Repr):
  """Casts the image to float32 (pixel values unchanged)."""

  def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
    return {**sample, "image": np.asarray(sample["image"], np.float32)}


class PhotometricDistort(Repr):
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


class Normalize(Repr):
  """``(image - mean) / std`` per RGB channel -> float32; mean/std in 0..255 units."""

  def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
    self.mean = tuple(mean)
    self.std = tuple(std)

  def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
    mean = np.asarray(self.mean, np.float32)
    inv_std = (1.0 / np.asarray(self.std, np.float64)).astype(np.float32)
    image = (np.asarray(sample["image"], np.float32) - mean) * inv_std
    return {**sample, "image": image.astype(np.float32, copy=False)}
