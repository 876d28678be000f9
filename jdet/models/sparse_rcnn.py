"""Sparse R-CNN: end-to-end detection with learnable proposals (Sun et al., CVPR 2021).

Read top to bottom as the paper's Figure 3:

1. **Body** (:class:`jdet.models.body.ResNetFPN`): ResNet-50 with frozen
   BatchNorm (stem and layer1 frozen) and an FPN, P2..P5 with 256 channels.
2. **Learnable proposals**: ``proposal_boxes [N, 4]`` in normalised
   ``(cx, cy, w, h)``, initialised to the whole image, scaled by each
   image's real ``(w, h, w, h)`` (after resizing, before padding), and
   ``proposal_features [N, 256]`` drawn from ``N(0, 1)``. N = 100 or 300.
3. **Six stages** (:class:`jdet.models.heads.sparse_rcnn_head.DynamicStage`,
   no weight sharing): RoIAlign 7x7 of every box from P2..P5
   (:func:`jdet.models.body.roi_features`, aligned, sampling ratio 2; no
   gradient through the boxes), self-attention between proposals, dynamic
   instance interaction, FFN, class and box towers, box update. Each stage
   passes its boxes (detached) and its proposal features (not detached) on.
4. **Set targets** (:func:`set_targets`): per stage and image a Hungarian
   matching of the N predictions to the image's ground truth
   (:func:`jdet.assign.match_columns`, host or jitted solver) on
   ``cost = 2 * focal + 5 * L1 (normalised xyxy) + 2 * (-GIoU)``, with no
   gradient through the cost.
5. **Set loss** (:func:`set_loss`): per stage ``2 * focal`` (over all
   ``N x num_classes`` logits) ``+ 5 * L1 + 2 * (1 - GIoU)`` (matched pairs),
   each summed and divided by the number of ground-truth boxes in the global
   batch (at least 1); six stages, 18 terms, all of weight 1. Images without
   objects contribute background focal terms only.
6. **Decode** (:func:`decode_detections`): last stage only, sigmoid scores
   of all ``N x num_classes`` pairs, the ``max_detections`` best (a class may
   take several proposals, a proposal several classes): no NMS, no threshold.

Fixed shapes: N is static, ground truth is padded to M with labels -1; the
matching takes the count of valid columns, so one compiled step serves every
batch. Focal loss, costs, GIoU and box decoding run in float32 whatever
``dtype`` the networks compute in.

Where the authors' code and MMDetection 3.3 differ, the fields choose:
``scale_clamp`` / ``symmetric_clamp`` (authors: ``dw, dh <= 8.74``;
MMDetection: ``|dw|, |dh| <= 4.135``), ``cost_eps`` (1e-8 / 1e-12).
The normaliser is the authors' (global ground-truth count, clamped at 1); it
equals MMDetection's (matched proposals) whenever no image has more boxes
than proposals.

Shapes: B images, N proposals, M padded ground-truth boxes, C classes, D
proposal feature width, T stages.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jdet import boxes as box_lib
from jdet import losses
from jdet.assign.hungarian import SOLVERS, match_columns
from jdet.detections import Detections
from jdet.models.body import BodyFields, ResNetFPN, frozen_body_parameters, roi_features
from jdet.models.detector import (build_from_fields, finalize_detections, gt_labels,
                                  real_image_sizes)
from jdet.models.heads.sparse_rcnn_head import DynamicStage, StageFields

__all__ = ["SparseRCNN", "StageOutputs", "SetTargets", "matching_cost", "set_targets",
           "set_loss", "decode_detections"]


@flax.struct.dataclass
class StageOutputs:
  """Every stage's predictions.

  Attributes:
    logits: ``[T, B, N, C]`` float32 class logits (sigmoid scores).
    boxes: ``[T, B, N, 4]`` float32 xyxy in input pixels (each stage's refined boxes).
    whwh: ``[B, 4]`` float32 ``(w, h, w, h)`` of each real image (input pixels).
  """

  logits: jnp.ndarray
  boxes: jnp.ndarray
  whwh: jnp.ndarray


@flax.struct.dataclass
class SetTargets:
  """One image's (or a batch's) Hungarian matching.

  Attributes:
    match: ``[..., M]`` int32, the proposal matched to each ground-truth box;
      -1 for padding.
    cost: ``[..., M]`` float32, the matching cost of each matched pair (0 for padding).
  """

  match: jnp.ndarray
  cost: jnp.ndarray


# ----------------------------------------------------------------------------
# Set targets: the Hungarian matching of one stage's predictions.
# ----------------------------------------------------------------------------


def matching_cost(logits, boxes, gt_boxes, gt_labels, whwh, *, class_weight: float = 2.0,
                  l1_weight: float = 5.0, giou_weight: float = 2.0, alpha: float = 0.25,
                  gamma: float = 2.0, eps: float = 1e-8) -> jnp.ndarray:
  """The matching cost of N predictions against M ground-truth boxes (one image).

  ``class_weight * (pos - neg)`` at the box's class, with ``p = sigmoid(logit)``,
  ``pos = alpha (1 - p)^gamma (-log(p + eps))`` and
  ``neg = (1 - alpha) p^gamma (-log(1 - p + eps))``; ``l1_weight *`` the L1
  distance of the xyxy boxes divided by ``whwh``; ``giou_weight * (-GIoU)`` in pixels.

  Args:
    logits: ``[N, C]``; boxes: ``[N, 4]`` xyxy.
    gt_boxes: ``[M, 4]`` xyxy; gt_labels: ``[M]`` int (padding: any value; its
      column is ignored by the matching).
    whwh: ``[4]`` the image's ``(w, h, w, h)``.
  Returns:
    ``[N, M]`` float32, without gradient.
  """
  logits, boxes, gt_boxes, whwh = (jax.lax.stop_gradient(box_lib.as_f32(v))
                                   for v in (logits, boxes, gt_boxes, whwh))
  p = jax.nn.sigmoid(logits)  # [N, C]
  neg = (1 - alpha) * p ** gamma * -jnp.log(1 - p + eps)
  pos = alpha * (1 - p) ** gamma * -jnp.log(p + eps)
  cls = jnp.take(pos - neg, jnp.clip(gt_labels, 0, logits.shape[-1] - 1), axis=-1)  # [N, M]
  l1 = jnp.sum(jnp.abs(boxes[:, None, :] / whwh - gt_boxes[None, :, :] / whwh), -1)  # [N, M]
  giou = box_lib.giou(boxes, gt_boxes)  # [N, M]
  return class_weight * cls + l1_weight * l1 - giou_weight * giou


def set_targets(logits, boxes, gt_boxes, gt_labels, whwh, *, solver: str = "host",
                **cost_kwargs) -> SetTargets:
  """Hungarian matching of every stage and image at once.

  Args:
    logits: ``[..., N, C]``; boxes: ``[..., N, 4]`` (any leading dims, e.g. ``[T, B]``).
    gt_boxes: ``[..., M, 4]``; gt_labels: ``[..., M]`` int, -1 for padding, valid
      boxes first (:func:`SparseRCNN.loss` reorders them).
    whwh: ``[..., 4]``.
    solver: ``"host"`` (scipy) or ``"jax"`` (:func:`jdet.assign.linear_sum_assignment`).
    cost_kwargs: weights of :func:`matching_cost`.
  """
  lead = logits.shape[:-2]
  gt_boxes = jnp.broadcast_to(gt_boxes, lead + gt_boxes.shape[-2:])
  gt_labels = jnp.broadcast_to(gt_labels, lead + gt_labels.shape[-1:])
  whwh = jnp.broadcast_to(whwh, lead + (4,))
  cost_fn = lambda l, b, g, c, s: matching_cost(l, b, g, c, s, **cost_kwargs)  # noqa: E731
  for _ in lead:
    cost_fn = jax.vmap(cost_fn)
  cost = cost_fn(logits, boxes, gt_boxes, gt_labels, whwh)  # [..., N, M]
  num_valid = jnp.sum(gt_labels >= 0, axis=-1)
  match = match_columns(cost, num_valid, solver=solver)  # [..., M]
  picked = jnp.take_along_axis(cost, jnp.maximum(match, 0)[..., None, :], axis=-2)[..., 0, :]
  return SetTargets(match=match, cost=jnp.where(match >= 0, picked, 0.0))


# ----------------------------------------------------------------------------
# Set loss.
# ----------------------------------------------------------------------------


def set_loss(logits, boxes, gt_boxes, gt_labels, whwh, match, *, normalizer,
             class_weight: float = 2.0, l1_weight: float = 5.0, giou_weight: float = 2.0,
             alpha: float = 0.25, gamma: float = 2.0):
  """One stage's loss terms over a batch, each already weighted.

  Args:
    logits: ``[B, N, C]``; boxes: ``[B, N, 4]`` xyxy (with gradient).
    gt_boxes: ``[B, M, 4]``; gt_labels: ``[B, M]`` (-1 padding).
    whwh: ``[B, 4]``.
    match: ``[B, M]`` the proposal of each box (-1: padding or unmatched).
    normalizer: scalar, the number of ground-truth boxes in the global batch (>= 1).
  Returns:
    ``(focal, l1, giou)``: ``class_weight * sum focal / normalizer`` over every
    logit (target 1 only at the matched proposal's box class), and
    ``l1_weight * sum |b / whwh - g / whwh|``, ``giou_weight * sum (1 - GIoU)``
    over the matched pairs, each divided by ``normalizer``.
  """
  logits, boxes = box_lib.as_f32(logits), box_lib.as_f32(boxes)
  gt_boxes, whwh = box_lib.as_f32(gt_boxes), box_lib.as_f32(whwh)
  b, n, c = logits.shape
  matched = match >= 0  # [B, M]
  rows = jnp.maximum(match, 0)
  # One-hot targets: 1 at (matched proposal, its box's class).
  target = jnp.zeros((b, n, c), logits.dtype)
  bi = jnp.broadcast_to(jnp.arange(b)[:, None], match.shape)
  target = target.at[bi, rows, jnp.clip(gt_labels, 0, c - 1)].max(matched.astype(logits.dtype))
  focal = losses.sigmoid_focal(logits, target, alpha=alpha, gamma=gamma, normalizer=normalizer)
  pred = jnp.take_along_axis(boxes, rows[..., None], axis=1)  # [B, M, 4]
  pred = jnp.where(matched[..., None], pred, gt_boxes)  # unmatched rows: exactly 0 loss
  l1 = losses.l1(pred / whwh[:, None], gt_boxes / whwh[:, None], weights=matched[..., None],
                 normalizer=normalizer)
  safe_gt = jnp.where(matched[..., None], gt_boxes, jnp.asarray([0.0, 0.0, 1.0, 1.0]))
  giou = losses.giou_loss(jnp.where(matched[..., None], pred, safe_gt), safe_gt,
                          weights=matched, normalizer=normalizer)
  return class_weight * focal, l1_weight * l1, giou_weight * giou


# ----------------------------------------------------------------------------
# Decoding.
# ----------------------------------------------------------------------------


def decode_detections(logits, boxes, batch, *, max_detections: int) -> Detections:
  """The last stage's ``logits [B, N, C]`` and ``boxes [B, N, 4]`` -> :class:`Detections`.

  The ``max_detections`` best of the ``N x C`` sigmoid scores, each with its
  proposal's box, clipped to the image and mapped to original pixels; boxes
  left empty by the clipping are invalid. No NMS, no score threshold.
  """
  b, n, c = logits.shape
  k = min(int(max_detections), n * c)
  scores = jax.nn.sigmoid(box_lib.as_f32(logits)).reshape(b, n * c)
  top, idx = jax.lax.top_k(scores, k)  # [B, K]
  det = jnp.take_along_axis(box_lib.as_f32(boxes), (idx // c)[..., None], axis=1)  # [B, K, 4]
  det = box_lib.clip(det, real_image_sizes(batch)[:, None, :])
  valid = box_lib.is_valid(det)
  return finalize_detections(det, top, idx % c, valid, batch, max_detections=max_detections)


# ----------------------------------------------------------------------------
# The detector.
# ----------------------------------------------------------------------------


class SparseRCNN(BodyFields, StageFields):
  """Sparse R-CNN with a ResNet-FPN body (defaults: R50-FPN, 100 proposals, the authors' settings).

  Attributes:
    the body's (:class:`~jdet.models.body.BodyFields`: depth, widths, stem_width,
      norm, norm_eps, frozen_stages, fpn_channels; P2..P5),
    every stage's (:class:`~jdet.models.heads.sparse_rcnn_head.StageFields`:
      num_classes, num_heads, dim_feedforward, dim_dynamic, num_cls_fcs,
      num_reg_fcs, dropout, prior_prob, scale_clamp, symmetric_clamp; the
      proposal feature width is ``fpn_channels``), and
    num_proposals: N (100 or 300).
    num_stages: T (6), each with its own weights.
    roi_output_size, roi_sampling_ratio: RoIAlign (7, 2; aligned).
    class_weight, l1_weight, giou_weight: of both the matching cost and the
      loss (2, 5, 2).
    focal_alpha, focal_gamma: (0.25, 2).
    cost_eps: inside the focal cost's logarithms (1e-8; MMDetection 1e-12).
    matcher: ``"host"`` (scipy through a callback) or ``"jax"`` (jitted solver).
    max_detections: K per image (100; use N = 300 for the 300-proposal model).
    dtype: computation dtype of the networks; box maths, costs and losses are float32.
  """

  num_proposals: int = 100
  num_stages: int = 6
  roi_output_size: int = 7
  roi_sampling_ratio: int = 2
  class_weight: float = 2.0
  l1_weight: float = 5.0
  giou_weight: float = 2.0
  focal_alpha: float = 0.25
  focal_gamma: float = 2.0
  cost_eps: float = 1e-8
  matcher: str = "host"
  max_detections: int = 100

  def setup(self):
    if self.matcher not in SOLVERS:
      raise ValueError(f"matcher must be one of {SOLVERS}, got {self.matcher!r}")
    self.body = build_from_fields(ResNetFPN, self, num_extra=0)  # P2..P5
    nn.share_scope(self, self.body)  # variables: backbone/..., neck/...
    n, d = self.num_proposals, self.fpn_channels
    self.proposal_boxes = self.param(
        "proposal_boxes", lambda key, shape: jnp.tile(jnp.asarray([0.5, 0.5, 1.0, 1.0]),
                                                      (shape[0], 1)), (n, 4))
    self.proposal_features = self.param("proposal_features", nn.initializers.normal(1.0), (n, d))
    self.stages = [build_from_fields(DynamicStage, self, name=f"stage{t}")
                   for t in range(self.num_stages)]

  def frozen_parameters(self) -> tuple[str, ...]:
    """Regexps of the parameters that never train (the frozen ResNet stages)."""
    return frozen_body_parameters(self.frozen_stages)

  # --- Body, proposals, stages -------------------------------------------------

  def __call__(self, image, image_size=None, *, train: bool = False) -> StageOutputs:
    """``image [B, H, W, 3]`` (real sizes ``image_size [B, 2]``, default the whole
    input) -> every stage's outputs (:meth:`stage_outputs`)."""
    batch = {"image": image}
    if image_size is not None:
      batch["image_size"] = image_size
    return self.stage_outputs(batch, train=train)

  def stage_outputs(self, batch, *, train: bool = False) -> StageOutputs:
    """Runs the body and every stage on ``batch["image"]`` -> :class:`StageOutputs`."""
    image = batch["image"]
    b = image.shape[0]
    features = self.body(image, train=train)  # P2..P5
    size = real_image_sizes(batch).astype(jnp.float32)  # [B, 2] (h, w)
    whwh = jnp.stack([size[:, 1], size[:, 0], size[:, 1], size[:, 0]], axis=-1)  # [B, 4]
    boxes = box_lib.cxcywh_to_xyxy(box_lib.as_f32(self.proposal_boxes))[None] * whwh[:, None]
    x = jnp.broadcast_to(self.proposal_features, (b,) + self.proposal_features.shape)
    all_logits, all_boxes = [], []
    for stage in self.stages:
      roi = roi_features(features, boxes, strides=self.body.strides,
                         output_size=self.roi_output_size,
                         sampling_ratio=self.roi_sampling_ratio, aligned=True)  # [B, N, 7, 7, D]
      logits, new_boxes, x = stage(roi, x, boxes, train=train)
      all_logits.append(logits)
      all_boxes.append(new_boxes)
      boxes = jax.lax.stop_gradient(new_boxes)
    return StageOutputs(logits=jnp.stack(all_logits), boxes=jnp.stack(all_boxes), whwh=whwh)

  def _cost_kwargs(self) -> dict[str, float]:
    return dict(class_weight=self.class_weight, l1_weight=self.l1_weight,
                giou_weight=self.giou_weight, alpha=self.focal_alpha, gamma=self.focal_gamma,
                eps=self.cost_eps)

  def targets(self, outputs: StageOutputs, batch) -> SetTargets:
    """Every stage's matching: ``match [T, B, M]`` in the batch's box order."""
    gt_boxes, labels = box_lib.as_f32(batch["boxes"]), gt_labels(batch)
    order = jnp.argsort(labels < 0, axis=-1, stable=True)  # valid boxes first
    sorted_boxes = jnp.take_along_axis(gt_boxes, order[..., None], -2)
    sorted_labels = jnp.take_along_axis(labels, order, -1)
    t = set_targets(outputs.logits, outputs.boxes, sorted_boxes, sorted_labels, outputs.whwh,
                    solver=self.matcher, **self._cost_kwargs())
    inverse = jnp.argsort(order, axis=-1)  # back to the batch's order
    return SetTargets(match=jnp.take_along_axis(t.match, jnp.broadcast_to(inverse, t.match.shape), -1),
                      cost=jnp.take_along_axis(t.cost, jnp.broadcast_to(inverse, t.cost.shape), -1))

  # --- Training ------------------------------------------------------------------

  def loss(self, batch, *, train: bool = True):
    """The set loss of every stage -> ``(loss, metrics)``.

    ``metrics`` holds the 18 weighted terms ``s{t}_loss_cls``, ``s{t}_loss_bbox``
    (L1), ``s{t}_loss_iou`` (GIoU), their sums over stages (``cls_loss``,
    ``l1_loss``, ``giou_loss``), ``num_gt`` (per image) and ``matched_iou``
    (the last stage's mean IoU of matched pairs).
    """
    outputs = self.stage_outputs(batch, train=train)
    labels = gt_labels(batch)
    gt_boxes = box_lib.as_f32(batch["boxes"])
    targets = self.targets(outputs, batch)
    num_gt = jnp.sum(labels >= 0).astype(jnp.float32)  # the global batch under jit
    normalizer = jnp.maximum(num_gt, 1.0)
    metrics, total = {}, 0.0
    weights = dict(class_weight=self.class_weight, l1_weight=self.l1_weight,
                   giou_weight=self.giou_weight, alpha=self.focal_alpha, gamma=self.focal_gamma)
    for t in range(self.num_stages):
      cls, l1, giou = set_loss(outputs.logits[t], outputs.boxes[t], gt_boxes, labels,
                               outputs.whwh, targets.match[t], normalizer=normalizer, **weights)
      metrics.update({f"s{t}_loss_cls": cls, f"s{t}_loss_bbox": l1, f"s{t}_loss_iou": giou})
      total = total + cls + l1 + giou
    for name, key in (("cls_loss", "loss_cls"), ("l1_loss", "loss_bbox"),
                      ("giou_loss", "loss_iou")):
      metrics[name] = sum(metrics[f"s{t}_{key}"] for t in range(self.num_stages))
    last = targets.match[-1]
    pred = jnp.take_along_axis(outputs.boxes[-1], jnp.maximum(last, 0)[..., None], axis=1)
    iou = box_lib.aligned_iou(jax.lax.stop_gradient(pred), gt_boxes)
    metrics["matched_iou"] = jnp.sum(jnp.where(last >= 0, iou, 0.0)) / normalizer
    num_images = jnp.maximum(jnp.sum(batch.get("valid", jnp.ones(labels.shape[:1], bool))), 1)
    metrics["num_gt"] = num_gt / num_images.astype(jnp.float32)
    return total, metrics

  # --- Inference -------------------------------------------------------------------

  def predict(self, batch) -> Detections:
    """Detections in original-image pixels: the last stage's ``max_detections`` best pairs."""
    outputs = self.stage_outputs(batch, train=False)
    return decode_detections(outputs.logits[-1], outputs.boxes[-1], batch,
                             max_detections=self.max_detections)

