"""Tests for jdet.ops.nms against torchvision.ops and a NumPy Soft-NMS.

Box coordinates are multiples of 1/16 px: then torchvision's batched_nms
(which offsets boxes by class for small inputs) computes exactly the same
float32 IoUs as the per-class definition, and parity can be asserted exactly.
Scores are distinct (a permutation), since torchvision does not define the
order of equal scores. Thresholds are traced inside jdet, so the shapes used
here (a handful of N) each compile once for all thresholds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from jdet import testing
from jdet.ops.nms import batched_nms, nms, soft_nms

THRESHOLDS = (0.3, 0.45, 0.5, 0.7)


# ----------------------------------------------------------------------------
# Inputs and references.
# ----------------------------------------------------------------------------


def _quantize(b: np.ndarray) -> np.ndarray:
  return (np.round(b * 16.0) / 16.0).astype(np.float32)


def random_boxes(rng: np.random.Generator, n: int, size: float = 1000.0) -> np.ndarray:
  """[n, 4] valid xyxy boxes spread over a size x size image."""
  xy = rng.uniform(0, size, (n, 2))
  wh = rng.uniform(4, size / 4, (n, 2))
  return _quantize(np.concatenate([xy, xy + wh], axis=1))


def clustered_boxes(rng: np.random.Generator, n: int, centres: int = 6) -> np.ndarray:
  """[n, 4] boxes jittered around a few centres: IoUs spread across every threshold."""
  c = random_boxes(rng, centres, 600.0)
  wh = c[:, 2:] - c[:, :2]
  pick = rng.integers(0, centres, n)
  jitter = rng.normal(0.0, 0.12, (n, 4)) * np.tile(wh[pick], 2)
  b = c[pick] + jitter
  b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 1.0)
  return _quantize(b)


def distinct_scores(rng: np.random.Generator, n: int) -> np.ndarray:
  return ((rng.permutation(n) + 1) / (n + 1)).astype(np.float32)


def torch_nms(boxes, scores, thr, labels=None) -> np.ndarray:
  b, s = torch.from_numpy(boxes), torch.from_numpy(scores)
  if labels is None:
    return torchvision.ops.nms(b, s, thr).numpy()
  return torchvision.ops.batched_nms(b, s, torch.from_numpy(labels), thr).numpy()


def assert_same_as(out, ref) -> None:
  """``out`` is the padded jdet result, ``ref`` torchvision's list of kept indices."""
  out = np.asarray(out)
  assert len(ref) <= out.shape[-1]
  np.testing.assert_array_equal(out[:len(ref)], ref)
  assert np.all(out[len(ref):] == -1)


def numpy_soft_nms(boxes, scores, *, thr, sigma, method, score_threshold, k, labels=None):
  """Greedy Soft-NMS, one box at a time, in float64."""
  b = boxes.astype(np.float64)
  s = scores.astype(np.float64).copy()
  area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  alive = np.ones(len(s), bool)
  idx, out = [], []
  while len(idx) < k and alive.any():
    j = int(np.argmax(np.where(alive, s, -np.inf)))
    if s[j] < score_threshold:
      break
    idx.append(j)
    out.append(s[j])
    alive[j] = False
    w = np.clip(np.minimum(b[j, 2], b[:, 2]) - np.maximum(b[j, 0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(b[j, 3], b[:, 3]) - np.maximum(b[j, 1], b[:, 1]), 0, None)
    ov = w * h / (area[j] + area - w * h)
    if method == "linear":
      decay = np.where(ov > thr, 1.0 - ov, 1.0)
    else:
      decay = np.exp(-ov ** 2 / sigma)
    if labels is not None:
      decay = np.where(labels == labels[j], decay, 1.0)
    s = np.where(alive, s * decay, s)
  return np.array(idx, np.int64), np.array(out)


# ----------------------------------------------------------------------------
# Parity with torchvision.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 300, 2000])
def test_nms_matches_torchvision(n):
  for seed in range(3):
    rng = np.random.default_rng(seed)
    for make in (random_boxes, clustered_boxes):
      boxes, scores = make(rng, n), distinct_scores(rng, n)
      for thr in THRESHOLDS:
        out = nms(boxes, scores, iou_threshold=thr, max_output_size=n)
        assert out.shape == (n,) and out.dtype == jnp.int32
        assert_same_as(out, torch_nms(boxes, scores, thr))


def test_nms_matches_torchvision_20k():
  rng = np.random.default_rng(20)
  n = 20_000
  for make, thresholds in ((clustered_boxes, THRESHOLDS), (random_boxes, (0.45,))):
    boxes, scores = make(rng, n), distinct_scores(rng, n)
    for thr in thresholds:
      out = nms(boxes, scores, iou_threshold=thr, max_output_size=n)
      assert_same_as(out, torch_nms(boxes, scores, thr))


@pytest.mark.parametrize("n,classes", [(1, 3), (7, 3), (300, 5), (2000, 80)])
def test_batched_nms_matches_torchvision(n, classes):
  for seed in range(3):
    rng = np.random.default_rng(100 + seed)
    for make in (random_boxes, clustered_boxes):
      boxes, scores = make(rng, n), distinct_scores(rng, n)
      labels = rng.integers(0, classes, n).astype(np.int32)
      for thr in THRESHOLDS:
        ref = torch_nms(boxes, scores, thr, labels)
        assert_same_as(batched_nms(boxes, scores, labels, iou_threshold=thr, max_output_size=n), ref)
        if n == 2000:  # the default groups by label here; check score order too
          assert_same_as(batched_nms(boxes, scores, labels, iou_threshold=thr, max_output_size=n,
                                     group_by_label=False), ref)


def test_batched_nms_matches_torchvision_20k_80_classes():
  rng = np.random.default_rng(7)
  n = 20_000
  for make in (clustered_boxes, random_boxes):
    boxes, scores = make(rng, n), distinct_scores(rng, n)
    labels = rng.integers(0, 80, n).astype(np.int32)
    for thr in THRESHOLDS:
      out = batched_nms(boxes, scores, labels, iou_threshold=thr, max_output_size=n)
      assert_same_as(out, torch_nms(boxes, scores, thr, labels))


def test_truncation_is_torchvision_first_k():
  rng = np.random.default_rng(3)
  boxes, scores = random_boxes(rng, 2000), distinct_scores(rng, 2000)
  labels = rng.integers(0, 80, 2000).astype(np.int32)
  for thr in (0.3, 0.7):
    ref = torch_nms(boxes, scores, thr)
    assert len(ref) > 50
    np.testing.assert_array_equal(nms(boxes, scores, iou_threshold=thr, max_output_size=50), ref[:50])
    ref = torch_nms(boxes, scores, thr, labels)
    for group in (False, True):
      out = batched_nms(boxes, scores, labels, iou_threshold=thr, max_output_size=50,
                        group_by_label=group)
      np.testing.assert_array_equal(out, ref[:50])


def test_small_tiles():
  """Tiles of 8 boxes over 300: exact across many tile borders."""
  rng = np.random.default_rng(11)
  boxes, scores = clustered_boxes(rng, 300, centres=20), distinct_scores(rng, 300)
  labels = rng.integers(0, 3, 300).astype(np.int32)
  for thr in THRESHOLDS:
    assert_same_as(nms(boxes, scores, iou_threshold=thr, max_output_size=300, tile_size=8),
                   torch_nms(boxes, scores, thr))
    ref = torch_nms(boxes, scores, thr, labels)
    for group in (False, True):  # grouped: labels straddle tiles too
      assert_same_as(batched_nms(boxes, scores, labels, iou_threshold=thr, max_output_size=300,
                                 tile_size=8, group_by_label=group), ref)


def test_tile_size_boundary():
  """N = T and N = T + 1 for the default T = 256."""
  rng = np.random.default_rng(12)
  for n in (256, 257):
    boxes, scores = clustered_boxes(rng, n, centres=4), distinct_scores(rng, n)
    for thr in THRESHOLDS:
      assert_same_as(nms(boxes, scores, iou_threshold=thr, max_output_size=300),
                     torch_nms(boxes, scores, thr))


# ----------------------------------------------------------------------------
# Hand-worked cases.
# ----------------------------------------------------------------------------

# Box 1 has IoU exactly 1/2 with box 0, box 2 has 1/3 with box 0 and 1/5 with
# box 1, box 4 has 81/119 with box 3. Rows 5 and 6 are zero padding.
HAND_BOXES = np.array([
    [0, 0, 10, 10],
    [0, 0, 10, 5],
    [5, 0, 15, 10],
    [20, 20, 30, 30],
    [21, 21, 31, 31],
    [0, 0, 0, 0],
    [0, 0, 0, 0],
], np.float32)
HAND_SCORES = np.array([0.9, 0.8, 0.7, 0.95, 0.6, 0.0, 0.0], np.float32)


@pytest.mark.parametrize("thr,expected", [
    (0.3, [3, 0]),  # 1/2 and 1/3 and 0.68 all suppress
    (0.45, [3, 0, 2]),
    (0.5, [3, 0, 1, 2]),  # IoU exactly 0.5 does not suppress (strictly greater)
    (0.7, [3, 0, 1, 2, 4]),
])
def test_hand_worked(thr, expected):
  out = nms(HAND_BOXES, HAND_SCORES, iou_threshold=thr, max_output_size=7)
  np.testing.assert_array_equal(out, expected + [-1] * (7 - len(expected)))
  # The same with every box in its own class: nothing is suppressed.
  labels = np.arange(7, dtype=np.int32)
  out = batched_nms(HAND_BOXES, HAND_SCORES, labels, iou_threshold=thr, max_output_size=7)
  np.testing.assert_array_equal(out, [3, 0, 1, 2, 4, -1, -1])


def test_threshold_compared_as_float64():
  """IoU 3/10 rounds up in float32; torchvision compares it with the float64 0.3."""
  boxes = np.array([[0, 0, 10, 1], [0, 0, 3, 1]], np.float32)
  scores = np.array([0.9, 0.8], np.float32)
  assert_same_as(nms(boxes, scores, iou_threshold=0.3, max_output_size=2),
                 torch_nms(boxes, scores, 0.3))
  assert_same_as(nms(boxes, scores, iou_threshold=0.3, max_output_size=2), [0])


def test_equal_scores_keep_lower_index_first():
  boxes = np.array([[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10], [50, 50, 60, 60],
                    [100, 0, 110, 10], [0, 0, 0, 0], [0, 0, 0, 0]], np.float32)
  scores = np.array([0.5, 0.5, 0.5, 0.5, 0.5, 0, 0], np.float32)
  np.testing.assert_array_equal(nms(boxes, scores, iou_threshold=0.5, max_output_size=7),
                                [0, 1, 4, -1, -1, -1, -1])


# ----------------------------------------------------------------------------
# Degenerate inputs (documented behaviour).
# ----------------------------------------------------------------------------


def test_empty_input():
  out = nms(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), iou_threshold=0.5,
            max_output_size=5)
  np.testing.assert_array_equal(out, [-1] * 5)
  out = batched_nms(np.zeros((2, 0, 4)), np.zeros((2, 0)), np.zeros((2, 0), np.int32),
                    iou_threshold=0.5, max_output_size=3)
  np.testing.assert_array_equal(out, -np.ones((2, 3)))
  idx, sc = soft_nms(np.zeros((0, 4)), np.zeros((0,)), max_output_size=4)
  np.testing.assert_array_equal(idx, [-1] * 4)
  np.testing.assert_array_equal(sc, [0] * 4)


def test_all_padding():
  out = nms(np.zeros((7, 4), np.float32), np.ones(7, np.float32), iou_threshold=0.5,
            max_output_size=7)
  np.testing.assert_array_equal(out, [-1] * 7)


def test_invalid_boxes_are_never_kept_and_suppress_nothing():
  b = np.array([[0, 0, 10, 10]] * 7, np.float32)
  b[1] = [0, 0, 10, 10]  # NaN score
  b[2] = [0, 0, 10, 10]  # -inf score
  b[3] = [0, 0, 0, 10]  # zero width
  b[4] = [10, 0, 0, 10]  # x2 < x1
  b[5] = [0, 0, np.nan, 10]  # non-finite coordinate
  b[6] = [0, 0, 10, np.inf]
  s = np.array([0.1, np.nan, -np.inf, 0.9, 0.9, 0.9, 0.9], np.float32)
  np.testing.assert_array_equal(nms(b, s, iou_threshold=0.5, max_output_size=7),
                                [0, -1, -1, -1, -1, -1, -1])
  # All invalid: nothing.
  s[0] = np.nan
  np.testing.assert_array_equal(nms(b, s, iou_threshold=0.5, max_output_size=7), [-1] * 7)


def test_inf_score_ranks_first_and_score_threshold():
  rng = np.random.default_rng(5)
  boxes = random_boxes(rng, 7, size=100.0)
  boxes[4] = boxes[0] + 0.5  # overlaps box 0 heavily
  scores = np.array([0.9, 0.1, 0.5, 0.2, np.inf, 0.3, 0.05], np.float32)
  out = np.asarray(nms(boxes, scores, iou_threshold=0.5, max_output_size=7))
  assert out[0] == 4 and 0 not in out
  out = np.asarray(nms(boxes, scores, iou_threshold=0.99, max_output_size=7, score_threshold=0.2))
  np.testing.assert_array_equal(out, [4, 0, 2, 5, -1, -1, -1])  # 0.2 itself is dropped


def test_negative_labels_are_padding():
  rng = np.random.default_rng(6)
  boxes, scores = random_boxes(rng, 7), distinct_scores(rng, 7)
  labels = np.array([0, 1, -1, 2, -1, 0, 1], np.int32)
  valid = np.nonzero(labels >= 0)[0]
  ref = valid[torch_nms(boxes[valid], scores[valid], 0.5, labels[valid])]
  assert_same_as(batched_nms(boxes, scores, labels, iou_threshold=0.5, max_output_size=7), ref)


# ----------------------------------------------------------------------------
# Batches, vmap, jit.
# ----------------------------------------------------------------------------


def _batch(seed: int, shape=(2, 3), n: int = 300):
  rng = np.random.default_rng(seed)
  m = int(np.prod(shape))
  boxes = np.stack([clustered_boxes(rng, n) for _ in range(m)]).reshape(shape + (n, 4))
  scores = np.stack([distinct_scores(rng, n) for _ in range(m)]).reshape(shape + (n,))
  labels = rng.integers(0, 4, shape + (n,)).astype(np.int32)
  return boxes, scores, labels


def test_leading_dims_equal_per_image():
  boxes, scores, labels = _batch(0)
  out = np.asarray(nms(boxes, scores, iou_threshold=0.45, max_output_size=300))
  outb = np.asarray(batched_nms(boxes, scores, labels, iou_threshold=0.45, max_output_size=300))
  assert out.shape == outb.shape == (2, 3, 300)
  for i in np.ndindex(2, 3):
    np.testing.assert_array_equal(out[i], nms(boxes[i], scores[i], iou_threshold=0.45,
                                              max_output_size=300))
    assert_same_as(out[i], torch_nms(boxes[i], scores[i], 0.45))
    assert_same_as(outb[i], torch_nms(boxes[i], scores[i], 0.45, labels[i]))


def test_vmap_and_jit_trace_once():
  def fn(b, s, l):
    return (jax.vmap(lambda b, s: nms(b, s, iou_threshold=0.5, max_output_size=300))(b, s),
            batched_nms(b, s, l, iou_threshold=0.5, max_output_size=300))

  sets = [tuple(x.reshape((6,) + x.shape[2:]) for x in _batch(seed)) for seed in (1, 2)]
  outs = testing.assert_traces_once(fn, *sets)
  for (b, s, l), (o, ob) in zip(sets, outs):
    for i in range(6):
      assert_same_as(o[i], torch_nms(b[i], s[i], 0.5))
      assert_same_as(ob[i], torch_nms(b[i], s[i], 0.5, l[i]))


# ----------------------------------------------------------------------------
# Soft-NMS.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_soft_nms_matches_numpy(method):
  for seed in range(2):
    rng = np.random.default_rng(200 + seed)
    boxes, scores = clustered_boxes(rng, 300, centres=10), distinct_scores(rng, 300)
    for thr in (0.3, 0.5):
      kw = dict(thr=thr, sigma=0.5, method=method, score_threshold=0.001, k=300)
      ref_idx, ref_sc = numpy_soft_nms(boxes, scores, **kw)
      idx, sc = soft_nms(boxes, scores, iou_threshold=thr, sigma=0.5, method=method,
                         score_threshold=0.001, max_output_size=300)
      assert idx.shape == sc.shape == (300,) and idx.dtype == jnp.int32
      m = len(ref_idx)
      assert 0 < m < 300  # some scores decayed below the threshold
      np.testing.assert_array_equal(idx[:m], ref_idx)
      np.testing.assert_allclose(sc[:m], ref_sc, rtol=1e-5, atol=1e-6)
      assert np.all(np.asarray(idx[m:]) == -1) and np.all(np.asarray(sc[m:]) == 0)


def test_soft_nms_class_aware_truncated_and_batched():
  boxes, scores, labels = _batch(9, shape=(2,), n=300)
  idx, sc = soft_nms(boxes, scores, labels, method="gaussian", sigma=0.5, max_output_size=40)
  assert idx.shape == sc.shape == (2, 40)
  for i in range(2):
    ref_idx, ref_sc = numpy_soft_nms(boxes[i], scores[i], thr=0.3, sigma=0.5, method="gaussian",
                                     score_threshold=0.001, k=40, labels=labels[i])
    np.testing.assert_array_equal(idx[i], ref_idx)
    np.testing.assert_allclose(sc[i], ref_sc, rtol=1e-5, atol=1e-6)


def test_soft_nms_invalid_inputs():
  b = HAND_BOXES.copy()
  b[2] = [15, 0, 5, 10]  # x2 < x1
  s = HAND_SCORES.copy()
  s[1] = np.nan
  idx, sc = soft_nms(b, s, iou_threshold=0.3, max_output_size=7)
  # Valid: 0, 3, 4 (rows 5, 6 are padding). Box 4 decays by 1 - 81/119 under box 3.
  np.testing.assert_array_equal(idx, [3, 0, 4, -1, -1, -1, -1])
  np.testing.assert_allclose(sc, [0.95, 0.9, 0.6 * 38 / 119, 0, 0, 0, 0], rtol=1e-6)
