"""Faster R-CNN with a ResNet-FPN backbone (Ren et al., NeurIPS 2015; Lin et al., CVPR 2017).

As torchvision's ``fasterrcnn_resnet50_fpn`` computes it (converted weights give
its proposals and detections: ``tests/convert/test_torchvision_faster_rcnn.py``),
read top to bottom:

1. **Body** (:class:`jdet.models.body.ResNetFPN`, shared with Sparse R-CNN):
   ResNet C2..C5 at strides 4..32 (frozen BatchNorm and a frozen stem +
   stage 1 by default), FPN P2..P5 with 256 channels, P6 by max-pooling P5
   (stride 64).
2. **RPN head** (:class:`jdet.models.heads.rpn_head.RPNHead`): on every level a
   3x3 conv, then 1 objectness logit and 4 offsets per anchor.
3. **Anchors** (:func:`jdet.ops.anchors.multilevel_grid_anchors`): sizes 32,
   64, 128, 256, 512 on P2..P6, ratios 0.5, 1, 2 (3 per location), as
   torchvision's ``AnchorGenerator``; level ``l`` has stride ``strides[l]``.
4. **RPN targets and loss** (:mod:`jdet.models.rpn`: :func:`rpn_targets`, :func:`rpn_loss`): max-IoU
   matching (positive at IoU >= 0.7, negative below 0.3, plus each box's best
   anchors), 256 anchors sampled per image at most half positive; binary
   cross-entropy and smooth L1 (beta 1/9), both divided by the number of
   sampled anchors in the batch.
5. **Proposals** (:func:`jdet.models.rpn.rpn_proposals`): per level the ``pre_nms_top_n``
   best anchors by objectness (2000 in training, 1000 at test), decoded,
   clipped to the image, tiny boxes dropped, NMS at 0.7 per level, then the
   ``post_nms_top_n`` best over all levels (2000 / 1000), padded and masked.
   No gradient flows through them.
6. **RoI sampling** (:func:`rcnn_targets`): the ground-truth boxes join the
   proposals; max-IoU matching at 0.5 (no low-quality matches); 512 RoIs
   sampled per image at most a quarter positive, gathered into a fixed-size
   set with a mask.
7. **RoI head** (:class:`jdet.models.heads.roi_head.RoIBoxHead`): multi-level
   RoIAlign 7x7 (:func:`jdet.models.body.roi_features`, sampling
   ratio 2, ``aligned=False``, P2..P5 by the 224 / level-4 rule, as
   torchvision's ``MultiScaleRoIAlign``), two fully connected layers of 1024,
   ``num_classes + 1`` class logits (background 0) and per-class offsets
   (weights 10, 10, 5, 5).
8. **R-CNN loss** (:func:`rcnn_loss`): softmax cross-entropy and smooth L1
   (beta 1/9) at the target class, both divided by the number of sampled RoIs.
9. **Decode** (:func:`decode_detections`): softmax, per-class boxes from the
   proposals, clipped, score > 0.05, tiny boxes dropped, per-class NMS at
   0.5, the 100 best per image, in original image pixels.

The detector's fields come in groups it inherits: the body's
(:class:`~jdet.models.body.BodyFields`), the RPN's
(:class:`~jdet.models.rpn.RPNFields`: anchors and ``rpn_*``) and the second
stage's (:class:`RCNNFields`: ``roi_*``, ``rcnn_*`` and inference).

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

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdet import boxes as box_lib
from jdet import losses
from jdet.assign.max_iou import max_iou_assign
from jdet.assign.sampling import sample_balanced
from jdet.detections import Detections
from jdet.models.body import BodyFields, ResNetFPN, frozen_body_parameters, roi_features
from jdet.models.detector import (build_from_fields, encode_positives, finalize_detections,
                                  gt_labels, image_valid, real_image_sizes)
from jdet.models.heads.roi_head import RoIBoxHead
from jdet.models.heads.rpn_head import RPNHead
from jdet.models.rpn import (RPN_BOX_STDS, Proposals, RPNFields, rpn_loss, rpn_proposals,
                             rpn_targets)
from jdet.ops.anchors import multilevel_grid_anchors, num_anchors_per_location
from jdet.ops.nms import class_specific_nms

__all__ = ["FasterRCNN", "RCNNFields", "rcnn_targets", "rcnn_loss", "decode_detections",
           "RCNN_BOX_STDS",
           # the RPN stage, from jdet.models.rpn:
           "Proposals", "rpn_targets", "rpn_loss", "rpn_proposals", "RPN_BOX_STDS"]

# The R-CNN head's offsets are scaled by 10, 10, 5, 5 (the RPN's are plain: RPN_BOX_STDS).
RCNN_BOX_STDS = (0.1, 0.1, 0.2, 0.2)


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
  deltas = encode_positives(gt_boxes[matched], rois, is_pos, stds=box_stds)
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
  scores = jax.nn.softmax(box_lib.as_f32(logits), axis=-1)[..., 1:]  # [B, P, C]
  boxes = box_lib.decode(deltas[..., 1:, :], proposals.boxes[:, :, None, :], stds=box_stds)
  boxes = box_lib.clip(boxes, real_image_sizes(batch)[:, None, None, :])  # [B, P, C, 4]
  wh = boxes[..., 2:] - boxes[..., :2]
  ok = proposals.valid[..., None] & (scores > score_threshold) & jnp.all(wh >= min_size, axis=-1)
  det_boxes, det_scores, labels, valid = class_specific_nms(
      boxes, jnp.where(ok, scores, -jnp.inf), iou_threshold=nms_threshold,
      pre_nms_top_k=pre_nms_top_k, max_detections=max_detections)
  return finalize_detections(det_boxes, det_scores, labels, valid, batch,
                             max_detections=max_detections)


# ----------------------------------------------------------------------------
# The detector.
# ----------------------------------------------------------------------------


class RCNNFields(nn.Module):
  """The second stage's settings (torchvision's values), which Faster R-CNN inherits.

  Attributes:
    roi_levels: how many FPN levels RoIAlign reads (4: P2..P5).
    roi_output_size, roi_sampling_ratio, roi_aligned: RoIAlign (7, 2, False).
    representation_size: width of the RoI head's two fully connected layers (1024).
    rcnn_pos_iou, rcnn_neg_iou: RoI matching thresholds of :func:`rcnn_targets` (0.5, 0.5).
    rcnn_num_samples, rcnn_positive_fraction: its sampling (512, 0.25).
    rcnn_box_stds: the head's offset scaling (0.1, 0.1, 0.2, 0.2: weights 10, 10, 5, 5).
    rcnn_smooth_l1_beta: of :func:`rcnn_loss` (1/9).
    score_threshold, nms_threshold, max_detections, min_box_size: inference
      (:func:`decode_detections`: 0.05, 0.5, 100, 1e-2).
    pre_nms_top_k: candidates per class before the final NMS (None: all proposals).
  """

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


class FasterRCNN(BodyFields, RPNFields, RCNNFields, kw_only=True):
  """Faster R-CNN with a ResNet-FPN backbone (defaults: R50-FPN, torchvision's settings).

  Attributes:
    the body's (:class:`~jdet.models.body.BodyFields`: depth, widths, stem_width,
      norm, norm_eps, frozen_stages, fpn_channels, dtype),
    the RPN's (:class:`~jdet.models.rpn.RPNFields`: anchor_sizes, anchor_ratios,
      rpn_pos_iou, rpn_neg_iou, rpn_num_samples, rpn_positive_fraction,
      rpn_pre_nms_top_n, rpn_post_nms_top_n, rpn_nms_threshold, rpn_min_size,
      rpn_score_threshold, rpn_smooth_l1_beta),
    the second stage's (:class:`RCNNFields`: roi_levels, roi_output_size,
      roi_sampling_ratio, roi_aligned, representation_size, rcnn_pos_iou,
      rcnn_neg_iou, rcnn_num_samples, rcnn_positive_fraction, rcnn_box_stds,
      rcnn_smooth_l1_beta, score_threshold, nms_threshold, max_detections,
      min_box_size, pre_nms_top_k), and
    num_classes: foreground classes (background is added internally).
    strides: the strides of P2..P6 (4 .. 64), of the anchors and of RoIAlign.
  """

  num_classes: int
  strides: Sequence[int] = (4, 8, 16, 32, 64)

  def setup(self):
    per_location = num_anchors_per_location(self._anchor_sizes(), self.anchor_ratios)
    if len(set(per_location)) != 1:
      raise ValueError(f"the shared RPN head needs as many anchors per location on every level; "
                       f"anchor_sizes {self.anchor_sizes} give {per_location}")
    self.body = build_from_fields(ResNetFPN, self, num_extra=len(self.strides) - 4)
    nn.share_scope(self, self.body)  # variables: backbone/..., neck/...
    self.rpn_head = RPNHead(num_anchors=per_location[0], dtype=self.dtype)
    self.roi_head = RoIBoxHead(num_classes=self.num_classes,
                               representation_size=self.representation_size, dtype=self.dtype)

  def _anchor_sizes(self) -> list[tuple[float, ...]]:
    return [tuple(s) if isinstance(s, (tuple, list)) else (s,) for s in self.anchor_sizes]

  # --- Backbone, neck, RPN head, anchors ---------------------------------------

  def features(self, image, *, train: bool = False) -> list[jnp.ndarray]:
    """``image [B, H, W, 3]`` -> FPN levels ``[B, H / s, W / s, fpn_channels]``, P2 .. P6."""
    features = self.body(image, train=train)
    if len(features) != len(self.strides):
      raise ValueError(f"the FPN gives {len(features)} levels, strides has {len(self.strides)}")
    return list(features)

  def rpn(self, features: Sequence[jnp.ndarray]):
    """-> ``(logits [B, A], deltas [B, A, 4], anchors [A, 4] (NumPy), level_counts)``."""
    logits, deltas = self.rpn_head(features)
    sizes = [tuple(f.shape[1:3]) for f in features]
    anchors = multilevel_grid_anchors(sizes, self.strides, self._anchor_sizes(),
                                      self.anchor_ratios, concat=False)
    level_counts = [a.shape[0] for a in anchors]
    anchors = np.concatenate(anchors, axis=0)
    if anchors.shape[0] != logits.shape[1]:
      raise ValueError(f"{anchors.shape[0]} anchors but the RPN head predicts {logits.shape[1]}")
    return logits, deltas, anchors, level_counts

  # --- Proposals, RoI head --------------------------------------------------------

  def _proposals(self, logits, deltas, anchors, level_counts, image_size, *,
                 train: bool) -> Proposals:
    i = 0 if train else 1

    def one(l, d, size):
      return rpn_proposals(l, d, anchors, level_counts, size,
                           pre_nms_top_n=self.rpn_pre_nms_top_n[i],
                           post_nms_top_n=self.rpn_post_nms_top_n[i],
                           nms_threshold=self.rpn_nms_threshold, min_size=self.rpn_min_size,
                           score_threshold=self.rpn_score_threshold)

    boxes, scores, valid = jax.vmap(one)(jax.lax.stop_gradient(logits),
                                         jax.lax.stop_gradient(deltas), image_size)
    return Proposals(boxes=jax.lax.stop_gradient(boxes), scores=jax.lax.stop_gradient(scores),
                     valid=valid)

  def roi_features(self, features: Sequence[jnp.ndarray], rois) -> jnp.ndarray:
    """RoIAlign of ``rois [B, R, 4]`` from P2 .. P(1 + roi_levels) -> ``[B, R, s, s, D]``
    (:func:`jdet.models.body.roi_features`; padding RoIs are pooled too: mask them)."""
    return roi_features(features, rois, strides=tuple(self.strides[:self.roi_levels]),
                        output_size=self.roi_output_size,
                        sampling_ratio=self.roi_sampling_ratio, aligned=self.roi_aligned)

  def frozen_parameters(self) -> tuple[str, ...]:
    """Regexps of the parameters that never train (the frozen ResNet stages)."""
    return frozen_body_parameters(self.frozen_stages)

  def __call__(self, image, image_size=None, *, train: bool = False):
    """The two-stage forward: ``(Proposals, logits [B, P, C + 1], deltas [B, P, C + 1, 4])``.

    ``image_size`` (``[B, 2]`` real ``(h, w)``) defaults to the whole input.
    """
    if image_size is None:
      image_size = real_image_sizes({"image": image})
    features = self.features(image, train=train)
    logits, deltas, anchors, level_counts = self.rpn(features)
    proposals = self._proposals(logits, deltas, anchors, level_counts, image_size, train=train)
    cls_logits, box_deltas = self.roi_head(self.roi_features(features, proposals.boxes))
    return proposals, cls_logits, box_deltas

  # --- Training ---------------------------------------------------------------------

  def loss(self, batch, *, train: bool = True):
    """RPN + R-CNN losses of a batch -> ``(loss, metrics)``. Needs the ``"sampling"`` RNG
    (for sampling): ``model.apply(..., method="loss", rngs={"sampling": key})``."""
    image = batch["image"]
    b = image.shape[0]
    image_size = real_image_sizes(batch)
    valid_images = image_valid(batch)
    gt_boxes = box_lib.as_f32(batch["boxes"])
    labels = gt_labels(batch)

    features = self.features(image, train=train)
    logits, deltas, anchors, level_counts = self.rpn(features)

    key_rpn, key_rcnn = jax.random.split(self.make_rng("sampling"))
    pos, neg, rpn_target = jax.vmap(
        lambda k, g, v: rpn_targets(k, anchors, g, v, pos_iou_thr=self.rpn_pos_iou,
                                    neg_iou_thr=self.rpn_neg_iou,
                                    num_samples=self.rpn_num_samples,
                                    positive_fraction=self.rpn_positive_fraction))(
        jax.random.split(key_rpn, b), gt_boxes, labels >= 0)
    pos &= valid_images[:, None]
    neg &= valid_images[:, None]
    rpn_obj, rpn_box, _ = rpn_loss(logits, deltas, pos, neg, rpn_target,
                                   smooth_l1_beta=self.rpn_smooth_l1_beta)

    proposals = self._proposals(logits, deltas, anchors, level_counts, image_size, train=train)
    rois, classes, rcnn_target, sampled = jax.vmap(
        lambda k, p, v, g, l: rcnn_targets(k, p, v, g, l, num_samples=self.rcnn_num_samples,
                                           positive_fraction=self.rcnn_positive_fraction,
                                           pos_iou_thr=self.rcnn_pos_iou,
                                           neg_iou_thr=self.rcnn_neg_iou,
                                           box_stds=self.rcnn_box_stds))(
        jax.random.split(key_rcnn, b), proposals.boxes, proposals.valid, gt_boxes, labels)
    sampled &= valid_images[:, None]
    cls_logits, box_deltas = self.roi_head(self.roi_features(features, rois))
    rcnn_cls, rcnn_box, _ = rcnn_loss(cls_logits, box_deltas, classes, rcnn_target, sampled,
                                      smooth_l1_beta=self.rcnn_smooth_l1_beta)

    total = rpn_obj + rpn_box + rcnn_cls + rcnn_box
    num_images = jnp.maximum(jnp.sum(valid_images), 1).astype(jnp.float32)
    metrics = dict(
        rpn_cls_loss=rpn_obj, rpn_box_loss=rpn_box, cls_loss=rcnn_cls, box_loss=rcnn_box,
        rpn_num_pos=jnp.sum(pos).astype(jnp.float32) / num_images,
        num_pos=jnp.sum(sampled & (classes > 0)).astype(jnp.float32) / num_images,
        num_proposals=jnp.sum(proposals.valid & valid_images[:, None]).astype(jnp.float32)
        / num_images)
    return total, metrics

  # --- Inference -------------------------------------------------------------------

  def proposals(self, batch, *, train: bool = False) -> Proposals:
    """The RPN's proposals (input pixels) with the test-time (or training) numbers."""
    features = self.features(batch["image"], train=False)
    logits, deltas, anchors, level_counts = self.rpn(features)
    return self._proposals(logits, deltas, anchors, level_counts, real_image_sizes(batch),
                           train=train)

  def predict(self, batch) -> Detections:
    """Detections in original-image pixels, ``max_detections`` per image."""
    proposals, cls_logits, box_deltas = self(batch["image"], real_image_sizes(batch), train=False)
    return decode_detections(cls_logits, box_deltas, proposals, batch,
                             score_threshold=self.score_threshold,
                             nms_threshold=self.nms_threshold, max_detections=self.max_detections,
                             min_size=self.min_box_size, pre_nms_top_k=self.pre_nms_top_k,
                             box_stds=self.rcnn_box_stds)

