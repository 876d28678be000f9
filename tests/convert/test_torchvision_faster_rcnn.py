"""jdet.convert against torchvision: a converted fasterrcnn_resnet50_fpn computes what it computes.

One torchvision ``fasterrcnn_resnet50_fpn(weights=None, num_classes=91)`` with
seeded random weights is converted and run on two raccoon photos, resized to
200x300 and 240x180 and padded to one 256x320 canvas (a multiple of 64, so
torchvision's anchor strides are the nominal ones). Both frameworks see the
same normalised tensor: torchvision's components (backbone, RPN, RoI heads)
are called directly with an ``ImageList`` of the real sizes, so its transform
neither resizes nor pads again. Compared: the RPN head's outputs and anchors,
the 1000 proposals per image (test-time numbers), every detection that
survives NMS (before the 100-per-image cut) and the 100 that are kept.

About the random weights: torchvision initialises the RPN and predictor with
small weights, so objectness logits would all be near 0 and every class score
near 1/91 (below the 0.05 threshold). The test draws the BatchNorm statistics
and affine at random, and the RPN head and box predictor with larger standard
deviations: objectness logits spread over about +-3 and detections exist above
0.05. The seed of the objectness weights is one whose logits have no near-tie
at a per-level top-1000 cut: the test checks that margin against the measured
difference between the frameworks' logits, and the margin at the top-100 cut;
tied detections may come out in either order.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.models.detection.image_list import ImageList

from jdet import convert
from jdet.convert import read_state_dict
from jdet.convert.faster_rcnn import (fasterrcnn_num_classes, fasterrcnn_resnet50_fpn_params,
                                      rename_legacy_keys)
from jdet.data.voc import VocSource
from jdet.models.faster_rcnn import FasterRCNN

pytestmark = pytest.mark.slow

RACCOON = Path(__file__).resolve().parents[3] / "shared" / "data" / "raccoon"
CANVAS = (256, 320)
SIZES = ((200, 300), (240, 180))  # (h, w) of the two photos inside the canvas
MEAN = np.float32([0.485, 0.456, 0.406])
STD = np.float32([0.229, 0.224, 0.225])
OBJECTNESS_SEED = 9
ALL = 4000  # jdet's max_detections when every NMS survivor is compared


def _num(tree) -> int:
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------
# Fixtures: the torchvision model, its outputs, jdet's outputs.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos():
  """``[2, 256, 320, 3]`` float32 normalised (ImageNet mean/std on 0..1), zero-padded."""
  if not RACCOON.is_dir():
    pytest.skip(f"the raccoon data set is not at {RACCOON}")
  source = VocSource(RACCOON, "val")
  images = []
  for i, (h, w) in enumerate(SIZES):
    img = Image.fromarray(source[i].image).resize((w, h), Image.BILINEAR)
    canvas = np.zeros(CANVAS + (3,), np.float32)
    canvas[:h, :w] = (np.asarray(img, np.float32) / 255.0 - MEAN) / STD
    images.append(canvas)
  return np.stack(images)


@pytest.fixture(scope="module")
def tv_model():
  torch.manual_seed(0)
  tv = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                            num_classes=91).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for m in tv.backbone.body.modules():
      if isinstance(m, torch.nn.BatchNorm2d):  # weights=None: BatchNorm2d, in eval mode frozen
        m.weight.uniform_(0.3, 0.8, generator=g)
        m.bias.normal_(0.0, 0.1, generator=g)
        m.running_mean.normal_(0.0, 0.1, generator=g)
        m.running_var.uniform_(0.5, 1.5, generator=g)
    # The objectness weights' seed is one whose logits have no near-tie at a top-1000 cut.
    g_objectness = torch.Generator().manual_seed(OBJECTNESS_SEED)
    for layer, std, gen in ((tv.rpn.head.conv[0][0], 0.03, g_objectness),
                            (tv.rpn.head.cls_logits, 0.3, g_objectness),
                            (tv.rpn.head.bbox_pred, 0.05, g),
                            (tv.roi_heads.box_predictor.cls_score, 0.8, g),
                            (tv.roi_heads.box_predictor.bbox_pred, 0.05, g)):
      layer.weight.normal_(0.0, std, generator=gen)
      layer.bias.normal_(0.0, std, generator=gen)
  return tv


@pytest.fixture(scope="module")
def tv_outputs(tv_model, photos):
  """torchvision's RPN head outputs, anchors, proposals and detections (all NMS survivors,
  and the default 100 per image)."""
  tv = tv_model
  seen = {}
  hooks = [tv.rpn.head.register_forward_hook(lambda m, a, out: seen.update(head=out)),
           tv.rpn.anchor_generator.register_forward_hook(
               lambda m, a, out: seen.update(anchors=out))]
  filter_proposals = tv.rpn.filter_proposals  # its scores, which tv.rpn's forward drops
  tv.rpn.filter_proposals = lambda *a: seen.setdefault("filtered", filter_proposals(*a))
  x = torch.from_numpy(photos).permute(0, 3, 1, 2).contiguous()
  images = ImageList(x, [tuple(s) for s in SIZES])
  try:
    with torch.no_grad():
      t = time.time()
      features = tv.backbone(x)
      proposals, _ = tv.rpn(images, features)
      top100, _ = tv.roi_heads(features, proposals, images.image_sizes)
      tv.roi_heads.detections_per_img = 100_000
      survivors, _ = tv.roi_heads(features, proposals, images.image_sizes)
      print(f"\ntorchvision forward {time.time() - t:.1f} s")
  finally:
    tv.roi_heads.detections_per_img = 100
    del tv.rpn.filter_proposals
    for h in hooks:
      h.remove()
  logits, deltas = seen["head"]
  flat = lambda xs, c: torch.cat([v.permute(0, 2, 3, 1).reshape(v.shape[0], -1, c) for v in xs], 1)
  return dict(
      logits=flat(logits, 1)[..., 0].numpy(),  # [B, A]: per location, anchor-minor
      deltas=flat(deltas, 4).numpy(),
      level_logits=[v.numpy() for v in logits],
      anchors=seen["anchors"][0].numpy(),
      proposals=[p.numpy() for p in proposals],
      proposal_scores=[s.numpy() for s in seen["filtered"][1]],
      top100=[{k: v.numpy() for k, v in d.items()} for d in top100],
      survivors=[{k: v.numpy() for k, v in d.items()} for d in survivors])


@pytest.fixture(scope="module")
def converted(tv_model):
  state = {k: v.detach().numpy() for k, v in tv_model.state_dict().items()}
  return fasterrcnn_resnet50_fpn_params(state)


@pytest.fixture(scope="module")
def jdet_outputs(converted, photos):
  model = FasterRCNN(num_classes=90, max_detections=ALL)
  batch = dict(image=jnp.asarray(photos), image_size=jnp.asarray(SIZES, jnp.int32))

  def run(variables, batch):
    features = model.apply(variables, batch["image"], method=lambda m, x: m.features(x))
    logits, deltas, anchors, _ = model.apply(variables, features, method=lambda m, f: m.rpn(f))
    return dict(logits=logits, deltas=deltas, anchors=jnp.asarray(anchors),
                proposals=model.apply(variables, batch, method="proposals"),
                detections=model.apply(variables, batch, method="predict"))

  t = time.time()
  out = jax.tree.map(np.asarray, jax.jit(run)(converted, batch))
  print(f"\njdet compile + forward {time.time() - t:.1f} s")
  return out


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------


def _match(want_boxes, want_scores, want_labels, boxes, scores, labels, *, score_tol=1e-3):
  """Pairs every expected detection with one of ours of the same label and a score within
  ``score_tol`` (tied detections may come out in either order), closest box first.
  Returns ``(max box diff, max score diff)``."""
  assert len(boxes) == len(want_boxes), f"{len(boxes)} detections, torchvision {len(want_boxes)}"
  free = np.ones(len(boxes), bool)
  max_box = max_score = 0.0
  for b, s, l in zip(want_boxes, want_scores, want_labels):
    cand = np.flatnonzero(free & (labels == l) & (np.abs(scores - s) <= score_tol))
    assert len(cand), f"no match for torchvision's {b} (label {l}, score {s})"
    diff = np.abs(boxes[cand] - b).max(axis=1)
    j = cand[np.argmin(diff)]
    free[j] = False
    max_box = max(max_box, float(np.abs(boxes[j] - b).max()))
    max_score = max(max_score, float(abs(scores[j] - s)))
  return max_box, max_score


# ----------------------------------------------------------------------------
# Tests.
# ----------------------------------------------------------------------------


def test_parameter_counts(tv_model, converted):
  # torchvision's model was built with weights=None, so its BatchNorm affine are parameters;
  # jdet's frozen BatchNorm keeps them in batch_stats (as FrozenBatchNorm2d keeps buffers).
  tv_params = sum(p.numel() for p in tv_model.parameters())
  stats = converted["batch_stats"]
  affine = sum(_num(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(stats)
               if getattr(path[-1], "key", None) in ("scale", "bias"))
  assert _num(converted["params"]) + affine == tv_params
  # The count torchvision documents for fasterrcnn_resnet50_fpn (COCO, FrozenBatchNorm2d).
  assert _num(converted["params"]) == 41_755_286
  # The converted tree is exactly the model's.
  shapes = jax.eval_shape(lambda k: FasterRCNN(num_classes=90).init(k, jnp.zeros((1, 64, 64, 3))),
                          jax.random.key(0))
  assert jax.tree.structure(shapes) == jax.tree.structure(converted)
  jax.tree.map(lambda s, v: np.testing.assert_equal(s.shape, np.shape(v)), shapes, converted)


def test_rpn_head_and_anchors(tv_outputs, jdet_outputs):
  np.testing.assert_array_equal(jdet_outputs["anchors"], tv_outputs["anchors"])
  want = tv_outputs["logits"]
  np.testing.assert_allclose(jdet_outputs["logits"], want, rtol=0, atol=1e-4 * np.abs(want).max())
  want = tv_outputs["deltas"]
  np.testing.assert_allclose(jdet_outputs["deltas"], want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_proposals_match_torchvision(tv_outputs, jdet_outputs):
  # Premise: at each level's top-1000 cut the two logits differ by more than twice the
  # largest difference between the frameworks, so both take the same 1000.
  noise = np.abs(jdet_outputs["logits"] - tv_outputs["logits"]).max()
  for level in tv_outputs["level_logits"]:
    for per_image in level.reshape(level.shape[0], -1):
      if per_image.size > 1000:
        s = np.sort(per_image)[::-1]
        assert s[999] - s[1000] > 2 * noise, f"a near-tie at the pre-NMS top-1000 cut ({noise=})"
  print(f"\nmax |objectness logit diff| {noise:.2e}")
  props = jdet_outputs["proposals"]
  pairs = zip(tv_outputs["proposals"], tv_outputs["proposal_scores"])
  for i, (want, want_scores) in enumerate(pairs):
    valid = props.valid[i]
    assert valid.sum() == len(want)
    assert valid[:len(want)].all()  # valid proposals first, by descending score
    boxes, scores = props.boxes[i][valid], props.scores[i][valid]
    assert np.all(np.diff(scores) <= 0)
    h, w = SIZES[i]
    assert boxes[:, [0, 2]].max() <= w and boxes[:, [1, 3]].max() <= h  # clipped to the real image
    zeros = np.zeros(len(want), int)
    max_box, max_score = _match(want, want_scores, zeros, boxes, scores, zeros, score_tol=1e-4)
    assert max_box <= 0.05 and max_score <= 1e-4
    print(f"\nimage {i}: {len(want)} proposals, max |box diff| {max_box:.2e} px, "
          f"max |score diff| {max_score:.2e}")


def test_detections_match_torchvision(tv_outputs, jdet_outputs):
  det = jdet_outputs["detections"]
  for i, (all_want, want) in enumerate(zip(tv_outputs["survivors"], tv_outputs["top100"])):
    n = len(all_want["scores"])
    assert 100 < n < ALL, f"image {i}: {n} NMS survivors; the test wants more than 100"
    assert det.valid[i].sum() == n
    labels = det.labels[i][:n] + 1  # torchvision's class ids count the background
    max_box, max_score = _match(all_want["boxes"], all_want["scores"], all_want["labels"],
                                det.boxes[i][:n], det.scores[i][:n], labels)
    assert max_box <= 0.05 and max_score <= 1e-3
    # The 100 kept: jdet's first 100 (premise: no tie at the cut).
    s = all_want["scores"]
    assert s[99] - s[100] > 1e-5, "a near-tie at the top-100 cut"
    b100, s100 = _match(want["boxes"], want["scores"], want["labels"], det.boxes[i][:100],
                        det.scores[i][:100], labels[:100])
    assert b100 <= 0.05 and s100 <= 1e-3
    assert len(np.unique(labels)) >= 2
    print(f"\nimage {i}: {n} survivors, max |box diff| {max_box:.2e} px, "
          f"max |score diff| {max_score:.2e}")


# ----------------------------------------------------------------------------
# Conversion details (no forward pass).
# ----------------------------------------------------------------------------


def test_legacy_names_and_coco80(tv_model, converted, tmp_path):
  state = {k: v.detach().numpy() for k, v in tv_model.state_dict().items()}
  # torchvision < 0.13 checkpoints (the published COCO weights): old RPN and FPN names.
  legacy = {}
  for k, v in state.items():
    k = k.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
    for kind in ("inner", "layer"):
      for i in range(4):
        k = k.replace(f"backbone.fpn.{kind}_blocks.{i}.0.", f"backbone.fpn.{kind}_blocks.{i}.")
    legacy[k] = v
  assert "rpn.head.conv.weight" in legacy and "backbone.fpn.inner_blocks.0.weight" in legacy
  assert sorted(rename_legacy_keys(legacy)) == sorted(state)
  torch.save({k: torch.from_numpy(v) for k, v in legacy.items()}, tmp_path / "legacy.pth")
  again = fasterrcnn_resnet50_fpn_params(read_state_dict(tmp_path / "legacy.pth"))
  jax.tree.map(np.testing.assert_array_equal, again, converted)
  assert fasterrcnn_num_classes(state) == 90

  # 91 COCO category ids -> background + jdet's 80 labels, in label order.
  from jdet.class_names import COCO_CATEGORY_IDS
  coco = fasterrcnn_resnet50_fpn_params(state, num_classes=80)["params"]["roi_head"]
  full = converted["params"]["roi_head"]
  keep = np.asarray((0,) + tuple(COCO_CATEGORY_IDS))
  np.testing.assert_array_equal(coco["cls_score"]["kernel"], full["cls_score"]["kernel"][:, keep])
  np.testing.assert_array_equal(coco["cls_score"]["bias"], full["cls_score"]["bias"][keep])
  box = full["bbox_pred"]["bias"].reshape(91, 4)
  np.testing.assert_array_equal(coco["bbox_pred"]["bias"].reshape(81, 4), box[keep])
  assert coco["bbox_pred"]["kernel"].shape == (1024, 81 * 4)
  with pytest.raises(ValueError, match="num_classes=90, or to 80"):
    fasterrcnn_resnet50_fpn_params(state, num_classes=20)
  with pytest.raises(ValueError, match="does not know"):
    fasterrcnn_resnet50_fpn_params({**state, "roi_heads.mask_head.0.weight": np.zeros(1)})
  del state["rpn.head.bbox_pred.bias"]
  with pytest.raises(KeyError, match="rpn.head.bbox_pred.bias"):
    fasterrcnn_resnet50_fpn_params(state)


def test_config_init_weights_load_params_and_frozen_batchnorm(tv_model, tmp_path):
  """``--config.init.weights=<fasterrcnn .pth>``: jdet.engine.restore.load_initial_weights puts
  every number of the file in the model's params or batch_stats (80 COCO classes)."""
  import ml_collections
  from jdet.engine.restore import load_initial_weights
  state = {k: v.detach() for k, v in tv_model.state_dict().items()}
  torch.save(state, tmp_path / "frcnn.pth")
  model = FasterRCNN(num_classes=80)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  init = ml_collections.ConfigDict(dict(weights=str(tmp_path / "frcnn.pth"), backbone=""))
  loaded = load_initial_weights(zeros, init)
  want = fasterrcnn_resnet50_fpn_params({k: v.numpy() for k, v in state.items()}, num_classes=80)
  assert sorted(loaded) == sorted(want) == ["batch_stats", "params"]
  jax.tree.map(np.testing.assert_array_equal, loaded, want)
  # The same through `python -m jdet.convert fasterrcnn_resnet50_fpn ... --num_classes 80`.
  from jdet.convert.__main__ import main as convert_main
  convert_main(["fasterrcnn_resnet50_fpn", str(tmp_path / "frcnn.pth"), str(tmp_path / "f.npz"),
                "--num_classes", "80"])
  init.weights = str(tmp_path / "f.npz")
  jax.tree.map(np.testing.assert_array_equal, load_initial_weights(zeros, init), want)
  # The running variance really is the file's (not the zeros the model started from).
  var = state["backbone.body.layer2.0.bn1.running_var"].numpy()
  got = convert.flatten_params(loaded["batch_stats"])
  assert any(np.array_equal(v, var) for v in got.values())
