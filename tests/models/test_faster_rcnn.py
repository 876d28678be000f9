"""Faster R-CNN: targets, sampling, losses, proposals and decoding against torchvision's parts.

The pure functions of :mod:`jdet.models.faster_rcnn` are compared with the
torchvision pieces that define them: ``Matcher`` and
``BalancedPositiveNegativeSampler`` (labels and the counts sampled, not which
anchors: the draws differ), ``BoxCoder``, ``RegionProposalNetwork.compute_loss``
and ``filter_proposals``, ``fastrcnn_loss`` and ``RoIHeads.postprocess_detections``.
The detector itself is the smoke config's tiny network with NumPy weights
(compiling ``model.init``'s random initialisers would cost more than the tests).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection import _utils as tv_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import box_iou

import jdet
from jdet.data import builder, pipeline
from jdet.engine import optim
from jdet.engine.train_state import TrainState
from jdet.engine.training import make_train_step
from jdet.models.faster_rcnn import (FasterRCNN, Proposals, decode_detections, rcnn_loss,
                                     rcnn_targets, rpn_loss, rpn_proposals, rpn_targets)
from jdet.ops.anchors import multilevel_grid_anchors
from jdet.testing import assert_traces_once, random_boxes

from configs import faster_rcnn_r50_fpn as frcnn_config
from tests.helpers.references import best_iou_per_object
from tests.helpers.weights import numpy_variables
from tests.helpers.detector_batches import resized_filler_padded_batch

# A 128 x 160 canvas with the smoke config's anchors (8 .. 128 on P2 .. P6).
CANVAS = (128, 160)
FEATURE_SIZES = [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]
STRIDES = [4, 8, 16, 32, 64]
ANCHORS = multilevel_grid_anchors(FEATURE_SIZES, STRIDES, [8, 16, 32, 64, 128], [0.5, 1.0, 2.0])
LEVEL_SIZES = [h * w * 3 for h, w in FEATURE_SIZES]

_rpn_targets = jax.jit(jax.vmap(lambda k, g, v: rpn_targets(k, ANCHORS, g, v)))
_rcnn_targets = jax.jit(jax.vmap(rcnn_targets))


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------


def _pad(boxes: np.ndarray, labels: np.ndarray, m: int):
  out_b = np.zeros((m, 4), np.float32)
  out_l = np.full((m,), -1, np.int32)
  out_b[:len(boxes)], out_l[:len(labels)] = boxes, labels
  return out_b, out_l


def _tv_labels(matcher, gt: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """torchvision's per-candidate label (1 / 0 / -1) and matched box, as its RPN and RoI heads
  derive them from ``Matcher`` (an image without boxes: every candidate negative)."""
  if len(gt) == 0:
    return np.zeros(len(candidates), np.int64), np.zeros(len(candidates), np.int64)
  idx = matcher(box_iou(torch.from_numpy(gt), torch.from_numpy(candidates))).numpy()
  labels = np.where(idx >= 0, 1, np.where(idx == matcher.BELOW_LOW_THRESHOLD, 0, -1))
  return labels, np.maximum(idx, 0)


def _tv_counts(sampler, labels: np.ndarray) -> tuple[int, int]:
  """How many positives and negatives torchvision's sampler draws from these labels."""
  pos, neg = sampler([torch.from_numpy(labels)])
  return int(pos[0].sum()), int(neg[0].sum())


@pytest.fixture(scope="module")
def smoke():
  """``(config, model, variables)`` of the smoke config (64x64 input, 5 classes), with frozen
  BatchNorm: the images of a batch are then independent (no batch statistics), so that a
  filler image's content provably changes nothing."""
  config = frcnn_config.get_config("smoke")
  model = FasterRCNN(**dict(config.model, norm="frozen_bn"))
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  return config, model, numpy_variables(shapes, head_std=0.01)


# ----------------------------------------------------------------------------
# RPN targets.
# ----------------------------------------------------------------------------


def _rpn_cases(rng):
  """Three images padded to M = 160: a few boxes, none, and 150 boxes that each sit on
  an anchor (more positives than the 128 a sample may take)."""
  some = random_boxes(rng, 4, size=CANVAS, min_side=8, max_side=80)
  on_anchors = ANCHORS[rng.choice(np.flatnonzero(
      (ANCHORS[:, :2] >= 0).all(1) & (ANCHORS[:, 2] <= CANVAS[1]) & (ANCHORS[:, 3] <= CANVAS[0])),
      150, replace=False)]
  many = on_anchors + rng.uniform(-0.5, 0.5, on_anchors.shape).astype(np.float32)
  return [some, np.zeros((0, 4), np.float32), many]


def test_rpn_targets_follow_torchvision_matcher_and_sampler(rng):
  cases = _rpn_cases(rng)
  gt = np.stack([_pad(c, np.zeros(len(c), np.int32), 160)[0] for c in cases])
  valid = np.stack([np.arange(160) < len(c) for c in cases])
  keys = jax.random.split(jax.random.key(0), len(cases))
  pos, neg, deltas = map(np.asarray, _rpn_targets(keys, gt, valid))
  assert pos.shape == neg.shape == (3, len(ANCHORS)) and deltas.shape == (3, len(ANCHORS), 4)

  matcher = tv_utils.Matcher(0.7, 0.3, allow_low_quality_matches=True)
  sampler = tv_utils.BalancedPositiveNegativeSampler(256, 0.5)
  coder = tv_utils.BoxCoder((1.0, 1.0, 1.0, 1.0))
  for i, boxes in enumerate(cases):
    labels, matched = _tv_labels(matcher, boxes, ANCHORS)
    assert not (pos[i] & neg[i]).any()
    assert np.all(labels[pos[i]] == 1) and np.all(labels[neg[i]] == 0)
    assert (pos[i].sum(), neg[i].sum()) == _tv_counts(sampler, labels)
    if len(boxes):
      want = coder.encode_single(torch.from_numpy(boxes[matched[pos[i]]]),
                                 torch.from_numpy(ANCHORS[pos[i]])).numpy()
      np.testing.assert_allclose(deltas[i][pos[i]], want, rtol=1e-4, atol=1e-5)
    assert np.all(deltas[i][~pos[i]] == 0)
  # The three regimes: some positives, none (256 negatives), capped at 128 positives.
  assert 0 < pos[0].sum() < 128 and pos[0].sum() + neg[0].sum() == 256
  assert pos[1].sum() == 0 and neg[1].sum() == 256
  assert (labels == 1).sum() > 128 and pos[2].sum() == 128 and neg[2].sum() == 128


# ----------------------------------------------------------------------------
# RoI sampling.
# ----------------------------------------------------------------------------


def test_rcnn_targets_counts_classes_and_padding(rng):
  m, p = 120, 300
  some = random_boxes(rng, 5, size=CANVAS, min_side=8, max_side=80)
  many = random_boxes(rng, 100, size=CANVAS, min_side=8, max_side=80)
  cases = [(some, rng.integers(0, 4, 5)), (np.zeros((0, 4), np.float32), np.zeros(0, int)),
           (many, rng.integers(0, 4, 100))]
  gt, gl, props, pvalid = [], [], [], []
  for boxes, labels in cases:
    b, l = _pad(boxes, labels, m)
    gt.append(b), gl.append(l)
    proposals = random_boxes(rng, p, size=CANVAS, min_side=4, max_side=100)
    if len(boxes) > 50:  # jittered copies of the boxes: more than 128 positives available
      proposals[:200] = boxes[np.arange(200) % len(boxes)] + rng.uniform(-2, 2, (200, 4))
    valid = np.arange(p) < p - 50
    # Padding rows that would be perfect positives, were they ever read.
    proposals[p - 50:p - 40] = b[0] if len(boxes) else random_boxes(rng, 10, size=CANVAS, min_side=8, max_side=80)
    props.append(proposals.astype(np.float32)), pvalid.append(valid)
  keys = jax.random.split(jax.random.key(1), 3)
  rois, classes, deltas, sampled = map(np.asarray, _rcnn_targets(
      keys, np.stack(props), np.stack(pvalid), np.stack(gt), np.stack(gl)))
  assert rois.shape == (3, 512, 4) and classes.shape == sampled.shape == (3, 512)

  matcher = tv_utils.Matcher(0.5, 0.5, allow_low_quality_matches=False)
  sampler = tv_utils.BalancedPositiveNegativeSampler(512, 0.25)
  coder = tv_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))
  for i, (boxes, labels) in enumerate(cases):
    # torchvision's candidates: the (valid) proposals, then the ground truth.
    cand = np.concatenate([props[i][pvalid[i]], boxes]).astype(np.float32)
    tv_labels, matched = _tv_labels(matcher, boxes, cand)
    n_pos, n_neg = _tv_counts(sampler, tv_labels)
    many_available = (tv_labels == 1).sum()
    assert sampled[i].sum() == n_pos + n_neg
    assert ((classes[i] > 0) & sampled[i]).sum() == n_pos
    assert np.all(classes[i][~sampled[i]] == -1)
    # Every sampled RoI is a valid candidate, with torchvision's class for it.
    for r, c, d in zip(rois[i][sampled[i]], classes[i][sampled[i]], deltas[i][sampled[i]]):
      j = np.flatnonzero((cand == r).all(1))
      assert len(j), f"image {i}: sampled RoI {r} is not a valid candidate"
      j = j[0]
      assert c == (labels[matched[j]] + 1 if tv_labels[j] == 1 else 0)
      if c > 0:
        want = coder.encode_single(torch.from_numpy(boxes[matched[j]][None]),
                                   torch.from_numpy(r[None])).numpy()[0]
        np.testing.assert_allclose(d, want, rtol=1e-4, atol=1e-4)
      else:
        assert np.all(d == 0)
  assert ((classes[0] > 0) & sampled[0]).sum() >= 5  # every box is its own positive RoI
  assert sampled[0].sum() < 512  # 250 + 5 candidates: the rest is padding
  assert ((classes[1] > 0) & sampled[1]).sum() == 0 and sampled[1].sum() == 250
  assert ((classes[2] > 0) & sampled[2]).sum() == 128  # of more than 128 available
  assert many_available > 128


# ----------------------------------------------------------------------------
# Losses.
# ----------------------------------------------------------------------------


def test_rpn_loss_matches_torchvision(rng):
  cases = _rpn_cases(rng)[:2]
  gt = np.stack([_pad(c, np.zeros(len(c), np.int32), 8)[0] for c in cases])
  valid = np.stack([np.arange(8) < len(c) for c in cases])
  pos, neg, targets = _rpn_targets(jax.random.split(jax.random.key(2), 2), gt, valid)
  logits = rng.normal(0, 2, pos.shape).astype(np.float32)
  deltas = rng.normal(0, 0.5, pos.shape + (4,)).astype(np.float32)
  obj, box, n = jax.jit(rpn_loss)(logits, deltas, pos, neg, targets)
  # torchvision's sampler takes every labelled anchor when there are no more than it wants.
  tv = RegionProposalNetwork(AnchorGenerator(), RPNHead(1, 3), 0.7, 0.3, 256, 0.5,
                             dict(training=1, testing=1), dict(training=1, testing=1), 0.7)
  labels = [torch.from_numpy(np.where(p, 1.0, np.where(q, 0.0, -1.0)).astype(np.float32))
            for p, q in zip(np.asarray(pos), np.asarray(neg))]
  want_obj, want_box = tv.compute_loss(torch.from_numpy(logits.reshape(-1, 1)),
                                       torch.from_numpy(deltas.reshape(-1, 4)), labels,
                                       [torch.from_numpy(t) for t in np.array(targets)])
  assert float(n) == 512
  np.testing.assert_allclose(float(obj), want_obj.item(), rtol=1e-5)
  np.testing.assert_allclose(float(box), want_box.item(), rtol=1e-5)
  assert float(box) > 0


def test_rcnn_loss_matches_torchvision(rng):
  s, c = 40, 4
  classes = rng.integers(0, c + 1, (2, s)).astype(np.int32)
  sampled = rng.uniform(size=(2, s)) < 0.8
  classes = np.where(sampled, classes, -1)
  logits = rng.normal(0, 2, (2, s, c + 1)).astype(np.float32)
  deltas = rng.normal(0, 1, (2, s, c + 1, 4)).astype(np.float32)
  targets = np.where((classes > 0)[..., None], rng.normal(0, 1, (2, s, 4)), 0).astype(np.float32)
  cls, box, n = jax.jit(rcnn_loss)(logits, deltas, classes, targets, sampled)
  want_cls, want_box = fastrcnn_loss(
      torch.from_numpy(logits[sampled]), torch.from_numpy(deltas[sampled].reshape(-1, 4 * (c + 1))),
      [torch.from_numpy(classes[sampled]).long()], [torch.from_numpy(targets[sampled])])
  assert float(n) == sampled.sum()
  np.testing.assert_allclose(float(cls), want_cls.item(), rtol=1e-5)
  np.testing.assert_allclose(float(box), want_box.item(), rtol=1e-5)


# ----------------------------------------------------------------------------
# Proposals and decoding.
# ----------------------------------------------------------------------------


def test_proposals_match_torchvision_filter_proposals(rng):
  b, a = 2, len(ANCHORS)
  logits = rng.normal(0, 2, (b, a)).astype(np.float32)
  deltas = rng.normal(0, 0.3, (b, a, 4)).astype(np.float32)
  sizes = np.array([CANVAS, (100, 90)], np.int32)  # the second image is padded
  fn = jax.jit(jax.vmap(lambda l, d, s: rpn_proposals(
      l, d, ANCHORS, LEVEL_SIZES, s, pre_nms_top_n=300, post_nms_top_n=200, nms_threshold=0.7)))
  boxes, scores, valid = map(np.asarray, fn(logits, deltas, sizes))
  assert boxes.shape == (b, 200, 4) and valid.shape == (b, 200)

  tv = RegionProposalNetwork(AnchorGenerator(), RPNHead(1, 3), 0.7, 0.3, 256, 0.5,
                             dict(training=300, testing=300), dict(training=200, testing=200),
                             0.7).eval()
  decoded = tv.box_coder.decode(torch.from_numpy(deltas.reshape(-1, 4)),
                                [torch.from_numpy(ANCHORS)] * b).view(b, -1, 4)
  want_boxes, want_scores = tv.filter_proposals(decoded, torch.from_numpy(logits),
                                                [tuple(s) for s in sizes], LEVEL_SIZES)
  for i in range(b):
    n = len(want_scores[i])
    assert valid[i].sum() == n and valid[i][:n].all()
    np.testing.assert_allclose(boxes[i][:n], want_boxes[i].numpy(), rtol=0, atol=1e-3)
    np.testing.assert_allclose(scores[i][:n], want_scores[i].numpy(), rtol=1e-6)
    assert np.all(boxes[i][n:] == 0) and np.all(scores[i][n:] == 0)
  assert len(want_scores[0]) == 200  # the post-NMS cut was exercised
  h, w = sizes[1]
  assert boxes[1][:, [0, 2]].max() <= w and boxes[1][:, [1, 3]].max() <= h


def test_decode_matches_torchvision_postprocess(rng):
  p, c, pad = 80, 4, 20
  sizes = np.array([[100, 120], [128, 160]], np.int32)
  logits = rng.normal(0, 2, (2, p, c + 1)).astype(np.float32)
  deltas = rng.normal(0, 0.5, (2, p, c + 1, 4)).astype(np.float32)
  props = np.stack([random_boxes(rng, p, size=tuple(s), min_side=8, max_side=80) for s in sizes])
  valid = np.arange(p) < p - pad
  # Padding rows with confident class-1 scores: they must never become detections.
  logits[:, ~valid] = np.array([0, 20, 0, 0, 0], np.float32)
  batch = dict(image=jnp.zeros((2,) + CANVAS + (3,)), image_size=sizes)
  proposals = Proposals(boxes=props, scores=np.ones((2, p), np.float32),
                        valid=np.broadcast_to(valid, (2, p)))
  decode = jax.jit(lambda k: decode_detections(logits, deltas, proposals, batch,
                                               score_threshold=0.05, nms_threshold=0.5,
                                               max_detections=k), static_argnums=0)
  det = jax.tree.map(np.asarray, decode(40))

  tv = RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 40)
  for i in range(2):
    want_boxes, want_scores, want_labels = tv.postprocess_detections(
        torch.from_numpy(logits[i][valid]),
        torch.from_numpy(deltas[i][valid].reshape(-1, 4 * (c + 1))),
        [torch.from_numpy(props[i][valid])], [tuple(sizes[i])])
    n = len(want_scores[0])
    assert det.valid[i].sum() == n and det.valid[i][:n].all()
    np.testing.assert_array_equal(det.labels[i][:n], want_labels[0].numpy() - 1)
    np.testing.assert_allclose(det.scores[i][:n], want_scores[0].numpy(), rtol=1e-5)
    np.testing.assert_allclose(det.boxes[i][:n], want_boxes[0].numpy(), rtol=0, atol=1e-3)
  assert det.valid[1].sum() == 40  # the cut at max_detections was exercised
  # A smaller max_detections keeps the same best ones.
  top = jax.tree.map(np.asarray, decode(10))
  for name in ("boxes", "scores", "labels", "valid"):
    np.testing.assert_array_equal(getattr(top, name), getattr(det, name)[:, :10])


# ----------------------------------------------------------------------------
# The detector.
# ----------------------------------------------------------------------------


def _smoke_batches(config, n: int):
  source = builder.build_source(config.data, "train")
  it = pipeline.train_batches(source, builder.build_transforms(config.data, train=True),
                              batch_size=int(config.data.batch_size), seed=0)
  return [next(it) for _ in range(n)]


def test_train_step_compiles_once_and_handles_empty_and_filler_images(smoke):
  config, model, variables = smoke
  b1, b2 = _smoke_batches(config, 2)
  assert not np.array_equal(b1["image"], b2["image"])
  # No objects at all.
  empty = dict(b1, boxes=np.zeros_like(b1["boxes"]), labels=np.full_like(b1["labels"], -1))
  # Images 1..3 filler; then the same with other content in the filler images.
  filler = dict(b1, valid=np.array([True, False, False, False]))
  other = {k: v.copy() for k, v in filler.items()}
  other["image"][1:] = b2["image"][1:]
  other["boxes"][1:], other["labels"][1:] = b2["boxes"][1:], b2["labels"][1:]
  tx, schedule = optim.build_optimizer(config.optim, total_steps=int(config.train.num_steps))
  state = TrainState.create(params=variables["params"], batch_stats=variables["batch_stats"],
                            tx=tx, rng=jax.random.key(0))
  outs = assert_traces_once(make_train_step(model, schedule), *[
      (state, b) for b in (b1, b2, empty, filler, other)])
  (s1, m1), (_, m2), (_, me), (_, mf), (_, mo) = outs
  assert int(s1.step) == 1
  for m in (m1, m2, me, mf, mo):
    assert m["finite"] == 1.0 and np.isfinite(m["loss"])
  assert m1["loss"] != m2["loss"] and m1["num_pos"] > 0 and m1["rpn_num_pos"] > 0
  # Without objects: no positive anywhere, box losses exactly 0, class losses still there.
  assert me["rpn_box_loss"] == 0.0 and me["box_loss"] == 0.0
  assert me["num_pos"] == 0.0 and me["rpn_num_pos"] == 0.0
  assert me["rpn_cls_loss"] > 0 and me["cls_loss"] > 0 and np.isfinite(me["grad_norm"])
  # Filler images count for nothing: their content does not change the step.
  for k in ("loss", "rpn_cls_loss", "rpn_box_loss", "cls_loss", "box_loss", "grad_norm"):
    assert mf[k] == mo[k], k
  assert mf["loss"] != m1["loss"]


def test_predict_shapes_and_original_pixels(smoke):
  config, model, variables = smoke
  k = model.max_detections
  image = np.random.default_rng(0).normal(size=(1, 64, 64, 3)).astype(np.float32)
  images = np.repeat(image, 4, axis=0)
  predict = jax.jit(lambda v, b: model.apply(v, b, method="predict"))
  # (0) scale 1, (1) resized from a 128 x 256 original with (sy, sx) = (0.5, 0.25),
  # (2) a filler image, (3) a 40 x 50 image padded to the input size.
  batch = resized_filler_padded_batch(images)
  det = predict(variables, batch)
  assert isinstance(det, jdet.Detections)
  det = jax.tree.map(np.asarray, det)
  assert det.boxes.shape == (4, k, 4) and det.scores.shape == det.labels.shape == (4, k)
  assert det.valid[0].sum() > 0, "the random model should detect something"
  np.testing.assert_array_equal(det.valid[1], det.valid[0])
  np.testing.assert_array_equal(det.labels[1], det.labels[0])
  # Original pixels = input pixels / scale: x / 0.25, y / 0.5.
  np.testing.assert_allclose(det.boxes[1], det.boxes[0] * np.float32([4, 2, 4, 2]), rtol=1e-5,
                             atol=1e-3)
  for i in (0, 1, 3):
    h, w = batch["orig_size"][i]
    boxes = det.boxes[i][det.valid[i]]
    assert len(boxes) and np.all(boxes >= 0)
    assert np.all(boxes[:, [0, 2]] <= w) and np.all(boxes[:, [1, 3]] <= h)
    assert np.all(np.diff(det.scores[i][det.valid[i]]) <= 0)
    assert np.all(det.labels[i][det.valid[i]] >= 0) and np.all(det.labels[i] < 5)
  assert not det.valid[2].any() and np.all(det.labels[2] == -1)


# ----------------------------------------------------------------------------
# Configs.
# ----------------------------------------------------------------------------


def _num_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("variant", ["coco", "coco_ms", "shapes", "smoke"])
def test_configs_build(variant):
  config = frcnn_config.get_config(variant)
  assert config.model_name == "faster_rcnn"
  model = FasterRCNN(**config.model)
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  assert config.data.num_classes == model.num_classes
  builder.build_transforms(config.data, train=True)
  builder.build_transforms(config.data, train=False)
  tx, _ = optim.build_optimizer(config.optim, total_steps=int(config.train.num_steps),
                                frozen=model.frozen_parameters())
  jax.eval_shape(tx.init, variables["params"])  # the freeze patterns match parameters
  if variant.startswith("coco"):
    # torchvision's 41,755,286 parameters less its 10 unused category ids' cls_score and
    # bbox_pred weights: 10 * (1024 + 1) + 40 * (1024 + 1).
    assert _num_params(variables["params"]) == 41_755_286 - 50 * 1025
    assert config.data.transforms.canvas == (1344, 1344)


def test_coco_schedule_scales_with_the_batch():
  # MMDetection's 1x at batch 16: 7,330 iterations per epoch, lr 0.02, steps after epochs 8, 11.
  c16 = frcnn_config.get_config("coco")
  assert c16.data.batch_size == 16 and c16.optim.lr == 0.02
  assert c16.train.num_steps == 87_960 and c16.optim.milestones == (58_640, 80_630)
  # Frozen parameters come from the model's fields, not from a copy in the config.
  assert c16.optim.freeze == ()
  assert FasterRCNN(**c16.model).frozen_parameters() == ("^backbone/(conv1|bn1|layer1)/",)
  c8 = frcnn_config.get_config("coco,batch=8,root=/data/coco")
  per_epoch = math.ceil(117_266 / 8)
  assert c8.optim.lr == 0.01 and c8.train.num_steps == 12 * per_epoch
  assert c8.optim.milestones == (8 * per_epoch, 11 * per_epoch)
  assert c8.data.train.annotation_file == "/data/coco/annotations/instances_train2017.json"
  ms = frcnn_config.get_config("coco_ms")
  assert ms.data.transforms.mode == "range" and ms.data.transforms.test_scale == (800, 1333)
  assert ms.optim.milestones == (27 * 7330, 33 * 7330) and ms.train.num_steps == 36 * 7330


def test_shapes_anchors_cover_the_validation_objects():
  """The shapes variant's two anchor sizes per level (3x and 4.2x the stride) give
  every object of the shapes validation split an anchor at IoU >= 0.5 and most
  one at the RPN's positive threshold 0.7; one size of 2x the stride does not."""
  config = frcnn_config.get_config("shapes")
  model = FasterRCNN(**config.model)
  source = builder.build_source(config.data, "val")
  objects = [np.asarray(source[i].boxes, np.float32) for i in range(256)]
  maps = [(128 // s, 128 // s) for s in model.strides]

  def best_iou(sizes):
    anchors = multilevel_grid_anchors(maps, model.strides, sizes, model.anchor_ratios)
    return best_iou_per_object(anchors, objects)

  best = best_iou([tuple(s) for s in model.anchor_sizes])
  assert len(best) > 500 and (best < 0.5).mean() < 0.005 and (best >= 0.7).mean() > 0.5
  single = best_iou([(2 * s,) for s in model.strides])
  assert (single < 0.5).mean() > 0.1 and (single >= 0.7).mean() < 0.15
