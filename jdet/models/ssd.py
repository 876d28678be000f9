"""SSD: Single Shot MultiBox Detector (Liu et al., ECCV 2016).

Read top to bottom as the paper's Fig. 2:

1. **Backbone** (:class:`jdet.models.backbones.vgg.VGG16`): conv4_3 (L2Norm),
   fc7 and the extra layers give 6 (SSD300) or 7 (SSD512) feature maps.
2. **Default boxes** (:func:`jdet.ops.anchors.ssd_default_boxes`): 8732 for
   SSD300, fixed, computed in NumPy from the feature map sizes.
3. **Head** (:class:`jdet.models.heads.ssd_head.SSDHead`): per level a 3x3
   conv for ``num_classes + 1`` scores and one for 4 offsets per default box.
4. **Targets** (:func:`jdet.models.multibox.ssd_targets`): each ground-truth box's best default box
   is forced positive, then every default box with IoU >= 0.5 is positive
   (:func:`jdet.assign.max_iou_assign` with ``low_quality="force"``); offsets
   are encoded with variances 0.1 (centre) and 0.2 (size).
5. **Loss** (:func:`jdet.models.multibox.ssd_loss`): smooth L1 on the positives plus softmax
   cross-entropy on the positives and the hardest negatives (3 per positive),
   both divided by the number of positives in the batch.
6. **Decode** (:meth:`SSD.predict`): softmax, per-class score > 0.01, top 200
   per class, NMS at 0.45, the ``max_detections`` best, mapped back to the
   original image's pixels.

All shapes are fixed: ground truth is padded to ``M`` boxes (label -1), hard
negative mining is a mask and NMS returns padded indices, so one compiled step
serves every batch.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jdet import boxes as box_lib
from jdet.detections import Detections
from jdet.models.backbones.vgg import VGG16, VGGFields
from jdet.models.detector import build_from_fields, image_valid, real_image_sizes
from jdet.models.heads.ssd_head import SSDHead
from jdet.models.multibox import (SSD_BOX_STDS, MultiBoxFields, multibox_detections,
                                  multibox_predict, ssd_loss, ssd_targets)
from jdet.ops.anchors import num_default_boxes_per_location, ssd_default_boxes, ssd_sizes

__all__ = ["SSD", "SSDOutputs", "ssd_targets", "ssd_loss", "multibox_detections", "SSD_BOX_STDS",
           "SSD300_ASPECT_RATIOS", "SSD512_ASPECT_RATIOS"]

# The ratios ``a`` per level that add default boxes ``a:1`` and ``1:a``.
SSD300_ASPECT_RATIOS = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
SSD512_ASPECT_RATIOS = ((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,))


class SSDOutputs(NamedTuple):
  """What :class:`SSD` computes for a batch (a tuple: ``logits, deltas, anchors = out``).

  Attributes:
    logits: ``[B, A, C + 1]`` class logits, background first.
    deltas: ``[B, A, 4]`` box offsets from the default boxes.
    anchors: ``[A, 4]`` the default boxes, xyxy input pixels.
  """

  logits: jnp.ndarray
  deltas: jnp.ndarray
  anchors: jnp.ndarray


# ----------------------------------------------------------------------------
# The detector.
# ----------------------------------------------------------------------------


class SSD(VGGFields, MultiBoxFields, kw_only=True):
  """SSD300 / SSD512 with a VGG16 backbone (defaults: SSD300 on COCO).

  Attributes:
    num_classes: foreground classes (background is added internally).
    image_size: side of the square input (300, 512, or smaller for tests).
    the backbone's (:class:`~jdet.models.backbones.vgg.VGGFields`: widths,
      fc_width, fc6_dilation, extras, norm, conv3_3_l2norm_scale, dtype; with
      conv3_3_l2norm_scale set, conv3_3 (stride 4) is a source too, the first
      level: S3FD's small-object layer, the 128-pixel quick start uses 10),
    the matching, loss and inference settings
      (:class:`~jdet.models.multibox.MultiBoxFields`: match_iou, box_stds,
      neg_pos_ratio, smooth_l1_beta, score_threshold, pre_nms_top_k (200 per
      class), nms_threshold, max_detections), and
    l2norm_scale: initial scale of the L2Norm on conv4_3 (20).
    min_sizes, max_sizes: default box sizes per level in pixels; ``None`` uses
      the paper's scale rule with ``size_rule = (s_min, s_max, first)``.
    size_rule: ``(0.15, 0.9, 0.07)`` for COCO, ``(0.2, 0.9, 0.1)`` for VOC SSD300.
    strides: the default boxes' stride per level (Caffe's ``step``); ``None``
      uses ``image_size / feature size`` (SSD300 uses 8, 16, 32, 64, 100, 300).
    aspect_ratios: per level, the ratios ``a`` that add boxes ``a:1`` and ``1:a``.
    clamp_default_boxes: clamp default box sides to the image (torchvision).
  """

  num_classes: int
  image_size: int = 300
  l2norm_scale: float = 20.0
  min_sizes: Sequence[float] | None = None
  max_sizes: Sequence[float] | None = None
  size_rule: Sequence[float] = (0.15, 0.9, 0.07)
  strides: Sequence[float] | None = (8, 16, 32, 64, 100, 300)
  aspect_ratios: Sequence[Sequence[float]] = SSD300_ASPECT_RATIOS
  clamp_default_boxes: bool = False

  def setup(self):
    self.backbone = build_from_fields(VGG16, self, l2norm_scale=self.l2norm_scale)
    self.head = SSDHead(self.num_classes + 1, self.boxes_per_location, dtype=self.dtype)

  @property
  def num_levels(self) -> int:
    """conv4_3, fc7 and one per extra level, plus conv3_3 if it is a source."""
    return 2 + len(self.extras) + (self.conv3_3_l2norm_scale is not None)

  @property
  def boxes_per_location(self) -> list[int]:
    return num_default_boxes_per_location(self.aspect_ratios, self.max_sizes is not None
                                          or self.min_sizes is None)

  def anchors(self, feature_sizes: Sequence[Sequence[int]]) -> np.ndarray:
    """``[A, 4]`` float32 xyxy default boxes (SSD's anchors) for the given ``(h, w)`` per level."""
    n = len(feature_sizes)
    if len(self.aspect_ratios) != n:
      raise ValueError(f"aspect_ratios has {len(self.aspect_ratios)} levels, the backbone {n}")
    min_sizes, max_sizes = self.min_sizes, self.max_sizes
    if min_sizes is None:
      min_sizes, max_sizes = ssd_sizes(self.image_size, n, *self.size_rule)
    strides = self.strides
    if strides is None:
      strides = [(self.image_size / h, self.image_size / w) for h, w in feature_sizes]
    return ssd_default_boxes(self.image_size, feature_sizes, strides, min_sizes, max_sizes,
                             self.aspect_ratios, clamp_size=self.clamp_default_boxes)

  def __call__(self, image, *, train: bool = False) -> SSDOutputs:
    """``image [B, S, S, 3]`` -> :class:`SSDOutputs` (logits, deltas, default boxes)."""
    if image.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"SSD{self.image_size} expects {self.image_size}x{self.image_size} input, "
                       f"got {image.shape[1]}x{image.shape[2]}")
    features = self.backbone(image, train=train)
    sizes = [f.shape[1:3] for f in features]
    if min(min(hw) for hw in sizes) < 1:
      raise ValueError(f"the backbone's feature maps for {self.image_size}x{self.image_size} input "
                       f"are {sizes}: an extra layer shrinks a map to nothing; change `extras`")
    logits, deltas = self.head(features)
    anchors = self.anchors(sizes)
    if anchors.shape[0] != logits.shape[1]:
      raise ValueError(f"{anchors.shape[0]} default boxes but the head predicts {logits.shape[1]}")
    return SSDOutputs(logits, deltas, jnp.asarray(anchors))

  def frozen_parameters(self) -> tuple[str, ...]:
    """Regexps of the parameters that never train: none (the whole VGG trains)."""
    return ()

  def loss(self, batch, *, train: bool = True):
    """The multibox loss of a batch (see :func:`ssd_loss`) -> ``(loss, metrics)``."""
    logits, deltas, anchors = self(batch["image"], train=train)
    classes, target_deltas, positive = jax.vmap(
        lambda b, l: ssd_targets(anchors, b, l, match_iou=self.match_iou,
                                 box_stds=self.box_stds))(batch["boxes"], batch["labels"])
    return ssd_loss(logits, deltas, classes, target_deltas, positive,
                    neg_pos_ratio=self.neg_pos_ratio, smooth_l1_beta=self.smooth_l1_beta,
                    image_valid=image_valid(batch))

  def candidates(self, batch):
    """Every default box decoded, before NMS: ``(boxes [B, A, 4], scores [B, A, C])``.

    Boxes are in input pixels, clipped to the image; scores are the softmax
    probabilities of the foreground classes. :meth:`predict` and test-time
    augmentation (:mod:`jdet.evaluation.tta`) start from here.
    """
    logits, deltas, anchors = self(batch["image"], train=False)
    scores = jax.nn.softmax(logits, axis=-1)[..., 1:]  # [B, A, C]
    boxes = box_lib.decode(deltas, anchors, stds=self.box_stds)  # [B, A, 4] input pixels
    boxes = box_lib.clip(boxes, real_image_sizes(batch)[:, None, :])
    return boxes, scores

  def predict(self, batch) -> Detections:
    """Detections in original-image pixels: per-class NMS of the :meth:`candidates`."""
    return multibox_predict(self, batch)

  def at_input_size(self, size: int) -> "SSD":
    """The same detector (same variables) for ``size x size`` input, for
    multi-scale testing: default boxes keep their sizes in pixels and follow
    the feature maps' strides, so a larger input finds smaller objects."""
    if size == self.image_size:
      return self
    min_sizes, max_sizes = self.min_sizes, self.max_sizes
    if min_sizes is None:
      min_sizes, max_sizes = ssd_sizes(self.image_size, self.num_levels, *self.size_rule)
    return self.clone(image_size=size, min_sizes=tuple(min_sizes),
                      max_sizes=None if max_sizes is None else tuple(max_sizes), strides=None)
