"""SSD: matching, multibox loss, decoding and sizes against hand-worked cases.

The smoke-sized model gets its weights from NumPy (He-normal kernels, zero
biases, identity BatchNorm) rather than ``model.init``: values do not matter
to these tests, and compiling the random initialisers of every layer would
cost more than all the rest.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdet
from jdet.data import builder, pipeline
from jdet.engine import optim
from jdet.engine.train_state import TrainState
from jdet.engine.training import make_train_step
from jdet.models.backbones.vgg import SSD512_EXTRAS
from jdet.models.ssd import SSD, ssd_loss, ssd_targets
from jdet.ops.anchors import ssd_sizes
from jdet.testing import assert_traces_once

from configs import ssd300 as ssd300_config
from tests.helpers.references import best_iou_per_object
from tests.helpers.weights import numpy_variables
from tests.helpers.detector_batches import resized_filler_padded_batch

# Jitted once: eager op-by-op dispatch would compile every primitive separately.
_targets = jax.jit(ssd_targets)
_loss = jax.jit(ssd_loss, static_argnames=("neg_pos_ratio",))


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------


def _smoke_config():
  return ssd300_config.get_config("smoke")


@pytest.fixture(scope="module")
def smoke():
  """``(model, variables)`` of the smoke config's SSD (64x64 input, 5 classes)."""
  config = _smoke_config()
  model = jdet.build_model(config.model_name, **config.model)
  size = int(config.model.image_size)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  return model, numpy_variables(shapes)


def _num_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------
# Targets.
# ----------------------------------------------------------------------------


def test_ssd_targets_hand_worked():
  anchors = np.array([
      [0, 0, 10, 10],    # a0: centre (5, 5), 10 x 10
      [10, 0, 20, 10],   # a1
      [0, 10, 10, 20],   # a2
      [10, 10, 20, 20],  # a3: centre (15, 15), 10 x 10
      [0, 0, 20, 20],    # a4: 20 x 20
  ], np.float32)
  gt = np.array([
      [1, 0, 11, 8],     # g0, label 2: centre (6, 4), 10 x 8
      [12, 12, 16, 16],  # g1, label 0: centre (14, 14), 4 x 4
      [0, 0, 0, 0],      # padding
  ], np.float32)
  labels = np.array([2, 0, -1], np.int32)
  # IoUs (intersection / union):
  #   g0: a0 = 9*8 / (100 + 80 - 72) = 72/108 = 0.667 >= 0.5 -> positive
  #       a1 = 1*8 / (100 + 80 - 8) = 8/172 = 0.047, a4 = 80/400 = 0.2, a2 = a3 = 0
  #   g1: a3 = 16/100 = 0.16 (its best, < 0.5), a4 = 16/400 = 0.04, others 0
  #       -> a3 is forced positive for g1 although its IoU is only 0.16.
  #   a1, a2, a4: best IoU < 0.5 and nobody's best anchor -> background.
  classes, deltas, positive = _targets(anchors, gt, labels)
  np.testing.assert_array_equal(np.asarray(positive), [True, False, False, True, False])
  # Class ids: 0 = background, label + 1 for the positives.
  np.testing.assert_array_equal(np.asarray(classes), [3, 0, 0, 1, 0])
  # Deltas ((gx - ax) / aw / 0.1, (gy - ay) / ah / 0.1, log(gw / aw) / 0.2, log(gh / ah) / 0.2):
  #   a0 <- g0: dx = (6 - 5) / 10 / 0.1 = 1, dy = (4 - 5) / 10 / 0.1 = -1,
  #             dw = log(10 / 10) / 0.2 = 0, dh = log(8 / 10) / 0.2 = -1.1157178
  #   a3 <- g1: dx = dy = (14 - 15) / 10 / 0.1 = -1, dw = dh = log(4 / 10) / 0.2 = -4.5814537
  #   every other anchor: 0.
  expected = np.zeros((5, 4), np.float32)
  expected[0] = [1.0, -1.0, 0.0, -1.1157178]
  expected[3] = [-1.0, -1.0, -4.5814537, -4.5814537]
  np.testing.assert_allclose(np.asarray(deltas), expected, rtol=1e-5, atol=1e-6)


def test_ssd_targets_without_objects_are_all_background():
  anchors = np.array([[0, 0, 10, 10], [5, 5, 15, 15]], np.float32)
  classes, deltas, positive = _targets(anchors, np.zeros((3, 4), np.float32),
                                          np.full((3,), -1, np.int32))
  np.testing.assert_array_equal(np.asarray(classes), [0, 0])
  assert not np.any(np.asarray(positive))
  # Encoding the zero-size padding box gives -inf; the targets must not keep it.
  np.testing.assert_array_equal(np.asarray(deltas), np.zeros((2, 4)))


# ----------------------------------------------------------------------------
# Loss.
# ----------------------------------------------------------------------------


def _np_ce(logits: np.ndarray, target: int) -> float:
  """Softmax cross-entropy of one row, in float64."""
  logits = np.asarray(logits, np.float64)
  return float(np.log(np.sum(np.exp(logits))) - logits[target])


def _np_smooth_l1(d: np.ndarray) -> float:
  d = np.abs(np.asarray(d, np.float64))
  return float(np.sum(np.where(d < 1.0, 0.5 * d * d, d - 0.5)))


def _loss_case():
  """Two images of A = 6 anchors, 2 foreground classes (3 logits, background first)."""
  logits = np.array([
      # Image 0: a0 is positive (class 2); background CE of the negatives:
      [[0, 1, 2],    # a0, positive
       [2, 0, 0],    # a1: log(e^2 + 2) - 2 = 0.240 (easy)
       [0, 3, 0],    # a2: log(2 + e^3)     = 3.095 (hardest)
       [0, 0, 1],    # a3: log(2 + e)       = 1.551 (3rd)
       [1, 1, 1],    # a4: log(3)           = 1.099 (4th: not mined)
       [0, 2, 2]],   # a5: log(1 + 2 e^2)   = 2.759 (2nd)
      # Image 1: a0, a1 positive -> 3 * 2 = 6 negatives wanted, only 4 exist: all mined.
      [[1, 0, 0], [0, 2, 0], [0.5, 0, 1], [0, 1, 0], [2, 1, 0], [0, 0, 0]],
  ], np.float32)
  positive = np.zeros((2, 6), bool)
  positive[0, 0] = positive[1, 0] = positive[1, 1] = True
  target_classes = np.zeros((2, 6), np.int32)
  target_classes[0, 0], target_classes[1, 0], target_classes[1, 1] = 2, 1, 2
  target_deltas = np.zeros((2, 6, 4), np.float32)
  target_deltas[0, 0] = [0.5, -0.2, 1.0, 0.0]
  target_deltas[1, 0] = [0.0, 0.0, 0.0, 0.0]
  target_deltas[1, 1] = [-1.0, 2.0, 0.3, 0.1]
  deltas = np.zeros((2, 6, 4), np.float32)
  deltas[0, 0] = [0.0, 0.3, 3.0, 0.1]    # diffs 0.5, 0.5, 2, 0.1
  deltas[1, 0] = [0.2, -0.4, 0.0, 1.5]   # diffs 0.2, 0.4, 0, 1.5
  deltas[1, 1] = [-1.0, 2.0, 0.3, 0.1]   # exact
  deltas[:, 2:] = 100.0  # negatives' offsets must not count
  return logits, deltas, target_classes, target_deltas, positive


def test_ssd_loss_hand_worked():
  logits, deltas, target_classes, target_deltas, positive = _loss_case()
  # Image 0: positive a0 + hard negatives a2, a5, a3 (the 3 highest background CE; a4, a1 not).
  cls0 = _np_ce(logits[0, 0], 2) + sum(_np_ce(logits[0, i], 0) for i in (2, 5, 3))
  # Image 1: positives a0 (class 1), a1 (class 2) + all 4 negatives.
  cls1 = (_np_ce(logits[1, 0], 1) + _np_ce(logits[1, 1], 2)
          + sum(_np_ce(logits[1, i], 0) for i in (2, 3, 4, 5)))
  # Smooth L1 (beta 1) over the 3 positives' 4 offsets.
  box = sum(_np_smooth_l1(deltas[b, i] - target_deltas[b, i]) for b, i in ((0, 0), (1, 0), (1, 1)))
  num_pos = 3  # both terms are divided by the positives of the whole batch
  loss, metrics = _loss(jnp.asarray(logits), jnp.asarray(deltas), target_classes,
                           target_deltas, positive)
  np.testing.assert_allclose(float(metrics["cls_loss"]), (cls0 + cls1) / num_pos, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["box_loss"]), box / num_pos, rtol=1e-5)
  np.testing.assert_allclose(float(loss), (cls0 + cls1 + box) / num_pos, rtol=1e-5)
  assert float(metrics["num_pos"]) == num_pos
  # The easy negatives of image 0 matter only if mined: with a 1:1 ratio just a2 is.
  _, m1 = _loss(jnp.asarray(logits[:1]), jnp.asarray(deltas[:1]), target_classes[:1],
                   target_deltas[:1], positive[:1], neg_pos_ratio=1.0)
  np.testing.assert_allclose(float(m1["cls_loss"]),
                             _np_ce(logits[0, 0], 2) + _np_ce(logits[0, 2], 0), rtol=1e-5)


def test_ssd_loss_image_without_objects_is_zero_and_finite():
  anchors = np.array([[0, 0, 10, 10], [10, 0, 20, 10], [0, 10, 10, 20], [10, 10, 20, 20]],
                     np.float32)
  classes, target_deltas, positive = _targets(anchors, np.zeros((2, 4), np.float32),
                                                 np.array([-1, -1], np.int32))
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 3)), jnp.float32)
  deltas = jnp.ones((1, 4, 4), jnp.float32)

  def loss_fn(logits, deltas):
    return ssd_loss(logits, deltas, classes[None], target_deltas[None], positive[None])

  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(
      logits, deltas)
  # No positive: no box loss, and no negative is mined (3 * 0 = 0), so no class loss.
  assert float(metrics["box_loss"]) == 0.0
  assert float(metrics["cls_loss"]) == 0.0
  assert float(loss) == 0.0 and float(metrics["num_pos"]) == 0.0
  for g in grads:
    assert np.all(np.asarray(g) == 0.0)


def test_ssd_loss_ignores_filler_images():
  logits, deltas, target_classes, target_deltas, positive = _loss_case()
  # A third image full of positives with a large loss, marked as filler.
  rng = np.random.default_rng(1)
  f_logits = np.concatenate([logits, rng.normal(0, 5, (1, 6, 3)).astype(np.float32)])
  f_deltas = np.concatenate([deltas, np.full((1, 6, 4), 7.0, np.float32)])
  f_classes = np.concatenate([target_classes, np.ones((1, 6), np.int32)])
  f_target = np.concatenate([target_deltas, np.zeros((1, 6, 4), np.float32)])
  f_positive = np.concatenate([positive, np.array([[True, True, False, False, False, False]])])

  ref_loss, ref = _loss(logits, deltas, target_classes, target_deltas, positive)
  loss, metrics = _loss(f_logits, f_deltas, f_classes, f_target, f_positive,
                           image_valid=np.array([True, True, False]))
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  for k in ("cls_loss", "box_loss", "num_pos"):
    np.testing.assert_allclose(float(metrics[k]), float(ref[k]), rtol=1e-6)
  # The filler image would have changed the loss had it counted.
  unmasked, _ = _loss(f_logits, f_deltas, f_classes, f_target, f_positive)
  assert abs(float(unmasked) - float(ref_loss)) > 1e-2


# ----------------------------------------------------------------------------
# The detector: decoding, sizes, compilation.
# ----------------------------------------------------------------------------


def test_predict_shapes_scaling_and_filler(smoke):
  model, variables = smoke
  s, k = model.image_size, model.max_detections
  image = np.random.default_rng(0).normal(size=(1, s, s, 3)).astype(np.float32)
  predict = jax.jit(lambda v, b: model.apply(v, b, method="predict"))

  # The same image four times; the reference batch has no scale_factor / orig_size
  # (the input is the original image) and no valid flags.
  images = np.repeat(image, 4, axis=0)
  ref = jax.tree.map(np.asarray, predict(variables, {"image": images}))
  assert ref.boxes.shape == (4, k, 4) and ref.scores.shape == (4, k)
  assert ref.labels.shape == (4, k) and ref.valid.shape == (4, k)
  assert ref.valid[0].sum() > 0, "the random model should give some detections"

  # (0) scale 1, (1) resized from a 2s x 4s original with (sy, sx) = (0.5, 0.25),
  # (2) a filler image, (3) a 40 x 50 image padded to the input size.
  batch = resized_filler_padded_batch(images)
  out = predict(variables, batch)
  assert isinstance(out, jdet.Detections)
  det = jax.tree.map(np.asarray, out)
  assert det.boxes.shape == (4, k, 4)
  for b in (0, 1):
    np.testing.assert_array_equal(det.valid[b], ref.valid[b])
    np.testing.assert_array_equal(det.labels[b], ref.labels[b])
    np.testing.assert_allclose(det.scores[b], ref.scores[b], rtol=1e-6)
  np.testing.assert_allclose(det.boxes[0], ref.boxes[0], rtol=1e-5, atol=1e-4)
  # Original pixels = input pixels / scale: x / 0.25, y / 0.5.
  np.testing.assert_allclose(det.boxes[1], ref.boxes[1] * np.array([4.0, 2.0, 4.0, 2.0]),
                             rtol=1e-5, atol=1e-3)
  # Every valid box lies in its original image, x1 <= x2 and y1 <= y2.
  for b in (0, 1, 3):
    h, w = batch["orig_size"][b]
    boxes = det.boxes[b][det.valid[b]]
    assert len(boxes) > 0
    assert np.all(boxes >= 0.0)
    assert np.all(boxes[:, [0, 2]] <= w) and np.all(boxes[:, [1, 3]] <= h)
    assert np.all(boxes[:, 2] >= boxes[:, 0]) and np.all(boxes[:, 3] >= boxes[:, 1])
  # A filler image has no detection at all.
  assert not det.valid[2].any()
  assert np.all(det.labels[2] == -1) and np.all(det.scores[2] == 0.0)


def _abstract_outputs(model: SSD, size: int):
  return jax.eval_shape(lambda key, x: model.init_with_output(key, x), jax.random.key(0),
                        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))


def test_ssd300_default_boxes_and_parameter_count():
  (logits, deltas, anchors), variables = _abstract_outputs(SSD(num_classes=20), 300)
  # 38^2 * 4 + 19^2 * 6 + 10^2 * 6 + 5^2 * 6 + 3^2 * 4 + 1 * 4 = 5776 + 2166 + 600 + 150 + 36 + 4
  assert anchors.shape == (8732, 4)
  assert logits.shape == (1, 8732, 21) and deltas.shape == (1, 8732, 4)
  # SSD300 VGG16 for VOC (20 classes + background), counted from the paper's layers
  # (3x3 convs with bias: 9 * cin * cout + cout):
  #   VGG16 conv1_1 .. conv5_3:                          14,714,688
  #     (1,792 + 36,928 + 73,856 + 147,584 + 295,168 + 2 * 590,080 + 1,180,160
  #      + 5 * 2,359,808)
  #   fc6 3x3 dilated 512 -> 1024: 9 * 512 * 1024 + 1024 =  4,719,616
  #   fc7 1x1 1024 -> 1024:        1024 * 1024 + 1024    =  1,049,600
  #   L2Norm on conv4_3: 512 scales                      =        512
  #   extras: conv8 (1x1 1024->256, 3x3 256->512) 262,400 + 1,180,160
  #           conv9..11 (1x1 ->128, 3x3 128->256) 65,664 + 295,168 + 2 * (32,896 + 295,168)
  #                                                      =  2,459,520
  #   heads: per level (9 * c + 1) * P * (21 + 4) for (c, P) = (512, 4), (1024, 6),
  #          (512, 6), (256, 6), (256, 4), (256, 4):
  #          460,900 + 1,382,550 + 691,350 + 345,750 + 230,500 + 230,500 = 3,341,550
  #   total                                              = 26,285,486
  assert _num_params(variables["params"]) == 26_285_486
  assert "batch_stats" not in variables  # the paper's VGG16 has no BatchNorm


def test_ssd300_coco_parameter_count_matches_torchvision():
  # torchvision's ssd300_vgg16 (91 COCO ids incl. background) lists 35,641,826 parameters:
  # the VOC count above with heads (9c + 1) * P * (91 + 4): 22,943,936 + 133,662 * 95.
  _, variables = _abstract_outputs(SSD(num_classes=90), 300)
  assert _num_params(variables["params"]) == 35_641_826


def test_ssd512_default_boxes():
  model = SSD(num_classes=20, image_size=512, extras=SSD512_EXTRAS,
              aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,)),
              strides=(8, 16, 32, 64, 128, 256, 512))
  (logits, _, anchors), _ = _abstract_outputs(model, 512)
  # Maps 64, 32, 16, 8, 4, 2, 1 with 4, 6, 6, 6, 6, 4, 4 boxes per location:
  # 16384 + 6144 + 1536 + 384 + 96 + 16 + 4 = 24564.
  assert anchors.shape == (24564, 4)
  assert logits.shape == (1, 24564, 21)


def test_train_step_compiles_once(smoke):
  model, variables = smoke
  config = _smoke_config()
  source = builder.build_source(config.data, "train")
  batches = pipeline.train_batches(source, builder.build_transforms(config.data, train=True),
                                   batch_size=int(config.data.batch_size), seed=0)
  b1, b2 = next(batches), next(batches)
  assert not np.array_equal(b1["image"], b2["image"])
  tx, schedule = optim.build_optimizer(config.optim, total_steps=int(config.train.num_steps))
  state = TrainState.create(params=variables["params"], batch_stats=variables["batch_stats"],
                            tx=tx, rng=jax.random.key(0))
  (s1, m1), (s2, m2) = assert_traces_once(make_train_step(model, schedule), (state, b1),
                                          (state, b2))
  for s, m in ((s1, m1), (s2, m2)):
    assert int(s.step) == 1 and m["finite"] == 1.0 and np.isfinite(m["loss"])
  assert m1["loss"] != m2["loss"]  # two different batches went through the one compiled step


# ----------------------------------------------------------------------------
# conv3_3 as a source (S3FD's stride-4 layer) and the shapes default boxes.
# ----------------------------------------------------------------------------


def test_conv3_3_source_comes_first_l2_normalised_and_leaves_the_rest_unchanged():
  from jdet.models.backbones.vgg import VGG16
  common = dict(widths=(4, 8, 16, 32, 32), fc_width=32, extras=((16, 32, 3, 2, 1),),
                fc6_dilation=1)
  plain, with_conv3 = VGG16(**common), VGG16(**common, conv3_3_l2norm_scale=10.0)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
  variables = with_conv3.init(jax.random.key(0), x)
  assert with_conv3.out_channels == (16,) + plain.out_channels
  feats = with_conv3.apply(variables, x)
  # The plain network is the same one without conv3_3_norm's scale: same other outputs.
  params = {k: v for k, v in variables["params"].items() if k != "conv3_3_norm"}
  reference = plain.apply({"params": params}, x)
  assert len(feats) == len(reference) + 1
  for got, want in zip(feats[1:], reference):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # conv3_3: stride 4, its channels, and every pixel's channel vector of L2 norm 10.
  assert feats[0].shape == (2, 16, 16, 16)
  norms = np.linalg.norm(np.asarray(feats[0]), axis=-1)
  np.testing.assert_allclose(norms[norms > 0], 10.0, rtol=1e-5)
  assert (norms > 0).mean() > 0.9


def _shapes_objects(num_images: int = 256) -> list[np.ndarray]:
  config = ssd300_config.get_config("shapes")
  source = builder.build_source(config.data, "val")
  return [np.asarray(source[i].boxes, np.float32) for i in range(num_images)]


def _ssd_without_conv3_3(model):
  """The same SSD design without the stride-4 level: conv4_3 first, the other levels kept."""
  min_sizes, max_sizes = ssd_sizes(128, model.num_levels, *model.size_rule)
  return model.clone(conv3_3_l2norm_scale=None, aspect_ratios=model.aspect_ratios[1:],
                     min_sizes=min_sizes[1:], max_sizes=max_sizes[1:])


def _refinedet_without_conv3_3(model):
  """The same RefineDet design without the stride-4 level, the other anchors kept."""
  return model.clone(conv3_3_l2norm_scale=None, strides=model.strides[1:],
                     anchor_sizes=model.anchor_sizes_by_level[1:])


@pytest.mark.parametrize("config_name,without_conv3_3", [
    ("ssd300", _ssd_without_conv3_3), ("refinedet320", _refinedet_without_conv3_3)])
def test_shapes_default_boxes_cover_the_validation_objects(config_name, without_conv3_3):
  """With conv3_3 as the first source, nearly every object of the shapes
  validation split overlaps a default box by IoU >= 0.5 (the matching rule);
  without it a large share has only its forced best match."""
  import importlib
  config = importlib.import_module(f"configs.{config_name}").get_config("shapes")
  model = jdet.build_model(config.model_name, **config.model)
  assert model.conv3_3_l2norm_scale is not None
  out, _ = jax.eval_shape(lambda key, x: model.init_with_output(key, x), jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 128, 128, 3), jnp.float32))
  maps = [(128 // s, 128 // s) for s in (4, 8, 16, 32, 64, 128)][:model.num_levels]
  anchors = model.anchors(maps)
  assert anchors.shape == (out.anchors.shape[0], 4)
  objects = _shapes_objects()
  best = best_iou_per_object(anchors, objects)
  assert len(best) > 500 and (best < 0.5).mean() < 0.01
  coarse = without_conv3_3(model).anchors(maps[1:])
  assert (best_iou_per_object(coarse, objects) < 0.5).mean() > 0.05
