"""RefineDet: Single-Shot Refinement Neural Network (Zhang et al., CVPR 2018).

Read top to bottom as the paper's Fig. 2:

1. **Backbone** (:class:`jdet.models.backbones.vgg.VGG16` with ``pool5_stride=2``,
   fc6 dilated by 3, conv6_1/conv6_2): four source maps at strides 8, 16, 32
   and 64, conv4_3 and conv5_3 L2-normalised (scales 10 and 8), fc7 and
   conv6_2; 40, 20, 10 and 5 pixels wide for a 320x320 input.
2. **Anchors** (:meth:`RefineDet.anchors`): one size per level, 4 x stride
   (32, 64, 128, 256 pixels), ratios 1/2, 1, 2: 6375 for RefineDet320.
3. **ARM**, the anchor refinement module (an :class:`SSDHead` with 2 classes):
   per level a 3x3 conv for (background, object) scores and one for 4 offsets
   per anchor. Its offsets move the anchors: the *refined anchors*.
4. **TCB**, the transfer connection blocks
   (:class:`jdet.models.heads.refinedet_head.TransferConnectionBlock`): the
   ARM's source features, top-down, each added to the 2x deconvolution of the
   level above, 256 channels.
5. **ODM**, the object detection module (an :class:`SSDHead` with
   ``num_classes + 1`` classes) on the TCB's maps: scores and offsets relative
   to the refined anchors, the second step of the cascaded regression.
6. **Targets** (:func:`refinedet_targets`): the ARM is matched as SSD is
   (:func:`jdet.models.multibox.ssd_targets`: best anchor forced, then IoU >= 0.5)
   on the anchors with a single "object" class; the ODM the same way on the
   refined anchors (ARM offsets decoded with variances 0.1/0.2, no gradient).
   **Negative anchor filtering**: anchors whose ARM background probability
   exceeds 0.99 are masked out of the ODM's loss, neither positive nor
   negative; they stay in every array, so shapes never change.
7. **Loss** (:func:`refinedet_loss`): SSD's multibox loss (:func:`ssd_loss`:
   softmax cross-entropy with 3:1 hard negative mining plus smooth L1) for the
   ARM and for the ODM, each divided by its own number of positives, summed.
8. **Decode** (:meth:`RefineDet.predict`): anchors -> ARM -> ODM boxes, the
   ODM's softmax with filtered anchors' scores set to 0, per class the 1000
   best above 0.01, NMS at 0.45, the ``max_detections`` best, mapped back to
   the original image's pixels.

What the filtering masks differs between the released implementations: the
Caffe code (``MineHardExamples`` with ``objectness_score``) keeps filtered
anchors that matched an object as positives and only stops mining the
filtered negatives; the PyTorch port (luuuyi/RefineDet.PyTorch) drops
filtered positives but may still mine filtered negatives. This file follows
the paper ("we only pass the refined hard negative anchor boxes and refined
positive anchor boxes to train the ODM"): filtered anchors are neither.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jdet import boxes as box_lib
from jdet.detections import Detections
from jdet.models.backbones.vgg import REFINEDET_EXTRAS, VGG16, VGGFields
from jdet.models.detector import build_from_fields, image_valid, real_image_sizes
from jdet.models.heads.refinedet_head import TransferConnectionBlock
from jdet.models.heads.ssd_head import SSDHead
from jdet.models.multibox import (SSD_BOX_STDS, MultiBoxFields, multibox_predict, ssd_loss,
                                  ssd_targets)
from jdet.ops.anchors import ssd_default_boxes

__all__ = ["RefineDet", "RefineDetOutputs", "RefineDetTargets", "refine_anchors",
           "negative_anchor_filter", "refinedet_targets", "refinedet_loss",
           "refinedet_candidates"]


@flax.struct.dataclass
class RefineDetOutputs:
  """The raw outputs of :class:`RefineDet` for a batch of B images and A anchors.

  Attributes:
    arm_logits: ``[B, A, 2]`` float32 ARM scores, (background, object).
    arm_deltas: ``[B, A, 4]`` float32 ARM offsets against ``anchors``.
    odm_logits: ``[B, A, C + 1]`` float32 ODM scores, background first.
    odm_deltas: ``[B, A, 4]`` float32 ODM offsets against the refined anchors.
    anchors: ``[A, 4]`` float32 xyxy anchors in input pixels.
  """

  arm_logits: jnp.ndarray
  arm_deltas: jnp.ndarray
  odm_logits: jnp.ndarray
  odm_deltas: jnp.ndarray
  anchors: jnp.ndarray


# ----------------------------------------------------------------------------
# Two-step regression and negative anchor filtering: pure functions.
# ----------------------------------------------------------------------------


def refine_anchors(anchors, arm_deltas, *, box_stds: Sequence[float] = SSD_BOX_STDS):
  """The ARM's step: ``anchors [A, 4]`` moved by ``arm_deltas [B, A, 4]`` ->
  ``[B, A, 4]`` xyxy refined anchors, without gradient (the ODM's targets and
  boxes are relative to them, but do not train the ARM)."""
  return jax.lax.stop_gradient(box_lib.decode(arm_deltas, anchors, stds=box_stds))


def negative_anchor_filter(arm_logits, *, threshold: float = 0.99):
  """``[B, A]`` bool, True for the anchors the ODM ignores: those whose ARM
  background probability ``softmax(arm_logits)[..., 0]`` exceeds ``threshold``
  (0.99; Caffe's ``objectness_score`` 0.01). No gradient flows through it."""
  logits = jax.lax.stop_gradient(jnp.asarray(arm_logits, jnp.float32))
  return jax.nn.softmax(logits, axis=-1)[..., 0] > threshold


# ----------------------------------------------------------------------------
# Targets and loss: pure functions.
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class RefineDetTargets:
  """Training targets of a batch (``[B, A]`` / ``[B, A, 4]``), from :func:`refinedet_targets`.

  Attributes:
    arm_classes: int32, 1 where an anchor matches an object, else 0.
    arm_deltas: float32 offsets of the matched box against the anchor (0 elsewhere).
    arm_positive: bool, the ARM's positives.
    odm_classes: int32, ``c + 1`` for a positive of class ``c``, else 0.
    odm_deltas: float32 offsets of the matched box against the refined anchor
      (0 elsewhere).
    odm_positive: bool, the ODM's positives (never a filtered anchor).
    odm_valid: bool, False for the filtered anchors: not positive, not negative.
  """

  arm_classes: jnp.ndarray
  arm_deltas: jnp.ndarray
  arm_positive: jnp.ndarray
  odm_classes: jnp.ndarray
  odm_deltas: jnp.ndarray
  odm_positive: jnp.ndarray
  odm_valid: jnp.ndarray


def refinedet_targets(anchors, arm_logits, arm_deltas, gt_boxes, gt_labels, *,
                      match_iou: float = 0.5, box_stds: Sequence[float] = SSD_BOX_STDS,
                      filter_threshold: float = 0.99) -> RefineDetTargets:
  """The targets of both modules for a batch, on device, with fixed shapes.

  ARM: :func:`ssd_targets` on the anchors, every object being class 0 (so
  ``arm_classes`` is 1 for an object, 0 for background). ODM: :func:`ssd_targets`
  on each image's refined anchors (:func:`refine_anchors`) with the real
  classes; then the anchors of :func:`negative_anchor_filter` are masked
  (``odm_valid`` False, never positive).

  Args:
    anchors: ``[A, 4]`` xyxy anchors, input pixels.
    arm_logits: ``[B, A, 2]`` the ARM's scores (for the filtering).
    arm_deltas: ``[B, A, 4]`` the ARM's offsets (for the refined anchors).
    gt_boxes: ``[B, M, 4]`` xyxy ground truth, input pixels, padded.
    gt_labels: ``[B, M]`` int class ``0 .. C-1``, ``-1`` for padding.
    match_iou: matching threshold of both modules (0.5).
    box_stds: encoding variances (0.1, 0.1, 0.2, 0.2).
    filter_threshold: background probability above which an anchor is filtered.
  Returns:
    :class:`RefineDetTargets`.
  """
  gt_labels = jnp.asarray(gt_labels, jnp.int32)
  match = functools.partial(ssd_targets, match_iou=match_iou, box_stds=box_stds)
  objects = jnp.where(gt_labels >= 0, 0, -1)  # [B, M]: one foreground class
  arm_classes, arm_deltas_t, arm_positive = jax.vmap(match, in_axes=(None, 0, 0))(
      anchors, gt_boxes, objects)  # [B, A], [B, A, 4], [B, A]
  refined = refine_anchors(anchors, arm_deltas, box_stds=box_stds)  # [B, A, 4]
  odm_classes, odm_deltas_t, odm_positive = jax.vmap(match)(refined, gt_boxes, gt_labels)
  valid = ~negative_anchor_filter(arm_logits, threshold=filter_threshold)  # [B, A]
  odm_positive &= valid
  return RefineDetTargets(
      arm_classes=arm_classes, arm_deltas=arm_deltas_t, arm_positive=arm_positive,
      odm_classes=jnp.where(odm_positive, odm_classes, 0),
      odm_deltas=jnp.where(odm_positive[..., None], odm_deltas_t, 0.0),
      odm_positive=odm_positive, odm_valid=valid)


def refinedet_loss(arm_logits, arm_deltas, odm_logits, odm_deltas, targets: RefineDetTargets, *,
                   neg_pos_ratio: float = 3.0, smooth_l1_beta: float = 1.0, image_valid=None):
  """RefineDet's loss: ``L = L_arm + L_odm``, each SSD's multibox loss (:func:`ssd_loss`).

  ``L_arm``: 2-class softmax cross-entropy on the ARM's positives and its 3:1
  hardest negatives plus smooth L1 on its positives, divided by its number of
  positives. ``L_odm``: the same on the ODM's outputs over the anchors that
  survive the filtering (``targets.odm_valid``), divided by the ODM's number
  of positives. Filtered anchors contribute nothing, not even as negatives.

  Args:
    arm_logits: ``[B, A, 2]``; arm_deltas: ``[B, A, 4]``.
    odm_logits: ``[B, A, C + 1]``; odm_deltas: ``[B, A, 4]``.
    targets: from :func:`refinedet_targets`.
    neg_pos_ratio: hard negatives per positive (3) in both modules.
    smooth_l1_beta: the smooth L1 transition point (1).
    image_valid: optional ``[B]`` bool; filler images contribute nothing.
  Returns:
    ``(loss, metrics)``: scalar loss and a dict with ``arm_cls_loss``,
    ``arm_box_loss``, ``odm_cls_loss``, ``odm_box_loss``, ``arm_num_pos``,
    ``odm_num_pos`` (positives in the batch) and ``num_filtered`` (filtered
    anchors in the batch's real images).
  """
  t = targets
  common = dict(neg_pos_ratio=neg_pos_ratio, smooth_l1_beta=smooth_l1_beta,
                image_valid=image_valid)
  arm_loss, arm = ssd_loss(arm_logits, arm_deltas, t.arm_classes, t.arm_deltas, t.arm_positive,
                           **common)
  odm_loss, odm = ssd_loss(odm_logits, odm_deltas, t.odm_classes, t.odm_deltas, t.odm_positive,
                           valid=t.odm_valid, **common)
  filtered = ~t.odm_valid  # [B, A]
  if image_valid is not None:
    filtered &= jnp.asarray(image_valid, bool)[:, None]
  metrics = dict(arm_cls_loss=arm["cls_loss"], arm_box_loss=arm["box_loss"],
                 odm_cls_loss=odm["cls_loss"], odm_box_loss=odm["box_loss"],
                 arm_num_pos=arm["num_pos"], odm_num_pos=odm["num_pos"],
                 num_filtered=jnp.sum(filtered).astype(jnp.float32))
  return arm_loss + odm_loss, metrics


# ----------------------------------------------------------------------------
# Decoding: pure function.
# ----------------------------------------------------------------------------


def refinedet_candidates(outputs: RefineDetOutputs, image_size, *,
                         box_stds: Sequence[float] = SSD_BOX_STDS,
                         filter_threshold: float = 0.99):
  """Every anchor decoded twice, before NMS: ``(boxes [B, A, 4], scores [B, A, C])``.

  Boxes: anchors -> ARM offsets -> ODM offsets, in input pixels, clipped to
  ``image_size`` (``[B, 2]`` or ``(h, w)``). Scores: the ODM's softmax
  probabilities of the foreground classes, 0 for every filtered anchor
  (:func:`negative_anchor_filter`), so that no detection comes from one.
  """
  refined = refine_anchors(outputs.anchors, outputs.arm_deltas, box_stds=box_stds)  # [B, A, 4]
  boxes = box_lib.decode(outputs.odm_deltas, refined, stds=box_stds)  # [B, A, 4]
  size = jnp.asarray(image_size)
  boxes = box_lib.clip(boxes, size[:, None, :] if size.ndim == 2 else size)
  scores = jax.nn.softmax(outputs.odm_logits, axis=-1)[..., 1:]  # [B, A, C]
  filtered = negative_anchor_filter(outputs.arm_logits, threshold=filter_threshold)  # [B, A]
  return boxes, jnp.where(filtered[..., None], 0.0, scores)


# ----------------------------------------------------------------------------
# The detector.
# ----------------------------------------------------------------------------


class RefineDet(VGGFields, MultiBoxFields, kw_only=True):
  """RefineDet320 / RefineDet512 with a VGG16 backbone (defaults: RefineDet320).

  Attributes:
    num_classes: foreground classes (background is added internally).
    image_size: side of the square input (320, 512, or smaller for tests).
    the backbone's (:class:`~jdet.models.backbones.vgg.VGGFields`: widths,
      fc_width, fc6_dilation (3 here), extras (conv6_1/conv6_2; each extra
      level must halve the resolution), norm (``"batch"`` also puts BatchNorm
      in the TCB), conv3_3_l2norm_scale (if set, conv3_3 is a source too, the
      first level: the 128-pixel quick start uses 10), dtype),
    the matching, loss and inference settings
      (:class:`~jdet.models.multibox.MultiBoxFields`, used by both the ARM and
      the ODM: match_iou, box_stds, neg_pos_ratio, smooth_l1_beta,
      score_threshold, pre_nms_top_k (1000 per class here), nms_threshold,
      max_detections (100; the Caffe model keeps 500)), and
    l2norm_scales: initial L2Norm scales of conv4_3 and conv5_3 (10, 8).
    tcb_width: channels of the TCB and so of the ODM's inputs (256).
    anchor_sizes: one anchor size per level in pixels; ``None`` gives
      ``anchor_scale`` times the level's stride (8, 16, 32, 64, ...).
    anchor_scale: 4 (sizes 32, 64, 128, 256).
    strides: the anchors' stride per level; ``None`` uses ``image_size /
      feature size`` (RefineDet uses 8, 16, 32, 64).
    aspect_ratios: ratios ``a`` adding ``a:1`` and ``1:a`` anchors to the 1:1
      one, the same on every level ((2,): 3 anchors per location).
    filter_threshold: negative anchor filtering, ARM background probability
      above which an anchor is ignored by the ODM (0.99), in training and test.
  """

  num_classes: int
  image_size: int = 320
  fc6_dilation: int = 3
  extras: Sequence[Sequence[int]] = REFINEDET_EXTRAS
  l2norm_scales: Sequence[float] = (10.0, 8.0)
  tcb_width: int = 256
  anchor_sizes: Sequence[float] | None = None
  anchor_scale: float = 4.0
  strides: Sequence[float] | None = (8, 16, 32, 64)
  aspect_ratios: Sequence[float] = (2,)
  filter_threshold: float = 0.99
  pre_nms_top_k: int = 1000

  def setup(self):
    if len(self.l2norm_scales) != 2:
      raise ValueError(f"l2norm_scales is (conv4_3, conv5_3), got {self.l2norm_scales!r}")
    self.backbone = build_from_fields(VGG16, self, l2norm_scale=self.l2norm_scales[0],
                                      pool5_stride=2, conv5_3_l2norm_scale=self.l2norm_scales[1],
                                      extras_first=6)
    per_location = [self.anchors_per_location] * self.num_levels
    self.arm = SSDHead(2, per_location, dtype=self.dtype)
    self.tcb = TransferConnectionBlock(self.tcb_width, norm=self.norm, dtype=self.dtype)
    self.odm = SSDHead(self.num_classes + 1, per_location, dtype=self.dtype)

  @property
  def num_levels(self) -> int:
    """conv4_3, conv5_3, fc7 and one per extra level (4), plus conv3_3 if it is a source."""
    return 3 + len(self.extras) + (self.conv3_3_l2norm_scale is not None)

  @property
  def anchors_per_location(self) -> int:
    return 1 + 2 * len(self.aspect_ratios)

  @property
  def anchor_sizes_by_level(self) -> tuple[float, ...]:
    """The anchor size of each level in pixels (32, 64, 128, 256): ``anchor_scale``
    times the level's stride (8, 16, ... or 4, 8, ... with conv3_3)."""
    if self.anchor_sizes is not None:
      return tuple(self.anchor_sizes)
    first = 4 if self.conv3_3_l2norm_scale is not None else 8
    return tuple(self.anchor_scale * first * 2 ** k for k in range(self.num_levels))

  def anchors(self, feature_sizes: Sequence[Sequence[int]]) -> np.ndarray:
    """``[A, 4]`` float32 xyxy anchors for the given ``(h, w)`` per level.

    SSD's default boxes without a max size (:func:`ssd_default_boxes`): at
    each location the 1:1 anchor, then ``a:1`` and ``1:a`` for each ratio.
    """
    n = len(feature_sizes)
    sizes = self.anchor_sizes_by_level
    if len(sizes) != n:
      raise ValueError(f"{len(sizes)} anchor sizes but the backbone has {n} levels")
    strides = self.strides
    if strides is None:
      strides = [(self.image_size / h, self.image_size / w) for h, w in feature_sizes]
    return ssd_default_boxes(self.image_size, feature_sizes, strides, sizes, None,
                             [tuple(self.aspect_ratios)] * n)

  def __call__(self, image, *, train: bool = False) -> RefineDetOutputs:
    """``image [B, S, S, 3]`` -> :class:`RefineDetOutputs` (ARM and ODM scores and
    offsets, anchors). ``train`` updates BatchNorm statistics (``norm="batch"``)."""
    if image.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"RefineDet{self.image_size} expects {self.image_size}x{self.image_size} "
                       f"input, got {image.shape[1]}x{image.shape[2]}")
    features = self.backbone(image, train=train)  # L maps, strides (4,) 8, 16, 32, 64
    sizes = [f.shape[1:3] for f in features]
    arm_logits, arm_deltas = self.arm(features)  # [B, A, 2], [B, A, 4]
    odm_features = self.tcb(features, train=train)  # L maps of tcb_width channels
    odm_logits, odm_deltas = self.odm(odm_features)  # [B, A, C + 1], [B, A, 4]
    anchors = self.anchors(sizes)
    if anchors.shape[0] != arm_logits.shape[1]:
      raise ValueError(f"{anchors.shape[0]} anchors but the heads predict {arm_logits.shape[1]}")
    return RefineDetOutputs(arm_logits=arm_logits, arm_deltas=arm_deltas, odm_logits=odm_logits,
                            odm_deltas=odm_deltas, anchors=jnp.asarray(anchors))

  def frozen_parameters(self) -> tuple[str, ...]:
    """Regexps of the parameters that never train: none (the whole VGG trains)."""
    return ()

  def loss(self, batch, *, train: bool = True):
    """ARM + ODM loss of a batch (see :func:`refinedet_loss`) -> ``(loss, metrics)``."""
    out = self(batch["image"], train=train)
    targets = refinedet_targets(out.anchors, out.arm_logits, out.arm_deltas, batch["boxes"],
                                batch["labels"], match_iou=self.match_iou,
                                box_stds=self.box_stds, filter_threshold=self.filter_threshold)
    return refinedet_loss(out.arm_logits, out.arm_deltas, out.odm_logits, out.odm_deltas, targets,
                          neg_pos_ratio=self.neg_pos_ratio, smooth_l1_beta=self.smooth_l1_beta,
                          image_valid=image_valid(batch))

  def candidates(self, batch):
    """Every anchor decoded, before NMS: ``(boxes [B, A, 4], scores [B, A, C])``.

    Boxes are in input pixels, clipped to the image; scores are the ODM's
    foreground probabilities, 0 for filtered anchors (see
    :func:`refinedet_candidates`). :meth:`predict` and test-time augmentation
    (:mod:`jdet.evaluation.tta`) start from here.
    """
    out = self(batch["image"], train=False)
    return refinedet_candidates(out, real_image_sizes(batch),
                                box_stds=self.box_stds, filter_threshold=self.filter_threshold)

  def predict(self, batch) -> Detections:
    """Detections in original-image pixels: per-class NMS of the :meth:`candidates`."""
    return multibox_predict(self, batch)

  def at_input_size(self, size: int) -> "RefineDet":
    """The same detector (same variables) for ``size x size`` input, for
    multi-scale testing: anchors keep their sizes in pixels and their strides
    (``strides``, the network's true strides 8 .. 64 at every input size), so a
    larger input finds smaller objects."""
    if size == self.image_size:
      return self
    return self.clone(image_size=size, anchor_sizes=self.anchor_sizes_by_level)
