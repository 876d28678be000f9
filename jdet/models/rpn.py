"""The region proposal network's stage (Ren et al., NeurIPS 2015), as torchvision computes it.

Pure functions that a two-stage detector composes with its RPN head
(:class:`jdet.models.heads.rpn_head.RPNHead`) and anchors
(:func:`jdet.ops.anchors.multilevel_grid_anchors`):

* :func:`rpn_targets`: max-IoU matching of anchors (positive at IoU >= 0.7,
  negative below 0.3, plus each box's best anchors), then 256 sampled at most
  half positive.
* :func:`rpn_loss`: binary cross-entropy and smooth L1 (beta 1/9), both
  divided by the number of sampled anchors in the batch.
* :func:`rpn_proposals`: per level the best anchors by objectness, decoded,
  clipped, tiny boxes dropped, NMS per level, the best over all levels,
  padded and masked (:class:`Proposals`).
* :class:`RPNFields`: the anchors' and these functions' settings, which a
  two-stage detector inherits as its own fields (``rpn_*``).

Shapes: B images, A anchors (all levels, level by level), M padded
ground-truth boxes, P proposals per image.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jdet import boxes as box_lib
from jdet import losses
from jdet.assign.max_iou import max_iou_assign
from jdet.assign.sampling import sample_balanced
from jdet.models.detector import encode_positives
from jdet.ops.nms import DEFAULT_TILE_SIZE, batched_nms

__all__ = ["RPNFields", "Proposals", "rpn_targets", "rpn_loss", "rpn_proposals", "RPN_BOX_STDS"]

# The RPN's offsets are plain (weights 1).
RPN_BOX_STDS = (1.0, 1.0, 1.0, 1.0)


class RPNFields(nn.Module):
  """The RPN's settings (torchvision's values), which Faster R-CNN inherits as its own.

  Attributes:
    anchor_sizes: per level the anchor sizes in pixels (one per level: 32 .. 512
      on P2 .. P6), or a tuple of sizes per level.
    anchor_ratios: ratios ``h / w`` shared by all levels (0.5, 1, 2).
    rpn_pos_iou, rpn_neg_iou: matching thresholds of :func:`rpn_targets` (0.7, 0.3).
    rpn_num_samples, rpn_positive_fraction: its sampling (256, 0.5).
    rpn_pre_nms_top_n, rpn_post_nms_top_n: ``(train, test)`` proposals per
      level before NMS and over all levels after it ((2000, 1000) each).
    rpn_nms_threshold, rpn_min_size, rpn_score_threshold: of
      :func:`rpn_proposals` (0.7, 1e-3, 0).
    rpn_smooth_l1_beta: of :func:`rpn_loss` (1/9).
  """

  anchor_sizes: Sequence[Any] = (32, 64, 128, 256, 512)
  anchor_ratios: Sequence[float] = (0.5, 1.0, 2.0)
  rpn_pos_iou: float = 0.7
  rpn_neg_iou: float = 0.3
  rpn_num_samples: int = 256
  rpn_positive_fraction: float = 0.5
  rpn_pre_nms_top_n: Sequence[int] = (2000, 1000)
  rpn_post_nms_top_n: Sequence[int] = (2000, 1000)
  rpn_nms_threshold: float = 0.7
  rpn_min_size: float = 1e-3
  rpn_score_threshold: float = 0.0
  rpn_smooth_l1_beta: float = 1.0 / 9


@flax.struct.dataclass
class Proposals:
  """The RPN's padded proposals, by descending score.

  Attributes:
    boxes: ``[B, P, 4]`` float32 xyxy in input pixels, clipped to the image; 0 where padded.
    scores: ``[B, P]`` float32 objectness probability; 0 where padded.
    valid: ``[B, P]`` bool.
  """

  boxes: jnp.ndarray
  scores: jnp.ndarray
  valid: jnp.ndarray


# ----------------------------------------------------------------------------
# Targets and loss: pure functions of one image (targets) or a batch (loss).
# ----------------------------------------------------------------------------


def rpn_targets(key, anchors, gt_boxes, gt_valid, *, pos_iou_thr: float = 0.7,
                neg_iou_thr: float = 0.3, num_samples: int = 256,
                positive_fraction: float = 0.5):
  """The RPN's anchor labels, sampled, and offsets for one image.

  Every anchor takes its best box (:func:`jdet.assign.max_iou_assign`):
  positive at IoU ``>= pos_iou_thr``, negative below ``neg_iou_thr``, and each
  box's best anchors (ties included) positive whatever their IoU (torchvision's
  ``Matcher(allow_low_quality_matches=True)``). Then ``num_samples`` are drawn
  (:func:`jdet.assign.sample_balanced`): ``min(P, num_samples * positive_fraction)``
  positives and negatives for the rest, as far as there are.

  Args:
    key: a PRNG key for the sampling.
    anchors: ``[A, 4]`` xyxy.
    gt_boxes: ``[M, 4]`` xyxy, padded.
    gt_valid: ``[M]`` bool, false for padding (and for every box of a filler image).
  Returns:
    ``(pos [A] bool, neg [A] bool, deltas [A, 4])``: the sampled positives and
    negatives, and the offsets of each positive's box (0 elsewhere).
  """
  assignment = max_iou_assign(anchors, gt_boxes, gt_valid, pos_iou_thr=pos_iou_thr,
                              neg_iou_thr=neg_iou_thr, low_quality="argmax")
  pos, neg = sample_balanced(key, assignment.labels, num_samples=num_samples,
                             positive_fraction=positive_fraction)
  matched = box_lib.as_f32(gt_boxes)[assignment.matched_gt]  # [A, 4]
  return pos, neg, encode_positives(matched, anchors, pos, stds=RPN_BOX_STDS)


def rpn_loss(logits, deltas, pos, neg, target_deltas, *, smooth_l1_beta: float = 1.0 / 9):
  """The RPN loss of a batch, normalised as torchvision's ``RegionProposalNetwork``.

  ``L_obj`` is the binary cross-entropy of every sampled anchor (positive 1,
  negative 0) and ``L_box`` the smooth L1 of the positives' offsets; both are
  divided by the number of sampled anchors in the batch (at least 1).

  Args:
    logits: ``[B, A]`` objectness logits.
    deltas: ``[B, A, 4]`` predicted offsets.
    pos, neg: ``[B, A]`` bool sampled anchors (already masked for filler images).
    target_deltas: ``[B, A, 4]``.
  Returns:
    ``(L_obj, L_box, num_sampled)`` scalars.
  """
  sampled = pos | neg
  n = jnp.sum(sampled).astype(jnp.float32)
  obj = losses.sigmoid_ce(logits, pos.astype(jnp.float32), weights=sampled, normalizer=n)
  box = losses.smooth_l1(deltas, target_deltas, beta=smooth_l1_beta, weights=pos[..., None],
                         normalizer=n)
  return obj, box, n


# ----------------------------------------------------------------------------
# Proposals.
# ----------------------------------------------------------------------------


def rpn_proposals(logits, deltas, anchors, level_counts: Sequence[int], image_size, *,
                  pre_nms_top_n: int, post_nms_top_n: int, nms_threshold: float = 0.7,
                  min_size: float = 1e-3, score_threshold: float = 0.0,
                  tile_size: int = DEFAULT_TILE_SIZE):
  """The RPN's proposals for one image (torchvision's ``filter_proposals``).

  Per level, the ``pre_nms_top_n`` anchors with the highest objectness are
  decoded and clipped to ``image_size``; boxes narrower or lower than
  ``min_size`` and scores (sigmoid) below ``score_threshold`` are masked; NMS
  at ``nms_threshold`` runs per level (levels never suppress each other) and
  the ``post_nms_top_n`` best survivors over all levels are kept.

  Args:
    logits: ``[A]`` objectness logits.
    deltas: ``[A, 4]`` offsets.
    anchors: ``[A, 4]`` xyxy, level by level.
    level_counts: static, the number of anchors of each level (summing to A).
    image_size: ``[2]`` ``(h, w)`` of the real image.
  Returns:
    ``(boxes [P, 4], scores [P], valid [P])`` with ``P = post_nms_top_n``, by
    descending score; padded rows are 0 and invalid.
  """
  if sum(level_counts) != logits.shape[0]:
    raise ValueError(f"level_counts {tuple(level_counts)} do not add up to {logits.shape[0]} anchors")
  index, level = [], []
  offset = 0
  for l, n in enumerate(level_counts):
    k = min(int(pre_nms_top_n), int(n))
    _, idx = jax.lax.top_k(logits[offset:offset + n], k)  # [k]
    index.append(idx + offset)
    level.append(jnp.full((k,), l, jnp.int32))
    offset += n
  index = jnp.concatenate(index)  # [N]
  level = jnp.concatenate(level)  # [N]
  boxes = box_lib.decode(deltas[index], jnp.asarray(anchors)[index], stds=RPN_BOX_STDS)
  boxes = box_lib.clip(boxes, image_size)  # [N, 4]
  scores = jax.nn.sigmoid(logits[index])  # [N]
  wh = boxes[:, 2:] - boxes[:, :2]
  ok = jnp.all(wh >= min_size, axis=-1) & (scores >= score_threshold)
  keep = batched_nms(boxes, scores, jnp.where(ok, level, -1), iou_threshold=nms_threshold,
                     max_output_size=int(post_nms_top_n), tile_size=tile_size)  # [P]
  valid = keep >= 0
  safe = jnp.maximum(keep, 0)
  return (jnp.where(valid[:, None], boxes[safe], 0.0), jnp.where(valid, scores[safe], 0.0), valid)
