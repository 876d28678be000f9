"""Sparse R-CNN: sizes, set targets and loss against NumPy / scipy, decoding, shapes, devices.

Parity with MMDetection's implementation (every stage, matchings, the 18 loss
terms, detections) is in tests/convert/test_mmdet_sparse_rcnn.py.
"""

from __future__ import annotations

import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import jdet
from jdet import parallel
from jdet.models.heads.sparse_rcnn_head import (AUTHORS_SCALE_CLAMP, MMDET_SCALE_CLAMP,
                                                apply_deltas)
from jdet.models.sparse_rcnn import (SparseRCNN, decode_detections, matching_cost, set_loss,
                                     set_targets)
from jdet.testing import assert_traces_once

from configs import sparse_rcnn as sparse_config
from tests.helpers.detector_batches import loss_value_and_grad

TINY = dict(num_classes=5, depth=18, widths=(4, 8, 16, 32), stem_width=4, norm="batch",
            frozen_stages=-1, fpn_channels=16, num_proposals=12, num_stages=2, num_heads=2,
            dim_feedforward=32, dim_dynamic=4, max_detections=20)


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _abstract_params(model, size: int = 64):
  init = functools.partial(model.init, method="predict")
  batch = {"image": jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)}
  return jax.eval_shape(init, jax.random.key(0), batch)["params"]


def _batch(rng, b: int = 2, size: int = 64, boxes_per_image=(3, 0)):
  """Images with a few random boxes each (the second image empty by default)."""
  m = 4
  boxes = np.zeros((b, m, 4), np.float32)
  labels = np.full((b, m), -1, np.int32)
  for i, n in enumerate(boxes_per_image):
    for j in range(n):
      x, y = rng.uniform(0, size * 0.6, 2)
      w, h = rng.uniform(6, size * 0.4, 2)
      boxes[i, j] = [x, y, x + w, y + h]
      labels[i, j] = rng.integers(0, 5)
  return dict(image=rng.normal(size=(b, size, size, 3)).astype(np.float32), boxes=boxes,
              labels=labels, image_size=np.array([[size, size], [size - 8, size]] * (b // 2),
                                                 np.int32))


# ----------------------------------------------------------------------------
# Sizes.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("proposals,total", [(100, 106_237_768), (300, 106_289_768)])
def test_parameter_counts_of_the_coco_model(proposals, total):
  # The counts measured on the authors' model with frozen BatchNorm affine as buffers.
  params = _abstract_params(SparseRCNN(num_classes=80, num_proposals=proposals))
  assert _count(params) == total
  stages = [k for k in params if k.startswith("stage")]
  assert stages == [f"stage{t}" for t in range(6)]
  for t in stages:  # no sharing: six full copies
    assert _count(params[t]) == 13_235_412
  assert _count(params["stage0"]["attention"]) == 263_168
  assert _count(params["stage0"]["dynamic_conv"]["dynamic_layer"]) == 8_421_376
  assert _count(params["stage0"]["ffn"]) == 1_050_880
  assert _count(params["neck"]) == 3_344_384
  assert _count(params["backbone"]) == 23_454_912
  assert params["proposal_boxes"].shape == (proposals, 4)
  assert params["proposal_features"].shape == (proposals, 256)
  # Each extra class adds 257 per stage.
  assert _count(_abstract_params(SparseRCNN(num_classes=81))) == 106_237_768 + 6 * 257


def test_initialisation(rng):
  model = SparseRCNN(**TINY)
  v = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  p = v["params"]
  np.testing.assert_array_equal(p["proposal_boxes"], np.tile([0.5, 0.5, 1.0, 1.0], (12, 1)))
  assert 0.5 < float(jnp.std(p["proposal_features"])) < 1.5
  np.testing.assert_allclose(p["stage0"]["cls_logits"]["bias"], -math.log(99), rtol=1e-6)
  # Stages are initialised independently.
  assert not np.allclose(p["stage0"]["ffn"]["fc1"]["kernel"], p["stage1"]["ffn"]["fc1"]["kernel"])
  # xavier-uniform on the combined q/k/v matrix [D, 3D].
  bound = math.sqrt(6 / (16 + 48))
  k = np.asarray(p["stage0"]["attention"]["in_proj"]["kernel"])
  assert k.shape == (16, 48) and np.abs(k).max() <= bound and np.abs(k).max() > 0.8 * bound


# ----------------------------------------------------------------------------
# Box update.
# ----------------------------------------------------------------------------


def test_box_update_weights_and_clamps():
  box = np.array([[10.0, 20.0, 50.0, 100.0]])  # centre (30, 60), size 40 x 80
  d = np.array([[2.0, -4.0, 0.0, math.log(2.0)]])
  # Weights (2, 2, 1, 1): dx = 1 -> +40 px, dy = -2 -> -160 px, w x1, h x2.
  np.testing.assert_allclose(apply_deltas(d, box), [[50.0, -180.0, 90.0, -20.0]], rtol=1e-6)
  big = np.array([[0.0, 0.0, 20.0, -6.0]])
  out = np.asarray(apply_deltas(big, box))
  # Authors: dw clamped at log(1e5 / 16) from above only; dh = -6 passes.
  np.testing.assert_allclose(out[0, 2] - out[0, 0], 40 * math.exp(AUTHORS_SCALE_CLAMP), rtol=1e-5)
  np.testing.assert_allclose(out[0, 3] - out[0, 1], 80 * math.exp(-6.0), rtol=1e-4)
  out = np.asarray(apply_deltas(big, box, scale_clamp=MMDET_SCALE_CLAMP, symmetric_clamp=True))
  np.testing.assert_allclose(out[0, 2] - out[0, 0], 40 * math.exp(MMDET_SCALE_CLAMP), rtol=1e-5)
  np.testing.assert_allclose(out[0, 3] - out[0, 1], 80 * math.exp(-MMDET_SCALE_CLAMP), rtol=1e-5)


# ----------------------------------------------------------------------------
# Set targets and loss against NumPy / scipy.
# ----------------------------------------------------------------------------


def _np_giou(a, b):
  """Pairwise GIoU of [N, 4] and [M, 4] xyxy boxes in float64."""
  a, b = a[:, None].astype(np.float64), b[None].astype(np.float64)
  iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
  ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
  inter = iw * ih
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
  union = area(a) + area(b) - inter
  hull = ((np.maximum(a[..., 2], b[..., 2]) - np.minimum(a[..., 0], b[..., 0]))
          * (np.maximum(a[..., 3], b[..., 3]) - np.minimum(a[..., 1], b[..., 1])))
  return inter / union - (hull - union) / hull


def _np_cost(logits, boxes, gt_boxes, gt_labels, whwh, eps=1e-8):
  """The paper's matching cost, written out in float64."""
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  pos = 0.25 * (1 - p) ** 2 * -np.log(p + eps)
  neg = 0.75 * p ** 2 * -np.log(1 - p + eps)
  cls = (pos - neg)[:, gt_labels]
  l1 = np.abs(boxes[:, None] / whwh - gt_boxes[None] / whwh).sum(-1)
  return 2 * cls + 5 * l1 - 2 * _np_giou(boxes, gt_boxes)


def _random_predictions(rng, n, c, size=100.0):
  xy = rng.uniform(0, size * 0.7, (n, 2))
  wh = rng.uniform(3, size * 0.3, (n, 2))
  return (rng.normal(scale=2.0, size=(n, c)).astype(np.float32),
          np.concatenate([xy, xy + wh], 1).astype(np.float32))


@pytest.mark.parametrize("solver", ["host", "jax"])
def test_set_targets_reach_scipys_optimum_of_the_papers_cost(rng, solver):
  n, c, m = 12, 5, 6
  logits, boxes = _random_predictions(rng, n, c)
  _, gt_boxes = _random_predictions(rng, m, c)
  gt_labels = rng.integers(0, c, m).astype(np.int32)
  whwh = np.array([100.0, 80.0, 100.0, 80.0], np.float32)
  cost = np.asarray(matching_cost(logits, boxes, gt_boxes, gt_labels, whwh))
  expected = _np_cost(logits, boxes, gt_boxes, gt_labels, whwh)
  np.testing.assert_allclose(cost, expected, rtol=1e-4, atol=1e-4)
  for valid in (m, 3, 0):  # the last columns are padding
    labels = np.where(np.arange(m) < valid, gt_labels, -1)
    t = jax.jit(functools.partial(set_targets, solver=solver))(logits, boxes, gt_boxes, labels,
                                                                whwh)
    match = np.asarray(t.match)
    assert (match[valid:] == -1).all() and len(set(match[:valid])) == valid
    r, cidx = scipy.optimize.linear_sum_assignment(expected[:, :valid])
    np.testing.assert_allclose(expected[match[:valid], np.arange(valid)].sum(),
                               expected[r, cidx].sum(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(t.cost)[:valid], cost[match[:valid], np.arange(valid)],
                               rtol=1e-5, atol=1e-6)


def test_set_loss_by_hand(rng):
  b, n, c, m = 2, 6, 3, 3
  logits = rng.normal(size=(b, n, c)).astype(np.float32)
  boxes = np.stack([_random_predictions(rng, n, c)[1] for _ in range(b)])
  gt_boxes = np.zeros((b, m, 4), np.float32)
  gt_boxes[0, :2] = _random_predictions(rng, 2, c)[1]
  gt_labels = np.array([[2, 0, -1], [-1, -1, -1]], np.int32)  # the second image is empty
  match = np.array([[4, 1, -1], [-1, -1, -1]], np.int32)
  whwh = np.array([[100, 90, 100, 90], [60, 50, 60, 50]], np.float32)
  focal, l1, giou = (float(x) for x in set_loss(logits, boxes, gt_boxes, gt_labels, whwh, match,
                                                 normalizer=2.0))
  # Focal over every logit of both images, target 1 at (4, class 2) and (1, class 0) of image 0.
  target = np.zeros((b, n, c))
  target[0, 4, 2] = target[0, 1, 0] = 1
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  pt = np.where(target == 1, p, 1 - p)
  alpha = np.where(target == 1, 0.25, 0.75)
  np.testing.assert_allclose(focal, 2 * np.sum(-alpha * (1 - pt) ** 2 * np.log(pt)) / 2, rtol=1e-5)
  pred = boxes[0, [4, 1]]
  gt = gt_boxes[0, :2]
  np.testing.assert_allclose(l1, 5 * np.abs(pred / whwh[0] - gt / whwh[0]).sum() / 2, rtol=1e-5)
  g = np.diag(_np_giou(pred, gt))
  np.testing.assert_allclose(giou, 2 * np.sum(1 - g) / 2, rtol=1e-5)


def _tiny(**kw):
  model = SparseRCNN(**{**TINY, **kw})
  variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  return model, variables


def _loss(model, variables, batch):
  out, _ = model.apply(variables, batch, method="loss", mutable=["batch_stats"])
  return out


def test_loss_terms_normalisation_and_empty_images(rng):
  model, v = _tiny()
  batch = _batch(rng, boxes_per_image=(3, 0))
  total, metrics = jax.jit(functools.partial(_loss, model))(v, batch)
  terms = [k for k in metrics if k.startswith("s")]
  assert sorted(terms) == sorted(f"s{t}_loss_{n}" for t in range(2) for n in ("cls", "bbox", "iou"))
  np.testing.assert_allclose(float(total), sum(float(metrics[k]) for k in terms), rtol=1e-5)
  assert float(metrics["num_gt"]) == 1.5  # 3 boxes over 2 images
  # Recompute stage 1's terms from its outputs and the returned matching.
  outs, _ = model.apply(v, batch, train=True, method="stage_outputs", mutable=["batch_stats"])
  targets = model.apply(v, outs, batch, method="targets")
  cls, l1, giou = set_loss(outs.logits[1], outs.boxes[1], batch["boxes"], batch["labels"],
                           outs.whwh, targets.match[1], normalizer=3.0)
  np.testing.assert_allclose([metrics["s1_loss_cls"], metrics["s1_loss_bbox"],
                              metrics["s1_loss_iou"]], [cls, l1, giou], rtol=1e-5)
  assert (np.asarray(targets.match)[:, 1] == -1).all()  # the empty image matches nothing

  # No objects in the whole batch: only background focal terms, divided by 1.
  empty = dict(batch, labels=np.full_like(batch["labels"], -1))
  grad_fn = jax.jit(jax.grad(lambda p: _loss(model, {**v, "params": p}, empty)[0]))
  total, metrics = jax.jit(functools.partial(_loss, model))(v, empty)
  assert np.isfinite(float(total)) and float(metrics["num_gt"]) == 0.0
  for t in range(2):
    assert float(metrics[f"s{t}_loss_bbox"]) == 0.0 and float(metrics[f"s{t}_loss_iou"]) == 0.0
    assert float(metrics[f"s{t}_loss_cls"]) > 0
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grad_fn(v["params"])))


def test_the_ground_truth_order_does_not_matter(rng):
  model, v = _tiny()
  batch = _batch(rng, boxes_per_image=(3, 2))
  # Padding first and boxes permuted: same loss.
  perm = np.array([3, 1, 0, 2])
  shuffled = dict(batch, boxes=batch["boxes"][:, perm], labels=batch["labels"][:, perm])
  a = jax.jit(functools.partial(_loss, model))(v, batch)
  b = jax.jit(functools.partial(_loss, model))(v, shuffled)
  np.testing.assert_allclose(float(a[0]), float(b[0]), rtol=1e-6)


def test_host_and_jax_matchers_give_the_same_loss(rng):
  model, v = _tiny()
  batch = _batch(rng, boxes_per_image=(4, 1))
  host = jax.jit(functools.partial(_loss, model))(v, batch)
  jitted = jax.jit(functools.partial(_loss, model.clone(matcher="jax")))(v, batch)
  np.testing.assert_allclose(float(host[0]), float(jitted[0]), rtol=1e-6)


def test_gradients_stop_at_the_boxes_between_stages(rng):
  model, v = _tiny()
  batch = _batch(rng, boxes_per_image=(3, 1))

  def stage0_box(p):
    return jnp.sum(model.apply({**v, "params": p}, batch, method="stage_outputs").boxes[0])

  def stage1_box(p):
    return jnp.sum(model.apply({**v, "params": p}, batch, method="stage_outputs").boxes[1])

  g0 = jax.grad(stage0_box)(v["params"])
  g1 = jax.grad(stage1_box)(v["params"])
  # Stage 0's boxes move with the proposal boxes; stage 1's input boxes are detached, so
  # its boxes depend on the proposal boxes only through nothing at all.
  assert np.abs(np.asarray(g0["proposal_boxes"])).sum() > 0
  assert np.abs(np.asarray(g1["proposal_boxes"])).sum() == 0
  # ... but on stage 0's parameters through the proposal features (not detached).
  assert np.abs(np.asarray(g1["stage0"]["ffn"]["fc1"]["kernel"])).sum() > 0


# ----------------------------------------------------------------------------
# Decoding.
# ----------------------------------------------------------------------------


def test_decode_takes_the_best_pairs_without_nms(rng):
  b, n, c, k = 2, 5, 3, 4
  logits = rng.normal(size=(b, n, c)).astype(np.float32)
  boxes = np.stack([_random_predictions(rng, n, c, size=60.0)[1] for _ in range(b)])
  boxes[0, 0] = [70.0, 70.0, 90.0, 90.0]  # outside the 64 x 64 image: empty after clipping
  batch = dict(image=np.zeros((b, 64, 64, 3), np.float32),
               image_size=np.array([[64, 64], [64, 64]], np.int32),
               scale_factor=np.array([[0.5, 0.5], [1.0, 2.0]], np.float32),
               orig_size=np.array([[128, 128], [64, 32]], np.int32))
  det = decode_detections(logits, boxes, batch, max_detections=k)
  for i in range(b):
    flat = logits[i].reshape(-1)
    order = np.argsort(-flat, kind="stable")[:k]
    for row, j in enumerate(order):
      if i == 0 and j // c == 0:
        assert not det.valid[i, row] and det.labels[i, row] == -1
        continue
      assert det.valid[i, row] and det.labels[i, row] == j % c
      sy, sx = batch["scale_factor"][i]
      want = np.clip(boxes[i, j // c], 0, 64) / np.array([sx, sy, sx, sy])
      want = np.minimum(want, np.array([batch["orig_size"][i][1], batch["orig_size"][i][0]] * 2))
      np.testing.assert_allclose(det.boxes[i, row], want, rtol=1e-5, atol=1e-4)
      np.testing.assert_allclose(det.scores[i, row], 1 / (1 + np.exp(-flat[j])), rtol=1e-5)


def test_predict_shapes_and_filler_images(rng):
  model, v = _tiny()
  batch = _batch(rng)
  batch["valid"] = np.array([True, False])
  det = jax.jit(functools.partial(model.apply, method="predict"))(v, batch)
  assert det.boxes.shape == (2, 20, 4) and det.labels.dtype == jnp.int32
  assert not np.asarray(det.valid[1]).any()
  # 12 proposals x 5 classes = 60 pairs: the best 20, by descending score.
  scores = np.asarray(det.scores[0])[np.asarray(det.valid[0])]
  assert (np.diff(scores) <= 0).all() and len(scores) > 10


# ----------------------------------------------------------------------------
# Compilation, devices, configs.
# ----------------------------------------------------------------------------


def test_a_training_step_compiles_once(rng):
  model, v = _tiny()

  def step(params, batch):
    return jax.grad(lambda p: _loss(model, {**v, "params": p}, batch)[0])(params)

  a, b = _batch(rng, boxes_per_image=(3, 0)), _batch(rng, boxes_per_image=(1, 4))
  outs = assert_traces_once(step, (v["params"], a), (v["params"], b))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(outs))


def test_four_devices_give_the_same_loss_and_gradients(rng):
  if jax.device_count() != 4:
    pytest.skip("needs the 4 simulated CPU devices of conftest.py")
  model, v = _tiny()
  batch = _batch(rng, b=4, boxes_per_image=(3, 0, 2, 1))

  def value_and_grad(variables, batch):
    return loss_value_and_grad(model, variables, variables["params"], batch)

  (one, m1), g1 = jax.jit(value_and_grad)(v, batch)
  mesh = parallel.make_mesh()
  (four, m4), g4 = jax.jit(value_and_grad)(parallel.replicate(v, mesh),
                                           parallel.shard_batch(batch, mesh))
  np.testing.assert_allclose(float(four), float(one), rtol=1e-5)
  for k in m1:
    np.testing.assert_allclose(float(m4[k]), float(m1[k]), rtol=1e-4, atol=1e-6, err_msg=k)
  # Gradients to float32 rounding (the sums run in another order on 4 devices): within
  # 1e-4 of each leaf's largest entry.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g4)):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4 * max(np.abs(a).max(), 1e-3),
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("variant", ["coco", "coco_300", "coco,r101", "coco,1x", "shapes", "smoke"])
def test_configs_build(variant):
  config = sparse_config.get_config(variant)
  assert config.model_name == "sparse_rcnn"
  model = jdet.build_model(config.model_name, **config.model)
  params = _abstract_params(model)
  assert config.data.num_classes == model.num_classes
  assert params["proposal_boxes"].shape == (model.num_proposals, 4)
  assert model.max_detections >= min(model.num_proposals, 100)
  if variant == "coco,1x":
    assert model.symmetric_clamp and math.isclose(model.scale_clamp, MMDET_SCALE_CLAMP)
  if variant == "coco,r101":
    assert model.depth == 101
  if variant.startswith("coco"):
    assert config.optim.lr == 2.5e-5 and config.optim.clip_norm == 1.0
    assert model.frozen_parameters() == ("^backbone/(conv1|bn1|layer1)/",)


def test_coco_variant_without_data_fails_at_start_up_pointing_to_shapes(tmp_path):
  from jdet.data import builder
  config = sparse_config.get_config(f"coco,root={tmp_path / 'coco'}")
  with pytest.raises(builder.DataNotFoundError, match=r"annotations/instances_train2017\.json.*:shapes"):
    builder.build_source(config.data, "train")
  # train.py ends with that message as its last line, before building anything.
  import subprocess
  import sys
  root = pathlib.Path(__file__).resolve().parents[2]
  proc = subprocess.run([sys.executable, "train.py", "--config",
                         f"configs/sparse_rcnn.py:coco,root={tmp_path / 'coco'}",
                         "--workdir", str(tmp_path / "run")], cwd=root, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: config field data.train.annotation_file") and ":shapes" in last
  assert not (tmp_path / "run" / "checkpoints").exists()
