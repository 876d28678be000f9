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

jdet's model takes MMDetection's settings where the two implementations differ
(``scale_clamp=MMDET_SCALE_CLAMP, symmetric_clamp=True, cost_eps=1e-12``) and runs
in float64 (``dtype=jnp.float64`` under ``jax.enable_x64``). Compared:

* every stage's class logits and boxes (measured: within 2e-14 relative);
* every stage's Hungarian matching of each image (the same, or the same total cost);
* the 18 loss terms (measured: GIoU within 1e-14; focal and L1 within 3e-7, because
  ``jdet.losses.l1`` / ``sigmoid_focal`` compute in float32 even for float64 input);
* the gradient of their sum with respect to the proposals and every stage's
  parameters (measured: within 1e-7 of each leaf's largest entry);
* the final detections: the same scores, labels and boxes in the same order, after
  clipping MMDetection's boxes to the image as jdet's decoding does (MMDetection's
  Sparse R-CNN returns unclipped boxes; the authors clip).

Parts that the random model leaves idle are compared with MMDetection's own
functions directly: the box update's clamp at +-4.135 (the tamed deltas never
reach it), the matching cost at saturated logits (where its epsilon matters) and
the FPN level of RoIs at the level boundaries.

The oracle's random weights: MMDetection's own initialisation, except what
would make the comparison blind (see ``build(tame=True)``): backbone BatchNorms
with random affine and statistics, proposal boxes spread over the image (all
are the whole image otherwise) and a box layer with std 0.02, so that the six
stages move boxes by some pixels each instead of running into the clamp.

The oracle is not optional: CI installs it (``tests/oracles/requirements.txt``)
and these tests fail, never skip, without it.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import jax
import numpy as np
import pytest
from filelock import FileLock
from PIL import Image

import jax.numpy as jnp

import jdet
from jdet.convert.mmdet_sparse_rcnn import (check_variables, is_mmdet_sparse_rcnn_state_dict,
                                            sparse_rcnn_num_classes, sparse_rcnn_sizes,
                                            sparse_rcnn_variables)
from jdet.data.voc import VocSource
from jdet.models.heads.sparse_rcnn_head import MMDET_SCALE_CLAMP

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


def _shared(name: str, compute, tmp_path_factory, worker_id):
  """``compute()`` once per test run: under pytest-xdist the first worker to ask computes
  and pickles it, the others wait for the file (the models take a minute on 2 cores;
  two workers computing them at once would take two)."""
  if worker_id == "master":
    return compute()
  path = tmp_path_factory.getbasetemp().parent / f"{name}.pkl"  # shared by the run's workers
  with FileLock(f"{path}.lock"):
    if path.is_file():
      return pickle.loads(path.read_bytes())
    value = compute()
    path.write_bytes(pickle.dumps(value))
    return value


@pytest.fixture(scope="module")
def outputs(request, batch, tmp_path_factory, worker_id):
  """``{"mmdet": ..., "jdet": ...}``: both models' outputs on the batch (see the two
  functions below), computed once per run."""
  def compute():
    state_dict = request.getfixturevalue("mmdet_state_dict")
    return {"mmdet": _mmdet_outputs(request.getfixturevalue("mmdet_model"), batch),
            "jdet": _jdet_outputs(state_dict, batch)}
  return _shared("mmdet_sparse_rcnn_parity", compute, tmp_path_factory, worker_id)


@pytest.fixture(scope="module")
def mmdet_outputs(outputs):
  return outputs["mmdet"]


@pytest.fixture(scope="module")
def jdet_outputs(outputs):
  return outputs["jdet"]


def _mmdet_outputs(mmdet_model, batch):
  """:func:`tests.oracles.mmdet_sparse_rcnn.run` on the batch."""
  nchw = np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2))
  return _oracle().run(mmdet_model, nchw, batch["sizes"], batch["boxes"], batch["labels"],
                       head_grads=True)


def _jdet_outputs(mmdet_state_dict, batch):
  """jdet's model with the converted weights, in float64, on the same batch: every stage's
  outputs, the matchings, the loss metrics and the detections, as NumPy."""
  sizes = np.asarray(batch["sizes"], np.int32)
  m = max(len(b) for b in batch["boxes"]) + 1  # one padding row at least
  gt_boxes = np.zeros((len(sizes), m, 4))
  gt_labels = np.full((len(sizes), m), -1, np.int32)
  for i, (b, lab) in enumerate(zip(batch["boxes"], batch["labels"])):
    # The boxes at the end of the padded rows: the model must not assume valid ones first.
    gt_boxes[i, m - len(b):] = b
    gt_labels[i, m - len(b):] = lab
  model = jdet.build_model("sparse_rcnn", num_classes=NUM_CLASSES, num_proposals=NUM_PROPOSALS,
                           max_detections=NUM_PROPOSALS, scale_clamp=MMDET_SCALE_CLAMP,
                           symmetric_clamp=True, cost_eps=1e-12, dtype=jnp.float64)
  variables = sparse_rcnn_variables(mmdet_state_dict)
  with jax.enable_x64(True):
    jbatch = dict(image=jnp.asarray(batch["image"]), image_size=jnp.asarray(sizes),
                  orig_size=jnp.asarray(sizes), boxes=jnp.asarray(gt_boxes),
                  labels=jnp.asarray(gt_labels))
    expected = jax.eval_shape(model.init, jax.random.key(0), jbatch["image"],
                              jbatch["image_size"])
    check_variables(variables, expected)

    @jax.jit
    def run(v, b):
      outputs = model.apply(v, b, method="stage_outputs")
      targets = model.apply(v, outputs, b, method="targets")
      fixed = {k: v["params"][k] for k in ("backbone", "neck")}
      head = {k: p for k, p in v["params"].items() if k not in fixed}

      def loss(head):
        params = {**fixed, **head}
        return model.apply({**v, "params": params}, b, method="loss")

      (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(head)
      detections = model.apply(v, b, method="predict")
      return outputs, targets, metrics, grads, detections

    outputs, targets, metrics, grads, detections = jax.device_get(run(variables, jbatch))
  return dict(logits=np.asarray(outputs.logits), boxes=np.asarray(outputs.boxes),
              match=np.asarray(targets.match), gt_offset=[m - len(b) for b in batch["boxes"]],
              metrics={k: float(v) for k, v in metrics.items()},
              grads=jax.tree.map(np.asarray, grads),
              detections={k: np.asarray(getattr(detections, k))
                          for k in ("boxes", "scores", "labels", "valid")})


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


def test_convert_num_classes_argument(mmdet_state_dict):
  """The converter table's ``(state_dict, num_classes)``: the class layers stay the
  checkpoint's, for loading to report."""
  assert sparse_rcnn_num_classes(mmdet_state_dict) == NUM_CLASSES
  v = sparse_rcnn_variables(mmdet_state_dict, num_classes=3)
  assert v["params"]["stage5"]["cls_logits"]["kernel"].shape == (256, NUM_CLASSES)


# ----------------------------------------------------------------------------
# Parity.
# ----------------------------------------------------------------------------


def _max_rel(a, b, floor):
  """max |a - b| / (|b| + floor)."""
  return float(np.max(np.abs(np.asarray(a) - b) / (np.abs(b) + floor)))


def test_stage_outputs(jdet_outputs, mmdet_outputs):
  """Every stage's class logits and boxes within 1e-4 relative (measured: 2e-14)."""
  for s in range(6):
    logits, boxes = mmdet_outputs["logits"][s], mmdet_outputs["boxes"][s]
    assert jdet_outputs["logits"][s].dtype == np.float64
    rel_logits = _max_rel(jdet_outputs["logits"][s], logits, 1e-3)
    rel_boxes = _max_rel(jdet_outputs["boxes"][s], boxes, 1.0)
    print(f"stage {s}: logits {rel_logits:.1e}, boxes {rel_boxes:.1e} relative")
    assert rel_logits < 1e-4, f"stage {s} logits"
    assert rel_boxes < 1e-4, f"stage {s} boxes"


def test_matching(jdet_outputs, mmdet_outputs, batch):
  """Each stage's matching of each image: the same pairs, or (a tie) the same total cost
  on MMDetection's cost matrix. The empty image matches nothing."""
  same = 0
  for s in range(6):
    for b in range(3):
      g = len(batch["boxes"][b])
      off = jdet_outputs["gt_offset"][b]
      match = jdet_outputs["match"][s, b]  # [M]: the proposal of each box, -1 padding
      assert (match[:off] == -1).all() and (match[off + g:] == -1).all()
      mine = match[off:off + g]
      assert (mine >= 0).all()
      oracle = mmdet_outputs["assignment"][s][b]  # [N]: the box of each proposal
      theirs = np.full(g, -1)
      theirs[oracle[oracle >= 0]] = np.flatnonzero(oracle >= 0)
      if g == 0 or (mine == theirs).all():
        same += 1
        continue
      print(f"stage {s} image {b}: a tie, jdet {mine}, MMDetection {theirs}")
      cost = mmdet_outputs["costs"][s][b]
      assert cost[mine, np.arange(g)].sum() == pytest.approx(
          cost[theirs, np.arange(g)].sum(), rel=1e-9), f"stage {s} image {b}"
  print(f"{same} of 18 matchings identical")


def test_loss_terms(jdet_outputs, mmdet_outputs):
  """The 18 loss terms, MMDetection's ``s{t}.loss_*`` against jdet's ``s{t}_loss_*``, all
  computed in float64 by both."""
  theirs = mmdet_outputs["losses"]
  assert len(theirs) == 18
  for name, value in sorted(theirs.items()):
    mine = float(jdet_outputs["metrics"][name.replace(".", "_")])
    rtol = 1e-12
    print(f"{name}: MMDetection {value:.9f}, jdet {mine:.9f}, {mine / value - 1:+.1e}")
    assert mine == pytest.approx(value, rel=rtol), name


def test_detections(jdet_outputs, mmdet_outputs, batch):
  """The final detections: the same N pairs in the same (descending score) order, with the
  same scores, labels and boxes, once MMDetection's boxes are clipped to the image (jdet's
  decoding clips, as the authors' does; MMDetection's does not)."""
  det = jdet_outputs["detections"]
  for b, (h, w) in enumerate(batch["sizes"]):
    boxes = mmdet_outputs["det_boxes"][b].copy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    np.testing.assert_array_equal(det["valid"][b], valid)
    np.testing.assert_array_equal(det["labels"][b][valid], mmdet_outputs["det_labels"][b][valid])
    np.testing.assert_allclose(det["scores"][b][valid], mmdet_outputs["det_scores"][b][valid],
                               rtol=1e-10)
    np.testing.assert_allclose(det["boxes"][b][valid], boxes[valid], rtol=1e-10, atol=1e-9)


def test_head_gradients(jdet_outputs, mmdet_outputs, mmdet_state_dict):
  """The gradient of the summed 18 terms with respect to the proposals and every stage's
  parameters (backbone and FPN held fixed), converted to jdet's names by the converter
  itself: every leaf within 1e-5 of its largest entry (measured: 1e-7, the float32 focal
  loss; box layers 1e-14). Checks what the forward pass cannot: where gradients stop
  (boxes detached between stages and into RoIAlign, none through the matching cost) and
  that the proposal boxes learn through the first stage's box update."""
  grad_sd = {k: np.zeros_like(a) for k, a in mmdet_state_dict.items()}
  grad_sd.update(mmdet_outputs["grads"])
  theirs = sparse_rcnn_variables(grad_sd)["params"]
  mine = jdet_outputs["grads"]
  assert sorted(mine) == sorted(k for k in theirs if k not in ("backbone", "neck"))
  worst = {}
  for path, g in jax.tree_util.tree_leaves_with_path(mine):
    ref = theirs
    for key in path:
      ref = ref[key.key]
    scale = np.abs(ref).max()
    assert scale > 0, jax.tree_util.keystr(path)
    err = np.abs(g - ref).max() / scale
    worst[jax.tree_util.keystr(path)] = err
    assert err < 1e-5, f"{jax.tree_util.keystr(path)}: {err:.1e} of max |grad| {scale:.2e}"
  name = max(worst, key=worst.get)
  print(f"worst gradient leaf {name}: {worst[name]:.1e}")


# ----------------------------------------------------------------------------
# Parts that the random model leaves idle, against MMDetection's own code.
# ----------------------------------------------------------------------------


def test_box_update_against_mmdet_coder(rng):
  """``apply_deltas(symmetric_clamp=True, scale_clamp=MMDET_SCALE_CLAMP)`` is MMDetection's
  ``DeltaXYWHBBoxCoder(target_stds=(0.5, 0.5, 1, 1), clip_border=False).decode``, the
  clamp at +-log(1000 / 16) included (the parity model's deltas never reach it)."""
  _oracle().install_cpu_ops()
  import torch
  from mmdet.models.task_modules.coders import DeltaXYWHBBoxCoder

  from jdet.models.heads.sparse_rcnn_head import apply_deltas
  xy = rng.uniform(-50, 300, (500, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(1, 400, (500, 2))], -1)
  deltas = rng.normal(0, 1, (500, 4)) * np.array([1.0, 1.0, 4.0, 4.0])
  assert (deltas[:, 2:] > MMDET_SCALE_CLAMP).any() and (deltas[:, 2:] < -MMDET_SCALE_CLAMP).any()
  coder = DeltaXYWHBBoxCoder(target_means=(0.0,) * 4, target_stds=(0.5, 0.5, 1.0, 1.0),
                             clip_border=False)
  theirs = coder.decode(torch.from_numpy(boxes), torch.from_numpy(deltas),
                        max_shape=(256, 320)).numpy()
  with jax.enable_x64(True):
    mine = np.asarray(apply_deltas(jnp.asarray(deltas), jnp.asarray(boxes),
                                   scale_clamp=MMDET_SCALE_CLAMP, symmetric_clamp=True))
  np.testing.assert_allclose(mine, theirs, rtol=1e-12, atol=1e-9)


def test_matching_cost_against_mmdet_costs(rng):
  """``matching_cost(eps=1e-12)`` is the sum of MMDetection's ``FocalLossCost(weight=2)``,
  ``BBoxL1Cost(weight=5, box_format="xyxy")`` and ``IoUCost("giou", weight=2)``, also at
  saturated logits (+-30), where the epsilon inside the logarithms decides the cost."""
  _oracle().install_cpu_ops()
  import torch
  from mmdet.models.task_modules.assigners.match_cost import BBoxL1Cost, FocalLossCost, IoUCost
  from mmengine.structures import InstanceData

  from jdet.models.sparse_rcnn import matching_cost
  n, g, c, (h, w) = 50, 7, 80, (200, 300)
  logits = rng.normal(-3, 3, (n, c))
  logits[:5] = 30.0
  logits[5:10] = -30.0
  xy = rng.uniform(0, 250, (n + g, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(2, 150, (n + g, 2))], -1)
  pred, gt = boxes[:n], boxes[n:]
  labels = rng.integers(0, c, g)
  p = InstanceData(scores=torch.from_numpy(logits), bboxes=torch.from_numpy(pred))
  t = InstanceData(labels=torch.from_numpy(labels), bboxes=torch.from_numpy(gt))
  meta = dict(img_shape=(h, w))
  theirs = sum(cost(pred_instances=p, gt_instances=t, img_meta=meta).numpy() for cost in (
      FocalLossCost(weight=2.0), BBoxL1Cost(weight=5.0, box_format="xyxy"),
      IoUCost(iou_mode="giou", weight=2.0)))
  with jax.enable_x64(True):
    mine = np.asarray(matching_cost(jnp.asarray(logits), jnp.asarray(pred), jnp.asarray(gt),
                                    jnp.asarray(labels), jnp.asarray([w, h, w, h], jnp.float64),
                                    eps=1e-12))
  np.testing.assert_allclose(mine, theirs, rtol=1e-10, atol=1e-10)


def test_roi_levels_against_mmdet(rng):
  """jdet's FPN level of a RoI is MMDetection's ``SingleRoIExtractor.map_roi_levels``
  (``finest_scale=56``), at random sizes and exactly at the level boundaries."""
  _oracle().install_cpu_ops()
  import torch
  from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor

  from jdet.ops.roi_align import map_roi_levels
  sides = np.concatenate([np.exp(rng.uniform(np.log(2), np.log(1500), (2000, 2))),
                          np.repeat([[56.0, 56.0], [112.0, 112.0], [224.0, 224.0],
                                     [448.0, 448.0], [111.99, 112.0], [448.0, 447.99]], 1, 0)])
  boxes = np.concatenate([np.full_like(sides, 10.0), 10.0 + sides], -1)
  extractor = SingleRoIExtractor(roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=2),
                                 out_channels=256, featmap_strides=[4, 8, 16, 32])
  rois = torch.from_numpy(np.concatenate([np.zeros((len(boxes), 1)), boxes], -1))
  theirs = extractor.map_roi_levels(rois, 4).numpy()
  with jax.enable_x64(True):
    mine = np.asarray(map_roi_levels(jnp.asarray(boxes), min_level=2, max_level=5))
  np.testing.assert_array_equal(mine, theirs)
  assert set(theirs.tolist()) == {0, 1, 2, 3}
