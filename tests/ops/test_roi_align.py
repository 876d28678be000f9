"""RoIAlign against torchvision (single level, FPN, level mapping, gradients)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.ops import poolers

from jdet.ops.roi_align import map_roi_levels, multilevel_roi_align, roi_align
from jdet.testing import assert_traces_once

# Features are uniform in [0, 1): neighbouring values then differ by less than 1,
# so a one-ulp difference in a float32 sampling coordinate (XLA may fuse a
# multiply-add that torchvision rounds twice) stays far below the tolerance.
ATOL = 1e-4


def _features(rng, shape) -> np.ndarray:
  return rng.random(shape, dtype=np.float32)


def _random_rois(rng, n: int, img_h: float, img_w: float) -> np.ndarray:
  """``[n, 4]`` xyxy: a mix of ordinary, tiny, huge and partly-outside RoIs."""
  size = np.exp(rng.uniform(np.log(0.5), np.log(1.5 * max(img_h, img_w)), (n, 2)))
  ctr = rng.uniform(-0.2, 1.2, (n, 2)) * [img_w, img_h]
  return np.concatenate([ctr - size / 2, ctr + size / 2], axis=1).astype(np.float32)


def _nchw(features: np.ndarray) -> torch.Tensor:
  """``[H, W, C]`` -> torch ``[1, C, H, W]``."""
  return torch.from_numpy(np.ascontiguousarray(features.transpose(2, 0, 1)[None]))


def _tv_roi_align(features, rois, **kwargs) -> np.ndarray:
  """torchvision's roi_align on ``[H, W, C]`` / ``[K, 4]``, back to channels last."""
  x = _nchw(features)
  out = torchvision.ops.roi_align(x, [torch.from_numpy(rois)], **kwargs)
  return out.numpy().transpose(0, 2, 3, 1)


def _jit(fn, **kwargs):
  """``jax.jit`` of ``fn`` with its keyword arguments fixed (compiles once per shape)."""
  return jax.jit(functools.partial(fn, **kwargs))


def _to_tuple(size):
  return (size, size) if isinstance(size, int) else size


# ----------------------------------------------------------------------------
# Single level.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("output_size,sampling_ratio,spatial_scale", [
    (7, 2, 1.0),
    ((3, 5), 1, 0.25),
    (4, 4, 1 / 16),
    ((6, 2), 2, 0.25),
    (1, 3, 1.0),
])
def test_roi_align_matches_torchvision(aligned, output_size, sampling_ratio, spatial_scale):
  rng = np.random.default_rng(0)
  h, w, c = 13, 19, 3
  features = _features(rng, (h, w, c))
  rois = _random_rois(rng, 60, h / spatial_scale, w / spatial_scale)
  # Degenerate ones too: zero-area, entirely outside, padding, single-pixel.
  extra = np.array([[5, 5, 5, 5], [-100, -100, -50, -50], [0, 0, 0, 0],
                    [w / spatial_scale + 40, 0, w / spatial_scale + 90, 10],
                    [1, 2, 1 + 1 / spatial_scale, 2 + 1 / spatial_scale]], np.float32)
  rois = np.concatenate([rois, extra])
  kwargs = dict(output_size=output_size, spatial_scale=spatial_scale,
                sampling_ratio=sampling_ratio, aligned=aligned)
  got = _jit(roi_align, **kwargs)(features, rois)
  want = _tv_roi_align(features, rois, **kwargs)
  assert got.shape == (len(rois), *_to_tuple(output_size), c)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=0)


def test_roi_align_single_pixel_maps():
  """1-pixel-wide and 1-pixel-high maps (the 2 x 2 patch needs padding there)."""
  rng = np.random.default_rng(1)
  for shape in [(1, 9, 2), (7, 1, 2), (1, 1, 2)]:
    features = _features(rng, shape)
    rois = _random_rois(rng, 20, shape[0] * 4, shape[1] * 4)
    for aligned in (True, False):
      kwargs = dict(output_size=3, spatial_scale=0.25, sampling_ratio=2, aligned=aligned)
      got = _jit(roi_align, **kwargs)(features, rois)
      np.testing.assert_allclose(np.asarray(got), _tv_roi_align(features, rois, **kwargs),
                                 atol=ATOL, rtol=0)


@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_gradient_matches_torch(aligned):
  rng = np.random.default_rng(2)
  h, w, c = 11, 14, 3
  features = _features(rng, (h, w, c))
  rois = _random_rois(rng, 30, h * 4, w * 4)
  kwargs = dict(output_size=(4, 3), spatial_scale=0.25, sampling_ratio=2, aligned=aligned)
  cotangent = rng.standard_normal((len(rois), 4, 3, c)).astype(np.float32)

  grad = jax.jit(jax.grad(lambda f: jnp.sum(roi_align(f, rois, **kwargs) * cotangent)))(features)

  x = _nchw(features).requires_grad_()
  out = torchvision.ops.roi_align(x, [torch.from_numpy(rois)], **kwargs)
  (out * torch.from_numpy(cotangent.transpose(0, 3, 1, 2))).sum().backward()
  want = x.grad.numpy()[0].transpose(1, 2, 0)
  np.testing.assert_allclose(np.asarray(grad), want, atol=ATOL, rtol=0)


def test_roi_align_vmap_equals_per_image_and_traces_once():
  rng = np.random.default_rng(3)
  b, h, w, c = 3, 10, 12, 2
  features = _features(rng, (b, h, w, c))
  rois = np.stack([_random_rois(rng, 8, h * 8, w * 8) for _ in range(b)])  # [B, K, 4]
  fn = functools.partial(roi_align, output_size=2, spatial_scale=1 / 8)
  batched = jax.vmap(fn)
  got = np.asarray(jax.jit(batched)(features, rois))
  single = jax.jit(fn)
  for i in range(b):
    np.testing.assert_allclose(got[i], np.asarray(single(features[i], rois[i])), atol=1e-6)
  out1, out2 = assert_traces_once(batched, (features, rois), (features[::-1], rois + 1.0))
  np.testing.assert_allclose(out1, got, atol=1e-6)
  assert out2.shape == got.shape


def test_roi_align_bfloat16_keeps_dtype():
  rng = np.random.default_rng(4)
  features = _features(rng, (9, 9, 4))
  rois = _random_rois(rng, 10, 36, 36)
  fn = _jit(roi_align, output_size=3, spatial_scale=0.25)
  got = fn(jnp.asarray(features, jnp.bfloat16), rois)
  assert got.dtype == jnp.bfloat16
  want = fn(jnp.asarray(features, jnp.bfloat16).astype(jnp.float32), rois)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=1e-2)


# ----------------------------------------------------------------------------
# Degenerate RoIs (the cases the module docstring documents).
# ----------------------------------------------------------------------------


def _bilinear(features: np.ndarray, y: float, x: float) -> np.ndarray:
  """Closed-form bilinear value at an in-range point of ``[H, W, C]``."""
  y0, x0 = int(np.floor(y)), int(np.floor(x))
  y1, x1 = min(y0 + 1, features.shape[0] - 1), min(x0 + 1, features.shape[1] - 1)
  ly, lx = y - y0, x - x0
  return ((1 - ly) * (1 - lx) * features[y0, x0] + (1 - ly) * lx * features[y0, x1]
          + ly * (1 - lx) * features[y1, x0] + ly * lx * features[y1, x1])


def test_degenerate_rois():
  rng = np.random.default_rng(5)
  features = _features(rng, (8, 10, 3))
  rois = np.array([
      [13.0, 9.0, 13.0, 9.0],        # zero area, inside
      [-40.0, -40.0, -20.0, -20.0],  # entirely outside, above-left
      [60.0, 10.0, 90.0, 20.0],      # entirely outside, right
      [0.0, 0.0, 0.0, 0.0],          # padding
      [np.nan, 1.0, 5.0, 5.0],       # non-finite
  ], np.float32)
  kwargs = dict(output_size=(2, 3), spatial_scale=0.5, sampling_ratio=2)
  got = np.asarray(_jit(roi_align, aligned=True, **kwargs)(features, rois))
  # Zero area: every bin is the bilinear value at (x1 / 2 - 0.5, y1 / 2 - 0.5).
  point = _bilinear(features, 9.0 * 0.5 - 0.5, 13.0 * 0.5 - 0.5)
  np.testing.assert_allclose(got[0], np.broadcast_to(point, (2, 3, 3)), atol=1e-6)
  np.testing.assert_array_equal(got[1], 0.0)
  np.testing.assert_array_equal(got[2], 0.0)
  # Padding: the sample at (-0.5, -0.5) is clamped to the corner pixel.
  np.testing.assert_allclose(got[3], np.broadcast_to(features[0, 0], (2, 3, 3)), atol=1e-6)
  np.testing.assert_array_equal(got[4], 0.0)
  # Not aligned: outside still zero; padding pools the first 1 x 1 pixel square.
  got = np.asarray(_jit(roi_align, aligned=False, **kwargs)(features, rois))
  np.testing.assert_array_equal(got[1:3], 0.0)
  np.testing.assert_array_equal(got[4], 0.0)
  np.testing.assert_allclose(got[3], _tv_roi_align(features, rois[3:4], aligned=False, **kwargs)[0],
                             atol=ATOL)
  # Gradients stay finite for all of them.
  grad = jax.jit(jax.grad(lambda f, r: roi_align(f, r, **kwargs).sum(), argnums=(0, 1)))(
      features, rois)
  assert np.all(np.isfinite(grad[0]))
  assert np.all(np.isfinite(grad[1][:4]))


def test_bad_arguments_raise():
  features = np.zeros((4, 4, 1), np.float32)
  rois = np.zeros((2, 4), np.float32)
  with pytest.raises(ValueError, match="sampling_ratio"):
    roi_align(features, rois, output_size=2, spatial_scale=1.0, sampling_ratio=0)
  with pytest.raises(ValueError, match="vmap"):
    roi_align(features[None], rois, output_size=2, spatial_scale=1.0)
  with pytest.raises(ValueError, match="output_size"):
    roi_align(features, rois, output_size=(2, 0), spatial_scale=1.0)
  with pytest.raises(ValueError, match="powers of two"):
    multilevel_roi_align([features, features], rois, strides=(4, 16), output_size=2)
  with pytest.raises(ValueError, match="feature maps"):
    multilevel_roi_align([features], rois, strides=(4, 8), output_size=2)


# ----------------------------------------------------------------------------
# Level mapping and FPN pooling.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("min_level,max_level,canonical_size,canonical_level", [
    (2, 5, 224, 4), (3, 6, 224, 4), (2, 4, 128, 3)])
def test_map_roi_levels_matches_level_mapper(min_level, max_level, canonical_size, canonical_level):
  rng = np.random.default_rng(6)
  rois = _random_rois(rng, 500, 1500, 1500)
  # Boundaries, where the 1e-6 matters: sqrt(area) = canonical_size * 2**k.
  side = canonical_size * 2.0 ** np.arange(-3, 3)
  rois = np.concatenate([rois, np.stack([0 * side, 0 * side, side, side], 1).astype(np.float32)])
  got = _jit(map_roi_levels, min_level=min_level, max_level=max_level,
             canonical_size=canonical_size, canonical_level=canonical_level)(rois)
  mapper = poolers.LevelMapper(min_level, max_level, canonical_size, canonical_level)
  want = mapper([torch.from_numpy(rois)]).numpy()
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), want)
  assert set(np.unique(want)) == set(range(max_level - min_level + 1))


def test_map_roi_levels_degenerate_go_to_finest():
  rois = np.array([[0, 0, 0, 0], [5, 5, 1, 1], [np.nan, 0, 1, 1], [0, 0, 1000, 1000]], np.float32)
  got = np.asarray(_jit(map_roi_levels, min_level=2, max_level=5)(rois))
  np.testing.assert_array_equal(got, [0, 0, 0, 3])


STRIDES = (4, 8, 16, 32)
IMAGE = (512, 640)  # (h, w): powers of two times the feature sizes for every stride


def _fpn(rng, c=3, batch=()):
  return [_features(rng, (*batch, IMAGE[0] // s, IMAGE[1] // s, c)) for s in STRIDES]


def _fpn_rois(rng, n):
  """RoIs with sqrt(area) spread from 20 to 800 pixels, so that P2-P5 are all used."""
  side = np.exp(rng.uniform(np.log(20), np.log(800), n))
  aspect = np.exp(rng.uniform(-0.7, 0.7, n))
  wh = np.stack([side * aspect, side / aspect], 1)
  ctr = rng.uniform(0, 1, (n, 2)) * [IMAGE[1], IMAGE[0]]
  return np.concatenate([ctr - wh / 2, ctr + wh / 2], 1).astype(np.float32)


@pytest.mark.parametrize("output_size,sampling_ratio", [(7, 2), ((3, 5), 1), (4, 4)])
def test_multilevel_matches_multiscale_roi_align(output_size, sampling_ratio):
  rng = np.random.default_rng(7)
  feats = _fpn(rng)
  rois = _fpn_rois(rng, 80)
  levels = poolers.LevelMapper(2, 5)([torch.from_numpy(rois)]).numpy()
  assert set(np.unique(levels)) == {0, 1, 2, 3}

  got = _jit(multilevel_roi_align, strides=STRIDES, output_size=output_size,
             sampling_ratio=sampling_ratio, aligned=False)(feats, rois)

  pool = torchvision.ops.MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], output_size, sampling_ratio)
  x = {f"p{i + 2}": _nchw(f) for i, f in enumerate(feats)}
  want = pool(x, [torch.from_numpy(rois)], [IMAGE]).numpy().transpose(0, 2, 3, 1)
  assert pool.scales == [1 / s for s in STRIDES]
  np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=0)


def test_multilevel_aligned_matches_per_level_torchvision():
  """aligned=True (MMDetection's setting): each RoI equals torchvision's roi_align on its level."""
  rng = np.random.default_rng(8)
  feats = _fpn(rng)
  rois = np.concatenate([_fpn_rois(rng, 40), np.zeros((2, 4), np.float32)])
  got = np.asarray(_jit(multilevel_roi_align, strides=STRIDES, output_size=(2, 3))(feats, rois))
  levels = poolers.LevelMapper(2, 5)([torch.from_numpy(rois[:-2])]).numpy()
  for k, level in enumerate(levels):
    want = _tv_roi_align(feats[level], rois[k:k + 1], output_size=(2, 3),
                         spatial_scale=1 / STRIDES[level], sampling_ratio=2, aligned=True)
    np.testing.assert_allclose(got[k], want[0], atol=ATOL, rtol=0)
  # Padding RoIs go to P2 and give its corner value.
  np.testing.assert_allclose(got[-2:], np.broadcast_to(feats[0][0, 0], (2, 2, 3, 3)), atol=1e-6)


def test_multilevel_gradient_matches_torch():
  rng = np.random.default_rng(9)
  feats = _fpn(rng, c=2)
  rois = _fpn_rois(rng, 40)
  cotangent = rng.standard_normal((len(rois), 3, 3, 2)).astype(np.float32)
  fn = functools.partial(multilevel_roi_align, strides=STRIDES, output_size=3, aligned=False)
  grads = jax.jit(jax.grad(lambda fs: jnp.sum(fn(fs, rois) * cotangent)))(feats)

  x = {f"p{i + 2}": _nchw(f).requires_grad_() for i, f in enumerate(feats)}
  pool = torchvision.ops.MultiScaleRoIAlign(list(x), 3, 2)
  out = pool(x, [torch.from_numpy(rois)], [IMAGE])
  (out * torch.from_numpy(cotangent.transpose(0, 3, 1, 2))).sum().backward()
  for grad, t in zip(grads, x.values()):
    np.testing.assert_allclose(np.asarray(grad), t.grad.numpy()[0].transpose(1, 2, 0),
                               atol=ATOL, rtol=0)


def test_multilevel_vmap_equals_per_image_and_traces_once():
  rng = np.random.default_rng(10)
  b = 2
  feats = _fpn(rng, c=2, batch=(b,))
  rois = np.stack([_fpn_rois(rng, 12) for _ in range(b)])  # [B, K, 4]
  fn = functools.partial(multilevel_roi_align, strides=STRIDES, output_size=2)
  batched = jax.vmap(fn)
  got = np.asarray(jax.jit(batched)(feats, rois))
  assert got.shape == (b, 12, 2, 2, 2)
  single = jax.jit(fn)
  for i in range(b):
    want = single([f[i] for f in feats], rois[i])
    np.testing.assert_allclose(got[i], np.asarray(want), atol=1e-6)
  out1, _ = assert_traces_once(batched, (feats, rois), ([f + 1 for f in feats], rois * 0.5))
  np.testing.assert_allclose(out1, got, atol=1e-6)
