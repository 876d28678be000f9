"""jdet's Sparse R-CNN against MMDetection 3.3.0's, with converted random weights.

MMDetection's Sparse R-CNN R50-FPN (its own config, built on the CPU by
``tests/oracles/mmdet_sparse_rcnn.py``, 80 classes, 100 proposals) gets seeded
random weights, is converted with :func:`jdet.convert.mmdet_sparse_rcnn.
sparse_rcnn_variables` and both run in float64 on the same three raccoon photos,
resized to 200x300, 256x192 and 240x160 inside one 256x320 canvas. The ground
truth of the loss: the first photo's two raccoons plus one made-up box of another
class, the second photo's raccoon, and no box at all on the third (MMDetection
filters such images from training, but its loss code takes them: the image's
logits count as background).

The oracle's random weights: MMDetection's own initialisation, except what
would make the comparison blind (see ``build(tame=True)``): backbone BatchNorms
with random affine and statistics, proposal boxes spread over the image (all
are the whole image otherwise) and a box layer with std 0.02, so that the six
stages move boxes by some pixels each instead of running into the clamp.

The oracle is not optional: CI installs it (``tests/oracles/requirements.txt``)
and these tests fail, never skip, without it.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from jdet.convert.mmdet_sparse_rcnn import (check_variables, is_mmdet_sparse_rcnn_state_dict,
                                            sparse_rcnn_sizes, sparse_rcnn_variables)
from jdet.data.voc import VocSource

pytestmark = pytest.mark.slow

RACCOON = Path(__file__).resolve().parents[3] / "shared" / "data" / "raccoon"
CANVAS = (256, 320)
# (raccoon val index, (h, w) inside the canvas); the first has two raccoons.
PHOTOS = ((19, (200, 300)), (0, (256, 192)), (2, (240, 160)))
NUM_CLASSES = 80
NUM_PROPOSALS = 100
RACCOON_LABEL = 0
EXTRA_BOX = (np.array([[150.0, 120.0, 290.0, 195.0]]), np.array([17]))  # made up, on photo 0


def _num(tree) -> int:
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


def _oracle():
  from tests.oracles import mmdet_sparse_rcnn
  if not mmdet_sparse_rcnn.available():
    pytest.fail("MMDetection (the Sparse R-CNN oracle) is not installed: "
                "python -m pip install --no-deps -r tests/oracles/requirements.txt")
  return mmdet_sparse_rcnn


# ----------------------------------------------------------------------------
# Fixtures: the data, the MMDetection model and its outputs.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch():
  """The three photos, normalised and padded, ``[3, 256, 320, 3]`` float64, their sizes and
  ground truth (xyxy pixels of the resized photos; the third image has none)."""
  oracle = _oracle()
  if not RACCOON.is_dir():
    pytest.fail(f"the raccoon data set is not at {RACCOON}")
  source = VocSource(RACCOON, "val")
  photos, boxes, labels = [], [], []
  for index, (h, w) in PHOTOS:
    ex = source[index]
    oh, ow = ex.image.shape[:2]
    photos.append(np.asarray(Image.fromarray(ex.image).resize((w, h), Image.BILINEAR)))
    boxes.append(ex.boxes.astype(np.float64) * np.array([w / ow, h / oh, w / ow, h / oh]))
    labels.append(np.full(len(ex.boxes), RACCOON_LABEL))
  boxes[0] = np.concatenate([boxes[0], EXTRA_BOX[0]])
  labels[0] = np.concatenate([labels[0], EXTRA_BOX[1]])
  boxes[2], labels[2] = np.zeros((0, 4)), np.zeros((0,), np.int64)
  return dict(image=oracle.pad_batch(photos, CANVAS), sizes=[s for _, s in PHOTOS],
              boxes=boxes, labels=labels)


@pytest.fixture(scope="module")
def mmdet_model():
  return _oracle().build(num_classes=NUM_CLASSES, num_proposals=NUM_PROPOSALS, seed=0)


@pytest.fixture(scope="module")
def mmdet_state_dict(mmdet_model):
  return _oracle().state_dict_numpy(mmdet_model)


@pytest.fixture(scope="module")
def mmdet_outputs(mmdet_model, batch):
  nchw = np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2))
  return _oracle().run(mmdet_model, nchw, batch["sizes"], batch["boxes"], batch["labels"])


# ----------------------------------------------------------------------------
# The oracle itself.
# ----------------------------------------------------------------------------


def test_oracle_parameter_count(mmdet_model):
  """MMDetection's count of the R50-FPN COCO model, 100 proposals (the note's, measured on
  the authors' model with the BN affine counted)."""
  assert _oracle().num_parameters(mmdet_model) == 106_290_888


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _giou(a, b):
  """Aligned GIoU of xyxy boxes ``[K, 4]``."""
  area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
  lt, rb = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
  union = area(a) + area(b) - inter
  hull = np.prod(np.maximum(a[:, 2:], b[:, 2:]) - np.minimum(a[:, :2], b[:, :2]), axis=1)
  return inter / union - (hull - union) / hull


def test_oracle_losses_from_its_outputs(mmdet_outputs, batch):
  """The oracle's 18 loss terms, recomputed in NumPy from the logits, boxes and matching it
  reports: the closed form of the note (focal over all B x N x C logits, L1 on boxes over
  ``[w, h, w, h]``, GIoU, each over the batch's ground-truth count; weights 2, 5, 2).
  This checks what the parity test relies on: the recorded matching is the one the loss
  used, and the empty image contributes background focal terms only."""
  out = mmdet_outputs
  num_gt = sum(len(b) for b in batch["boxes"])
  whwh = np.array([[w, h, w, h] for h, w in batch["sizes"]], np.float64)
  assert len(out["losses"]) == 18
  for s in range(6):
    logits, boxes, assign = out["train_logits"][s], out["train_boxes"][s], out["assignment"][s]
    # Inference and training run the same function (dropout 0, frozen BN).
    np.testing.assert_allclose(logits, out["logits"][s], rtol=1e-12, atol=1e-12)
    assert (assign[2] == -1).all() and out["costs"][s][2] is None  # the empty image
    for b in range(2):
      assert sorted(assign[b][assign[b] >= 0]) == list(range(len(batch["boxes"][b])))
    target = np.zeros_like(logits)
    l1 = giou = 0.0
    for b in range(3):
      rows = np.flatnonzero(assign[b] >= 0)
      gt = batch["boxes"][b][assign[b][rows]]
      target[b, rows, batch["labels"][b][assign[b][rows]]] = 1.0
      l1 += np.abs(boxes[b, rows] / whwh[b] - gt / whwh[b]).sum()
      giou += (1.0 - _giou(boxes[b, rows], gt)).sum() if len(rows) else 0.0
    p = _sigmoid(logits)
    focal = -(0.25 * target * (1 - p) ** 2 * np.log(p)
              + 0.75 * (1 - target) * p ** 2 * np.log(1 - p)).sum()
    np.testing.assert_allclose(out["losses"][f"s{s}.loss_cls"], 2 * focal / num_gt, rtol=1e-10)
    np.testing.assert_allclose(out["losses"][f"s{s}.loss_bbox"], 5 * l1 / num_gt, rtol=1e-10)
    np.testing.assert_allclose(out["losses"][f"s{s}.loss_iou"], 2 * giou / num_gt, rtol=1e-8)


def test_oracle_matching_is_optimal(mmdet_outputs, batch):
  """Each recorded matching is scipy's optimum of the recorded cost, and the cost is the
  note's ``2 * focal cost + 5 * L1 / [w, h, w, h] + 2 * -GIoU``."""
  from scipy.optimize import linear_sum_assignment
  out = mmdet_outputs
  for s in range(6):
    logits, boxes = out["train_logits"][s], out["train_boxes"][s]
    for b in range(2):
      cost = out["costs"][s][b]
      gt, labels = batch["boxes"][b], batch["labels"][b]
      h, w = batch["sizes"][b]
      whwh = np.array([w, h, w, h])
      p = _sigmoid(logits[b][:, labels])  # [N, G]
      focal = (0.25 * (1 - p) ** 2 * -np.log(p + 1e-12)
               - 0.75 * p ** 2 * -np.log(1 - p + 1e-12))
      l1 = np.abs(boxes[b][:, None] / whwh - gt[None] / whwh).sum(-1)
      n, g = len(boxes[b]), len(gt)
      giou = _giou(np.repeat(boxes[b], g, 0), np.tile(gt, (n, 1))).reshape(n, g)
      np.testing.assert_allclose(cost, 2 * focal + 5 * l1 - 2 * giou, rtol=1e-9, atol=1e-9)
      rows, cols = linear_sum_assignment(cost)
      assign = out["assignment"][s][b]
      assert cost[np.flatnonzero(assign >= 0), assign[assign >= 0]].sum() == pytest.approx(
          cost[rows, cols].sum(), rel=1e-12)


def test_oracle_detections(mmdet_outputs):
  """The final detections are the top N of the last stage's sigmoid scores over all
  proposals and classes, each with its proposal's box (no NMS, no threshold)."""
  out = mmdet_outputs
  logits, boxes = out["logits"][-1], out["boxes"][-1]
  for b in range(3):
    scores = _sigmoid(logits[b]).reshape(-1)
    top = np.sort(scores)[::-1][:NUM_PROPOSALS]
    np.testing.assert_allclose(out["det_scores"][b], top, rtol=1e-12)
    index = out["det_index"][b]
    np.testing.assert_array_equal(out["det_labels"][b], index % NUM_CLASSES)
    np.testing.assert_array_equal(out["det_boxes"][b], boxes[b][index // NUM_CLASSES])


# ----------------------------------------------------------------------------
# The conversion.
# ----------------------------------------------------------------------------


def test_convert_tree_and_counts(mmdet_state_dict):
  sd = mmdet_state_dict
  assert is_mmdet_sparse_rcnn_state_dict(sd)
  assert is_mmdet_sparse_rcnn_state_dict({"meta": {}, "state_dict": sd})
  assert sparse_rcnn_sizes(sd) == dict(
      num_stages=6, num_proposals=NUM_PROPOSALS, num_classes=NUM_CLASSES, hidden_dim=256,
      dynamic_dim=64, feedforward_dim=2048, num_cls_fcs=1, num_reg_fcs=3, depth=50)
  v = sparse_rcnn_variables({"meta": {}, "state_dict": sd})  # the model zoo's wrapper
  params = v["params"]
  # The note's counts with frozen BN (the BN affine in batch_stats, not params).
  assert _num(params) == 106_237_768
  assert _num(v["batch_stats"]) == 4 * 26_560
  for s in range(6):
    assert _num(params[f"stage{s}"]) == 13_235_412
  assert sorted(k for k in params if not k.startswith("stage")) == [
      "backbone", "neck", "proposal_boxes", "proposal_features"]
  assert sorted(params["neck"]) == [f"{k}{i}" for k in ("inner_block", "layer_block")
                                    for i in range(4)]
  head = "roi_head.bbox_head.3."
  stage = params["stage3"]
  np.testing.assert_array_equal(stage["attention"]["in_proj"]["kernel"],
                                sd[head + "attention.attn.in_proj_weight"].T)
  np.testing.assert_array_equal(stage["dynamic_conv"]["fc_layer"]["kernel"],
                                sd[head + "instance_interactive_conv.fc_layer.weight"].T)
  np.testing.assert_array_equal(stage["reg_fc2"]["kernel"], sd[head + "reg_fcs.6.weight"].T)
  np.testing.assert_array_equal(stage["reg_norm2"]["scale"], sd[head + "reg_fcs.7.weight"])
  np.testing.assert_array_equal(stage["cls_norm0"]["bias"], sd[head + "cls_fcs.1.bias"])
  np.testing.assert_array_equal(stage["ffn"]["fc2"]["kernel"], sd[head + "ffn.layers.1.weight"].T)
  np.testing.assert_array_equal(stage["dynamic_conv_norm"]["scale"],
                                sd[head + "instance_interactive_conv_norm.weight"])
  np.testing.assert_array_equal(params["neck"]["layer_block2"]["kernel"],
                                sd["neck.fpn_convs.2.conv.weight"].transpose(2, 3, 1, 0))
  bn = v["batch_stats"]["backbone"]["layer2"]["block0"]["downsample_bn"]
  for jdet_name, mm_name in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"),
                             ("var", "running_var")):
    np.testing.assert_array_equal(bn[jdet_name], sd[f"backbone.layer2.0.downsample.1.{mm_name}"])
  assert "bn1" not in params["backbone"]
  # torch tensors convert the same.
  import torch
  tv = sparse_rcnn_variables({k: torch.from_numpy(a) for k, a in sd.items()})
  np.testing.assert_array_equal(tv["params"]["proposal_boxes"],
                                sd["rpn_head.init_proposal_bboxes.weight"])


def test_convert_errors(mmdet_state_dict):
  sd = dict(mmdet_state_dict)
  bad = dict(sd)
  bad["roi_head.bbox_head.2.fc_reg.weight"] = sd["roi_head.bbox_head.2.fc_reg.weight"][:, :128]
  with pytest.raises(ValueError, match=r"bbox_head\.2\.fc_reg\.weight has shape \(4, 128\); "
                                       r"this model expects \(4, 256\)"):
    sparse_rcnn_variables(bad)
  bad = dict(sd)
  bad["extra.weight"] = bad.pop("roi_head.bbox_head.4.ffn_norm.bias")
  with pytest.raises(ValueError, match=r"(?s)missing \(1\): roi_head\.bbox_head\.4\.ffn_norm\.bias"
                                       r".*unused \(1\): extra\.weight"):
    sparse_rcnn_variables(bad)
  with pytest.raises(ValueError, match="not an MMDetection Sparse R-CNN"):
    sparse_rcnn_variables({k: a for k, a in sd.items() if not k.startswith("rpn_head.")})
  v = sparse_rcnn_variables(sd)
  expected = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), v)
  check_variables(v, expected)
  expected["params"]["stage1"]["cls_logits"]["kernel"] = jax.ShapeDtypeStruct((256, 81), "f4")
  del expected["params"]["stage0"]["ffn_norm"]
  with pytest.raises(ValueError, match=r"(?s)not in the model \(2\): params/stage0/ffn_norm/bias, "
                                       r"params/stage0/ffn_norm/scale.*stage1/cls_logits/kernel: "
                                       r"converted \(256, 80\) vs model \(256, 81\)"):
    check_variables(v, expected)
