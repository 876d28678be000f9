"""RefineDet: two-step matching against NumPy, filtering as a mask, sizes, compilation.

The targets and loss are checked on small hand-made arrays (the 255 anchors of
a 64x64 input), all through one jitted function so that they compile once.
The smoke-sized model gets its weights from NumPy, as in ``test_ssd.py``:
compiling the random initialisers would cost more than the tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdet
from jdet.models.refinedet import (RefineDet, RefineDetOutputs, refinedet_candidates,
                                   refinedet_loss, refinedet_targets)
from jdet.models.multibox import multibox_detections
from jdet.testing import assert_traces_once

from configs import refinedet320, refinedet512, ssd300
from tests.helpers.anchor_presets import refinedet_anchors
from tests.helpers.references import np_iou
from tests.helpers.weights import numpy_variables
from tests.helpers.detector_batches import loss_value_and_grad

NUM_CLASSES = 5  # foreground classes of the small cases
IMAGE = 64       # their input side: maps 8, 4, 2, 1 -> (64 + 16 + 4 + 1) * 3 = 255 anchors
ANCHORS = refinedet_anchors(IMAGE)


def _num_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------
# A NumPy reference of the paper's two-step matching, independent of jdet.
# ----------------------------------------------------------------------------

STDS = np.array([0.1, 0.1, 0.2, 0.2])


def _np_cxcywh(b):
  return np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2,
                   b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def _np_decode(deltas, anchors):
  """SSD's decoding: centre moves by ``d * 0.1 * size``, sizes scale by ``exp(d * 0.2)``."""
  a, d = _np_cxcywh(anchors.astype(np.float64)), deltas.astype(np.float64) * STDS
  cx, cy = a[:, 0] + d[:, 0] * a[:, 2], a[:, 1] + d[:, 1] * a[:, 3]
  w, h = a[:, 2] * np.exp(d[:, 2]), a[:, 3] * np.exp(d[:, 3])
  return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def _np_encode(boxes, anchors):
  g, a = _np_cxcywh(boxes.astype(np.float64)), _np_cxcywh(anchors.astype(np.float64))
  return np.stack([(g[:, 0] - a[:, 0]) / a[:, 2], (g[:, 1] - a[:, 1]) / a[:, 3],
                   np.log(g[:, 2] / a[:, 2]), np.log(g[:, 3] / a[:, 3])], axis=1) / STDS


def _np_match(anchors, gt, labels):
  """SSD's rule: every object takes its best anchor (a later object wins a shared
  one), then every anchor with IoU >= 0.5 takes its best object.
  Returns ``(classes [A] with c + 1 / 0, deltas [A, 4], positive [A])``."""
  gt, labels = gt[labels >= 0].astype(np.float64), labels[labels >= 0]
  num = len(anchors)
  if len(gt) == 0:
    return np.zeros(num, np.int64), np.zeros((num, 4)), np.zeros(num, bool)
  iou = np_iou(anchors.astype(np.float64), gt)  # [A, G]
  best_gt, best_iou = iou.argmax(1), iou.max(1)
  for j, a in enumerate(iou.argmax(0)):
    best_gt[a], best_iou[a] = j, 1.0
  positive = best_iou >= 0.5
  classes = np.where(positive, labels[best_gt] + 1, 0)
  deltas = np.where(positive[:, None], _np_encode(gt[best_gt], anchors), 0.0)
  return classes, deltas, positive


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------
# Targets and loss through one jitted function (B = 2, A = 255, M = 4, C = 5).
# ----------------------------------------------------------------------------


@jax.jit
def _targets_loss_grads(arm_logits, arm_deltas, odm_logits, odm_deltas, gt_boxes, gt_labels):
  """-> ``(loss, metrics, targets, (d loss / d odm_logits, d loss / d odm_deltas))``."""
  targets = refinedet_targets(ANCHORS, arm_logits, arm_deltas, gt_boxes, gt_labels)

  def loss_fn(odm_logits, odm_deltas):
    return refinedet_loss(arm_logits, arm_deltas, odm_logits, odm_deltas, targets)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
      odm_logits, odm_deltas)
  return loss, metrics, targets, grads


def _case(seed: int = 0):
  """Random ARM/ODM outputs and two images' objects; a third of the reference ODM
  positives, and some other anchors, have an ARM background probability > 0.99."""
  rng = np.random.default_rng(seed)
  b, a = 2, len(ANCHORS)
  gt = np.zeros((b, 4, 4), np.float32)
  labels = np.full((b, 4), -1, np.int32)
  gt[0, :3] = [[4, 6, 34, 36], [30, 10, 62, 40], [10, 40, 30, 60]]
  labels[0, :3] = [0, 3, 1]
  gt[1, :2] = [[0, 0, 40, 50], [36, 30, 60, 58]]
  labels[1, :2] = [4, 2]
  arm_deltas = rng.normal(0.0, 0.6, (b, a, 4)).astype(np.float32)
  arm_logits = rng.normal(0.0, 0.5, (b, a, 2)).astype(np.float32)
  odm_logits = rng.normal(0.0, 1.0, (b, a, NUM_CLASSES + 1)).astype(np.float32)
  odm_deltas = rng.normal(0.0, 1.0, (b, a, 4)).astype(np.float32)
  filtered = rng.random((b, a)) < 0.2
  for i in range(b):
    refined = _np_decode(arm_deltas[i], ANCHORS)
    pos = np.flatnonzero(_np_match(refined, gt[i], labels[i])[2])
    filtered[i, pos[::3]] = True
  arm_logits[filtered] = [6.0, -6.0]  # background probability 1 - 6e-6
  return arm_logits, arm_deltas, odm_logits, odm_deltas, gt, labels, filtered


def test_two_step_matching_matches_numpy_reference():
  arm_logits, arm_deltas, odm_logits, odm_deltas, gt, labels, _ = _case()
  _, metrics, t, _ = _targets_loss_grads(arm_logits, arm_deltas, odm_logits, odm_deltas, gt,
                                         labels)
  t = jax.tree.map(np.asarray, t)
  removed_total = 0
  for i in range(2):
    # ARM: the anchors against the objects, any class being "object".
    classes, deltas, positive = _np_match(ANCHORS, gt[i], np.where(labels[i] >= 0, 0, -1))
    np.testing.assert_array_equal(t.arm_positive[i], positive)
    np.testing.assert_array_equal(t.arm_classes[i], classes)
    np.testing.assert_allclose(t.arm_deltas[i], deltas, rtol=1e-4, atol=1e-4)
    # ODM: the refined anchors against the objects, then the filter.
    refined = _np_decode(arm_deltas[i], ANCHORS)
    classes, deltas, positive = _np_match(refined, gt[i], labels[i])
    keep = _np_softmax(arm_logits[i].astype(np.float64))[:, 0] <= 0.99
    removed_total += int(np.sum(positive & ~keep))
    assert np.any(positive & keep)
    # The refinement changes which anchors are positive.
    assert not np.array_equal(positive, t.arm_positive[i])
    np.testing.assert_array_equal(t.odm_valid[i], keep)
    np.testing.assert_array_equal(t.odm_positive[i], positive & keep)
    np.testing.assert_array_equal(t.odm_classes[i], np.where(positive & keep, classes, 0))
    np.testing.assert_allclose(t.odm_deltas[i], np.where((positive & keep)[:, None], deltas, 0.0),
                               rtol=1e-4, atol=1e-4)
  assert removed_total > 0, "the case must filter some positives"
  assert float(metrics["odm_num_pos"]) == t.odm_positive.sum()
  assert float(metrics["arm_num_pos"]) == t.arm_positive.sum()
  assert float(metrics["num_filtered"]) == (~t.odm_valid).sum()


def test_filtered_anchors_are_masked_out_of_the_loss():
  arm_logits, arm_deltas, odm_logits, odm_deltas, gt, labels, filtered = _case()
  loss, metrics, t, (g_logits, g_deltas) = _targets_loss_grads(
      arm_logits, arm_deltas, odm_logits, odm_deltas, gt, labels)
  # Anything at the filtered anchors: confident wrong classes, wild offsets.
  rng = np.random.default_rng(1)
  odm_logits2, odm_deltas2 = odm_logits.copy(), odm_deltas.copy()
  odm_logits2[filtered] = rng.normal(0.0, 8.0, (filtered.sum(), NUM_CLASSES + 1))
  odm_deltas2[filtered] = rng.normal(0.0, 30.0, (filtered.sum(), 4))
  loss2, metrics2, t2, (g_logits2, g_deltas2) = _targets_loss_grads(
      arm_logits, arm_deltas, odm_logits2, odm_deltas2, gt, labels)
  assert float(loss2) == float(loss)
  for k in metrics:
    assert float(metrics2[k]) == float(metrics[k]), k
  for g in (g_logits, g_deltas, g_logits2, g_deltas2):
    assert np.all(np.asarray(g)[filtered] == 0.0)
  # Same shapes with and without filtering; unfiltered, the same change counts.
  arm_open = np.where(filtered[..., None], np.float32(0.0), arm_logits)
  loss3, metrics3, t3, _ = _targets_loss_grads(arm_open, arm_deltas, odm_logits, odm_deltas, gt,
                                               labels)
  loss4, _, _, _ = _targets_loss_grads(arm_open, arm_deltas, odm_logits2, odm_deltas2, gt, labels)
  assert jax.tree.map(np.shape, t3) == jax.tree.map(np.shape, t)
  assert float(metrics3["num_filtered"]) == 0.0 and float(metrics["num_filtered"]) > 0
  assert float(metrics3["odm_num_pos"]) > float(metrics["odm_num_pos"])
  assert abs(float(loss4) - float(loss3)) > 1.0


@jax.jit
def _decode(outputs, batch):
  """-> ``(candidate scores [B, A, C], Detections)``."""
  boxes, scores = refinedet_candidates(outputs, batch["image_size"])
  return scores, multibox_detections(boxes, scores, batch, score_threshold=0.01, pre_nms_top_k=50,
                                     nms_threshold=0.45, max_detections=20)


def test_filtered_anchors_give_no_detection():
  arm_logits, arm_deltas, odm_logits, odm_deltas, _, _, filtered = _case()
  size = np.full((2, 2), IMAGE, np.int32)
  batch = {"image_size": size, "orig_size": size}
  outputs = RefineDetOutputs(arm_logits=arm_logits, arm_deltas=arm_deltas, odm_logits=odm_logits,
                             odm_deltas=odm_deltas, anchors=jnp.asarray(ANCHORS))
  # Filtered anchors now claim class 2 with probability ~1, on a box of their own.
  odm_logits2 = odm_logits.copy()
  odm_logits2[filtered] = 0.0
  odm_logits2[filtered, 3] = 30.0
  odm_deltas2 = np.where(filtered[..., None], np.float32(0.5), odm_deltas)
  outputs2 = outputs.replace(odm_logits=odm_logits2, odm_deltas=odm_deltas2)

  (_, det), (scores2, det2) = (jax.tree.map(np.asarray, _decode(o, batch))
                                for o in (outputs, outputs2))
  assert scores2.shape == (2, len(ANCHORS), NUM_CLASSES)
  assert np.all(scores2[filtered] == 0.0) and np.all(scores2[~filtered] > 0.0)
  for a, b in zip(jax.tree.leaves(det), jax.tree.leaves(det2)):
    np.testing.assert_array_equal(a, b)
  assert det.valid.sum() > 0
  # Without the filter the same change takes over the detections.
  open_ = outputs2.replace(arm_logits=np.where(filtered[..., None], np.float32(0.0), arm_logits))
  _, det3 = jax.tree.map(np.asarray, _decode(open_, batch))
  assert np.sum(det3.scores > 0.9) > np.sum(det.scores > 0.9)


def test_loss_without_objects_is_finite_with_zero_box_losses():
  arm_logits, arm_deltas, odm_logits, odm_deltas, gt, labels, _ = _case()
  loss, metrics, t, grads = _targets_loss_grads(arm_logits, arm_deltas, odm_logits, odm_deltas,
                                                np.zeros_like(gt), np.full_like(labels, -1))
  assert np.isfinite(float(loss))
  assert float(metrics["arm_box_loss"]) == 0.0 and float(metrics["odm_box_loss"]) == 0.0
  assert float(metrics["arm_num_pos"]) == 0.0 and float(metrics["odm_num_pos"]) == 0.0
  assert not np.any(np.asarray(t.arm_positive)) and not np.any(np.asarray(t.odm_positive))
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))


# ----------------------------------------------------------------------------
# Sizes: parameter count and anchors of the paper's models.
# ----------------------------------------------------------------------------


def _abstract(model: RefineDet, size: int):
  return jax.eval_shape(lambda key, x: model.init_with_output(key, x), jax.random.key(0),
                        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))


def test_refinedet320_voc_parameter_count():
  out, variables = _abstract(RefineDet(num_classes=20), 320)
  # RefineDet320 VGG16 for VOC (21 classes with background), counted layer by layer
  # from the released Caffe model (examples/refinedet/VGG16_VOC2012_320.py with
  # python/caffe/model_libs.py: VGGNetBody(reduced=True, dilated=False),
  # AddExtraLayers, CreateRefineDetHead; the PyTorch port luuuyi/RefineDet.PyTorch
  # has the same layers). kxk conv with bias: k * k * cin * cout + cout.
  #   VGG16 conv1_1 .. conv5_3 (as SSD300):                        14,714,688
  #   fc6 3x3 (dilation 3) 512 -> 1024:  9 * 512 * 1024 + 1024   =  4,719,616
  #   fc7 1x1 1024 -> 1024:              1024 * 1024 + 1024      =  1,049,600
  #   conv4_3_norm, conv5_3_norm (Normalize, channel_shared=False)  512 + 512 = 1,024
  #   conv6_1 1x1 1024 -> 256: 262,400; conv6_2 3x3 256 -> 512: 1,180,160
  #                                                                  =  1,442,560
  #   ARM (3x3, 3 anchors x (2 + 4) outputs) on c = 512, 512, 1024, 512:
  #     (9c + 1) * 18 = 82,962 * 3 + 165,906                     =    414,792
  #   TCB: TL*_1 3x3 c -> 256: 1,179,904 * 3 + 2,359,552 = 5,899,264
  #        TL*_2 and P* 3x3 256 -> 256: 8 * 590,080      = 4,720,640
  #        P*-up deconv 2x2 256 -> 256 (with bias): 3 * 262,400 = 787,200
  #                                                                  = 11,407,104
  #   ODM (3x3 on 256 channels, 3 anchors x (21 + 4)): (9 * 256 + 1) * 75 * 4 = 691,500
  #   total                                                          = 34,440,884
  assert _num_params(variables["params"]) == 34_440_884
  assert "batch_stats" not in variables
  assert out.anchors.shape == (6375, 4)  # (40^2 + 20^2 + 10^2 + 5^2) * 3
  assert out.odm_logits.shape == (1, 6375, 21) and out.arm_logits.shape == (1, 6375, 2)


def test_anchors_are_refinedets():
  model = RefineDet(num_classes=20)
  anchors = model.anchors([(40, 40), (20, 20), (10, 10), (5, 5)])
  np.testing.assert_allclose(anchors, refinedet_anchors(320), rtol=1e-6)
  # By hand: the first location (centre 4, 4) of level 0 (size 32): 1:1, then
  # w x h = 32 sqrt(2) x 32 / sqrt(2) (45.255 x 22.627) and its transpose.
  r = 16 * np.sqrt(2)  # half of 45.255
  np.testing.assert_allclose(anchors[:3], [[-12, -12, 20, 20], [4 - r, 4 - r / 2, 4 + r, 4 + r / 2],
                                           [4 - r / 2, 4 - r, 4 + r / 2, 4 + r]], rtol=1e-5)
  # The last one: conv6_2's last location, centre (4.5 * 64, 4.5 * 64), 1:2 of size 256.
  half_w, half_h = 128 / np.sqrt(2), 128 * np.sqrt(2)  # 256 / sqrt(2) x 256 sqrt(2)
  np.testing.assert_allclose(anchors[-1], [288 - half_w, 288 - half_h, 288 + half_w, 288 + half_h],
                             rtol=1e-5)
  big = RefineDet(num_classes=20, image_size=512)
  np.testing.assert_allclose(big.anchors([(64, 64), (32, 32), (16, 16), (8, 8)]),
                             refinedet_anchors(512), rtol=1e-6)


# ----------------------------------------------------------------------------
# The smoke-sized detector.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke():
  """``(model, variables)`` of the smoke config's RefineDet (64x64 input, 5 classes)."""
  config = refinedet320.get_config("smoke")
  model = jdet.build_model(config.model_name, **config.model)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, IMAGE, IMAGE, 3), jnp.float32))
  return model, numpy_variables(shapes)


def _batch(seed: int, size: int = IMAGE, b: int = 2) -> dict:
  rng = np.random.default_rng(seed)
  boxes = np.zeros((b, 8, 4), np.float32)
  labels = np.full((b, 8), -1, np.int32)
  for i in range(b):
    n = i + 1
    xy = rng.uniform(0, size / 2, (n, 2))
    boxes[i, :n] = np.concatenate([xy, xy + rng.uniform(10, size / 2, (n, 2))], axis=1)
    labels[i, :n] = rng.integers(0, NUM_CLASSES, n)
  return {"image": rng.normal(size=(b, size, size, 3)).astype(np.float32), "boxes": boxes,
          "labels": labels, "valid": np.ones((b,), bool)}


def test_loss_and_grad_compile_once(smoke):
  model, variables = smoke

  def loss_and_grad(params, batch):
    return loss_value_and_grad(model, variables, params, batch)

  ((l1, m1), g1), ((l2, m2), g2) = assert_traces_once(
      loss_and_grad, (variables["params"], _batch(0)), (variables["params"], _batch(1)))
  assert np.isfinite(l1) and np.isfinite(l2) and l1 != l2
  assert set(m1) == {"arm_cls_loss", "arm_box_loss", "odm_cls_loss", "odm_box_loss",
                     "arm_num_pos", "odm_num_pos", "num_filtered"}
  np.testing.assert_allclose(l1, m1["arm_cls_loss"] + m1["arm_box_loss"] + m1["odm_cls_loss"]
                             + m1["odm_box_loss"], rtol=1e-5)
  assert m1["arm_num_pos"] > 0 and m1["odm_num_pos"] > 0
  for part in ("backbone", "arm", "tcb", "odm"):
    leaves = jax.tree.leaves(g1[part])
    assert all(np.all(np.isfinite(x)) for x in leaves)
    assert any(np.any(x != 0) for x in leaves), part


def test_predict_in_original_pixels(smoke):
  model, variables = smoke
  k = model.max_detections
  image = np.random.default_rng(0).normal(size=(1, IMAGE, IMAGE, 3)).astype(np.float32)
  # (0) the original image, (1) resized from 128 x 256 with (sy, sx) = (0.5, 0.25), (2) filler.
  batch = {
      "image": np.repeat(image, 3, axis=0),
      "image_size": np.full((3, 2), IMAGE, np.int32),
      "orig_size": np.array([[IMAGE, IMAGE], [2 * IMAGE, 4 * IMAGE], [IMAGE, IMAGE]], np.int32),
      "scale_factor": np.array([[1.0, 1.0], [0.5, 0.25], [1.0, 1.0]], np.float32),
      "valid": np.array([True, True, False]),
  }
  out = jax.jit(lambda v, b: model.apply(v, b, method="predict"))(variables, batch)
  assert isinstance(out, jdet.Detections)
  det = jax.tree.map(np.asarray, out)
  assert det.boxes.shape == (3, k, 4) and det.scores.shape == (3, k)
  assert det.labels.shape == (3, k) and det.valid.shape == (3, k)
  assert det.valid[0].sum() > 0, "the random model should give some detections"
  np.testing.assert_array_equal(det.valid[1], det.valid[0])
  np.testing.assert_array_equal(det.labels[1], det.labels[0])
  np.testing.assert_allclose(det.boxes[1], det.boxes[0] * np.array([4.0, 2.0, 4.0, 2.0]),
                             rtol=1e-5, atol=1e-3)
  boxes = det.boxes[1][det.valid[1]]
  assert np.all(boxes >= 0) and np.all(boxes[:, [0, 2]] <= 4 * IMAGE)
  assert np.all(boxes[:, [1, 3]] <= 2 * IMAGE)
  assert not det.valid[2].any() and np.all(det.labels[2] == -1)


@pytest.mark.parametrize("size, maps", [(IMAGE, (8, 4, 2, 1)), (96, (12, 6, 3, 2)),
                                        (72, (9, 4, 2, 1))])
def test_candidates_at_input_size(smoke, size, maps):
  # 96: conv6_2's 2x2 upsamples to 4x4 for fc7's 3x3 (cropped); 72: conv5_3's
  # 4x4 upsamples to 8x8 for conv4_3's 9x9 (padded).
  model, variables = smoke
  scaled = model.at_input_size(size)
  num = sum(m * m for m in maps) * 3
  batch = {"image": jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)}
  boxes, scores = jax.eval_shape(lambda v, b: scaled.apply(v, b, method="candidates"),
                                 variables, batch)
  assert boxes.shape == (2, num, 4) and scores.shape == (2, num, NUM_CLASSES)
  # Anchors keep their sizes in pixels (32 .. 256) and the network's strides (8 .. 64:
  # cell i of a level covers the input from i * stride, at every input size).
  anchors = scaled.anchors([(m, m) for m in maps])
  first = np.cumsum([0] + [m * m * 3 for m in maps])[:-1]
  for level, (m, start) in enumerate(zip(maps, first)):
    stride = 8 * 2 ** level
    a, last = anchors[start], anchors[start + m * m * 3 - 1]
    np.testing.assert_allclose(a[2] - a[0], 32 * 2 ** level, rtol=1e-6)
    np.testing.assert_allclose((a[0] + a[2]) / 2, stride / 2, rtol=1e-6)
    np.testing.assert_allclose((last[0] + last[2]) / 2, (m - 0.5) * stride, rtol=1e-6)


# ----------------------------------------------------------------------------
# Configs.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("module", [refinedet320, refinedet512])
@pytest.mark.parametrize("variant, size, num_anchors", [
    ("coco", None, None), ("voc", None, None),
    ("shapes", 128, (32 ** 2 + 16 ** 2 + 8 ** 2 + 4 ** 2 + 2 ** 2) * 3),  # conv3_3 .. conv6_2
    ("smoke", 64, 255)])
def test_configs_build(module, variant, size, num_anchors):
  """Every variant builds its model and traces a forward pass at its input size
  (abstractly: compiling VGG16 at 512 would take minutes on a CPU). The smoke
  config's model runs for real in the tests above (the ``smoke`` fixture)."""
  config = module.get_config(variant)
  model = jdet.build_model(config.model_name, **config.model)
  assert isinstance(model, RefineDet)
  assert config.data.num_classes == model.num_classes
  if size is None:  # the paper's models: (40^2 + ... + 5^2) * 3 or (64^2 + ... + 8^2) * 3
    size, num_anchors = {refinedet320: (320, 6375), refinedet512: (512, 16320)}[module]
  assert model.image_size == size == config.data.transforms.size
  out, _ = _abstract(model, size)
  assert out.odm_logits.shape == (1, num_anchors, model.num_classes + 1)
  assert out.anchors.shape == (num_anchors, 4)
  if variant == "shapes":  # the budget of ssd300.py:shapes, to compare the two
    ssd = ssd300.get_config("shapes")
    for section in ("data", "optim", "train"):
      assert config[section].to_dict() == ssd[section].to_dict(), section
