"""jdet.convert against torchvision: a converted ssd300_vgg16 computes what torchvision computes.

One torchvision ``ssd300_vgg16`` with random weights (seed 0, 4 classes counting
the background) is saved as a ``.pth``, converted, and run on three raccoon
photos resized to 300x300, so torchvision's own resize is the identity and
both frameworks see the same normalised tensor. Compared, from the inside out:
head outputs and default boxes, the matching and the multibox loss of
torchvision's training forward, the final detections of its eval forward,
and the mapping of boxes back to the original image size.

About the random weights: the input is in 0..255 units, so random logits span
about +-30 and the softmax scores already spread over (0, 1); with 4 classes
nearly every default box would pass the 0.01 score threshold and only the
top-400 cut would be tested. The test therefore lowers the foreground logits
of class 2 by 4 and of class 3 by 9 (a change of the classification convs'
biases inside torch, before saving): per image, class 1 has ~8.5k candidates
above 0.01 (the top-400 cut matters), class 2 ~3k, class 3 a few dozen (the
threshold matters), and more boxes than ``detections_per_img=200`` survive NMS.
The comparisons assume that no score sits within float32 noise of a cut (the
tests check those margins on torchvision's numbers) and let detections whose
scores tie to float32 precision come out in either order. One difference is by
design: jdet's NMS drops zero-area boxes, which torchvision keeps.
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.ops import box_iou

from jdet import convert
from jdet.convert.__main__ import main as convert_main
from jdet.data.voc import VocSource
from jdet.models.backbones.vgg import VGG16
from jdet.models.ssd import SSD, ssd_targets
from tests.helpers.faults import UNPICKLED, Payload

RACCOON = Path(__file__).resolve().parents[3] / "shared" / "data" / "raccoon"
TV_CLASSES = 4  # torchvision's count, background included; jdet's num_classes is 3
LOGIT_OFFSETS = (0.0, -4.0, -9.0)  # added to the foreground logits of classes 1, 2, 3
SIZE = 300


def _ssd(num_classes: int = TV_CLASSES - 1) -> SSD:
  # torchvision's postprocess: score_thresh 0.01, topk_candidates 400, nms 0.45, 200 per image.
  return SSD(num_classes=num_classes, clamp_default_boxes=True, size_rule=(0.15, 0.9, 0.07),
             pre_nms_top_k=400, max_detections=200, score_threshold=0.01, nms_threshold=0.45)


def _param_shapes(model: SSD):
  return jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, SIZE, SIZE, 3))),
                        jax.random.key(0))["params"]


def _to_numpy(tree):
  return jax.tree.map(np.asarray, tree)


# ----------------------------------------------------------------------------
# Fixtures: one torchvision model, its converted params, three photos.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tv_ssd(tmp_path_factory):
  """``(torchvision model in eval mode, path of its saved state dict)``."""
  torch.manual_seed(0)
  tv = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None,
                                                 num_classes=TV_CLASSES).eval()
  with torch.no_grad():
    for conv in tv.head.classification_head.module_list:
      bias = conv.bias.view(-1, TV_CLASSES)  # channels are (box, class)
      bias[:, 1:] += torch.tensor(LOGIT_OFFSETS)
  path = tmp_path_factory.mktemp("ssd") / "ssd300_vgg16.pth"
  torch.save(tv.state_dict(), path)
  return tv, path


@pytest.fixture(scope="module")
def photos():
  """Three raccoon photos at 300x300: ``(images [B, 3, 300, 300] in [0, 1], orig (h, w) per
  image, torchvision targets with boxes in 300x300 pixels)``."""
  if not RACCOON.is_dir():
    pytest.skip(f"the raccoon data set is not at {RACCOON}")
  source = VocSource(RACCOON, "val")
  rng = np.random.default_rng(0)
  images, orig, targets = [], [], []
  for i in range(3):
    ex = source[i]
    h, w = ex.image.shape[:2]
    img = Image.fromarray(ex.image).resize((SIZE, SIZE), Image.BILINEAR)
    images.append(torch.from_numpy(np.asarray(img, np.float32) / 255.0).permute(2, 0, 1))
    orig.append((h, w))
    boxes = ex.boxes * np.float32([SIZE / w, SIZE / h, SIZE / w, SIZE / h])
    labels = ex.labels + 1  # raccoon -> torchvision class 1
    # One more object of class 2 or 3 per image, at a random (non-round) place.
    wh = rng.uniform(40, 160, size=2)
    xy = rng.uniform(0, SIZE - wh)
    boxes = np.concatenate([boxes, [np.concatenate([xy, xy + wh])]]).astype(np.float32)
    labels = np.concatenate([labels, [2 + i % 2]])
    targets.append({"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels).long()})
  return torch.stack(images), orig, targets


@pytest.fixture(scope="module")
def tv_outputs(tv_ssd, photos):
  """torchvision's normalised input, head outputs, default boxes and NMS survivors, all
  from one eval forward (transform, backbone, head, postprocess), read with hooks."""
  tv, _ = tv_ssd
  images, _, _ = photos
  seen = {}
  hooks = [tv.backbone.register_forward_hook(lambda m, args, out: seen.update(image=args[0])),
           tv.head.register_forward_hook(lambda m, args, out: seen.update(head=out)),
           tv.anchor_generator.register_forward_hook(lambda m, args, out: seen.update(anchors=out))]
  # Every NMS survivor, not the first 200 only (see test_detections_match_torchvision).
  tv.detections_per_img = 100_000
  try:
    with torch.no_grad():
      survivors = tv(list(images))
  finally:
    tv.detections_per_img = 200
    for hook in hooks:
      hook.remove()
  # The transform normalised and did not resize: (x - mean) / (1 / 255).
  assert seen["image"].shape == (3, 3, SIZE, SIZE)
  return dict(image=seen["image"].permute(0, 2, 3, 1).numpy(),
              logits=seen["head"]["cls_logits"].numpy(),
              deltas=seen["head"]["bbox_regression"].numpy(), anchors=seen["anchors"][0].numpy(),
              survivors=survivors)


@pytest.fixture(scope="module")
def jdet_outputs(tv_ssd, tv_outputs, photos):
  """jdet's head outputs and detections for the same input; and the detections again with
  ``scale_factor``/``orig_size`` of the original photos (same shapes: one compilation)."""
  _, path = tv_ssd
  _, orig, _ = photos
  model = _ssd()
  variables = convert.load_model_variables(path, {"params": _param_shapes(model)})
  predict = jax.jit(lambda v, b: model.apply(v, b, method="predict", capture_intermediates=True,
                                             mutable=["intermediates"]))
  b = len(orig)
  batch = dict(image=jnp.asarray(tv_outputs["image"]),
               image_size=jnp.full((b, 2), SIZE, jnp.int32),
               scale_factor=jnp.ones((b, 2), jnp.float32),
               orig_size=jnp.full((b, 2), SIZE, jnp.int32))
  dets, state = predict(variables, batch)
  logits, deltas, anchors = state["intermediates"]["__call__"][0]
  orig = np.asarray(orig, np.float32)
  rescaled = dict(batch, scale_factor=jnp.asarray(SIZE / orig),
                  orig_size=jnp.asarray(orig, jnp.int32))
  dets_orig, _ = predict(variables, rescaled)
  return dict(model=model, variables=variables, logits=np.asarray(logits),
              deltas=np.asarray(deltas), anchors=np.asarray(anchors), detections=_to_numpy(dets),
              detections_orig=_to_numpy(dets_orig))


# ----------------------------------------------------------------------------
# The converted tree.
# ----------------------------------------------------------------------------


def test_converted_tree_has_the_models_names_shapes_and_parameter_count(tv_ssd):
  tv, path = tv_ssd
  state = convert.read_state_dict(path)
  assert convert.ssd300_vgg16_num_classes(state) == TV_CLASSES - 1
  params = convert.ssd300_vgg16_params(state)
  shapes = _param_shapes(_ssd())
  assert jax.tree.structure(params) == jax.tree.structure(shapes)
  assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, shapes)
  assert (sum(np.size(x) for x in jax.tree.leaves(params))
          == sum(p.numel() for p in tv.parameters()) == 24_013_232)
  # Layouts: OIHW -> HWIO; the L2Norm scale as is.
  w = tv.backbone.extra[0][7][1].weight.detach().numpy()  # fc6
  np.testing.assert_array_equal(params["backbone"]["fc6"]["kernel"], w.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["backbone"]["conv4_3_norm"]["scale"],
                                tv.backbone.scale_weight.detach().numpy())
  np.testing.assert_array_equal(params["backbone"]["conv11_2"]["bias"],
                                tv.backbone.extra[4][2].bias.detach().numpy())


# ----------------------------------------------------------------------------
# Inference parity.
# ----------------------------------------------------------------------------


def test_head_outputs_and_default_boxes_match(tv_outputs, jdet_outputs):
  for name in ("logits", "deltas"):
    got, want = jdet_outputs[name], tv_outputs[name]
    assert got.shape == want.shape == (3, 8732, 4)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale, err_msg=name)
  np.testing.assert_allclose(jdet_outputs["anchors"], tv_outputs["anchors"], rtol=0, atol=1e-4)


def _check_cut_margins(tv_outputs, *, margin: float = 5e-6) -> None:
  """The test's premise: no score that decides a cut lies within ``margin`` of it, where
  float32 noise could move it across. A class with more than 400 candidates is cut at
  its 400th score, one with fewer at the 0.01 threshold. (Measured: the two frameworks'
  scores differ by at most 8e-7 near the cuts; the smallest margin is 1.1e-5.)"""
  scores = torch.softmax(torch.from_numpy(tv_outputs["logits"]), -1)[..., 1:].numpy()
  for i, per_image in enumerate(scores):
    for c, s in enumerate(per_image.T):
      top = np.sort(s[s > 0.01])[::-1]
      if len(top) > 400:
        assert top[399] - top[400] > margin, f"image {i} class {c + 1}: a tie at the top-400 cut"
      else:
        assert np.abs(s - 0.01).min() > margin, f"image {i} class {c + 1}: a score sits on 0.01"


def _proper(boxes: np.ndarray) -> np.ndarray:
  """``[N, 4]`` -> ``[N]`` bool: positive width and height (what jdet's NMS keeps)."""
  return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def _pair(ours, i: int, want: dict, *, tie: float = 2e-6) -> np.ndarray:
  """For each of jdet's detections of image ``i``, the index of the same detection in
  torchvision's list ``want`` (same label, box within 0.01 px, score within 1e-4).

  Scores near 1 lie a few float32 steps apart, so two detections whose scores differ by
  less than the frameworks' rounding noise may come out in either order; the pairing
  allows a swap only between torchvision scores less than ``tie`` apart.
  """
  n = len(want["scores"])
  used = np.zeros(n, bool)
  order = np.empty(n, np.int64)
  for k in range(n):
    same = (~used & (want["labels"] - 1 == ours.labels[i, k])
            & (np.abs(want["scores"] - ours.scores[i, k]) <= 1e-4)
            & (np.abs(want["boxes"] - ours.boxes[i, k]).max(axis=1) <= 0.01))
    assert same.any(), f"image {i}: jdet's detection {k} is not among torchvision's"
    order[k] = np.argmax(same)
    used[order[k]] = True
  assert np.abs(want["scores"][order] - want["scores"]).max() < tie, "reordered beyond a tie"
  return order


def test_detections_match_torchvision(tv_outputs, jdet_outputs):
  """Same boxes, scores and labels in the same order (up to float32 ties), except that
  jdet's NMS drops zero-area boxes by design (see :func:`jdet.ops.nms`) and torchvision
  keeps them: random box offsets push some boxes off the image, where clipping leaves
  ``x1 == x2 == 300``. So torchvision's survivors without those are compared with
  jdet's 200."""
  _check_cut_margins(tv_outputs)
  ours = jdet_outputs["detections"]
  max_box, max_score, dropped, swapped = 0.0, 0.0, 0, 0
  for i, survivors in enumerate(tv_outputs["survivors"]):
    survivors = {k: v.numpy() for k, v in survivors.items()}
    b = survivors["boxes"]
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    assert ((w == 0) | (h == 0) | ((w > 0.01) & (h > 0.01))).all()  # premise: no near-zero sides
    proper = _proper(b)
    dropped += int((~proper[:200]).sum())
    want = {k: v[proper] for k, v in survivors.items()}
    assert want["scores"][199] - want["scores"][200] > 1e-5  # premise: no tie at the 200 cut
    want = {k: v[:200] for k, v in want.items()}
    assert ours.valid[i].all()  # more than 200 survive NMS: the final cut is tested too
    assert set(want["labels"].tolist()) == {1, 2, 3}
    order = _pair(ours, i, want)
    swapped += int((order != np.arange(200)).sum())
    max_box = max(max_box, np.abs(ours.boxes[i] - want["boxes"][order]).max())
    max_score = max(max_score, np.abs(ours.scores[i] - want["scores"][order]).max())
  assert dropped > 0  # the difference is exercised
  print(f"\nmax |box diff| {max_box:.2e} px, max |score diff| {max_score:.2e}; "
        f"{dropped} zero-area boxes in torchvision's top 200s; {swapped} tied detections swapped")


def test_boxes_map_back_to_the_original_image(tv_ssd, tv_outputs, jdet_outputs, photos):
  tv, _ = tv_ssd
  _, orig, _ = photos
  at_300, at_orig = jdet_outputs["detections"], jdet_outputs["detections_orig"]
  np.testing.assert_array_equal(at_orig.valid, at_300.valid)
  np.testing.assert_array_equal(at_orig.labels, at_300.labels)
  np.testing.assert_array_equal(at_orig.scores, at_300.scores)
  # By hand: x * w / 300, y * h / 300.
  (h0, w0), (h1, w1) = orig[0], orig[1]
  assert (h0, w0) != (h1, w1) and h0 != w0
  for i, (h, w) in enumerate(orig):
    expected = at_300.boxes[i] * np.float32([w, h, w, h]) / SIZE
    np.testing.assert_allclose(at_orig.boxes[i], expected, rtol=1e-6, atol=1e-4)
    assert (at_orig.boxes[i][:, 2] <= w).all() and (at_orig.boxes[i][:, 3] <= h).all()
  # torchvision's own mapping (GeneralizedRCNNTransform.postprocess) of its detections.
  proper = [{k: v[_proper(d["boxes"].numpy())] for k, v in d.items()}
            for d in tv_outputs["survivors"]]
  mapped = tv.transform.postprocess(copy.deepcopy(proper), [(SIZE, SIZE)] * len(orig), orig)
  for i, (want, want_300) in enumerate(zip(mapped, proper)):
    order = _pair(at_300, i, {k: v.numpy()[:200] for k, v in want_300.items()})
    np.testing.assert_allclose(at_orig.boxes[i], want["boxes"].numpy()[order], rtol=0, atol=0.05)


# ----------------------------------------------------------------------------
# Training parity: matching and the multibox loss.
# ----------------------------------------------------------------------------


def _jdet_batch(tv_outputs, targets) -> dict:
  """torchvision targets -> a jdet batch, boxes padded to one more than the most per image."""
  b = len(targets)
  max_boxes = max(len(t["labels"]) for t in targets) + 1
  boxes = np.zeros((b, max_boxes, 4), np.float32)
  labels = np.full((b, max_boxes), -1, np.int32)
  for i, t in enumerate(targets):
    n = len(t["labels"])
    boxes[i, :n] = t["boxes"].numpy()
    labels[i, :n] = t["labels"].numpy() - 1  # jdet labels have no background
  return dict(image=jnp.asarray(tv_outputs["image"]), boxes=jnp.asarray(boxes),
              labels=jnp.asarray(labels), valid=jnp.ones((b,), bool))


def test_matching_and_multibox_loss_match_torchvision(tv_ssd, tv_outputs, jdet_outputs, photos):
  tv, _ = tv_ssd
  images, _, targets = photos
  batch = _jdet_batch(tv_outputs, targets)
  anchors = torch.from_numpy(tv_outputs["anchors"])

  # Matching: torchvision's SSDMatcher (IoU >= 0.5, plus each box's best default box).
  cls_targets = []
  for i, t in enumerate(targets):
    matched = tv.proposal_matcher(box_iou(t["boxes"], anchors)).numpy()
    want = np.where(matched >= 0, t["labels"].numpy()[np.maximum(matched, 0)], 0)
    classes, _, positive = ssd_targets(jdet_outputs["anchors"], batch["boxes"][i],
                                       batch["labels"][i])
    np.testing.assert_array_equal(np.asarray(classes), want)
    np.testing.assert_array_equal(np.asarray(positive), matched >= 0)
    cls_targets.append(want)
  # Premise: no tie in the background loss at the hard-negative cut (3 per positive).
  logp = torch.log_softmax(torch.from_numpy(tv_outputs["logits"]), -1).numpy()
  for i, want in enumerate(cls_targets):
    neg_loss = np.sort(-logp[i, want == 0, 0])[::-1]
    k = 3 * int((want > 0).sum())
    assert neg_loss[k - 1] - neg_loss[k] > 1e-4, f"image {i}: a tie at the hard-negative cut"

  tv.train()
  try:
    with torch.no_grad():
      want = tv(list(images), copy.deepcopy(targets))
  finally:
    tv.eval()
  model, variables = jdet_outputs["model"], jdet_outputs["variables"]
  loss, metrics = jax.jit(lambda v, b: model.apply(v, b, method="loss", train=True))(variables,
                                                                                    batch)
  np.testing.assert_allclose(float(metrics["box_loss"]), want["bbox_regression"].item(), rtol=1e-4)
  np.testing.assert_allclose(float(metrics["cls_loss"]), want["classification"].item(), rtol=1e-4)
  np.testing.assert_allclose(float(loss), sum(v.item() for v in want.values()), rtol=1e-4)
  assert float(metrics["num_pos"]) == sum((c > 0).sum() for c in cls_targets)
  print(f"\nloss: jdet box {float(metrics['box_loss']):.6f} cls {float(metrics['cls_loss']):.6f}; "
        f"torchvision box {want['bbox_regression'].item():.6f} "
        f"cls {want['classification'].item():.6f}")


# ----------------------------------------------------------------------------
# ImageNet VGG16 -> backbone.
# ----------------------------------------------------------------------------


def test_vgg16_backbone_matches_torchvision_features(tmp_path):
  torch.manual_seed(1)
  vgg = torchvision.models.vgg16(weights=None).eval()
  # Same state dict names, a small file: shrink the (unused) fully connected classifier.
  vgg.classifier = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Dropout(),
                                       torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Dropout(),
                                       torch.nn.Linear(4, 2))
  pth = tmp_path / "vgg16.pth"
  torch.save(vgg.state_dict(), pth)

  backbone = VGG16(extras=())  # conv1_1 .. fc7
  # 128 -> pools 64, 32, 16 (pool3's ceil mode changes nothing on an even size) -> pool4 8.
  x = np.random.default_rng(0).normal(size=(1, 128, 128, 3)).astype(np.float32) * 50
  shapes = jax.eval_shape(lambda k: backbone.init(k, jnp.asarray(x)), jax.random.key(0))["params"]
  rng = np.random.default_rng(1)
  init = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32) * 0.01, shapes)
  params = convert.load_backbone_variables(
      pth, {"params": {"backbone": init, "head": {}}})["params"]["backbone"]
  for name in ("fc6", "fc7", "conv4_3_norm"):  # not in an ImageNet VGG16: kept as they were
    jax.tree.map(np.testing.assert_array_equal, params[name], init[name])

  def run(p, image):
    outs, state = backbone.apply({"params": p}, image, capture_intermediates=True,
                                 mutable=["intermediates"])
    return outs[0], state["intermediates"]

  normed, inter = jax.jit(run)(params, jnp.asarray(x))
  with torch.no_grad():
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    conv4_3 = vgg.features[:23](t)  # up to conv4_3's ReLU, before L2Norm
    conv5_3 = vgg.features[:30](t)  # pool4, conv5_1 .. conv5_3 and its ReLU
  for name, want in (("conv4_3", conv4_3), ("conv5_3", conv5_3)):
    got = np.asarray(jax.nn.relu(inter[name]["__call__"][0]))  # the captured conv is pre-ReLU
    want = want.permute(0, 2, 3, 1).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max(), err_msg=name)
  # And the L2-normalised output, as torchvision's SSD computes it (with jdet's scale).
  scale = torch.from_numpy(init["conv4_3_norm"]["scale"]).view(1, -1, 1, 1)
  want_normed = (scale * torch.nn.functional.normalize(conv4_3)).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(normed), want_normed, rtol=0,
                             atol=1e-5 * np.abs(want_normed).max())

  # The command line writes the same backbone to an .npz, loadable without torch.
  npz = tmp_path / "vgg16.npz"
  convert_main(["vgg16", str(pth), str(npz)])
  again = convert.load_backbone_variables(npz, {"params": {"backbone": init}})["params"]["backbone"]
  jax.tree.map(np.testing.assert_array_equal, _to_numpy(again), _to_numpy(params))


# ----------------------------------------------------------------------------
# Files: npz round trip, wrappers, errors.
# ----------------------------------------------------------------------------


def test_npz_round_trip_and_command_line(tv_ssd, tmp_path, capsys):
  _, path = tv_ssd
  shapes = _param_shapes(_ssd())
  from_pth = convert.load_model_variables(path, {"params": shapes})["params"]
  out = tmp_path / "ssd300.npz"
  convert_main(["ssd300_vgg16", str(path), str(out)])
  assert "num_classes=3" in capsys.readouterr().out
  from_npz = convert.load_model_variables(out, {"params": shapes})["params"]
  jax.tree.map(np.testing.assert_array_equal, from_npz, from_pth)
  saved = tmp_path / "params"  # no suffix added behind the caller's back
  convert.save_params_npz(saved, from_pth)
  assert saved.exists()
  jax.tree.map(np.testing.assert_array_equal, convert.load_params_npz(out), from_pth)


def test_loaded_arrays_keep_the_models_dtype_and_sharding(tv_ssd):
  _, path = tv_ssd
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), _param_shapes(_ssd()))
  loaded = convert.load_model_variables(path, {"params": params})["params"]
  leaf = loaded["head"]["cls_0"]["kernel"]
  assert isinstance(leaf, jax.Array) and leaf.dtype == jnp.float32
  assert leaf.sharding == params["head"]["cls_0"]["kernel"].sharding
  assert np.asarray(leaf).any()  # converted values, not the zeros
  assert np.asarray(params["head"]["cls_0"]["kernel"]).sum() == 0  # the input is unchanged


def test_wrapped_and_prefixed_state_dicts(tmp_path):
  sd = {"features.0.weight": torch.ones(2, 3, 3, 3),
        "features.0.bias": torch.zeros(2, dtype=torch.bfloat16)}
  wrapped = {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}
  torch.save(wrapped, tmp_path / "a.pth")
  torch.save({"model": sd}, tmp_path / "b.pt")
  for name in ("a.pth", "b.pt"):
    got = convert.read_state_dict(tmp_path / name)
    assert sorted(got) == sorted(sd)
    assert got["features.0.bias"].dtype == np.float32  # bfloat16 -> float32


def test_shape_mismatch_names_the_parameter(tv_ssd):
  """Another class count re-initialises the class convolutions (fine-tuning; see
  tests/convert/test_finetune.py); other default boxes per position are an error."""
  _, path = tv_ssd
  _, report = convert.load_model_variables(path, {"params": _param_shapes(_ssd(num_classes=5))},
                                           return_report=True)
  assert report.reinitialised["params/head/cls_0/kernel"].startswith(
      "depends on the class count: model (3, 3, 512, 24), file (3, 3, 512, 16)")
  other_boxes = SSD(num_classes=5, size_rule=(0.15, 0.9, 0.07),
                    aspect_ratios=((2,), (2,), (2,), (2,), (2,), (2,)))
  with pytest.raises(ValueError, match=r"head/box_1/kernel: model \(3, 3, 1024, 16\), "
                                       r"file \(3, 3, 1024, 24\)"):
    convert.load_model_variables(path, {"params": _param_shapes(other_boxes)})


def test_missing_and_unexpected_names_are_listed(tv_ssd, tmp_path):
  _, path = tv_ssd
  state = convert.read_state_dict(path)
  del state["backbone.extra.2.2.weight"]
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "cut.pth")
  with pytest.raises(KeyError, match=r"backbone\.extra\.2\.2\.weight"):
    convert.load_model_variables(tmp_path / "cut.pth", {"params": _param_shapes(_ssd())})

  flat = convert.flatten_params(
      convert.load_model_variables(path, {"params": _param_shapes(_ssd())})["params"])
  del flat["backbone/conv9_2/kernel"]
  flat["head/cls_6/kernel"] = np.zeros((3, 3, 256, 16), np.float32)
  convert.save_params_npz(tmp_path / "odd.npz", convert.unflatten_params(flat))
  with pytest.raises(ValueError, match=r"(?s)missing from the file \(1\): backbone/conv9_2/kernel"
                                       r".*unexpected, not in the model \(1\): head/cls_6/kernel"):
    convert.load_model_variables(tmp_path / "odd.npz", {"params": _param_shapes(_ssd())})
  # A backbone without the extra layers cannot take SSD300's conv8_1 .. conv11_2.
  no_extras = jax.eval_shape(lambda k: VGG16(extras=()).init(k, jnp.zeros((1, SIZE, SIZE, 3))),
                             jax.random.key(0))["params"]
  with pytest.raises(ValueError, match=r"unexpected, not in the model \(16\): backbone/conv10_1"):
    convert.load_backbone_variables(path, {"params": {"backbone": no_extras}})


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_with_objects_is_refused(tmp_path):
  path = tmp_path / "evil.pth"
  with open(path, "wb") as fh:
    pickle.dump({"features.0.weight": Payload()}, fh)
  torch.save({"w": torch.zeros(2), "obj": Payload()}, tmp_path / "evil2.pth")
  for p in (path, tmp_path / "evil2.pth"):
    with pytest.raises(ValueError, match="weights_only"):
      convert.read_state_dict(p)
  assert not UNPICKLED


def test_unknown_formats_and_layouts_are_refused(tmp_path):
  with pytest.raises(ValueError, match="unknown checkpoint format"):
    convert.read_state_dict(tmp_path / "x.ckpt")
  np.savez(tmp_path / "x.npz", **{"fc.weight": np.zeros((2, 2))})
  with pytest.raises(ValueError, match="unknown state dict layout"):
    convert.load_model_variables(tmp_path / "x.npz", {"params": {}})


def test_safetensors(tmp_path):
  try:
    from safetensors.numpy import save_file
  except ImportError:
    with pytest.raises(ImportError, match="safetensors"):
      convert.read_state_dict(tmp_path / "x.safetensors")
    return
  save_file({"features.0.weight": np.ones((2, 3, 3, 3), np.float32)},
            str(tmp_path / "x.safetensors"))
  got = convert.read_state_dict(tmp_path / "x.safetensors")
  np.testing.assert_array_equal(got["features.0.weight"], np.ones((2, 3, 3, 3), np.float32))


def test_coco91_heads_become_background_plus_80_categories():
  """torchvision's per-category-id columns are picked in jdet's label order."""
  from jdet.convert import coco91_to_coco80
  from jdet.class_names import COCO_CATEGORY_IDS
  p = 4  # boxes per location
  cols = np.arange(p * 91, dtype=np.float32)  # the value of each column is its index
  params = {"head": {"cls_0": {"kernel": np.broadcast_to(cols, (3, 3, 2, p * 91)).copy(),
                               "bias": cols.copy()},
                     "box_0": {"kernel": np.zeros((3, 3, 2, p * 4)), "bias": np.zeros(p * 4)}}}
  model = {"head": {"cls_0": {"kernel": np.zeros((3, 3, 2, p * 81))},
                    "box_0": {"kernel": np.zeros((3, 3, 2, p * 4))}}}
  out = coco91_to_coco80(params, model)
  bias = out["head"]["cls_0"]["bias"].reshape(p, 81)
  for box in range(p):
    assert bias[box, 0] == box * 91  # background
    # label l of jdet's COCO source is category COCO_CATEGORY_IDS[l]: person 1, ..., toothbrush 90
    np.testing.assert_array_equal(bias[box, 1:], box * 91 + np.asarray(COCO_CATEGORY_IDS))
  assert COCO_CATEGORY_IDS[0] == 1 and COCO_CATEGORY_IDS[-1] == 90 and len(COCO_CATEGORY_IDS) == 80
  np.testing.assert_array_equal(out["head"]["cls_0"]["kernel"][0, 0, 0], out["head"]["cls_0"]["bias"])
  assert out["head"]["box_0"] is params["head"]["box_0"]
