"""Multibox targets, loss and decoding: what SSD and RefineDet share (Liu et al., ECCV 2016).

* :func:`ssd_targets`: one image's matching of default boxes (anchors) to
  ground truth: each box's best anchor forced positive, then every anchor with
  IoU >= 0.5; offsets encoded with variances 0.1 / 0.2 (:data:`SSD_BOX_STDS`).
* :func:`ssd_loss`: smooth L1 on the positives plus softmax cross-entropy on
  the positives and the hardest negatives (3 per positive), both divided by
  the number of positives in the batch. RefineDet runs it twice (ARM, ODM).
* :func:`multibox_detections`: per-class NMS of class-agnostic boxes into
  :class:`jdet.Detections` in original pixels (each detector's ``predict``
  runs it on its ``candidates``).
* :class:`MultiBoxFields`: the settings of the three above, which both
  detectors inherit as their own fields.

Shapes: B images, A anchors, M padded ground-truth boxes, C foreground classes
(logits have ``C + 1`` columns, background first), K detections per image.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdet import boxes as box_lib
from jdet import losses
from jdet.assign.max_iou import POSITIVE, max_iou_assign
from jdet.assign.sampling import hard_negative_mask
from jdet.detections import Detections
from jdet.models.detector import encode_positives, finalize_detections
from jdet.ops.nms import multiclass_nms

__all__ = ["ssd_targets", "ssd_loss", "multibox_detections", "multibox_predict", "MultiBoxFields",
           "SSD_BOX_STDS"]

# SSD's "variances" (RefineDet's too): centre offsets are divided by 0.1, log sizes by 0.2.
SSD_BOX_STDS = (0.1, 0.1, 0.2, 0.2)


class MultiBoxFields(nn.Module):
  """The matching, loss and inference settings SSD and RefineDet share (SSD's values).

  Attributes:
    match_iou: an anchor matches a box at IoU ``>=`` it (0.5).
    box_stds: encoding variances (0.1, 0.1, 0.2, 0.2).
    neg_pos_ratio: hard negatives per positive (3).
    smooth_l1_beta: smooth L1 transition (1).
    score_threshold, pre_nms_top_k, nms_threshold, max_detections: inference
      (0.01, 200 candidates per class, 0.45, 100 per image).
    dtype: computation dtype of the convolutions (float32 or bfloat16).
  """

  match_iou: float = 0.5
  box_stds: Sequence[float] = SSD_BOX_STDS
  neg_pos_ratio: float = 3.0
  smooth_l1_beta: float = 1.0
  score_threshold: float = 0.01
  pre_nms_top_k: int = 200
  nms_threshold: float = 0.45
  max_detections: int = 100
  dtype: Any = jnp.float32


# ----------------------------------------------------------------------------
# Targets and loss: pure functions.
# ----------------------------------------------------------------------------


def ssd_targets(anchors, gt_boxes, gt_labels, *, match_iou: float = 0.5,
                box_stds: Sequence[float] = SSD_BOX_STDS):
  """SSD's matching for one image.

  Args:
    anchors: ``[A, 4]`` default boxes, xyxy pixels.
    gt_boxes: ``[M, 4]`` ground truth, xyxy pixels, padded.
    gt_labels: ``[M]`` int class in ``0 .. C-1``; ``-1`` marks padding.
    match_iou: positive at IoU ``>=`` it (0.5); the rest is background.
    box_stds: the encoding variances.
  Returns:
    ``(classes [A] int32`` with 0 = background and ``c + 1`` for class ``c``,
    ``deltas [A, 4]`` encoded offsets (meaningful at positives),
    ``positive [A] bool)``.
  """
  gt_labels = jnp.asarray(gt_labels, jnp.int32)
  assignment = max_iou_assign(anchors, gt_boxes, gt_labels >= 0, pos_iou_thr=match_iou,
                              neg_iou_thr=match_iou, low_quality="force")
  positive = assignment.labels == POSITIVE
  matched = box_lib.as_f32(gt_boxes)[assignment.matched_gt]  # [A, 4]
  classes = jnp.where(positive, gt_labels[assignment.matched_gt] + 1, 0).astype(jnp.int32)
  return classes, encode_positives(matched, anchors, positive, stds=box_stds), positive


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


def multibox_predict(detector, batch) -> Detections:
  """A multibox detector's ``predict``: :func:`multibox_detections` of
  ``detector.candidates(batch)`` with the detector's own :class:`MultiBoxFields`
  (score threshold, pre-NMS top-k, NMS threshold, detections per image)."""
  boxes, scores = detector.candidates(batch)
  return multibox_detections(boxes, scores, batch, score_threshold=detector.score_threshold,
                             pre_nms_top_k=detector.pre_nms_top_k,
                             nms_threshold=detector.nms_threshold,
                             max_detections=detector.max_detections)


def multibox_detections(boxes, scores, batch, *, score_threshold: float, pre_nms_top_k: int,
                        nms_threshold: float, max_detections: int) -> Detections:
  """Per-class NMS of ``boxes [B, A, 4]`` (input pixels) with ``scores [B, A, C]``
  -> :class:`Detections` in original pixels (SSD's and RefineDet's last step)."""
  idx, det_scores, labels = multiclass_nms(boxes, scores, score_threshold=score_threshold,
                                           pre_nms_top_k=pre_nms_top_k,
                                           iou_threshold=nms_threshold,
                                           max_detections=max_detections)
  det_boxes = jnp.take_along_axis(boxes, jnp.maximum(idx, 0)[..., None], axis=1)  # [B, K, 4]
  return finalize_detections(det_boxes, det_scores, labels, idx >= 0, batch,
                             max_detections=max_detections)
