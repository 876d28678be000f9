"""The papers' anchor presets (SSD300, SSD512, RefineDet), which no model builds from.

The models compute their anchors from their own fields; these are the
references that the anchor and model tests compare with.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from jdet.ops.anchors import ssd_default_boxes, ssd_sizes

# (image size, dataset) -> (s_min, s_max, first), as in the released Caffe models.
SSD_SIZE_RULES = {
    (300, "voc"): (0.2, 0.9, 0.1),
    (300, "coco"): (0.15, 0.9, 0.07),
    (512, "voc"): (0.15, 0.9, 0.07),
    (512, "coco"): (0.1, 0.9, 0.04),
}
SSD300_FEATURE_SIZES = (38, 19, 10, 5, 3, 1)
SSD300_STRIDES = (8, 16, 32, 64, 100, 300)
SSD512_FEATURE_SIZES = (64, 32, 16, 8, 4, 2, 1)
SSD512_STRIDES = (8, 16, 32, 64, 128, 256, 512)
SSD512_ASPECT_RATIOS = ((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,))


def _ssd_preset(image_size: int, feature_sizes, strides, aspect_ratios, dataset: str,
                clip: bool, clamp_size: bool) -> np.ndarray:
  if (image_size, dataset) not in SSD_SIZE_RULES:
    raise ValueError(f"dataset must be 'voc' or 'coco', got {dataset!r}")
  s_min, s_max, first = SSD_SIZE_RULES[(image_size, dataset)]
  min_sizes, max_sizes = ssd_sizes(image_size, len(feature_sizes), s_min, s_max, first)
  return ssd_default_boxes(image_size, feature_sizes, strides, min_sizes, max_sizes,
                           aspect_ratios, clip=clip, clamp_size=clamp_size)


def ssd300_default_boxes(dataset: str = "voc", *, clip: bool = False,
                         clamp_size: bool = False) -> np.ndarray:
  """The 8732 default boxes of SSD300 (VGG16), ``[8732, 4]`` float32 xyxy.

  Feature maps 38, 19, 10, 5, 3, 1 with strides 8, 16, 32, 64, 100, 300 and
  ratios [2], [2, 3], [2, 3], [2, 3], [2], [2]. ``dataset="voc"``: min sizes
  30, 60, 111, 162, 213, 264 and max sizes 60, 111, 162, 213, 264, 315;
  ``dataset="coco"``: 21, 45, 99, 153, 207, 261 and 45, 99, 153, 207, 261, 315.
  ``clip`` and ``clamp_size`` as in :func:`jdet.ops.anchors.ssd_default_boxes`.
  """
  from jdet.models.ssd import SSD300_ASPECT_RATIOS  # the SSD model's default

  return _ssd_preset(300, SSD300_FEATURE_SIZES, SSD300_STRIDES, SSD300_ASPECT_RATIOS,
                     dataset, clip, clamp_size)


def ssd512_default_boxes(dataset: str = "voc", *, clip: bool = False,
                         clamp_size: bool = False) -> np.ndarray:
  """The 24564 default boxes of SSD512 (VGG16), ``[24564, 4]`` float32 xyxy.

  Feature maps 64, 32, 16, 8, 4, 2, 1 with strides 8, 16, ..., 512 and ratios
  [2], [2, 3] x 4, [2], [2]. ``dataset="voc"``: min sizes 35.84, 76.8, 153.6,
  230.4, 307.2, 384, 460.8 and max sizes 76.8, ..., 537.6; ``dataset="coco"``:
  20.48, 51.2, 133.12, 215.04, 296.96, 378.88, 460.8 and 51.2, ..., 542.72.
  """
  return _ssd_preset(512, SSD512_FEATURE_SIZES, SSD512_STRIDES, SSD512_ASPECT_RATIOS,
                     dataset, clip, clamp_size)


def refinedet_anchors(image_size: int = 320, *, strides: Sequence[int] = (8, 16, 32, 64),
                      sizes: Sequence[float] | None = None,
                      aspect_ratios: Sequence[float] = (2,), clip: bool = False) -> np.ndarray:
  """RefineDet's anchors (Zhang et al. 2018), shared by its ARM and ODM.

  One size per level, ``4 * stride`` by default (32, 64, 128, 256), on feature
  maps of ``ceil(image_size / stride)`` (40, 20, 10, 5 for a 320 input), centred
  at ``(j + 0.5) * stride``. At each location: the 1:1 box, then ``(s sqrt(2),
  s / sqrt(2))`` and ``(s / sqrt(2), s sqrt(2))`` (ratios 1, 2, 1/2), i.e. SSD's
  default boxes with no max size. RefineDet320 has
  ``(40^2 + 20^2 + 10^2 + 5^2) * 3 = 6375`` anchors.

  Returns:
    ``[A, 4]`` float32 xyxy in input-image pixels.
  """
  if sizes is None:
    sizes = [4 * s for s in strides]
  feature_sizes = [math.ceil(image_size / s) for s in strides]
  return ssd_default_boxes(image_size, feature_sizes, strides, sizes, None,
                           [tuple(aspect_ratios)] * len(strides), clip=clip)
