"""Tests for jdet.ops.anchors against torchvision's generators and hand-worked boxes."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList

from jdet.ops import anchors
from jdet.models.ssd import SSD300_ASPECT_RATIOS
from tests.helpers.anchor_presets import (refinedet_anchors, ssd300_default_boxes,
                                          ssd512_default_boxes)

R2 = math.sqrt(2.0)


def _torchvision_anchors(generator, image_hw, feature_sizes) -> np.ndarray:
  """Runs a torchvision anchor module on one blank image and feature maps of the given sizes."""
  h, w = image_hw
  images = ImageList(torch.zeros(1, 3, h, w), [(h, w)])
  feats = [torch.zeros(1, 1, fh, fw) for fh, fw in feature_sizes]
  with torch.no_grad():
    (out,) = generator(images, feats)
  return out.numpy()


# ----------------------------------------------------------------------------
# SSD.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("tv_clip", [False, True])
def test_ssd300_coco_matches_torchvision(tv_clip):
  # torchvision's ssd300_vgg16 settings; its scales x 300 are the COCO sizes 21, 45, ..., 315.
  # Its clip=True (the model's default) clamps each box's w, h to the image: our clamp_size.
  tv = DefaultBoxGenerator([[2], [2, 3], [2, 3], [2, 3], [2], [2]],
                           scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
                           steps=[8, 16, 32, 64, 100, 300], clip=tv_clip)
  sizes = [(f, f) for f in (38, 19, 10, 5, 3, 1)]
  expected = _torchvision_anchors(tv, (300, 300), sizes)
  got = ssd300_default_boxes("coco", clamp_size=tv_clip)
  assert got.dtype == np.float32 and got.shape == expected.shape == (8732, 4)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
  assert sum(f * f * p for (f, _), p in zip(
      sizes, anchors.num_default_boxes_per_location(SSD300_ASPECT_RATIOS))) == 8732
  assert tv.num_anchors_per_location() == anchors.num_default_boxes_per_location(
      SSD300_ASPECT_RATIOS)


def test_ssd512_voc_matches_torchvision():
  # The Caffe SSD512 VOC sizes 35.84, 76.8, ..., 537.6 are scales 0.07, 0.15, ..., 1.05 of 512.
  tv = DefaultBoxGenerator([[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]],
                           scales=[0.07, 0.15, 0.30, 0.45, 0.60, 0.75, 0.90, 1.05],
                           steps=[8, 16, 32, 64, 128, 256, 512], clip=False)
  sizes = [(f, f) for f in (64, 32, 16, 8, 4, 2, 1)]
  expected = _torchvision_anchors(tv, (512, 512), sizes)
  got = ssd512_default_boxes("voc")
  assert got.shape == expected.shape == (24564, 4)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_ssd_counts():
  assert ssd300_default_boxes().shape == (8732, 4)
  assert ssd300_default_boxes("coco").shape == (8732, 4)
  assert ssd512_default_boxes().shape == (24564, 4)
  assert ssd512_default_boxes("coco").shape == (24564, 4)
  # 38^2*4 + 19^2*6 + 10^2*6 + 5^2*6 + 3^2*4 + 1*4.
  assert 1444 * 4 + 361 * 6 + 100 * 6 + 25 * 6 + 9 * 4 + 4 == 8732
  with pytest.raises(ValueError, match="dataset"):
    ssd300_default_boxes("kitti")


def test_ssd_sizes_caffe_voc_and_coco():
  # Caffe ssd_pascal.py: min_ratio 20, max_ratio 90, step floor(70 / 4) = 17 percent,
  # conv4_3 at 10 %: 0.10, 0.20, 0.37, 0.54, 0.71, 0.88, 1.05 of 300.
  assert anchors.ssd_sizes(300, 6) == ((30, 60, 111, 162, 213, 264), (60, 111, 162, 213, 264, 315))
  # ssd_coco.py: 15 to 90 in steps of floor(75 / 4) = 18, conv4_3 at 7 %.
  assert anchors.ssd_sizes(300, 6, s_min=0.15, first=0.07) == (
      (21, 45, 99, 153, 207, 261), (45, 99, 153, 207, 261, 315))
  min_512, max_512 = anchors.ssd_sizes(512, 7, s_min=0.15, first=0.07)
  np.testing.assert_allclose(min_512, [35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8])
  np.testing.assert_allclose(max_512, [76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.6])


def test_ssd_sizes_follow_paper_formula():
  # Paper: s_k = s_min + (s_max - s_min) (k - 1) / (m - 1), k = 1..m, for the m levels after
  # the first; here (0.8 - 0.2) / 3 = 20 % is whole, so the Caffe percent rule is exact.
  m, s_min, s_max = 4, 0.2, 0.8
  s = [s_min + (s_max - s_min) * (k - 1) / (m - 1) for k in range(1, m + 2)]  # s_1 .. s_{m+1}
  min_sizes, max_sizes = anchors.ssd_sizes(100, m + 1, s_min, s_max, first=0.1)
  np.testing.assert_allclose(min_sizes, [10] + [100 * v for v in s[:m]])
  np.testing.assert_allclose(max_sizes, [20] + [100 * v for v in s[1:]])
  with pytest.raises(ValueError):
    anchors.ssd_sizes(300, 2)


def test_ssd300_voc_hand_worked_boxes():
  b = ssd300_default_boxes("voc")
  # First location of conv4_3 (centre 4, 4): 30x30, sqrt(30*60) square, then ratio 2 and 1/2.
  s = math.sqrt(30 * 60) / 2
  np.testing.assert_allclose(b[:4], [
      [4 - 15, 4 - 15, 4 + 15, 4 + 15],
      [4 - s, 4 - s, 4 + s, 4 + s],
      [4 - 15 * R2, 4 - 15 / R2, 4 + 15 * R2, 4 + 15 / R2],
      [4 - 15 / R2, 4 - 15 * R2, 4 + 15 / R2, 4 + 15 * R2],
  ], atol=1e-4)
  # Second location is one step (8 px) to the right, same row.
  np.testing.assert_allclose(b[4:8], b[:4] + [8, 0, 8, 0], atol=1e-4)
  # Location (row 1, column 0) comes after the 38 locations of row 0.
  np.testing.assert_allclose(b[38 * 4:38 * 4 + 4], b[:4] + [0, 8, 0, 8], atol=1e-4)
  # Last box: the 1x1 map (centre 150), min size 264, ratio 1/2.
  np.testing.assert_allclose(b[-1], [150 - 132 / R2, 150 - 132 * R2, 150 + 132 / R2,
                                     150 + 132 * R2], atol=1e-4)


def test_ssd_clip_and_small_case():
  # One 2x2 level, step 10, min 8, no max size, no ratios.
  got = anchors.ssd_default_boxes(20, [2], [10], [8], None, [()])
  np.testing.assert_array_equal(
      got, [[1, 1, 9, 9], [11, 1, 19, 9], [1, 11, 9, 19], [11, 11, 19, 19]])
  # Rectangular maps and steps: (h, w) pairs; x follows the column, y the row.
  got = anchors.ssd_default_boxes((20, 40), [(1, 2)], [(20, 20)], [10], [40], [()])
  np.testing.assert_allclose(
      got, [[5, 5, 15, 15], [0, 0, 20, 20], [25, 5, 35, 15], [20, 0, 40, 20]])
  unclipped = ssd300_default_boxes()
  clipped = ssd300_default_boxes(clip=True)
  np.testing.assert_array_equal(clipped, np.clip(unclipped, 0, 300))
  assert (unclipped.min() < 0) and (unclipped.max() > 300)
  with pytest.raises(ValueError, match="strides"):
    anchors.ssd_default_boxes(300, [38, 19], [8], [30, 60], None, [(2,), (2,)])


# ----------------------------------------------------------------------------
# RefineDet.
# ----------------------------------------------------------------------------


def test_refinedet320_anchors():
  b = refinedet_anchors(320)
  assert b.shape == ((40 * 40 + 20 * 20 + 10 * 10 + 5 * 5) * 3, 4) == (6375, 4)
  # First location (centre 4, 4), size 32: 1:1, ratio 2 (wide), ratio 1/2 (tall).
  np.testing.assert_allclose(b[:3], [
      [-12, -12, 20, 20],
      [4 - 16 * R2, 4 - 16 / R2, 4 + 16 * R2, 4 + 16 / R2],
      [4 - 16 / R2, 4 - 16 * R2, 4 + 16 / R2, 4 + 16 * R2],
  ], atol=1e-4)
  # First box of the stride-16 level: centre (8, 8), size 64.
  np.testing.assert_allclose(b[40 * 40 * 3], [-24, -24, 40, 40])
  # Last location of the stride-64 level: centre (4.5 * 64) = 288, size 256, ratio 1/2.
  np.testing.assert_allclose(b[-1], [288 - 128 / R2, 288 - 128 * R2, 288 + 128 / R2,
                                     288 + 128 * R2], atol=1e-4)
  assert refinedet_anchors(512).shape == ((64**2 + 32**2 + 16**2 + 8**2) * 3, 4)


# ----------------------------------------------------------------------------
# Grid anchors (RPN / FPN).
# ----------------------------------------------------------------------------

FPN_SIZES = ((32,), (64,), (128,), (256,), (512,))
FPN_RATIOS = ((0.5, 1.0, 2.0),) * 5
FPN_STRIDES = (4, 8, 16, 32, 64)


def test_fpn_grid_anchors_match_torchvision():
  # A 768x1216 input: every level divides, so torchvision's strides (image // grid) are 4..64.
  h, w = 768, 1216
  feature_sizes = [(h // s, w // s) for s in FPN_STRIDES]
  tv = AnchorGenerator(FPN_SIZES, FPN_RATIOS)
  expected = _torchvision_anchors(tv, (h, w), feature_sizes)
  got = anchors.multilevel_grid_anchors(feature_sizes, FPN_STRIDES, FPN_SIZES, FPN_RATIOS)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, expected)
  assert anchors.num_anchors_per_location(FPN_SIZES, FPN_RATIOS) == tv.num_anchors_per_location()
  # Flat forms: one size per level, ratios shared by every level.
  flat = anchors.multilevel_grid_anchors(feature_sizes, FPN_STRIDES, (32, 64, 128, 256, 512),
                                         (0.5, 1.0, 2.0))
  np.testing.assert_array_equal(flat, expected)


def test_fpn_grid_anchors_800x1216_match_torchvision():
  # 800x1216 padded input; the stride-64 map is ceil(800 / 64) = 13 high, for which torchvision
  # uses the stride 800 // 13 = 61 vertically. Given the same strides, the anchors are equal.
  h, w = 800, 1216
  feature_sizes = [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)]
  tv = AnchorGenerator(FPN_SIZES, FPN_RATIOS)
  expected = _torchvision_anchors(tv, (h, w), feature_sizes)
  strides = [(h // fh, w // fw) for fh, fw in feature_sizes]
  assert strides[-1] == (61, 64)
  levels = anchors.multilevel_grid_anchors(feature_sizes, strides, FPN_SIZES, FPN_RATIOS,
                                           concat=False)
  assert [len(l) for l in levels] == [fh * fw * 3 for fh, fw in feature_sizes]
  np.testing.assert_array_equal(np.concatenate(levels), expected)
  # The first four levels do not depend on that quirk.
  n4 = sum(len(l) for l in levels[:4])
  plain = anchors.multilevel_grid_anchors(feature_sizes, FPN_STRIDES, FPN_SIZES, FPN_RATIOS)
  np.testing.assert_array_equal(plain[:n4], expected[:n4])


def test_grid_anchors_multi_size_order_and_rounding():
  # Ratio-major, size-minor, as torchvision's single-level C4 RPN (3 sizes x 3 ratios).
  sizes, ratios = (128, 256, 512), (0.5, 1.0, 2.0)
  tv = AnchorGenerator((sizes,), (ratios,))
  expected = _torchvision_anchors(tv, (80, 96), [(5, 6)])
  got = anchors.grid_anchors((5, 6), 16, sizes, ratios)
  np.testing.assert_array_equal(got, expected)
  # Hand-worked: ratio 0.5, size 128 -> w = 128 * sqrt(2) = 181.02, h = 90.51, halves rounded.
  np.testing.assert_array_equal(got[0], [-91, -45, 91, 45])
  np.testing.assert_array_equal(got[9], [16 - 91, -45, 16 + 91, 45])   # next column
  np.testing.assert_array_equal(anchors.grid_anchors((1, 2), 16, (32,), (1.0,)),
                                [[-16, -16, 16, 16], [0, -16, 32, 16]])
  # Unrounded, centred at (x + 0.5) * stride (MMDetection's style).
  got = anchors.grid_anchors(1, 16, (128,), (0.5,), offset=0.5, round_base=False)
  np.testing.assert_allclose(got, [[8 - 64 * R2, 8 - 32 * R2, 8 + 64 * R2, 8 + 32 * R2]], atol=1e-4)


def test_anchors_are_constants_under_jit():
  # Called inside a trace, the functions still return concrete NumPy arrays.
  seen = []

  def f(x):
    a = refinedet_anchors(320)
    g = anchors.grid_anchors((2, 3), 8, (32,), (1.0,))
    seen.append((type(a), type(g)))
    return x + jnp.sum(a[:, 2] - a[:, 0]) + jnp.sum(g)

  out = jax.jit(f)(jnp.float32(0))
  assert seen == [(np.ndarray, np.ndarray)]
  expected = np.sum(refinedet_anchors(320)[:, 2] - refinedet_anchors(320)[:, 0])
  expected += np.sum(anchors.grid_anchors((2, 3), 8, (32,), (1.0,)))
  np.testing.assert_allclose(out, expected, rtol=1e-5)
