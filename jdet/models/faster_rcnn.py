"""Faster R-CNN with a ResNet-FPN backbone (Ren et al., NeurIPS 2015; Lin et al., CVPR 2017).

As torchvision's ``fasterrcnn_resnet50_fpn`` computes it (converted weights give
its proposals and detections: ``tests/convert/test_torchvision_faster_rcnn.py``),
read top to bottom:

1. **Backbone** (:class:`jdet.models.backbones.resnet.ResNet`): C2..C5 at
   strides 4..32 (frozen BatchNorm and a frozen stem + stage 1 by default).
2. **Neck** (:class:`jdet.models.necks.fpn.FPN`): P2..P5 with 256 channels,
   P6 by max-pooling P5 (stride 64).
3. **RPN head** (:class:`jdet.models.heads.rpn_head.RPNHead`): on every level a
   3x3 conv, then 1 objectness logit and 4 offsets per anchor.
4. **Anchors** (:func:`jdet.ops.anchors.multilevel_grid_anchors`): sizes 32,
   64, 128, 256, 512 on P2..P6, ratios 0.5, 1, 2 (3 per location), as
   torchvision's ``AnchorGenerator``; level ``l`` has stride ``strides[l]``.
5. **RPN targets and loss** (:func:`rpn_targets`, :func:`rpn_loss`): max-IoU
   matching (positive at IoU >= 0.7, negative below 0.3, plus each box's best
   anchors), 256 anchors sampled per image at most half positive; binary
   cross-entropy and smooth L1 (beta 1/9), both divided by the number of
   sampled anchors in the batch.
6. **Proposals** (:func:`rpn_proposals`): per level the ``pre_nms_top_n``
   best anchors by objectness (2000 in training, 1000 at test), decoded,
   clipped to the image, tiny boxes dropped, NMS at 0.7 per level, then the
   ``post_nms_top_n`` best over all levels (2000 / 1000), padded and masked.
   No gradient flows through them.
7. **RoI sampling** (:func:`rcnn_targets`): the ground-truth boxes join the
   proposals; max-IoU matching at 0.5 (no low-quality matches); 512 RoIs
   sampled per image at most a quarter positive, gathered into a fixed-size
   set with a mask.
8. **RoI head** (:class:`jdet.models.heads.roi_head.RoIBoxHead`): multi-level
   RoIAlign 7x7 (:func:`jdet.ops.roi_align.multilevel_roi_align`, sampling
   ratio 2, ``aligned=False``, P2..P5 by the 224 / level-4 rule, as
   torchvision's ``MultiScaleRoIAlign``), two fully connected layers of 1024,
   ``num_classes + 1`` class logits (background 0) and per-class offsets
   (weights 10, 10, 5, 5).
9. **R-CNN loss** (:func:`rcnn_loss`): softmax cross-entropy and smooth L1
   (beta 1/9) at the target class, both divided by the number of sampled RoIs.
10. **Decode** (:func:`decode_detections`): softmax, per-class boxes from the
    proposals, clipped, score > 0.05, tiny boxes dropped, per-class NMS at
    0.5, the 100 best per image, in original image pixels.

Fixed shapes throughout: ground truth is padded (label -1); sampling gives
masks and a fixed number of RoIs; NMS returns padded indices; proposals and
RoIs carry validity masks, and padded ones (whose RoIAlign reads real
features) are masked out of the loss and the detections. One compiled step
serves every batch of a given input size.

MMDetection's ``faster-rcnn_r50_fpn_1x`` is the same network and recipe but
for a few fields: 1000 proposals after NMS in training
(``rpn_post_nms_top_n=(1000, 1000)``), ``roi_aligned=True`` and L1 box losses
(``rpn_smooth_l1_beta=0, rcnn_smooth_l1_beta=0``); its adaptive RoIAlign
sampling (``sampling_ratio=0``, a data-dependent shape) has no counterpart here.

Images come padded (bottom/right) to a fixed canvas; ``batch["image_size"]``
gives each real ``(h, w)``, to which proposals and detections are clipped.
Anchors cover the whole canvas, as torchvision's cover its padded batch.
torchvision derives each level's anchor stride as ``canvas // feature size``;
here it is the nominal ``strides``, which is the same for canvases that are
multiples of 64 (those of the configs).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jdet import boxes as box_lib
from jdet import losses
from jdet.assign.max_iou import max_iou_assign
from jdet.assign.sampling import sample_balanced
from jdet.detections import Detections
from jdet.models.backbones.resnet import ResNet
from jdet.models.heads.roi_head import RoIBoxHead
from jdet.models.heads.rpn_head import RPNHead
from jdet.models.necks.fpn import FPN
from jdet.models.ssd import to_original_pixels
from jdet.ops.anchors import multilevel_grid_anchors, num_anchors_per_location
from jdet.ops.nms import DEFAULT_TILE_SIZE, batched_nms, nms
from jdet.ops.roi_align import multilevel_roi_align

__all__ = ["FasterRCNN", "Proposals", "rpn_targets", "rpn_loss", "rpn_proposals", "rcnn_targets",
           "rcnn_loss", "decode_detections", "RPN_BOX_STDS", "RCNN_BOX_STDS"]

# The RPN's offsets are plain (weights 1); the R-CNN head's are scaled by 10, 10, 5, 5.
RPN_BOX_STDS = (1.0, 1.0, 1.0, 1.0)
RCNN_BOX_STDS = (0.1, 0.1, 0.2, 0.2)


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
# RPN targets and loss: pure functions of one image (targets) or a batch (loss).
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
  anchors = box_lib.as_f32(anchors)
  matched = jnp.asarray(gt_boxes, jnp.float32)[assignment.matched_gt]  # [A, 4]
  matched = jnp.where(pos[:, None], matched, anchors)  # no log(0) from padding rows
  deltas = box_lib.encode(matched, anchors, stds=RPN_BOX_STDS)
  return pos, neg, jnp.where(pos[:, None], deltas, 0.0)


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


def rpn_proposals(logits, deltas, anchors, level_sizes: Sequence[int], image_size, *,
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
    level_sizes: static, the number of anchors of each level (summing to A).
    image_size: ``[2]`` ``(h, w)`` of the real image.
  Returns:
    ``(boxes [P, 4], scores [P], valid [P])`` with ``P = post_nms_top_n``, by
    descending score; padded rows are 0 and invalid.
  """
  if sum(level_sizes) != logits.shape[0]:
    raise ValueError(f"level_sizes {tuple(level_sizes)} do not add up to {logits.shape[0]} anchors")
  index, level = [], []
  offset = 0
  for l, n in enumerate(level_sizes):
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


# ----------------------------------------------------------------------------
# RoI sampling and the R-CNN loss.
# ----------------------------------------------------------------------------


def rcnn_targets(key, proposals, proposal_valid, gt_boxes, gt_labels, *, num_samples: int = 512,
                 positive_fraction: float = 0.25, pos_iou_thr: float = 0.5,
                 neg_iou_thr: float = 0.5, add_gt_as_proposals: bool = True,
                 box_stds: Sequence[float] = RCNN_BOX_STDS):
  """RoIs for the second stage of one image, and their targets.

  The valid ground-truth boxes are appended to the proposals (torchvision's
  ``add_gt_proposals``); every candidate takes its best box, positive at IoU
  ``>= pos_iou_thr`` and background below ``neg_iou_thr``, without low-quality
  matches; ``num_samples`` are sampled (at most ``positive_fraction``
  positive) and gathered, positives first, into exactly ``num_samples`` rows.
  An image short of candidates fills the remaining rows with padding
  (``sampled`` false).

  Args:
    key: a PRNG key for the sampling.
    proposals: ``[P, 4]`` xyxy; proposal_valid: ``[P]`` bool.
    gt_boxes: ``[M, 4]`` xyxy; gt_labels: ``[M]`` int, ``-1`` for padding.
  Returns:
    ``(rois [S, 4], classes [S] int32, deltas [S, 4], sampled [S] bool)`` with
    ``S = num_samples``: classes are ``label + 1`` for positives, 0 for
    background and -1 for padding rows; deltas are the positives' encoded
    boxes (weights ``1 / box_stds``), 0 elsewhere.
  """
  gt_boxes = box_lib.as_f32(gt_boxes)
  gt_labels = jnp.asarray(gt_labels, jnp.int32)
  gt_valid = gt_labels >= 0
  candidates, valid = box_lib.as_f32(proposals), jnp.asarray(proposal_valid, bool)
  if add_gt_as_proposals:
    candidates = jnp.concatenate([candidates, gt_boxes])  # [P + M, 4]
    valid = jnp.concatenate([valid, gt_valid])
  if candidates.shape[0] < num_samples:  # too few rows for a fixed-size sample: pad
    pad = num_samples - candidates.shape[0]
    candidates = jnp.pad(candidates, ((0, pad), (0, 0)))
    valid = jnp.pad(valid, (0, pad))
  assignment = max_iou_assign(candidates, gt_boxes, gt_valid, pos_iou_thr=pos_iou_thr,
                              neg_iou_thr=neg_iou_thr, anchor_valid=valid)
  pos, neg = sample_balanced(key, assignment.labels, num_samples=num_samples,
                             positive_fraction=positive_fraction, valid=valid)
  # Gather the sample: positives (priority 2), then negatives (1), then padding (0).
  priority = pos.astype(jnp.int32) * 2 + neg.astype(jnp.int32)
  _, idx = jax.lax.top_k(priority, num_samples)  # [S]
  is_pos, sampled = pos[idx], (pos | neg)[idx]
  rois = candidates[idx]  # [S, 4]
  matched = assignment.matched_gt[idx]
  classes = jnp.where(is_pos, gt_labels[matched] + 1, jnp.where(sampled, 0, -1))
  target = jnp.where(is_pos[:, None], gt_boxes[matched], rois)
  anchor = jnp.where(is_pos[:, None], rois, jnp.asarray([0.0, 0.0, 1.0, 1.0]))  # no 0-size division
  deltas = jnp.where(is_pos[:, None], box_lib.encode(target, anchor, stds=box_stds), 0.0)
  return rois, classes.astype(jnp.int32), deltas, sampled


def rcnn_loss(logits, deltas, classes, target_deltas, sampled, *,
              smooth_l1_beta: float = 1.0 / 9):
  """The R-CNN head's loss of a batch, normalised as torchvision's ``fastrcnn_loss``.

  ``L_cls`` is the softmax cross-entropy of every sampled RoI, ``L_box`` the
  smooth L1 of the offsets predicted for the positives' own class; both are
  divided by the number of sampled RoIs in the batch (at least 1).

  Args:
    logits: ``[B, S, C + 1]``; deltas: ``[B, S, C + 1, 4]``.
    classes: ``[B, S]`` int target class (0 background, -1 padding).
    target_deltas: ``[B, S, 4]``; sampled: ``[B, S]`` bool (masked for filler images).
  Returns:
    ``(L_cls, L_box, num_sampled)`` scalars.
  """
  n = jnp.sum(sampled).astype(jnp.float32)
  classes = jnp.where(sampled, classes, -1)
  cls = losses.softmax_ce(logits, classes, normalizer=n)  # -1 rows give exactly 0
  pos = sampled & (classes > 0)
  picked = jnp.take_along_axis(deltas, jnp.maximum(classes, 0)[..., None, None], axis=-2)[..., 0, :]
  box = losses.smooth_l1(picked, target_deltas, beta=smooth_l1_beta, weights=pos[..., None],
                         normalizer=n)
  return cls, box, n


# ----------------------------------------------------------------------------
# Decoding.
# ----------------------------------------------------------------------------


def _per_class_nms(boxes, scores, *, iou_threshold: float, pre_nms_top_k: int | None,
                   max_detections: int, tile_size: int):
  """NMS per class of class-specific boxes; invalid candidates score ``-inf``.

  Args:
    boxes: ``[B, N, C, 4]``; scores: ``[B, N, C]``.
  Returns:
    ``(boxes [B, K, 4], scores [B, K], labels [B, K], valid [B, K])`` by descending score.
  """
  n, c = scores.shape[-2:]
  k = n if pre_nms_top_k is None else min(int(pre_nms_top_k), n)
  top_scores, top_idx = jax.lax.top_k(jnp.swapaxes(scores, -1, -2), k)  # [B, C, k]
  class_boxes = jnp.swapaxes(boxes, 1, 2)  # [B, C, N, 4]
  top_boxes = jnp.take_along_axis(class_boxes, top_idx[..., None], axis=-2)  # [B, C, k, 4]
  keep = nms(top_boxes, top_scores, iou_threshold=iou_threshold, max_output_size=k,
             tile_size=min(int(tile_size), max(k, 1)))  # [B, C, k] into k
  safe = jnp.maximum(keep, 0)
  kept_scores = jnp.where(keep >= 0, jnp.take_along_axis(top_scores, safe, -1), -jnp.inf)
  kept_boxes = jnp.take_along_axis(top_boxes, safe[..., None], axis=-2)  # [B, C, k, 4]
  b = scores.shape[0]
  flat_scores = kept_scores.reshape(b, c * k)
  n_out = min(int(max_detections), c * k)
  out_scores, pos = jax.lax.top_k(flat_scores, n_out)  # [B, K']
  valid = jnp.isfinite(out_scores)
  out_boxes = jnp.take_along_axis(kept_boxes.reshape(b, c * k, 4), pos[..., None], axis=1)
  labels = jnp.where(valid, pos // k, -1).astype(jnp.int32)
  if n_out < max_detections:
    pad = int(max_detections) - n_out
    out_boxes = jnp.pad(out_boxes, ((0, 0), (0, pad), (0, 0)))
    out_scores = jnp.pad(out_scores, ((0, 0), (0, pad)), constant_values=-jnp.inf)
    labels = jnp.pad(labels, ((0, 0), (0, pad)), constant_values=-1)
    valid = jnp.pad(valid, ((0, 0), (0, pad)))
  return out_boxes, jnp.where(valid, out_scores, 0.0), labels, valid


def decode_detections(logits, deltas, proposals: Proposals, batch, *, score_threshold: float,
                      nms_threshold: float, max_detections: int, min_size: float = 1e-2,
                      pre_nms_top_k: int | None = None,
                      box_stds: Sequence[float] = RCNN_BOX_STDS) -> Detections:
  """The R-CNN head's outputs on the proposals -> :class:`Detections` in original pixels.

  torchvision's ``RoIHeads.postprocess_detections``: softmax over the classes,
  each foreground class's box decoded from the proposal and clipped to the
  image, candidates with score ``> score_threshold`` and both sides
  ``>= min_size`` kept, NMS per class, the ``max_detections`` best.

  Args:
    logits: ``[B, P, C + 1]``; deltas: ``[B, P, C + 1, 4]``.
    proposals: the :class:`Proposals` the head ran on (padded ones never detect).
    batch: for ``image_size``, ``scale_factor``, ``orig_size`` and ``valid``.
    pre_nms_top_k: candidates per class before NMS; ``None`` keeps all ``P``
      (exactly torchvision's result).
  """
  scores = jax.nn.softmax(logits, axis=-1)[..., 1:]  # [B, P, C]
  boxes = box_lib.decode(deltas[..., 1:, :], proposals.boxes[:, :, None, :], stds=box_stds)
  size = batch.get("image_size")
  if size is None:
    size = jnp.asarray(batch["image"].shape[1:3])
  else:
    size = jnp.asarray(size)[:, None, None, :]
  boxes = box_lib.clip(boxes, size)  # [B, P, C, 4]
  wh = boxes[..., 2:] - boxes[..., :2]
  ok = proposals.valid[..., None] & (scores > score_threshold) & jnp.all(wh >= min_size, axis=-1)
  det_boxes, det_scores, labels, valid = _per_class_nms(
      boxes, jnp.where(ok, scores, -jnp.inf), iou_threshold=nms_threshold,
      pre_nms_top_k=pre_nms_top_k, max_detections=max_detections, tile_size=DEFAULT_TILE_SIZE)
  if "valid" in batch:
    valid &= jnp.asarray(batch["valid"], bool)[:, None]
  det_boxes = jnp.where(valid[..., None], to_original_pixels(det_boxes, batch), 0.0)
  return Detections(boxes=det_boxes, scores=jnp.where(valid, det_scores, 0.0),
                    labels=jnp.where(valid, labels, -1), valid=valid)


# ----------------------------------------------------------------------------
# The detector.
# ----------------------------------------------------------------------------


class FasterRCNN(nn.Module):
  """Faster R-CNN with a ResNet-FPN backbone (defaults: R50-FPN, torchvision's settings).

  Attributes:
    num_classes: foreground classes (background is added internally).
    depth, widths, stem_width, norm, norm_eps, frozen_stages: the ResNet backbone
      (:class:`~jdet.models.backbones.resnet.ResNet`).
    fpn_channels: the FPN's width (256).
    strides: the strides of P2..P6 (4 .. 64).
    anchor_sizes: per level the anchor sizes (one per level: 32 .. 512).
    anchor_ratios: ratios ``h / w`` shared by all levels.
    rpn_pos_iou, rpn_neg_iou: RPN matching thresholds (0.7, 0.3).
    rpn_num_samples, rpn_positive_fraction: RPN sampling (256, 0.5).
    rpn_pre_nms_top_n, rpn_post_nms_top_n: ``(train, test)`` proposals per
      level before NMS and over all levels after it ((2000, 1000) each).
    rpn_nms_threshold, rpn_min_size, rpn_score_threshold: (0.7, 1e-3, 0).
    rpn_smooth_l1_beta: (1/9).
    roi_levels: how many FPN levels RoIAlign reads (4: P2..P5).
    roi_output_size, roi_sampling_ratio, roi_aligned: RoIAlign (7, 2, False).
    representation_size: width of the two fully connected layers (1024).
    rcnn_pos_iou, rcnn_neg_iou: RoI matching thresholds (0.5, 0.5).
    rcnn_num_samples, rcnn_positive_fraction: RoI sampling (512, 0.25).
    rcnn_box_stds: the head's offset scaling (0.1, 0.1, 0.2, 0.2: weights 10, 10, 5, 5).
    rcnn_smooth_l1_beta: (1/9).
    score_threshold, nms_threshold, max_detections, min_box_size: inference
      (0.05, 0.5, 100, 1e-2).
    pre_nms_top_k: candidates per class before the final NMS (None: all proposals).
    dtype: computation dtype of the networks (float32 or bfloat16); box maths is float32.
  """

  num_classes: int
  depth: int = 50
  widths: Sequence[int] = (64, 128, 256, 512)
  stem_width: int = 64
  norm: str = "frozen_bn"
  norm_eps: float = 1e-5
  frozen_stages: int = 1
  fpn_channels: int = 256
  strides: Sequence[int] = (4, 8, 16, 32, 64)
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
  roi_levels: int = 4
  roi_output_size: int = 7
  roi_sampling_ratio: int = 2
  roi_aligned: bool = False
  representation_size: int = 1024
  rcnn_pos_iou: float = 0.5
  rcnn_neg_iou: float = 0.5
  rcnn_num_samples: int = 512
  rcnn_positive_fraction: float = 0.25
  rcnn_box_stds: Sequence[float] = RCNN_BOX_STDS
  rcnn_smooth_l1_beta: float = 1.0 / 9
  score_threshold: float = 0.05
  nms_threshold: float = 0.5
  max_detections: int = 100
  min_box_size: float = 1e-2
  pre_nms_top_k: int | None = None
  dtype: Any = jnp.float32

  def setup(self):
    per_location = num_anchors_per_location(self._anchor_sizes(), self.anchor_ratios)
    if len(set(per_location)) != 1:
      raise ValueError(f"the shared RPN head needs as many anchors per location on every level; "
                       f"anchor_sizes {self.anchor_sizes} give {per_location}")
    self.backbone = ResNet(depth=self.depth, widths=tuple(self.widths), stem_width=self.stem_width,
                           norm=self.norm, norm_eps=self.norm_eps,
                           frozen_stages=self.frozen_stages,
                           out_stages=(1, 2, 3, 4), dtype=self.dtype)
    self.neck = FPN(out_channels=self.fpn_channels, extra="maxpool",
                    num_extra=len(self.strides) - 4, dtype=self.dtype)
    self.rpn_head = RPNHead(num_anchors=per_location[0], dtype=self.dtype)
    self.roi_head = RoIBoxHead(num_classes=self.num_classes,
                               representation_size=self.representation_size, dtype=self.dtype)

  def _anchor_sizes(self) -> list[tuple[float, ...]]:
    return [tuple(s) if isinstance(s, (tuple, list)) else (s,) for s in self.anchor_sizes]

  # --- Backbone, neck, RPN head, anchors ---------------------------------------

  def features(self, image, *, train: bool = False) -> list[jnp.ndarray]:
    """``image [B, H, W, 3]`` -> FPN levels ``[B, H / s, W / s, fpn_channels]``, P2 .. P6."""
    features = self.neck(self.backbone(image, train=train))
    if len(features) != len(self.strides):
      raise ValueError(f"the FPN gives {len(features)} levels, strides has {len(self.strides)}")
    return list(features)

  def rpn(self, features: Sequence[jnp.ndarray]):
    """-> ``(logits [B, A], deltas [B, A, 4], anchors [A, 4] (NumPy), level_sizes)``."""
    logits, deltas = self.rpn_head(features)
    sizes = [tuple(f.shape[1:3]) for f in features]
    anchors = multilevel_grid_anchors(sizes, self.strides, self._anchor_sizes(),
                                      self.anchor_ratios, concat=False)
    level_sizes = [a.shape[0] for a in anchors]
    anchors = np.concatenate(anchors, axis=0)
    if anchors.shape[0] != logits.shape[1]:
      raise ValueError(f"{anchors.shape[0]} anchors but the RPN head predicts {logits.shape[1]}")
    return logits, deltas, anchors, level_sizes

  # --- Proposals, RoI head --------------------------------------------------------

  def _proposals(self, logits, deltas, anchors, level_sizes, image_size, *,
                 train: bool) -> Proposals:
    i = 0 if train else 1

    def one(l, d, size):
      return rpn_proposals(l, d, anchors, level_sizes, size,
                           pre_nms_top_n=self.rpn_pre_nms_top_n[i],
                           post_nms_top_n=self.rpn_post_nms_top_n[i],
                           nms_threshold=self.rpn_nms_threshold, min_size=self.rpn_min_size,
                           score_threshold=self.rpn_score_threshold)

    boxes, scores, valid = jax.vmap(one)(jax.lax.stop_gradient(logits),
                                         jax.lax.stop_gradient(deltas), image_size)
    return Proposals(boxes=jax.lax.stop_gradient(boxes), scores=jax.lax.stop_gradient(scores),
                     valid=valid)

  def roi_features(self, features: Sequence[jnp.ndarray], rois) -> jnp.ndarray:
    """RoIAlign of ``rois [B, K, 4]`` from P2 .. P(1 + roi_levels) -> ``[B, K, S, S, C]``.

    Padding RoIs are pooled too (from real features): mask their results.
    """
    levels = list(features[:self.roi_levels])
    strides = tuple(self.strides[:self.roi_levels])

    def one(feats, r):
      return multilevel_roi_align(feats, r, strides=strides, output_size=self.roi_output_size,
                                  sampling_ratio=self.roi_sampling_ratio, aligned=self.roi_aligned)

    return jax.vmap(one)(levels, jax.lax.stop_gradient(rois))

  def __call__(self, image, image_size=None, *, train: bool = False):
    """The two-stage forward: ``(Proposals, logits [B, P, C + 1], deltas [B, P, C + 1, 4])``.

    ``image_size`` (``[B, 2]`` real ``(h, w)``) defaults to the whole input.
    """
    if image_size is None:
      image_size = _image_size({"image": image})
    features = self.features(image, train=train)
    logits, deltas, anchors, level_sizes = self.rpn(features)
    proposals = self._proposals(logits, deltas, anchors, level_sizes, image_size, train=train)
    cls_logits, box_deltas = self.roi_head(self.roi_features(features, proposals.boxes))
    return proposals, cls_logits, box_deltas

  # --- Training ---------------------------------------------------------------------

  def loss(self, batch, *, train: bool = True):
    """RPN + R-CNN losses of a batch -> ``(loss, metrics)``. Needs the ``"dropout"`` RNG
    (for sampling): ``model.apply(..., method="loss", rngs={"dropout": key})``."""
    image = batch["image"]
    b = image.shape[0]
    image_size = _image_size(batch)
    image_valid = jnp.asarray(batch.get("valid", jnp.ones((b,), bool)), bool)
    gt_boxes = box_lib.as_f32(batch["boxes"])
    gt_labels = jnp.where(image_valid[:, None], jnp.asarray(batch["labels"], jnp.int32), -1)

    features = self.features(image, train=train)
    logits, deltas, anchors, level_sizes = self.rpn(features)

    key_rpn, key_rcnn = jax.random.split(self.make_rng("dropout"))
    pos, neg, rpn_target = jax.vmap(
        lambda k, g, v: rpn_targets(k, anchors, g, v, pos_iou_thr=self.rpn_pos_iou,
                                    neg_iou_thr=self.rpn_neg_iou,
                                    num_samples=self.rpn_num_samples,
                                    positive_fraction=self.rpn_positive_fraction))(
        jax.random.split(key_rpn, b), gt_boxes, gt_labels >= 0)
    pos &= image_valid[:, None]
    neg &= image_valid[:, None]
    rpn_obj, rpn_box, _ = rpn_loss(logits, deltas, pos, neg, rpn_target,
                                   smooth_l1_beta=self.rpn_smooth_l1_beta)

    proposals = self._proposals(logits, deltas, anchors, level_sizes, image_size, train=train)
    rois, classes, rcnn_target, sampled = jax.vmap(
        lambda k, p, v, g, l: rcnn_targets(k, p, v, g, l, num_samples=self.rcnn_num_samples,
                                           positive_fraction=self.rcnn_positive_fraction,
                                           pos_iou_thr=self.rcnn_pos_iou,
                                           neg_iou_thr=self.rcnn_neg_iou,
                                           box_stds=self.rcnn_box_stds))(
        jax.random.split(key_rcnn, b), proposals.boxes, proposals.valid, gt_boxes, gt_labels)
    sampled &= image_valid[:, None]
    cls_logits, box_deltas = self.roi_head(self.roi_features(features, rois))
    rcnn_cls, rcnn_box, _ = rcnn_loss(cls_logits, box_deltas, classes, rcnn_target, sampled,
                                      smooth_l1_beta=self.rcnn_smooth_l1_beta)

    total = rpn_obj + rpn_box + rcnn_cls + rcnn_box
    num_images = jnp.maximum(jnp.sum(image_valid), 1).astype(jnp.float32)
    metrics = dict(
        rpn_cls_loss=rpn_obj, rpn_box_loss=rpn_box, cls_loss=rcnn_cls, box_loss=rcnn_box,
        rpn_num_pos=jnp.sum(pos).astype(jnp.float32) / num_images,
        num_pos=jnp.sum(sampled & (classes > 0)).astype(jnp.float32) / num_images,
        num_proposals=jnp.sum(proposals.valid & image_valid[:, None]).astype(jnp.float32)
        / num_images)
    return total, metrics

  # --- Inference -------------------------------------------------------------------

  def proposals(self, batch, *, train: bool = False) -> Proposals:
    """The RPN's proposals (input pixels) with the test-time (or training) numbers."""
    features = self.features(batch["image"], train=False)
    logits, deltas, anchors, level_sizes = self.rpn(features)
    return self._proposals(logits, deltas, anchors, level_sizes, _image_size(batch), train=train)

  def predict(self, batch) -> Detections:
    """Detections in original-image pixels, ``max_detections`` per image."""
    proposals, cls_logits, box_deltas = self(batch["image"], _image_size(batch), train=False)
    return decode_detections(cls_logits, box_deltas, proposals, batch,
                             score_threshold=self.score_threshold,
                             nms_threshold=self.nms_threshold, max_detections=self.max_detections,
                             min_size=self.min_box_size, pre_nms_top_k=self.pre_nms_top_k,
                             box_stds=self.rcnn_box_stds)


def _image_size(batch) -> jnp.ndarray:
  """``batch["image_size"]`` or, without it, the whole input: ``[B, 2]`` int32 ``(h, w)``."""
  if "image_size" in batch:
    return jnp.asarray(batch["image_size"], jnp.int32)
  image = batch["image"]
  return jnp.broadcast_to(jnp.asarray(image.shape[1:3], jnp.int32), (image.shape[0], 2))
