"""Test-time augmentation against plain predict, hand-worked cases and a NumPy reference.

Most tests use small fake detectors (Linen modules with ``candidates`` and
``at_input_size``) whose candidates are known in advance, so that what every
pass, size range and merge must give can be worked out by hand or in NumPy.
The smoke SSD checks that one unflipped scale is the model's own ``predict``
and that a flipped pass is ``predict`` of the mirrored image, mirrored back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdet
from jdet import parallel
from jdet.data import builder, pipeline
from jdet.evaluation import tta
from jdet.testing import TraceCounter

from configs import common
from configs import ssd300 as ssd300_config
from tests.helpers.references import np_iou
from tests.helpers.weights import numpy_variables

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------
# Fake detectors.
# ----------------------------------------------------------------------------


class FakeDetector(nn.Module):
  """What test-time augmentation needs of a detector: ``candidates`` at a square
  ``image_size`` and ``at_input_size``, with the NMS settings as fields."""

  image_size: int
  score_threshold: float = 0.01
  pre_nms_top_k: int = 100
  nms_threshold: float = 0.45
  max_detections: int = 10

  def checked_image(self, batch):
    image = batch["image"]
    if image.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"expected {self.image_size}x{self.image_size} input, got {image.shape}")
    return image

  def at_input_size(self, size: int):
    return self.clone(image_size=size)


class TableDetector(FakeDetector, kw_only=True):
  """Candidates from a table per input side, whatever the image.

  ``tables`` holds ``(side, boxes, scores)``: ``boxes [A, 4]`` as fractions
  of the input side, ``scores [A, C]``; every side has the same A.
  """

  tables: tuple

  def candidates(self, batch):
    image = self.checked_image(batch)
    TRACED.append(self.image_size)  # runs once per trace
    table = {side: (b, s) for side, b, s in self.tables}[self.image_size]
    b = image.shape[0]
    boxes = jnp.asarray(np.asarray(table[0], np.float32) * self.image_size)
    scores = jnp.asarray(np.asarray(table[1], np.float32))
    return (jnp.broadcast_to(boxes, (b,) + boxes.shape),
            jnp.broadcast_to(scores, (b,) + scores.shape))


TRACED: list[int] = []


class BrightBoxDetector(FakeDetector):
  """One candidate: the bounding box of the pixels above 0.5 in channel 0."""

  pre_nms_top_k: int = 10
  max_detections: int = 4

  def candidates(self, batch):
    image = self.checked_image(batch)
    bright = image[..., 0] > 0.5  # [B, H, W]
    rows, cols = jnp.any(bright, axis=2), jnp.any(bright, axis=1)  # [B, H], [B, W]
    h, w = rows.shape[1], cols.shape[1]
    y1, y2 = jnp.argmax(rows, axis=1), h - jnp.argmax(rows[:, ::-1], axis=1)
    x1, x2 = jnp.argmax(cols, axis=1), w - jnp.argmax(cols[:, ::-1], axis=1)
    boxes = jnp.stack([x1, y1, x2, y2], axis=-1).astype(jnp.float32)[:, None]  # [B, 1, 4]
    return boxes, jnp.full((image.shape[0], 1, 1), 0.9, jnp.float32)


def _tables(spec: dict) -> tuple:
  """``{side: (boxes, scores)}`` -> the hashable ``tables`` field."""
  def tup(a):
    return tuple(map(tup, a)) if isinstance(a, (list, tuple, np.ndarray)) else float(a)
  return tuple((side, tup(b), tup(s)) for side, (b, s) in spec.items())


def _batch(side: int, orig_sizes, *, valid=None, image=None) -> dict:
  """A batch of ``side x side`` images standing for originals of ``orig_sizes`` ``(h, w)``."""
  orig = np.asarray(orig_sizes, np.int32)
  n = len(orig)
  return dict(
      image=np.zeros((n, side, side, 3), np.float32) if image is None else image,
      image_size=np.full((n, 2), side, np.int32), orig_size=orig,
      scale_factor=(side / orig).astype(np.float32),
      valid=np.ones(n, bool) if valid is None else np.asarray(valid, bool),
      image_id=np.arange(n, dtype=np.int32))


def _np(tree):
  return jax.tree.map(np.asarray, tree)


# ----------------------------------------------------------------------------
# NumPy reference: every pass, size ranges, top k, NMS, merge and voting.
# ----------------------------------------------------------------------------


def _np_greedy_nms(boxes, scores, thr):
  """Indices kept by greedy NMS (suppress at IoU > thr), by score, ties by index."""
  order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
  kept = []
  for i in order:
    if all(np_iou(boxes[j], boxes[i][None])[0] <= thr for j in kept):
      kept.append(i)
  return kept


def _np_tta(spec, sides, ranges, orig_hw, *, score_threshold, k, scale_nms, iou_threshold,
            merge, vote_threshold, max_detections):
  """Detections of one image as ``[(score, label, box)]``, from the fake tables ``spec``."""
  h, w = orig_hw
  scale = np.array([w, h, w, h], np.float64)
  num_classes = np.asarray(spec[sides[0]][1]).shape[1]
  pool = {c: ([], []) for c in range(num_classes)}  # class -> (boxes, scores), in pass order
  for side, (lo, hi) in zip(sides, ranges):
    frac, scores = np.asarray(spec[side][0], np.float64), np.asarray(spec[side][1], np.float64)
    for flip in (False, True):
      f = np.stack([1 - frac[:, 2], frac[:, 1], 1 - frac[:, 0], frac[:, 3]], 1) if flip else frac
      boxes = f * scale  # original pixels
      size = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
      for c in range(num_classes):
        ok = [i for i in range(len(boxes)) if scores[i, c] > score_threshold
              and lo <= size[i] < (np.inf if hi is None else hi)]
        top = sorted(ok, key=lambda i: (-scores[i, c], i))[:k]
        if scale_nms and top:  # the pass's own detections: at most max_detections
          kept = _np_greedy_nms(boxes[top], scores[top, c], iou_threshold)[:max_detections]
          top = [top[j] for j in kept]
        pool[c][0].extend(boxes[top])
        pool[c][1].extend(scores[top, c])
  dets = []
  for c, (boxes, scores) in pool.items():
    boxes, scores = np.asarray(boxes).reshape(-1, 4), np.asarray(scores)
    for rank, i in enumerate(_np_greedy_nms(boxes, scores, iou_threshold)):
      box = boxes[i]
      if merge == "vote":
        weight = np.where(np_iou(box, boxes) >= vote_threshold, scores, 0.0)
        box = (weight[:, None] * boxes).sum(0) / weight.sum()
      dets.append((scores[i], c, rank, box))
  dets.sort(key=lambda d: (-d[0], d[1], d[2]))
  return [(s, c, b) for s, c, _, b in dets[:max_detections]]


# ----------------------------------------------------------------------------
# Settings.
# ----------------------------------------------------------------------------


def test_settings_defaults_resolve_and_config_round_trip():
  model = TableDetector(image_size=320, tables=())
  s = tta.TTASettings().resolve(model)
  # RefineDet320's sides, and the model's own post-processing values.
  assert s.sides() == (192, 320, 384, 448, 512, 576)
  assert (s.iou_threshold, s.vote_threshold, s.score_threshold, s.pre_nms_top_k,
          s.max_detections) == (0.45, 0.45, 0.01, 100, 10)
  config = tta.default_settings()
  config.merge = "vote"
  config.iou_threshold = 0.5
  from_config = tta.TTASettings.from_config(config).resolve(model)
  assert (from_config.merge, from_config.iou_threshold, from_config.vote_threshold) == \
      ("vote", 0.5, 0.5)
  assert from_config.size_ranges == s.size_ranges  # None in the config is unbounded
  record = json.loads(json.dumps(from_config.to_dict(), allow_nan=False))
  assert record["size_ranges"][0] == [32.0, None] and record["sides"][-1] == 576
  # The pipeline resizes to the largest side; the config itself is left alone.
  data = ssd300_config.get_config("smoke").data
  assert tta.tta_data_config(data, s).transforms.size == 576 and data.transforms.size == 64
  with pytest.raises(ValueError, match="'ssd' transforms"):
    tta.tta_data_config(common.data_config(
        data, common.rcnn_augment(), batch_size=2), s)
  with pytest.raises(ValueError, match="2 scales"):
    tta.TTASettings(scales=(1.0, 2.0), size_ranges=((0, None),))
  with pytest.raises(ValueError, match="merge"):
    tta.TTASettings(merge="soft")
  with pytest.raises(ValueError, match="unknown TTA settings"):
    tta.TTASettings.from_config({"scale": (1.0,)})


# ----------------------------------------------------------------------------
# The smoke SSD.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke():
  """``(model, variables, batch)``: the smoke SSD (64x64 input) and 4 shapes images
  presented as 128x256 originals (the last one a filler)."""
  config = ssd300_config.get_config("smoke")
  model = jdet.build_model(config.model_name, **config.model)
  size = int(config.model.image_size)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  source = builder.build_source(config.data, "val")
  real = next(iter(pipeline.eval_batches(source, builder.build_transforms(config.data, train=False),
                                         batch_size=4)))
  batch = _batch(size, [(128, 256)] * 4, valid=[True, True, True, False], image=real["image"])
  return model, numpy_variables(shapes), batch


def test_one_scale_without_flip_is_predict(smoke):
  model, variables, batch = smoke
  ref = _np(jax.jit(lambda v, b: model.apply(v, b, method="predict"))(variables, batch))
  predict = tta.make_tta_predict_fn(model, tta.TTASettings(scales=(1.0,), flip=False,
                                                           size_ranges=None))
  out = _np(predict(variables, batch))
  assert ref.valid[:3].sum() > 10 and not ref.valid[3].any()
  for name in ("boxes", "scores", "labels", "valid"):
    np.testing.assert_array_equal(getattr(out, name), getattr(ref, name), err_msg=name)


def test_flipped_pass_is_predict_of_mirrored_image(smoke):
  model, variables, batch = smoke
  mirrored = dict(batch, image=np.ascontiguousarray(batch["image"][:, :, ::-1]))
  ref = _np(jax.jit(lambda v, b: model.apply(v, b, method="predict"))(variables, mirrored))
  width = 256.0  # of the original image
  ref_boxes = np.stack([width - ref.boxes[..., 2], ref.boxes[..., 1],
                        width - ref.boxes[..., 0], ref.boxes[..., 3]], axis=-1)

  @jax.jit
  def flipped_only(v, b):
    boxes, scores = tta.scale_candidates(model, v, b, side=64, flips=(True,),
                                         score_threshold=model.score_threshold,
                                         pre_nms_top_k=model.pre_nms_top_k)
    return tta.merge_candidates(boxes, scores, b, iou_threshold=model.nms_threshold,
                                max_detections=model.max_detections)

  out = _np(flipped_only(variables, batch))
  assert ref.valid.sum() > 10
  np.testing.assert_array_equal(out.valid, ref.valid)
  np.testing.assert_array_equal(out.labels, ref.labels)
  np.testing.assert_allclose(out.scores, ref.scores, rtol=1e-6)
  np.testing.assert_allclose(out.boxes[out.valid], ref_boxes[ref.valid], atol=1e-3)
  # Not a symmetric case: the unmirrored detections differ.
  plain = _np(jax.jit(lambda v, b: model.apply(v, b, method="predict"))(variables, batch))
  assert not np.allclose(plain.scores, ref.scores)


# ----------------------------------------------------------------------------
# Geometry of the passes: resize, canvas, flips, back to original pixels.
# ----------------------------------------------------------------------------


def test_every_pass_finds_the_same_box_in_original_pixels():
  """A bright rectangle is found by every pass (shrunk on a canvas, enlarged,
  mirrored) at the same place in original pixels, up to one pass pixel."""
  base = 64
  image = np.zeros((2, base, base, 3), np.float32)
  image[0, 16:40, 8:48] = 1.0  # rows y 16..40, columns x 8..48 (input pixels)
  image[1, 4:60, 30:62] = 1.0
  batch = _batch(base, [(128, 128), (32, 256)], image=image)
  expected = np.array([[8, 16, 48, 40], [30, 4, 62, 60]], np.float64) / np.concatenate(
      [batch["scale_factor"][:, ::-1]] * 2, axis=1)  # [x1, y1, x2, y2] / (sx, sy, sx, sy)
  model = BrightBoxDetector(image_size=base)
  for side in (32, 64, 96):  # 32: the model runs on a 64 canvas (it insists on it)
    fn = jax.jit(lambda v, b, side=side: tta.scale_candidates(
        model, v, b, side=side, flips=(False, True), score_threshold=0.01, pre_nms_top_k=1))
    boxes, scores = _np(fn({}, batch))  # [B, 1, 2, 4], [B, 1, 2]
    assert boxes.shape == (2, 1, 2, 4)
    np.testing.assert_array_equal(scores, np.float32(0.9))
    per_axis = np.concatenate([batch["scale_factor"][:, ::-1]] * 2, axis=1)  # [B, 4] (sx, sy, ..)
    orig = boxes[:, 0] / per_axis[:, None]  # [B, 2, 4]
    one_pixel = (base / side) / per_axis[:, None]  # a pass pixel in original pixels
    for flip in (0, 1):
      error = np.abs(orig[:, flip] - expected)
      assert np.all(error <= one_pixel[:, 0] + 1e-3), (side, flip, orig[:, flip], expected)
  # The whole predict function: every pass agrees, so the top detection is the box.
  out = _np(tta.make_tta_predict_fn(model, tta.TTASettings(scales=(0.5, 1.0, 1.5), size_ranges=None,
                                                           scale_nms=False))({}, batch))
  per_axis = np.concatenate([batch["scale_factor"][:, ::-1]] * 2, axis=1)
  assert np.all(np.abs(out.boxes[:, 0] - expected) <= (base / 32) / per_axis + 1e-3)
  assert out.valid[:, 0].all() and not out.valid[:, 1:].any()  # one box left after NMS


# ----------------------------------------------------------------------------
# Size ranges and the merge, worked out by hand.
# ----------------------------------------------------------------------------

# Boxes in 64ths of the input side; the originals are 128 x 256 (h, w), so one
# unit is 4 original pixels across and 2 down.
_U = 1 / 64
_BIG, _SMALL_A, _SMALL_B, _EDGE = ([4, 4, 36, 52], [40, 40, 45, 50], [50, 40, 55, 50],
                                   [44, 2, 54, 22])  # sqrt(w h): 110.9, 20, 20, exactly 40


def _one_hot(labels_scores, num_classes=3):
  s = np.zeros((len(labels_scores), num_classes))
  for i, (label, score) in enumerate(labels_scores):
    s[i, label] = score
  return s


_HAND_TABLES = {
    64: (np.array([_BIG, _SMALL_A, _EDGE, [0, 0, 1, 1]]) * _U,
         _one_hot([(0, 0.9), (1, 0.95), (2, 0.8), (0, 0.0)])),
    128: (np.array([_SMALL_B, _BIG, _EDGE, [0, 0, 1, 1]]) * _U,
          _one_hot([(1, 0.6), (0, 0.99), (2, 0.97), (0, 0.0)])),
}


def _orig(units):
  return np.array(units, np.float32) * np.array([4, 2, 4, 2], np.float32)


@pytest.mark.parametrize("ranges, expected", [
    # The 1x pass keeps boxes of at least 40 pixels, the 2x pass those under 40:
    # the highest scores (0.99, 0.97, 0.95) are all out of their pass's range.
    (((40, None), (0, 40)), [(0.9, 0, _BIG), (0.8, 2, _EDGE), (0.6, 1, _SMALL_B)]),
    # Without ranges they win, and NMS merges the same box found at both scales.
    (None, [(0.99, 0, _BIG), (0.97, 2, _EDGE), (0.95, 1, _SMALL_A), (0.6, 1, _SMALL_B)]),
])
def test_size_ranges_and_merge_by_hand(ranges, expected):
  model = TableDetector(image_size=64, tables=_tables(_HAND_TABLES), max_detections=5)
  settings = tta.TTASettings(scales=(1.0, 2.0), flip=False, size_ranges=ranges)
  out = _np(tta.make_tta_predict_fn(model, settings)({}, _batch(64, [(128, 256)])))
  n = len(expected)
  np.testing.assert_array_equal(out.valid[0], [True] * n + [False] * (5 - n))
  np.testing.assert_allclose(out.scores[0, :n], [e[0] for e in expected], rtol=1e-6)
  np.testing.assert_array_equal(out.labels[0, :n], [e[1] for e in expected])
  np.testing.assert_allclose(out.boxes[0, :n], np.stack([_orig(e[2]) for e in expected]),
                             atol=1e-4)


def test_scale_nms_keeps_a_pass_own_detections():
  """A pass's NMS (``scale_nms``) drops its duplicates, then keeps the best ``keep_top_k``."""
  near_big = [5, 4, 36, 53]  # IoU with _BIG about 0.95
  table = {64: (np.array([_BIG, _SMALL_A, near_big, _EDGE]) * _U,
                _one_hot([(0, 0.9), (0, 0.5), (0, 0.85), (0, 0.4)]))}
  model = TableDetector(image_size=64, tables=_tables(table))
  batch = _batch(64, [(128, 256)])

  def run(**kwargs):
    return _np(jax.jit(lambda b: tta.scale_candidates(
        model, {}, b, side=64, score_threshold=0.01, pre_nms_top_k=4, **kwargs))(batch))

  boxes, scores = run(nms_threshold=0.45, keep_top_k=2)
  assert scores.shape == (1, 3, 2) and boxes.shape == (1, 3, 2, 4)
  np.testing.assert_allclose(scores[0, 0], [0.9, 0.5], rtol=1e-6)  # 0.85 suppressed, 0.4 cut
  np.testing.assert_allclose(boxes[0, 0], np.array([_BIG, _SMALL_A], np.float32), atol=1e-4)
  assert np.all(scores[0, 1:] == -np.inf)  # classes 1 and 2 have nothing
  _, scores = run(nms_threshold=0.45)
  np.testing.assert_allclose(scores[0, 0], [0.9, 0.5, 0.4, -np.inf], rtol=1e-6)
  _, scores = run()  # no NMS: the 4 best as they are
  np.testing.assert_allclose(scores[0, 0], [0.9, 0.85, 0.5, 0.4], rtol=1e-6)


# ----------------------------------------------------------------------------
# Random candidates against the NumPy reference (NMS and box voting).
# ----------------------------------------------------------------------------


def _random_tables(rng, sides, num=24, num_classes=3, num_centres=4):
  """Per side, boxes clustered around a few centres (so that they overlap) and dense scores."""
  centres = rng.uniform(0.25, 0.75, (num_centres, 2))
  spec = {}
  for side in sides:
    c = centres[rng.integers(0, num_centres, num)] + rng.normal(0, 0.03, (num, 2))
    half = rng.uniform(0.05, 0.25, (num, 2))
    boxes = np.clip(np.concatenate([c - half, c + half], axis=1), 0.0, 1.0)
    scores = rng.uniform(0, 1, (num, num_classes)) ** 2
    spec[side] = (boxes, scores)
  return spec


@pytest.mark.parametrize("merge, scale_nms, vote_threshold", [
    ("nms", False, None), ("vote", True, None), ("vote", False, 0.3)])
def test_merge_against_numpy_reference(rng, merge, scale_nms, vote_threshold):
  base, sides = 32, (32, 64)
  spec = _random_tables(rng, sides, num_centres=12)
  # k = 8 candidates per class and pass, at most K = 7 of them after a pass's NMS.
  model = TableDetector(image_size=base, tables=_tables(spec), pre_nms_top_k=8,
                        max_detections=7, score_threshold=0.05)
  ranges = ((20.0, None), (0.0, 30.0))  # original pixels
  settings = tta.TTASettings(scales=(1.0, 2.0), flip=True, size_ranges=ranges, merge=merge,
                             scale_nms=scale_nms, vote_threshold=vote_threshold)
  orig_sizes = [(64, 128), (100, 80), (64, 128)]
  batch = _batch(base, orig_sizes, valid=[True, True, False])
  out = _np(tta.make_tta_predict_fn(model, settings)({}, batch))
  assert not out.valid[2].any()  # the filler image
  for row in (0, 1):
    ref = _np_tta(spec, sides, ranges, orig_sizes[row], score_threshold=0.05, k=8,
                  scale_nms=scale_nms, iou_threshold=0.45, merge=merge,
                  vote_threshold=0.45 if vote_threshold is None else vote_threshold,
                  max_detections=7)
    n = len(ref)
    assert n >= 5
    np.testing.assert_array_equal(out.valid[row], [True] * n + [False] * (7 - n))
    np.testing.assert_allclose(out.scores[row, :n], [d[0] for d in ref], rtol=1e-6)
    np.testing.assert_array_equal(out.labels[row, :n], [d[1] for d in ref])
    np.testing.assert_allclose(out.boxes[row, :n], np.stack([d[2] for d in ref]), atol=1e-3)
    if merge == "vote":  # voting moved boxes: the NMS result is not the answer
      plain = _np_tta(spec, sides, ranges, orig_sizes[row], score_threshold=0.05, k=8,
                      scale_nms=scale_nms, iou_threshold=0.45, merge="nms", vote_threshold=0.45,
                      max_detections=7)
      assert not np.allclose(np.stack([d[2] for d in plain]), np.stack([d[2] for d in ref]),
                             atol=1e-2)


def test_sharded_batch_gives_the_same_detections(rng):
  """A batch sharded over 4 devices (as ``evaluate_split`` feeds it) gives the
  detections of the same batch on one device."""
  if jax.device_count() < 4:
    pytest.skip("needs 4 (simulated) devices")
  spec = _random_tables(rng, (32, 64))
  model = TableDetector(image_size=32, tables=_tables(spec), pre_nms_top_k=6, max_detections=12)
  settings = tta.TTASettings(scales=(1.0, 2.0), size_ranges=None, merge="vote")
  batch = _batch(32, [(64, 128), (100, 80), (64, 128), (30, 200)], valid=[True, True, False, True])
  ref = _np(tta.make_tta_predict_fn(model, settings)({}, batch))
  mesh = parallel.make_mesh(jax.devices()[:4])
  with parallel.mesh_context(mesh):
    out = tta.make_tta_predict_fn(model, settings)(parallel.replicate({}, mesh),
                                                   parallel.shard_batch(batch, mesh))
    assert len(out.boxes.sharding.device_set) == 4
    out = _np(parallel.gather_to_host(out))
  assert ref.valid.sum() > 10
  for name in ("boxes", "scores", "labels", "valid"):
    np.testing.assert_array_equal(getattr(out, name), getattr(ref, name), err_msg=name)


# ----------------------------------------------------------------------------
# One compilation per scale.
# ----------------------------------------------------------------------------


def test_one_trace_per_scale_and_one_merge(monkeypatch, rng):
  spec = _random_tables(rng, (32, 48, 64))
  model = TableDetector(image_size=32, tables=_tables(spec))
  merge = TraceCounter(tta.merge_candidates)
  monkeypatch.setattr(tta, "merge_candidates", merge)
  predict = tta.make_tta_predict_fn(model, tta.TTASettings(scales=(1.0, 1.5, 2.0), flip=True,
                                                           size_ranges=None, scale_nms=False))
  TRACED.clear()
  image = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  first = _np(predict({}, _batch(32, [(64, 64), (50, 70)], image=image)))
  second = _np(predict({}, _batch(32, [(90, 40), (64, 64)], image=image + 1)))
  assert sorted(TRACED) == [32, 48, 64]  # one trace per scale, both flips in it
  assert merge.count == 1
  assert not np.allclose(first.boxes, second.boxes)  # new sizes reached the merge
  predict({}, _batch(32, [(64, 64)] * 3))  # a new batch size traces again
  assert sorted(TRACED) == [32, 32, 48, 48, 64, 64] and merge.count == 2


# ----------------------------------------------------------------------------
# eval.py --tta.
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_program_with_tta(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"))
  workdir = str(tmp_path / "run")

  def run(program, *args):
    proc = subprocess.run([sys.executable, program, "--config", "configs/ssd300.py:smoke",
                           "--workdir", workdir, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, f"{program} failed:\n{proc.stderr[-6000:]}"
    return proc

  run("train.py", "--config.train.eval_every=0")
  proc = run("eval.py", "--tta", "--config.tta.scales=(0.75, 1.25)",
             "--config.tta.size_ranges=((16, None), (0, 48))", "--config.tta.merge=vote")
  metrics = json.loads(open(os.path.join(workdir, "eval", "metrics.json")).read())
  for key in ("AP", "AP50", "AP75", "APs", "APm"):
    assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
  assert metrics["tta"]["sides"] == [48, 80] and metrics["tta"]["merge"] == "vote"
  assert metrics["tta"]["size_ranges"] == [[16.0, None], [0.0, 48.0]]
  assert metrics["tta"]["flip"] is True and metrics["tta"]["iou_threshold"] == 0.45
  assert "Test-time augmentation: sides 48, 80 with flips" in proc.stdout
  assert ", TTA," in proc.stdout
