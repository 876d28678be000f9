"""SSD: Single Shot MultiBox Detector (Liu et al., ECCV 2016).

Read top to bottom as the paper's Fig. 2:

1. **Backbone** (:class:`jdet.models.backbones.vgg.VGG16`): conv4_3 (L2Norm),
   fc7 and the extra layers give 6 (SSD300) or 7 (SSD512) feature maps.
2. **Default boxes** (:func:`jdet.ops.anchors.ssd_default_boxes`): 8732 for
   SSD300, fixed, computed in NumPy from the feature map sizes.
3. **Head** (:class:`jdet.models.heads.ssd_head.SSDHead`): per level a 3x3
   conv for ``num_classes + 1`` scores and one for 4 offsets per default box.
4. **Targets** (:func:`ssd_targets`): each ground-truth box's best default box
   is forced positive, then every default box with IoU >= 0.5 is positive
   (:func:`jdet.assign.max_iou_assign` with ``low_quality="force"``); offsets
   are encoded with variances 0.1 (centre) and 0.2 (size).
5. **Loss** (:func:`ssd_loss`): smooth L1 on the positives plus softmax
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

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdet import boxes as box_lib
from jdet import losses
from jdet.assign.max_iou import POSITIVE, max_iou_assign
from jdet.assign.sampling import hard_negative_mask
from jdet.detections import Detections
from jdet.models.backbones.vgg import SSD300_EXTRAS, VGG16
from jdet.models.heads.ssd_head import SSDHead
from jdet.ops.anchors import (SSD300_ASPECT_RATIOS, num_default_boxes_per_location,
                              ssd_default_boxes, ssd_sizes)
from jdet.ops.nms import multiclass_nms

__all__ = ["SSD", "ssd_targets", "ssd_loss", "decode_detections", "to_original_pixels", "BOX_STDS"]

# SSD's "variances": centre offsets are divided by 0.1, log sizes by 0.2.
BOX_STDS = (0.1, 0.1, 0.2, 0.2)


# ----------------------------------------------------------------------------
# Targets and loss: pure functions.
# ----------------------------------------------------------------------------


def ssd_targets(anchors, gt_boxes, gt_labels, *, iou_threshold: float = 0.5,
                box_stds: Sequence[float] = BOX_STDS):
  """SSD's matching for one image.

  Args:
    anchors: ``[A, 4]`` default boxes, xyxy pixels.
    gt_boxes: ``[M, 4]`` ground truth, xyxy pixels, padded.
    gt_labels: ``[M]`` int class in ``0 .. C-1``; ``-1`` marks padding.
    iou_threshold: positive at IoU ``>=`` it (0.5); the rest is background.
    box_stds: the encoding variances.
  Returns:
    ``(classes [A] int32`` with 0 = background and ``c + 1`` for class ``c``,
    ``deltas [A, 4]`` encoded offsets (meaningful at positives),
    ``positive [A] bool)``.
  """
  gt_labels = jnp.asarray(gt_labels, jnp.int32)
  assignment = max_iou_assign(anchors, gt_boxes, gt_labels >= 0, pos_iou_thr=iou_threshold,
                              neg_iou_thr=iou_threshold, low_quality="force")
  positive = assignment.labels == POSITIVE
  matched = jnp.asarray(gt_boxes, jnp.float32)[assignment.matched_gt]  # [A, 4]
  classes = jnp.where(positive, gt_labels[assignment.matched_gt] + 1, 0).astype(jnp.int32)
  deltas = box_lib.encode(matched, anchors, stds=box_stds)
  return classes, jnp.where(positive[:, None], deltas, 0.0), positive


def ssd_loss(logits, deltas, target_classes, target_deltas, positive, *,
             neg_pos_ratio: float = 3.0, smooth_l1_beta: float = 1.0, image_valid=None,
             valid=None):
  """SSD's multibox loss over a batch.

  ``L = (L_conf + L_loc) / N`` with ``N`` the number of positives in the batch
  (at least 1): ``L_loc`` is smooth L1 over the positives' offsets, ``L_conf``
  the softmax cross-entropy over the positives and, per image, the
  ``neg_pos_ratio`` times as many negatives with the highest background loss.

  Args:
    logits: ``[B, A, C + 1]`` class logits, background first.
    deltas: ``[B, A, 4]`` predicted offsets.
    target_classes, target_deltas, positive: from :func:`ssd_targets`, batched.
    neg_pos_ratio: hard negatives per positive (3).
    smooth_l1_beta: the smooth L1 transition point (1).
    image_valid: optional ``[B]`` bool; filler images contribute nothing.
    valid: optional ``[B, A]`` bool; masked-out anchors are neither positive
      nor negative (RefineDet's negative anchor filtering).
  Returns:
    ``(loss, metrics)``: scalar loss and a dict with ``cls_loss``,
    ``box_loss`` and ``num_pos``.
  """
  b, a = positive.shape
  mask = jnp.ones((b, a), bool)
  if image_valid is not None:
    mask &= jnp.asarray(image_valid, bool)[:, None]
  if valid is not None:
    mask &= jnp.asarray(valid, bool)
  positive = positive & mask
  ce = losses.softmax_ce(logits, target_classes, normalizer=None)  # [B, A]
  negative = jax.vmap(lambda l, p, v: hard_negative_mask(l, p, neg_pos_ratio=neg_pos_ratio,
                                                         valid=v))(ce, positive, mask)
  num_pos = jnp.sum(positive)
  normalizer = jnp.maximum(num_pos, 1).astype(jnp.float32)
  cls_loss = jnp.sum(jnp.where(positive | negative, ce, 0.0)) / normalizer
  box_loss = losses.smooth_l1(deltas, target_deltas, beta=smooth_l1_beta,
                              weights=positive[..., None], normalizer=normalizer)
  return cls_loss + box_loss, dict(cls_loss=cls_loss, box_loss=box_loss,
                                   num_pos=num_pos.astype(jnp.float32))


def to_original_pixels(boxes, batch) -> jnp.ndarray:
  """Input-image boxes ``[B, K, 4]`` -> original-image pixels, clipped to ``orig_size``.

  Undoes the resize recorded in ``batch["scale_factor"]`` (``[B, 2]`` ``(sy, sx)``);
  without it the input is taken to be the original image.
  """
  if "scale_factor" in batch:
    sy, sx = batch["scale_factor"][:, 0], batch["scale_factor"][:, 1]
    boxes = boxes / jnp.stack([sx, sy, sx, sy], axis=-1)[:, None, :]
  if "orig_size" in batch:
    boxes = box_lib.clip(boxes, batch["orig_size"][:, None, :])
  return boxes


# ----------------------------------------------------------------------------
# The detector.
# ----------------------------------------------------------------------------


class SSD(nn.Module):
  """SSD300 / SSD512 with a VGG16 backbone (defaults: SSD300 on COCO).

  Attributes:
    num_classes: foreground classes (background is added internally).
    image_size: side of the square input (300, 512, or smaller for tests).
    widths, fc_width, fc6_dilation, extras, l2norm_scale, norm: the VGG16 backbone
      (see :class:`~jdet.models.backbones.vgg.VGG16`).
    conv3_3_l2norm_scale: if set, conv3_3 (stride 4) is a source too, the first
      level (S3FD's small-object layer; the 128-pixel quick start uses 10).
    min_sizes, max_sizes: default box sizes per level in pixels; ``None`` uses
      the paper's scale rule with ``size_rule = (s_min, s_max, first)``.
    size_rule: ``(0.15, 0.9, 0.07)`` for COCO, ``(0.2, 0.9, 0.1)`` for VOC SSD300.
    steps: the default boxes' stride per level; ``None`` uses ``image_size /
      feature size`` (SSD300 uses 8, 16, 32, 64, 100, 300).
    aspect_ratios: per level, the ratios ``a`` that add boxes ``a:1`` and ``1:a``.
    clamp_default_boxes: clamp default box sides to the image (torchvision).
    iou_threshold: matching threshold (0.5).
    box_stds: encoding variances (0.1, 0.1, 0.2, 0.2).
    neg_pos_ratio: hard negatives per positive (3).
    smooth_l1_beta: smooth L1 transition (1).
    score_threshold, pre_nms_top_k, nms_threshold, max_detections: inference
      (0.01, 200 per class, 0.45, 100 per image).
    dtype: computation dtype of the convolutions (float32 or bfloat16).
  """

  num_classes: int
  image_size: int = 300
  widths: Sequence[int] = (64, 128, 256, 512, 512)
  fc_width: int = 1024
  fc6_dilation: int = 6
  extras: Sequence[Sequence[int]] = SSD300_EXTRAS
  l2norm_scale: float = 20.0
  norm: str = "none"
  conv3_3_l2norm_scale: float | None = None
  min_sizes: Sequence[float] | None = None
  max_sizes: Sequence[float] | None = None
  size_rule: Sequence[float] = (0.15, 0.9, 0.07)
  steps: Sequence[float] | None = (8, 16, 32, 64, 100, 300)
  aspect_ratios: Sequence[Sequence[float]] = SSD300_ASPECT_RATIOS
  clamp_default_boxes: bool = False
  iou_threshold: float = 0.5
  box_stds: Sequence[float] = BOX_STDS
  neg_pos_ratio: float = 3.0
  smooth_l1_beta: float = 1.0
  score_threshold: float = 0.01
  pre_nms_top_k: int = 200
  nms_threshold: float = 0.45
  max_detections: int = 100
  dtype: Any = jnp.float32

  def setup(self):
    self.backbone = VGG16(widths=self.widths, fc_width=self.fc_width,
                          fc6_dilation=self.fc6_dilation, extras=self.extras,
                          l2norm_scale=self.l2norm_scale, norm=self.norm, dtype=self.dtype,
                          conv3_3_l2norm_scale=self.conv3_3_l2norm_scale)
    self.head = SSDHead(self.num_classes + 1, self.boxes_per_location, dtype=self.dtype)

  @property
  def num_levels(self) -> int:
    """conv4_3, fc7 and one per extra level, plus conv3_3 if it is a source."""
    return 2 + len(self.extras) + (self.conv3_3_l2norm_scale is not None)

  @property
  def boxes_per_location(self) -> list[int]:
    return num_default_boxes_per_location(self.aspect_ratios, self.max_sizes is not None
                                          or self.min_sizes is None)

  def default_boxes(self, feature_sizes: Sequence[Sequence[int]]) -> np.ndarray:
    """``[A, 4]`` float32 xyxy default boxes for the given ``(h, w)`` per level."""
    n = len(feature_sizes)
    if len(self.aspect_ratios) != n:
      raise ValueError(f"aspect_ratios has {len(self.aspect_ratios)} levels, the backbone {n}")
    min_sizes, max_sizes = self.min_sizes, self.max_sizes
    if min_sizes is None:
      min_sizes, max_sizes = ssd_sizes(self.image_size, n, *self.size_rule)
    steps = self.steps
    if steps is None:
      steps = [(self.image_size / h, self.image_size / w) for h, w in feature_sizes]
    return ssd_default_boxes(self.image_size, feature_sizes, steps, min_sizes, max_sizes,
                             self.aspect_ratios, clamp_size=self.clamp_default_boxes)

  def __call__(self, image, *, train: bool = False):
    """``image [B, S, S, 3]`` -> ``(logits [B, A, C + 1], deltas [B, A, 4], default boxes [A, 4])``."""
    if image.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"SSD{self.image_size} expects {self.image_size}x{self.image_size} input, "
                       f"got {image.shape[1]}x{image.shape[2]}")
    features = self.backbone(image, train=train)
    sizes = [f.shape[1:3] for f in features]
    if min(min(hw) for hw in sizes) < 1:
      raise ValueError(f"the backbone's feature maps for {self.image_size}x{self.image_size} input "
                       f"are {sizes}: an extra layer shrinks a map to nothing; change `extras`")
    logits, deltas = self.head(features)
    anchors = self.default_boxes(sizes)
    if anchors.shape[0] != logits.shape[1]:
      raise ValueError(f"{anchors.shape[0]} default boxes but the head predicts {logits.shape[1]}")
    return logits, deltas, jnp.asarray(anchors)

  def loss(self, batch, *, train: bool = True):
    """The multibox loss of a batch (see :func:`ssd_loss`) -> ``(loss, metrics)``."""
    logits, deltas, anchors = self(batch["image"], train=train)
    classes, target_deltas, positive = jax.vmap(
        lambda b, l: ssd_targets(anchors, b, l, iou_threshold=self.iou_threshold,
                                 box_stds=self.box_stds))(batch["boxes"], batch["labels"])
    return ssd_loss(logits, deltas, classes, target_deltas, positive,
                    neg_pos_ratio=self.neg_pos_ratio, smooth_l1_beta=self.smooth_l1_beta,
                    image_valid=batch.get("valid"))

  def candidates(self, batch):
    """Every default box decoded, before NMS: ``(boxes [B, A, 4], scores [B, A, C])``.

    Boxes are in input pixels, clipped to the image; scores are the softmax
    probabilities of the foreground classes. :meth:`predict` and test-time
    augmentation (:mod:`jdet.evaluation.tta`) start from here.
    """
    logits, deltas, anchors = self(batch["image"], train=False)
    scores = jax.nn.softmax(logits, axis=-1)[..., 1:]  # [B, A, C]
    boxes = box_lib.decode(deltas, anchors, stds=self.box_stds)  # [B, A, 4] input pixels
    size = batch.get("image_size")
    boxes = box_lib.clip(boxes, jnp.asarray((self.image_size, self.image_size)) if size is None
                         else size[:, None, :])
    return boxes, scores

  def predict(self, batch) -> Detections:
    """Detections in original-image pixels, ``max_detections`` per image."""
    boxes, scores = self.candidates(batch)
    return decode_detections(boxes, scores, batch, score_threshold=self.score_threshold,
                             pre_nms_top_k=self.pre_nms_top_k, nms_threshold=self.nms_threshold,
                             max_detections=self.max_detections)

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
                      max_sizes=None if max_sizes is None else tuple(max_sizes), steps=None)


def decode_detections(boxes, scores, batch, *, score_threshold: float, pre_nms_top_k: int,
                      nms_threshold: float, max_detections: int) -> Detections:
  """Per-class NMS of ``boxes [B, A, 4]`` (input pixels) with ``scores [B, A, C]``
  -> :class:`Detections` in original pixels (SSD's and RefineDet's last step)."""
  idx, det_scores, labels = multiclass_nms(boxes, scores, score_threshold=score_threshold,
                                           pre_nms_top_k=pre_nms_top_k,
                                           iou_threshold=nms_threshold,
                                           max_detections=max_detections)
  det_boxes = jnp.take_along_axis(boxes, jnp.maximum(idx, 0)[..., None], axis=1)  # [B, K, 4]
  valid = idx >= 0
  if "valid" in batch:
    valid &= jnp.asarray(batch["valid"], bool)[:, None]
  det_boxes = jnp.where(valid[..., None], to_original_pixels(det_boxes, batch), 0.0)
  return Detections(boxes=det_boxes, scores=jnp.where(valid, det_scores, 0.0),
                    labels=jnp.where(valid, labels, -1), valid=valid)
