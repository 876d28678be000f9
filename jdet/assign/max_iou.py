"""Max-IoU anchor assignment with fixed shapes (SSD, RPN, Faster R-CNN, RefineDet).

Every anchor (or proposal) takes the ground-truth box it overlaps most. Its IoU
with that box decides its label:

* ``IoU >= pos_iou_thr``: ``POSITIVE`` (1), matched to that box;
* ``IoU < neg_iou_thr``: ``NEGATIVE`` (0), i.e. background;
* in between: ``IGNORE`` (-1), no loss.

Low-quality matches then make sure that every ground-truth box has at least one
positive anchor, in one of two ways (``low_quality=``):

* ``"argmax"`` (torchvision's and Detectron2's ``allow_low_quality_matches``,
  used by the RPN): for each box, every anchor whose IoU with it equals the box's
  best IoU over all anchors (ties included) becomes positive. Such an anchor keeps
  its *own* best box as its match, which can be another box than the one that
  promoted it. (MMDetection's ``MaxIoUAssigner`` with ``gt_max_assign_all``
  instead matches it to the promoting box; the two differ only when an anchor is
  the best anchor of one box but overlaps another box more.)
* ``"force"`` (the original SSD and torchvision's ``SSDMatcher``): each box's
  single best anchor (the lowest anchor index on ties) is positive and matched
  to *that* box, whatever its IoU with other boxes. When several boxes pick the
  same anchor, the box with the highest index wins, as torchvision's indexing
  assignment does; the others lose their forced anchor.

In both modes a box promotes anchors only if its best IoU is ``> 0`` and
``>= min_pos_iou``. (torchvision has no such guard: a box that overlaps no anchor
would match every anchor in Faster R-CNN, or anchor 0 in SSD. With anchors that
tile the image this never happens for a box of positive area.)

Ground truth is padded to a fixed number of boxes ``M`` with a validity mask:
the IoU column of a padded box is treated as ``-1``, so it never matches, and
an image without a valid box has every (valid) anchor ``NEGATIVE``. Ties in an
anchor's best box go to the lower box index (as ``torch.max``), so duplicate
ground-truth boxes are matched to their first copy, except for an anchor forced
by a later copy in ``"force"`` mode.

Worked example (one 10x10 box, four anchors, ``pos_iou_thr=0.7``,
``neg_iou_thr=0.3``)::

  gt      = [[0, 0, 10, 10]]
  anchors = [[0, 0, 10,  5],    # IoU 0.5  -> IGNORE
             [0, 0, 10,  2],    # IoU 0.2  -> NEGATIVE
             [0, 0, 10,  6],    # IoU 0.6  -> IGNORE, but the box's best anchor
             [20, 20, 30, 30]]  # IoU 0.0  -> NEGATIVE
  low_quality="none":   labels = [-1, 0, -1, 0]
  low_quality="argmax": labels = [-1, 0,  1, 0], matched_gt[2] = 0
  low_quality="force":  labels = [-1, 0,  1, 0], matched_gt[2] = 0

All functions work on one image with fixed shapes; batch them with ``jax.vmap``.
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax.numpy as jnp

from jdet.boxes import iou

__all__ = ["POSITIVE", "NEGATIVE", "IGNORE", "LOW_QUALITY_MODES", "MaxIoUAssignment", "max_iou_assign"]

POSITIVE = 1
NEGATIVE = 0
IGNORE = -1

LOW_QUALITY_MODES = ("none", "argmax", "force")


@flax.struct.dataclass
class MaxIoUAssignment:
  """Per-anchor result of :func:`max_iou_assign` (one image; ``[B, A]`` under vmap).

  Attributes:
    matched_gt: ``[A]`` int32, index of the matched ground-truth box. Meaningful
      wherever ``labels == POSITIVE``; elsewhere it is the anchor's best box
      (0 when the image has no valid box).
    labels: ``[A]`` int32, ``POSITIVE`` (1), ``NEGATIVE`` (0) or ``IGNORE`` (-1).
    max_iou: ``[A]`` float32, the anchor's best IoU over the valid boxes; 0 when
      the image has no valid box.
  """

  matched_gt: jnp.ndarray
  labels: jnp.ndarray
  max_iou: jnp.ndarray


def max_iou_assign(
    anchors,
    gt_boxes,
    gt_valid,
    *,
    pos_iou_thr: float,
    neg_iou_thr: float | Sequence[float],
    min_pos_iou: float = 0.0,
    low_quality: str = "none",
    anchor_valid=None,
) -> MaxIoUAssignment:
  """Assigns each anchor to its best-overlapping ground-truth box (one image).

  Args:
    anchors: ``[A, 4]`` xyxy anchors (or proposals).
    gt_boxes: ``[M, 4]`` xyxy ground truth, padded.
    gt_valid: ``[M]`` bool, false for padding rows (whatever their coordinates).
    pos_iou_thr: an anchor with best IoU ``>= pos_iou_thr`` is positive.
    neg_iou_thr: an anchor with best IoU ``< neg_iou_thr`` is negative. A pair
      ``(lo, hi)`` makes it negative only for ``lo <= IoU < hi`` (MMDetection's
      band, e.g. ``(0.0, 0.4)`` or ``(0.1, 0.5)``); below ``lo`` it is ignored.
      Must not exceed ``pos_iou_thr``.
    min_pos_iou: a box promotes low-quality matches only if its best IoU is at
      least this (and always ``> 0``).
    low_quality: ``"none"``, ``"argmax"`` (Faster R-CNN's RPN) or ``"force"``
      (SSD); see the module docstring.
    anchor_valid: optional ``[A]`` bool; invalid anchors (e.g. crossing the image
      border) are ``IGNORE`` and are never a box's best anchor.
  Returns:
    A :class:`MaxIoUAssignment` of ``[A]`` arrays.
  """
  if low_quality not in LOW_QUALITY_MODES:
    raise ValueError(f"unknown low_quality {low_quality!r}; expected one of {LOW_QUALITY_MODES}")
  if isinstance(neg_iou_thr, (tuple, list)):
    if len(neg_iou_thr) != 2:
      raise ValueError(f"neg_iou_thr must be a number or a (lo, hi) pair, got {neg_iou_thr!r}")
    neg_lo, neg_hi = neg_iou_thr
  else:
    neg_lo, neg_hi = None, neg_iou_thr
  if isinstance(neg_hi, (int, float)) and isinstance(pos_iou_thr, (int, float)) and neg_hi > pos_iou_thr:
    raise ValueError(f"neg_iou_thr ({neg_hi}) must not exceed pos_iou_thr ({pos_iou_thr})")

  anchors = jnp.asarray(anchors)
  gt_boxes = jnp.asarray(gt_boxes)
  gt_valid = jnp.asarray(gt_valid, dtype=bool)
  if gt_boxes.shape[-2] == 0:  # no box slots at all: one padding slot keeps shapes non-empty
    gt_boxes = jnp.zeros((1, 4), jnp.float32)
    gt_valid = jnp.zeros((1,), bool)
  num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
  if anchor_valid is None:
    anchor_valid = jnp.ones((num_anchors,), bool)
  anchor_valid = jnp.asarray(anchor_valid, dtype=bool)

  ious = iou(anchors, gt_boxes)  # [A, M]
  ious = jnp.where(gt_valid[None, :], ious, -1.0)  # padded boxes never match
  has_gt = jnp.any(gt_valid)  # []

  max_iou = jnp.max(ious, axis=1)  # [A], -1 without a valid box
  matched_gt = jnp.argmax(ious, axis=1).astype(jnp.int32)  # [A], first box on ties

  positive = has_gt & (max_iou >= pos_iou_thr)  # [A]
  negative = max_iou < neg_hi  # [A]
  if neg_lo is not None:
    negative &= max_iou >= neg_lo
  negative = (negative | ~has_gt) & ~positive

  if low_quality != "none":
    ious_a = jnp.where(anchor_valid[:, None], ious, -1.0)  # [A, M], only valid anchors compete
    gt_best = jnp.max(ious_a, axis=0)  # [M]
    gt_ok = gt_valid & (gt_best > 0.0) & (gt_best >= min_pos_iou)  # [M]
    if low_quality == "argmax":
      is_best = (ious_a == gt_best[None, :]) & gt_ok[None, :]  # [A, M], ties included
      promoted = jnp.any(is_best, axis=1)  # [A]; keeps its own matched_gt
    else:  # "force"
      best_anchor = jnp.argmax(ious_a, axis=0)  # [M], first anchor on ties
      forced = (best_anchor[None, :] == jnp.arange(num_anchors)[:, None]) & gt_ok[None, :]  # [A, M]
      forced_gt = jnp.max(jnp.where(forced, jnp.arange(num_gt, dtype=jnp.int32)[None, :], -1), axis=1)  # [A]
      promoted = forced_gt >= 0  # [A]
      matched_gt = jnp.where(promoted, forced_gt, matched_gt)  # the later box wins a shared anchor
    positive |= promoted
    negative &= ~promoted

  labels = jnp.where(positive, POSITIVE, jnp.where(negative, NEGATIVE, IGNORE))  # [A]
  labels = jnp.where(anchor_valid, labels, IGNORE).astype(jnp.int32)
  return MaxIoUAssignment(matched_gt=matched_gt, labels=labels, max_iou=jnp.maximum(max_iou, 0.0))
