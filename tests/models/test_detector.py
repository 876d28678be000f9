"""The shared detector layer: the contract, its helpers, frozen parameters (the import rules:
tests/test_layers.py)."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdet
from jdet import boxes as box_lib
from jdet.engine import restore
from jdet.models import detector
from jdet.models.detector import (Detector, encode_positives, finalize_detections, pad_to,
                                  supports_tta, to_original_pixels)

from configs import faster_rcnn_r50_fpn as frcnn_config

DETECTORS = ("ssd", "refinedet", "faster_rcnn", "sparse_rcnn")


def test_every_registered_detector_keeps_the_contract():
  for name, cls in jdet.MODELS.items():
    assert name in DETECTORS
    for method in ("loss", "predict", "frozen_parameters"):
      assert callable(getattr(cls, method, None)), f"{name} lacks {method}"
  assert supports_tta(jdet.build_model("ssd", num_classes=3))
  assert supports_tta(jdet.build_model("refinedet", num_classes=3))
  assert not supports_tta(jdet.build_model("sparse_rcnn", num_classes=3))
  assert not supports_tta(jdet.build_model("faster_rcnn", num_classes=3))
  assert isinstance(jdet.build_model("sparse_rcnn", num_classes=3), Detector)


def test_batch_defaults():
  batch = {"image": np.zeros((3, 20, 30, 3), np.float32)}
  np.testing.assert_array_equal(detector.real_image_sizes(batch), [[20, 30]] * 3)
  np.testing.assert_array_equal(detector.image_valid(batch), [True] * 3)
  batch.update(labels=np.array([[1, -1], [0, 2], [2, 2]]), valid=np.array([True, False, True]))
  np.testing.assert_array_equal(detector.gt_labels(batch), [[1, -1], [-1, -1], [2, 2]])


def test_build_model_refuses_unknown_keys_naming_them_and_the_fields():
  with pytest.raises(ValueError, match=r"unknown ssd model settings \['iou_threshold'\]; "
                                       r"its fields are .*match_iou"):
    jdet.build_model("ssd", num_classes=3, iou_threshold=0.5)


def test_parts_are_built_from_the_fields_they_share():
  from jdet.models.backbones.vgg import VGG16
  from jdet.models.body import BodyFields, ResNetFPN
  from jdet.models.heads.sparse_rcnn_head import DynamicStage
  assert detector.field_names(BodyFields) == ("depth", "widths", "stem_width", "norm", "norm_eps",
                                               "frozen_stages", "fpn_channels", "dtype")
  frcnn = jdet.build_model("faster_rcnn", num_classes=3, depth=18, widths=[8, 16, 32, 64],
                           norm_eps=0.0, dtype=jnp.bfloat16)
  body = detector.build_from_fields(ResNetFPN, frcnn, num_extra=2)
  assert (body.depth, body.widths, body.norm_eps, body.dtype, body.num_extra) == \
      (18, (8, 16, 32, 64), 0.0, jnp.bfloat16, 2)
  # SSD's l2norm_scale is its own field, not a VGGFields one: VGG16 takes it as a setting.
  ssd = jdet.build_model("ssd", num_classes=3, fc_width=64, l2norm_scale=5.0)
  vgg = detector.build_from_fields(VGG16, ssd, pool5_stride=2)
  assert (vgg.fc_width, vgg.pool5_stride, vgg.l2norm_scale) == (64, 2, 20.0)
  sparse = jdet.build_model("sparse_rcnn", num_classes=7, num_heads=2, depth=18)
  stage = detector.build_from_fields(DynamicStage, sparse, name="stage0")
  assert (stage.num_classes, stage.num_heads, stage.name) == (7, 2, "stage0")
  with pytest.raises(ValueError, match=r"\['depth'\] come from FasterRCNN's fields"):
    detector.build_from_fields(ResNetFPN, frcnn, depth=50, num_extra=1)


def test_config_model_sections_hold_every_plain_field():
  from configs import common
  for name, cls in jdet.MODELS.items():
    section = common.model_section(name, num_classes=3)
    assert set(section) == set(detector.field_names(cls)) - {"dtype"}, name
    model = jdet.build_model(name, **section)
    assert model.num_classes == 3 and model.max_detections == cls(num_classes=3).max_detections
  frcnn = common.model_section("faster_rcnn", num_classes=3, norm_eps=0.0)
  assert frcnn.norm_eps == 0.0 and frcnn.rpn_nms_threshold == 0.7 and frcnn.pre_nms_top_k is None


def test_finalize_pads_masks_and_maps_to_original_pixels():
  boxes = np.array([[[10.0, 10.0, 30.0, 50.0], [0.0, 0.0, 400.0, 400.0]]] * 2, np.float32)
  scores = np.array([[0.9, 0.5]] * 2, np.float32)
  labels = np.array([[1, 2]] * 2, np.int32)
  valid = np.array([[True, True], [True, False]])
  batch = {"scale_factor": np.array([[0.5, 2.0], [1.0, 1.0]], np.float32),
           "orig_size": np.array([[100, 50], [60, 60]], np.int32),
           "valid": np.array([True, True])}
  det = finalize_detections(boxes, scores, labels, valid, batch, max_detections=4)
  assert det.boxes.shape == (2, 4, 4) and det.labels.shape == (2, 4)
  # (sy, sx) = (0.5, 2): x / 2, y * 2, then clipped to (h, w) = (100, 50).
  np.testing.assert_allclose(det.boxes[0, 0], [5.0, 20.0, 15.0, 100.0])
  np.testing.assert_allclose(det.boxes[0, 1], [0.0, 0.0, 50.0, 100.0])
  np.testing.assert_array_equal(det.valid, [[True, True, False, False], [True, False, False, False]])
  np.testing.assert_array_equal(det.labels, [[1, 2, -1, -1], [1, -1, -1, -1]])
  np.testing.assert_array_equal(det.scores[1], np.float32([0.9, 0.0, 0.0, 0.0]))
  np.testing.assert_array_equal(det.boxes[1, 1:], 0.0)
  # A filler image detects nothing.
  det = finalize_detections(boxes, scores, labels, valid, dict(batch, valid=np.array([True, False])),
                            max_detections=2)
  assert not np.asarray(det.valid[1]).any()
  np.testing.assert_allclose(to_original_pixels(boxes, {}), boxes)
  with pytest.raises(ValueError, match="pad"):
    pad_to(jnp.zeros((1, 5)), 3)


def test_encode_positives_round_trips_and_is_zero_elsewhere(rng):
  anchors = np.array([[0, 0, 10, 10], [5, 5, 25, 15], [0, 0, 0, 0]], np.float32)  # last: empty
  targets = np.array([[1, 2, 12, 9], [0, 0, 0, 0], [3, 3, 8, 8]], np.float32)  # middle: padding
  positive = np.array([True, False, False])
  stds = (0.1, 0.1, 0.2, 0.2)
  deltas = np.asarray(encode_positives(targets, anchors, positive, stds=stds))
  assert np.isfinite(deltas).all() and (deltas[1:] == 0).all()
  np.testing.assert_allclose(box_lib.decode(deltas[:1], anchors[:1], stds=stds), targets[:1],
                             atol=1e-4)
  grad = jax.grad(lambda t: jnp.sum(encode_positives(t, anchors, positive, stds=stds)))(targets)
  assert np.isfinite(np.asarray(grad)).all()


def test_frozen_stages_override_reaches_the_optimiser(rng):
  # --config.model.frozen_stages=2 after the config is built: layer2 must get no update
  # at all, weight decay included (before, optim.freeze was derived once in get_config).
  config = frcnn_config.get_config("smoke")
  config.model.frozen_stages = 2
  config.optim.weight_decay = 0.1
  model = jdet.build_model(config.model_name, **config.model)
  sample = {"image": np.zeros((1, 64, 64, 3), np.float32)}
  state, _ = restore.init_state(model, config, sample, total_steps=4, load_weights=False)
  before = jax.tree.map(np.asarray, state.params["backbone"])
  zeros = jax.tree.map(jnp.zeros_like, state.params)
  for _ in range(2):  # warm-up starts at a small but non-zero learning rate
    state = state.apply_gradients(zeros, batch_stats=state.batch_stats)
  after = state.params["backbone"]
  for name in ("conv1", "layer1", "layer2"):
    for a, b in zip(jax.tree.leaves(after[name]), jax.tree.leaves(before[name])):
      np.testing.assert_array_equal(a, b, err_msg=name)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after["layer3"]),
                                                       jax.tree.leaves(before["layer3"]))]
  assert any(changed)  # weight decay moves the trainable kernels
