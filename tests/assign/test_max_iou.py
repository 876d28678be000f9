"""Tests for jdet.assign.max_iou against torchvision's Matcher and SSDMatcher."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection._utils import Matcher, SSDMatcher

from jdet.assign.max_iou import IGNORE, NEGATIVE, POSITIVE, max_iou_assign
from jdet.boxes import iou
from jdet.testing import assert_traces_once

IMAGE = 64
NUM_GT = 8

# Jitted once per configuration: far fewer compilations than op-by-op dispatch.
assign = jax.jit(max_iou_assign, static_argnames=("pos_iou_thr", "neg_iou_thr", "min_pos_iou", "low_quality"))


def _anchors() -> np.ndarray:
  """``[A, 4]`` integer anchors tiling a 64x64 image, clipped (so some coincide)."""
  out = []
  for stride, sizes in ((8, (8, 16)), (16, (24, 40))):
    centres = np.arange(stride // 2, IMAGE, stride)
    for cy in centres:
      for cx in centres:
        for w in sizes:
          for h in sizes:
            out.append([cx - w // 2, cy - h // 2, cx + w // 2, cy + h // 2])
  return np.clip(np.array(out, np.float32), 0, IMAGE)


def _random_gt(rng: np.random.Generator, num_images: int) -> tuple[np.ndarray, np.ndarray]:
  """``[B, M, 4]`` integer boxes and ``[B, M]`` validity with padding anywhere.

  Image 0 has no box (zero rows), image 1 only junk padding rows, image 2 duplicate
  boxes; the others a random number of boxes, some duplicated, padding rows either
  zeros or junk boxes (which must be ignored).
  """
  xy = rng.integers(0, IMAGE - 4, size=(num_images, NUM_GT, 2))
  wh = rng.integers(2, 40, size=(num_images, NUM_GT, 2))
  boxes = np.concatenate([xy, np.minimum(xy + wh, IMAGE)], axis=-1).astype(np.float32)
  valid = rng.random((num_images, NUM_GT)) < rng.random((num_images, 1))
  for b in range(3, num_images, 3):  # duplicates among valid boxes
    cols = np.flatnonzero(valid[b])
    if cols.size >= 2:
      boxes[b, cols[-1]] = boxes[b, cols[0]]
  valid[:2] = False
  valid[2] = [True, True, False, True, True, False, False, False]
  boxes[2, 1] = boxes[2, 0]
  boxes[2, 4] = boxes[2, 3]
  zero_padding = rng.random(num_images) < 0.5
  zero_padding[:2] = [True, False]
  boxes[zero_padding[:, None] & ~valid] = 0.0
  return boxes, valid


def _torchvision(matcher, ious: np.ndarray, gt_valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """torchvision's labels (POSITIVE/NEGATIVE/IGNORE) and matched column indices."""
  cols = np.flatnonzero(gt_valid)
  if cols.size == 0:  # torchvision's detectors make every anchor background
    return np.full(ious.shape[0], NEGATIVE), np.full(ious.shape[0], -1)
  m = matcher(torch.from_numpy(np.ascontiguousarray(ious[:, cols].T))).numpy()
  labels = np.where(m >= 0, POSITIVE, np.where(m == Matcher.BELOW_LOW_THRESHOLD, NEGATIVE, IGNORE))
  return labels, np.where(m >= 0, cols[np.maximum(m, 0)], -1)


CASES = {  # name: (max_iou_assign's keywords, torchvision's matcher)
    "none_0.7_0.3": (dict(pos_iou_thr=0.7, neg_iou_thr=0.3, low_quality="none"),
                     lambda: Matcher(0.7, 0.3, allow_low_quality_matches=False)),
    "none_0.5_0.5": (dict(pos_iou_thr=0.5, neg_iou_thr=0.5, low_quality="none"),
                     lambda: Matcher(0.5, 0.5, allow_low_quality_matches=False)),
    "argmax_0.7_0.3": (dict(pos_iou_thr=0.7, neg_iou_thr=0.3, low_quality="argmax"),
                       lambda: Matcher(0.7, 0.3, allow_low_quality_matches=True)),
    "argmax_0.5_0.4": (dict(pos_iou_thr=0.5, neg_iou_thr=0.4, low_quality="argmax"),
                       lambda: Matcher(0.5, 0.4, allow_low_quality_matches=True)),
    "force_0.5": (dict(pos_iou_thr=0.5, neg_iou_thr=0.5, low_quality="force"), lambda: SSDMatcher(0.5)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_torchvision(name):
  kwargs, make_matcher = CASES[name]
  matcher = make_matcher()
  rng = np.random.default_rng(sorted(CASES).index(name))
  anchors = _anchors()
  gt, gt_valid = _random_gt(rng, 30)
  fn = jax.jit(jax.vmap(functools.partial(max_iou_assign, **kwargs), in_axes=(None, 0, 0)))
  out = jax.tree.map(np.asarray, fn(anchors, gt, gt_valid))

  ties = duplicates = 0
  for b in range(gt.shape[0]):
    ious = np.asarray(iou(anchors, gt[b]))  # [A, M]
    valid_ious = ious[:, gt_valid[b]]
    if valid_ious.size:
      assert np.all(valid_ious.max(axis=0) > 0)  # torchvision has no guard for boxes off every anchor
      ties += int(np.sum(np.sum(valid_ious == valid_ious.max(axis=0), axis=0) > 1))
      duplicates += len(valid_ious.T) - len(np.unique(gt[b][gt_valid[b]], axis=0))
    want_labels, want_matched = _torchvision(matcher, ious, gt_valid[b])
    np.testing.assert_array_equal(out.labels[b], want_labels, err_msg=f"image {b}")
    pos = want_labels == POSITIVE
    np.testing.assert_array_equal(out.matched_gt[b][pos], want_matched[pos], err_msg=f"image {b}")
    want_max = valid_ious.max(axis=1) if valid_ious.size else np.zeros(len(anchors))
    np.testing.assert_allclose(out.max_iou[b], np.maximum(want_max, 0.0), rtol=0, atol=0)
  assert not np.any(out.labels[:2])  # no valid box: all negative
  assert ties > 0 and duplicates > 0  # the data exercises both


# The docstring's example: one 10x10 box, IoUs 0.5, 0.2, 0.6, 0.0.
GT = np.array([[0, 0, 10, 10]], np.float32)
ANCHORS = np.array([[0, 0, 10, 5], [0, 0, 10, 2], [0, 0, 10, 6], [20, 20, 30, 30]], np.float32)


@pytest.mark.parametrize("mode, labels", [
    ("none", [IGNORE, NEGATIVE, IGNORE, NEGATIVE]),
    ("argmax", [IGNORE, NEGATIVE, POSITIVE, NEGATIVE]),
    ("force", [IGNORE, NEGATIVE, POSITIVE, NEGATIVE]),
])
def test_docstring_example(mode, labels):
  out = assign(ANCHORS, GT, [True], pos_iou_thr=0.7, neg_iou_thr=0.3, low_quality=mode)
  np.testing.assert_array_equal(out.labels, labels)
  np.testing.assert_array_equal(out.matched_gt, 0)
  np.testing.assert_allclose(out.max_iou, [0.5, 0.2, 0.6, 0.0], atol=1e-6)
  assert out.labels.dtype == jnp.int32 and out.matched_gt.dtype == jnp.int32


def test_min_pos_iou_and_anchor_valid():
  for mode in ("argmax", "force"):
    # The box's best IoU 0.6 is below min_pos_iou: no promotion.
    out = assign(ANCHORS, GT, [True], pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.65,
                         low_quality=mode)
    np.testing.assert_array_equal(out.labels, [IGNORE, NEGATIVE, IGNORE, NEGATIVE])
    # Anchor 2 invalid: ignored, and anchor 0 (IoU 0.5) becomes the box's best anchor.
    out = assign(ANCHORS, GT, [True], pos_iou_thr=0.7, neg_iou_thr=0.3, low_quality=mode,
                         anchor_valid=[True, True, False, True])
    np.testing.assert_array_equal(out.labels, [POSITIVE, NEGATIVE, IGNORE, NEGATIVE])


def test_negative_band():
  out = assign(ANCHORS, GT, [True], pos_iou_thr=0.7, neg_iou_thr=(0.1, 0.3))
  np.testing.assert_array_equal(out.labels, [IGNORE, NEGATIVE, IGNORE, IGNORE])  # IoU 0 < 0.1: ignored


def test_argmax_keeps_own_match_force_takes_promoting_box():
  # IoU [anchor, box]: A0 (1.0, 0.5), A1 (0.833, 0.6), A2 (0.0, 0.5), A3 (0, 0).
  gt = np.array([[0, 0, 10, 10], [0, 0, 20, 10]], np.float32)
  anchors = np.array([[0, 0, 10, 10], [0, 0, 12, 10], [10, 0, 20, 10], [30, 30, 40, 40]], np.float32)
  kw = dict(pos_iou_thr=0.9, neg_iou_thr=0.4)
  out = assign(anchors, gt, [True, True], **kw)
  np.testing.assert_array_equal(out.labels, [POSITIVE, IGNORE, IGNORE, NEGATIVE])
  assert out.matched_gt[0] == 0
  # Box 1's best anchor is A1, whose own best box is box 0.
  out = assign(anchors, gt, [True, True], low_quality="argmax", **kw)
  np.testing.assert_array_equal(out.labels, [POSITIVE, POSITIVE, IGNORE, NEGATIVE])
  np.testing.assert_array_equal(out.matched_gt[:2], [0, 0])
  out = assign(anchors, gt, [True, True], low_quality="force", **kw)
  np.testing.assert_array_equal(out.labels, [POSITIVE, POSITIVE, IGNORE, NEGATIVE])
  np.testing.assert_array_equal(out.matched_gt[:2], [0, 1])


def test_ties_argmax_takes_all_force_takes_first():
  anchors = np.array([[0, 0, 10, 5], [0, 5, 10, 10], [0, 0, 10, 2]], np.float32)  # IoU 0.5, 0.5, 0.2
  kw = dict(pos_iou_thr=0.7, neg_iou_thr=0.3)
  out = assign(anchors, GT, [True], low_quality="argmax", **kw)
  np.testing.assert_array_equal(out.labels, [POSITIVE, POSITIVE, NEGATIVE])
  out = assign(anchors, GT, [True], low_quality="force", **kw)
  np.testing.assert_array_equal(out.labels, [POSITIVE, IGNORE, NEGATIVE])


def test_duplicate_boxes_and_padding():
  # Boxes 0 and 1 coincide; row 2 is the same box but padding and must never match.
  gt = np.array([[0, 0, 10, 10]] * 3, np.float32)
  valid = [True, True, False]
  anchors = np.array([[0, 0, 10, 6], [0, 0, 10, 2]], np.float32)  # IoU 0.6, 0.2
  kw = dict(pos_iou_thr=0.7, neg_iou_thr=0.3)
  out = assign(anchors, gt, valid, **kw)
  np.testing.assert_array_equal(out.labels, [IGNORE, NEGATIVE])
  out = assign(anchors, gt, valid, low_quality="argmax", **kw)
  np.testing.assert_array_equal(out.labels, [POSITIVE, NEGATIVE])
  assert out.matched_gt[0] == 0  # the first copy
  out = assign(anchors, gt, valid, low_quality="force", **kw)
  np.testing.assert_array_equal(out.labels, [POSITIVE, NEGATIVE])
  assert out.matched_gt[0] == 1  # both copies force anchor 0: the later one wins


@pytest.mark.parametrize("mode", ["none", "argmax", "force"])
def test_no_valid_box_and_box_off_every_anchor(mode):
  kw = dict(pos_iou_thr=0.7, neg_iou_thr=(0.1, 0.3), low_quality=mode)
  out = assign(ANCHORS, GT, [False], **kw)
  np.testing.assert_array_equal(out.labels, NEGATIVE)
  np.testing.assert_array_equal(out.max_iou, 0.0)
  out = assign(ANCHORS, GT, [False], anchor_valid=[True, False, True, True], **kw)
  np.testing.assert_array_equal(out.labels, [NEGATIVE, IGNORE, NEGATIVE, NEGATIVE])
  out = assign(ANCHORS, np.zeros((0, 4), np.float32), np.zeros((0,), bool), **kw)
  np.testing.assert_array_equal(out.labels, NEGATIVE)
  # A valid box overlapping no anchor promotes nothing (best IoU 0).
  far = np.array([[50, 50, 60, 60]], np.float32)
  out = assign(ANCHORS[:3], far, [True], pos_iou_thr=0.7, neg_iou_thr=0.3, low_quality=mode)
  np.testing.assert_array_equal(out.labels, NEGATIVE)


def test_bad_arguments():
  with pytest.raises(ValueError, match="low_quality"):
    assign(ANCHORS, GT, [True], pos_iou_thr=0.7, neg_iou_thr=0.3, low_quality="all")
  with pytest.raises(ValueError, match="must not exceed"):
    assign(ANCHORS, GT, [True], pos_iou_thr=0.3, neg_iou_thr=0.7)
  with pytest.raises(ValueError, match="pair"):
    assign(ANCHORS, GT, [True], pos_iou_thr=0.7, neg_iou_thr=(0.0, 0.1, 0.3))


@pytest.mark.parametrize("mode", ["none", "argmax", "force"])
def test_jit_vmap_per_image_and_single_trace(mode):
  rng = np.random.default_rng(7)
  anchors = _anchors()
  gt_a, valid_a = _random_gt(rng, 6)
  gt_b, valid_b = _random_gt(rng, 6)
  one_image = functools.partial(max_iou_assign, pos_iou_thr=0.6, neg_iou_thr=0.4, low_quality=mode)
  batched = jax.vmap(one_image, in_axes=(None, 0, 0))
  one_image = jax.jit(one_image)
  outs = assert_traces_once(batched, (anchors, gt_a, valid_a), (anchors, gt_b, valid_b))
  for out, gt, valid in zip(outs, (gt_a, gt_b), (valid_a, valid_b)):
    for b in range(gt.shape[0]):
      single = one_image(anchors, gt[b], valid[b])
      np.testing.assert_array_equal(out.labels[b], single.labels)
      np.testing.assert_array_equal(out.matched_gt[b], single.matched_gt)
      np.testing.assert_array_equal(out.max_iou[b], single.max_iou)
