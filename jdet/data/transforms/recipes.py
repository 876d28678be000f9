"""The two augmentation recipes, as :class:`~jdet.data.transforms.core.Compose` chains.

* SSD / RefineDet (Liu et al. 2016; the ssd.pytorch recipe): photometric
  distortion -> expand (zoom out) -> min-IoU random crop -> flip -> resize to a
  fixed square -> normalise -> pad boxes.
* Faster / Sparse R-CNN (MMDetection's ``Resize(keep_ratio=True)``): keep-ratio
  resize with multi-scale training -> flip -> normalise -> pad to a fixed canvas
  or to the smallest fitting size bucket (bottom/right) -> pad boxes. Sparse
  R-CNN's 300-proposal model (``crop=True``, the DETR augmentation) replaces
  the resize, with probability 0.5, by a keep-ratio resize to a shorter side
  of 400, 500 or 600, a random crop of 384..600 pixels a side, then the
  multi-scale resize.

Order matters in one place: :class:`Normalize` comes before :class:`Pad`, so
that the padding value 0 is the mean colour.
"""

from __future__ import annotations

from typing import Sequence

from jdet.data.transforms.choice import RandomChoice
from jdet.data.transforms.core import DEFAULT_MIN_SIZE, Compose, PadBoxes
from jdet.data.transforms.geometry import (Expand, KeepRatioResize, MinIoURandomCrop, Pad,
                                           RandomHFlip, RandomSizeCrop, Resize)
from jdet.data.transforms.photometric import (IMAGENET_MEAN, IMAGENET_STD, Normalize,
                                              PhotometricDistort)

__all__ = ["ssd_train_transforms", "ssd_eval_transforms", "rcnn_train_transforms",
           "rcnn_eval_transforms", "rcnn_resize", "CROP_SCALES", "CROP_SIZE"]

# Sparse R-CNN's 300-proposal crop branch (DETR's): the keep-ratio resize before the crop
# (shorter side one of these, longer at most 1333) and the range of the crop's sides.
CROP_SCALES = ((400, 1333), (500, 1333), (600, 1333))
CROP_SIZE = (384, 600)


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


def rcnn_resize(scales: Sequence[Sequence[int]] = ((800, 1333),), mode: str = "value", *,
                crop: bool = False, crop_scales: Sequence[Sequence[int]] = CROP_SCALES,
                crop_size: Sequence[int] = CROP_SIZE, crop_prob: float = 0.5,
                min_size: float = DEFAULT_MIN_SIZE):
  """The R-CNN recipe's resize step: :class:`KeepRatioResize` of ``scales`` (``mode``).

  With ``crop`` (Sparse R-CNN's 300-proposal model, DETR's augmentation;
  MMDetection's ``RandomChoice`` of two pipelines), a :class:`RandomChoice`:
  with probability ``1 - crop_prob`` that resize alone, otherwise a
  keep-ratio resize to one of ``crop_scales`` (uniformly), a
  :class:`RandomSizeCrop` with sides in ``crop_size = (lo, hi)``, then that
  resize.
  """
  resize = KeepRatioResize(scales, mode, min_size=min_size)
  if not crop:
    return resize
  return RandomChoice(
      [resize,
       Compose([KeepRatioResize(crop_scales, "value", min_size=min_size),
                RandomSizeCrop(crop_size, min_size=min_size),
                KeepRatioResize(scales, mode, min_size=min_size)])],
      probs=(1.0 - crop_prob, crop_prob))


def rcnn_train_transforms(scales: Sequence[Sequence[int]] = ((800, 1333),), *, mode: str = "value",
                          canvas: Sequence[int] | None = (1344, 1344),
                          buckets: Sequence[Sequence[int]] | None = None, max_boxes: int = 100,
                          mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                          flip_prob: float = 0.5, min_size: float = DEFAULT_MIN_SIZE,
                          crop: bool = False, crop_scales: Sequence[Sequence[int]] = CROP_SCALES,
                          crop_size: Sequence[int] = CROP_SIZE,
                          crop_prob: float = 0.5) -> Compose:
  """Faster / Sparse R-CNN training: multi-scale keep-ratio resize, flip, normalise, pad.

  ``buckets``, when given, replace ``canvas``. ``crop`` adds the random-size
  crop branch (see :func:`rcnn_resize`). A crop can turn a landscape image
  into a portrait one, so it goes with a ``canvas`` that holds both
  orientations, not with buckets chosen by the stored image's orientation
  (``data.group_by_aspect``), which would leave such images out.
  """
  return Compose([
      rcnn_resize(scales, mode, crop=crop, crop_scales=crop_scales, crop_size=crop_size,
                  crop_prob=crop_prob, min_size=min_size),
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
