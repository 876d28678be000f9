"""The two augmentation recipes, as :class:`~jdet.data.transforms.core.Compose` chains.

* SSD / RefineDet (Liu et al. 2016; the ssd.pytorch recipe): photometric
  distortion -> expand (zoom out) -> min-IoU random crop -> flip -> resize to a
  fixed square -> normalise -> pad boxes.
* Faster / Sparse R-CNN (MMDetection's ``Resize(keep_ratio=True)``): keep-ratio
  resize with multi-scale training -> flip -> normalise -> pad to a fixed canvas
  or to the smallest fitting size bucket (bottom/right) -> pad boxes.

Order matters in one place: :class:`Normalize` comes before :class:`Pad`, so
that the padding value 0 is the mean colour.
"""

from __future__ import annotations

from typing import Sequence

from jdet.data.transforms.core import DEFAULT_MIN_SIZE, Compose, PadBoxes
from jdet.data.transforms.geometry import (Expand, KeepRatioResize, MinIoURandomCrop, Pad,
                                           RandomHFlip, Resize)
from jdet.data.transforms.photometric import (IMAGENET_MEAN, IMAGENET_STD, Normalize,
                                              PhotometricDistort)

__all__ = ["ssd_train_transforms", "ssd_eval_transforms", "rcnn_train_transforms",
           "rcnn_eval_transforms"]


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
