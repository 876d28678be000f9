"""jdet.boxes against torchvision.ops and closed-form cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection import _utils as tv_det_utils

from jdet import boxes as B
from jdet.testing import assert_traces_once, random_boxes


def _t(x):
  return torch.from_numpy(np.asarray(x))


@pytest.mark.parametrize("fmt", ["cxcywh", "xywh"])
def test_convert_matches_torchvision_and_round_trips(rng, fmt):
  b = random_boxes(rng, 50)
  ours = np.asarray(B.convert(b, "xyxy", fmt))
  ref = torchvision.ops.box_convert(_t(b), "xyxy", fmt).numpy()
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-4)
  np.testing.assert_allclose(np.asarray(B.convert(ours, fmt, "xyxy")), b, atol=1e-4)


def test_convert_rejects_unknown_format():
  with pytest.raises(ValueError, match="unknown box format 'yxyx'"):
    B.convert(np.zeros((1, 4)), "yxyx", "xyxy")


def test_area_iou_giou_match_torchvision(rng):
  a, b = random_boxes(rng, 37), random_boxes(rng, 23)
  b[:5] = a[:5]  # identical pairs: IoU 1
  np.testing.assert_allclose(np.asarray(B.area(a)), torchvision.ops.box_area(_t(a)).numpy(), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(B.iou(a, b)), torchvision.ops.box_iou(_t(a), _t(b)).numpy(), atol=1e-6)
  np.testing.assert_allclose(np.asarray(B.giou(a, b)),
                             torchvision.ops.generalized_box_iou(_t(a), _t(b)).numpy(), atol=1e-6)
  # Aligned versions are the diagonal of the pairwise ones.
  np.testing.assert_allclose(np.asarray(B.aligned_iou(a[:23], b)), np.diag(np.asarray(B.iou(a[:23], b))), atol=1e-7)
  np.testing.assert_allclose(np.asarray(B.aligned_giou(a[:23], b)), np.diag(np.asarray(B.giou(a[:23], b))), atol=1e-7)


def test_iou_hand_worked():
  a = np.array([[0, 0, 2, 2]], np.float32)
  b = np.array([[1, 1, 3, 3], [2, 0, 4, 2], [10, 10, 11, 11]], np.float32)
  # Overlap 1, union 4 + 4 - 1 = 7; touching boxes: 0; far: 0.
  np.testing.assert_allclose(np.asarray(B.iou(a, b))[0], [1 / 7, 0.0, 0.0], atol=1e-7)
  # GIoU of the far pair: enclosure 11*11=121, union 5 -> 0 - (121 - 5) / 121.
  np.testing.assert_allclose(np.asarray(B.giou(a, b))[0, 2], -116 / 121, atol=1e-6)


def test_batched_leading_dims(rng):
  a = random_boxes(rng, 2 * 5).reshape(2, 5, 4)
  b = random_boxes(rng, 2 * 7).reshape(2, 7, 4)
  out = np.asarray(B.iou(a, b))
  assert out.shape == (2, 5, 7)
  for i in range(2):
    np.testing.assert_allclose(out[i], np.asarray(B.iou(a[i], b[i])), atol=1e-7)
  vm = np.asarray(jax.vmap(B.giou)(a, b))
  np.testing.assert_allclose(vm, np.asarray(B.giou(a, b)), atol=1e-7)


def test_degenerate_boxes_give_zero_not_nan():
  pad = np.zeros((3, 4), np.float32)                    # padding rows
  flipped = np.array([[5, 5, 1, 1]], np.float32)        # x2 < x1
  good = np.array([[0, 0, 10, 10]], np.float32)
  for d in (pad, flipped):
    assert np.all(np.asarray(B.area(d)) == 0)
    assert np.all(np.asarray(B.iou(d, good)) == 0)
    assert np.all(np.asarray(B.iou(d, d)) == 0)
    g = np.asarray(B.giou(d, good))
    assert np.all(np.isfinite(g)) and np.all(g <= 0) and np.all(g >= -1)
  assert not np.any(np.asarray(B.is_valid(np.concatenate([pad, flipped]))))
  assert np.asarray(B.is_valid(good)).all()
  assert not np.asarray(B.is_valid(np.array([[0, 0, np.nan, 1]], np.float32))).any()
  # The gradient through IoU of degenerate boxes is finite too.
  grad = jax.grad(lambda x: B.iou(x, good).sum())(jnp.asarray(pad))
  assert np.all(np.isfinite(np.asarray(grad)))


def test_bfloat16_input_computes_in_float32(rng):
  a = random_boxes(rng, 8)
  out = B.iou(jnp.asarray(a, jnp.bfloat16), jnp.asarray(a, jnp.bfloat16))
  assert out.dtype == jnp.float32
  assert B.decode(jnp.zeros((8, 4), jnp.bfloat16), a).dtype == jnp.float32


def test_clip_matches_torchvision(rng):
  b = random_boxes(rng, 40, size=700.0) - 100.0
  ours = np.asarray(B.clip(b, (480, 640)))
  ref = torchvision.ops.clip_boxes_to_image(_t(b), (480, 640)).numpy()
  np.testing.assert_array_equal(ours, ref)
  # Per-image sizes broadcast: [2, N, 4] with sizes [2, 1, 2].
  bb = np.stack([b, b])
  sizes = np.array([[[480, 640]], [[100, 200]]], np.int32)
  out = np.asarray(B.clip(bb, sizes))
  np.testing.assert_array_equal(out[1], torchvision.ops.clip_boxes_to_image(_t(b), (100, 200)).numpy())


@pytest.mark.parametrize("weights", [(10.0, 10.0, 5.0, 5.0), (1.0, 1.0, 1.0, 1.0)])
def test_encode_decode_match_torchvision_boxcoder(rng, weights):
  coder = tv_det_utils.BoxCoder(weights)
  stds = tuple(1.0 / w for w in weights)
  anchors = random_boxes(rng, 64, min_side=4.0)
  gt = random_boxes(rng, 64, min_side=4.0)
  ours = np.asarray(B.encode(gt, anchors, stds=stds))
  ref = coder.encode_single(_t(gt), _t(anchors)).numpy()
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  # Decoding with large deltas exercises the dw/dh clamp in both.
  deltas = rng.normal(0, 3, size=(64, 4)).astype(np.float32) * np.array(weights, np.float32)
  dec = np.asarray(B.decode(deltas, anchors, stds=stds))
  ref_dec = coder.decode_single(_t(deltas), _t(anchors)).numpy()
  np.testing.assert_allclose(dec, ref_dec, rtol=1e-5, atol=1e-3)
  # Round trip.
  np.testing.assert_allclose(np.asarray(B.decode(ours, anchors, stds=stds)), gt, rtol=1e-5, atol=1e-3)


def test_encode_decode_round_trip_with_means_and_stds(rng):
  anchors, gt = random_boxes(rng, 32, min_side=2.0), random_boxes(rng, 32, min_side=2.0)
  kw = dict(stds=(0.1, 0.1, 0.2, 0.2), means=(0.01, -0.02, 0.0, 0.05))
  np.testing.assert_allclose(np.asarray(B.decode(B.encode(gt, anchors, **kw), anchors, **kw)), gt, atol=1e-3)


def test_decode_clamps_scale():
  anchors = np.array([[0, 0, 16, 16]], np.float32)
  out = np.asarray(B.decode(np.array([[0, 0, 50.0, 50.0]], np.float32), anchors))
  # exp(clamp) * 16 = 1000 px wide, centred at 8.
  np.testing.assert_allclose(out, [[8 - 500, 8 - 500, 8 + 500, 8 + 500]], rtol=1e-5)


def test_box_ops_compile_once(rng):
  a1, b1 = random_boxes(rng, 10), random_boxes(rng, 6)
  a2, b2 = random_boxes(rng, 10), random_boxes(rng, 6)
  o1, o2 = assert_traces_once(B.giou, (a1, b1), (a2, b2))
  np.testing.assert_allclose(o2, np.asarray(B.giou(a2, b2)), atol=1e-7)
  assert_traces_once(lambda d, a: B.decode(d, a, stds=(0.1, 0.1, 0.2, 0.2)), (b1, a1[:6]), (b2, a2[:6]))
