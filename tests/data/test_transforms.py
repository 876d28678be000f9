"""Tests of jdet.data.transforms: box bookkeeping, pixels vs boxes, determinism, shapes."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jdet.data import transforms as T
from jdet.testing import random_boxes

REPO = pathlib.Path(__file__).resolve().parents[2]

# Saturated colours, each more than half the range away from black and from the mean fill.
COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255],
                    [0, 255, 255]], np.uint8)


def make_sample(image, boxes, labels=None, crowd=None, difficult=None, image_id=7):
  """A sample dict as sample_from_example would build it."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  n = len(boxes)
  size = np.array(image.shape[:2], np.int32)
  return dict(
      image=image, boxes=boxes,
      labels=np.arange(n, dtype=np.int32) if labels is None else np.asarray(labels, np.int32),
      crowd=np.zeros(n, bool) if crowd is None else np.asarray(crowd, bool),
      difficult=np.zeros(n, bool) if difficult is None else np.asarray(difficult, bool),
      image_id=np.int32(image_id), orig_size=size, image_size=size.copy(),
      scale_factor=np.ones(2, np.float32), dropped_boxes=0)


def colour_sample(h=120, w=160):
  """A black image with six filled rectangles of distinct colours, labels = colour index.

  Rectangles lie on a 3 x 2 grid with black gaps, at integer pixel edges.
  """
  image = np.zeros((h, w, 3), np.uint8)
  boxes = []
  for i in range(6):
    r, c = divmod(i, 3)
    x1, y1 = 8 + c * (w // 3), 8 + r * (h // 2)
    x2, y2 = x1 + w // 3 - 16 - 3 * c, y1 + h // 2 - 16 - 4 * r
    image[y1:y2, x1:x2] = COLOURS[i]
    boxes.append([x1, y1, x2, y2])
  return make_sample(image, boxes)


def random_sample(rng, h=96, w=128, n=8, dtype=np.uint8):
  """Random pixels and ``n`` random valid boxes inside an ``h`` x ``w`` image."""
  image = rng.integers(0, 256, (h, w, 3)).astype(dtype)
  boxes = random_boxes(rng, n, size=min(h, w), min_side=2.0, max_side=min(h, w) * 0.6)
  crowd = rng.random(n) < 0.15
  return make_sample(image, boxes, labels=rng.integers(0, 5, n), crowd=crowd)


def colour_mask(image, colour):
  """[H, W] bool: pixels closer than half the range to ``colour`` in every channel."""
  return np.all(np.abs(image.astype(np.float32) - colour.astype(np.float32)) < 128, axis=-1)


def assert_boxes_follow_pixels(out, tol=2.0, min_fraction=0.9):
  """Each output box covers its colour: region mostly that colour, colour bbox == box."""
  image, boxes, labels = out["image"], out["boxes"], out["labels"]
  assert len(boxes) > 0
  for box, label in zip(boxes, labels):
    mask = colour_mask(image, COLOURS[label])
    x1, y1, x2, y2 = box
    inner = mask[int(np.ceil(y1)):int(np.floor(y2)), int(np.ceil(x1)):int(np.floor(x2))]
    assert inner.size > 0 and inner.mean() >= min_fraction, (label, box, inner.mean())
    ys, xs = np.nonzero(mask)
    found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
    np.testing.assert_allclose(found, box, atol=tol, err_msg=f"colour {label}")


def assert_boxes_inside(out):
  """Real boxes satisfy 0 <= x1 < x2 <= w inside image_size; padding rows are zeros / -1."""
  h, w = out["image_size"]
  assert out["image"].shape[0] >= h and out["image"].shape[1] >= w
  b, real = out["boxes"], out["labels"] >= 0
  assert b.dtype == np.float32 and out["labels"].dtype == np.int32
  assert len(b) == len(out["labels"]) == len(out["crowd"]) == len(out["difficult"])
  r = b[real]
  assert np.all(r[:, 0] >= 0) and np.all(r[:, 1] >= 0)
  assert np.all(r[:, 2] <= w) and np.all(r[:, 3] <= h)
  assert np.all(r[:, 0] < r[:, 2]) and np.all(r[:, 1] < r[:, 3])
  assert np.all(b[~real] == 0)


# ----------------------------------------------------------------------------
# Pure box helpers.
# ----------------------------------------------------------------------------


def test_box_helpers_closed_form():
  b = np.array([[10, 20, 30, 60]], np.float32)
  np.testing.assert_array_equal(T.hflip_boxes(b, 100), [[70, 20, 90, 60]])
  np.testing.assert_array_equal(T.resize_boxes(b, (0.5, 2.0)), [[20, 10, 60, 30]])
  np.testing.assert_array_equal(T.translate_boxes(b, -5, 3), [[5, 23, 25, 63]])
  np.testing.assert_array_equal(T.clip_boxes([[-3, 5, 120, 70]], (50, 100)), [[0, 5, 100, 50]])
  np.testing.assert_allclose(T.box_iou([0, 0, 10, 10], [[5, 0, 15, 10], [20, 20, 30, 30]]),
                             [1 / 3, 0.0], rtol=1e-6)


def test_rescale_size_matches_mmdetection_rule():
  assert T.rescale_size((480, 640), 800, 1333) == (800, 1067)   # short side reaches 800
  assert T.rescale_size((600, 2000), 800, 1333) == (400, 1333)  # long side bound wins
  assert T.rescale_size((1000, 500), 600, 1000) == (1000, 500)  # portrait, long bound


def test_choose_bucket_is_smallest_fitting():
  buckets = [(128, 128), (64, 128), (64, 64), (128, 64)]
  assert T.choose_bucket((60, 60), buckets) == (64, 64)
  assert T.choose_bucket((50, 100), buckets) == (64, 128)
  assert T.choose_bucket((100, 60), buckets) == (128, 64)
  assert T.choose_bucket((100, 100), buckets) == (128, 128)
  with pytest.raises(ValueError, match="fits none"):
    T.choose_bucket((129, 10), buckets)


# ----------------------------------------------------------------------------
# Boxes follow the pixels.
# ----------------------------------------------------------------------------


def test_hflip_follows_pixels():
  assert_boxes_follow_pixels(T.hflip(colour_sample()), tol=0)


@pytest.mark.parametrize("size", [(300, 300), (60, 90), (97, 51)])
def test_resize_follows_pixels(size):
  out = T.resize(colour_sample(), size)
  assert out["image"].shape == (*size, 3)
  np.testing.assert_array_equal(out["image_size"], size)
  np.testing.assert_allclose(out["scale_factor"], (size[0] / 120, size[1] / 160), rtol=1e-6)
  assert_boxes_follow_pixels(out, tol=1.5)


def test_expand_follows_pixels_and_fills_mean():
  s = colour_sample()
  for seed in range(5):
    out = T.Expand(prob=1.0)(s, np.random.default_rng(seed))
    h, w = out["image"].shape[:2]
    assert h >= 120 and w >= 160 and h <= 480 and w <= 640
    assert_boxes_follow_pixels(out, tol=0)
    left, top = (out["boxes"][0, :2] - s["boxes"][0, :2]).astype(int)
    np.testing.assert_array_equal(out["image"][top:top + 120, left:left + 160], s["image"])
    outside = np.ones((h, w), bool)
    outside[top:top + 120, left:left + 160] = False
    assert outside.any()
    np.testing.assert_array_equal(np.unique(out["image"][outside], axis=0),
                                  [np.round(T.IMAGENET_MEAN).astype(np.uint8)])


def test_random_crop_follows_pixels():
  s = colour_sample()
  cropped = 0
  for seed in range(30):
    out = T.MinIoURandomCrop(min_ious=(0.1, 0.3))(s, np.random.default_rng(seed))
    cropped += out["image"].shape[:2] != (120, 160)
    assert_boxes_follow_pixels(out, tol=0)
    assert out["dropped_boxes"] == 6 - len(out["boxes"])
  assert cropped > 20


def test_keep_ratio_resize_and_pad_follow_pixels():
  t = T.Compose([T.KeepRatioResize([(90, 100)]), T.Pad((128, 128))])
  out = t(colour_sample(), None)
  assert out["image"].shape == (128, 128, 3)
  np.testing.assert_array_equal(out["image_size"], (75, 100))  # 120x160 -> long side 100
  assert np.all(out["image"][75:] == 0) and np.all(out["image"][:, 100:] == 0)
  assert_boxes_follow_pixels(out, tol=1.5)
  back = T.resize_boxes(out["boxes"], 1.0 / out["scale_factor"])
  np.testing.assert_allclose(back, colour_sample()["boxes"], atol=1e-3)


def test_ssd_geometric_chain_follows_pixels():
  chain = T.Compose([T.Expand(), T.MinIoURandomCrop(), T.RandomHFlip(), T.Resize(300)])
  for seed in range(10):
    out = chain(colour_sample(), np.random.default_rng(seed))
    if len(out["boxes"]):
      assert_boxes_follow_pixels(out, tol=2.0, min_fraction=0.85)


# ----------------------------------------------------------------------------
# Flip, determinism.
# ----------------------------------------------------------------------------


def test_flip_twice_is_identity(rng):
  s = random_sample(rng)
  # Quarter-pixel coordinates: W - (W - x) is exact in float32.
  s["boxes"] = np.round(s["boxes"] * 4) / 4
  twice = T.hflip(T.hflip(s))
  np.testing.assert_array_equal(twice["image"], s["image"])
  np.testing.assert_array_equal(twice["boxes"], s["boxes"])
  np.testing.assert_array_equal(twice["labels"], s["labels"])
  assert not np.array_equal(T.hflip(s)["image"], s["image"])


_DIGEST_SCRIPT = """
import hashlib
import numpy as np
from jdet.data import transforms as T

def digest():
  rng = np.random.default_rng(0)
  h = hashlib.sha256()
  for seed in range(4):
    image = rng.integers(0, 256, (72, 96, 3)).astype(np.uint8)
    xy = rng.uniform(0, 40, (6, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 30, (6, 2))], 1).astype(np.float32)
    n = len(boxes)
    sample = dict(image=image, boxes=boxes, labels=np.arange(n, dtype=np.int32),
                  crowd=np.zeros(n, bool), difficult=np.zeros(n, bool), image_id=np.int32(seed),
                  orig_size=np.array([72, 96], np.int32), image_size=np.array([72, 96], np.int32),
                  scale_factor=np.ones(2, np.float32), dropped_boxes=0)
    for chain in (T.ssd_train_transforms(64, max_boxes=8),
                  T.rcnn_train_transforms([(40, 64), (56, 90)], mode="range", canvas=(96, 96),
                                          max_boxes=8)):
      out = chain(sample, np.random.default_rng([seed, 1, 2]))
      for k in sorted(out):
        h.update(k.encode())
        h.update(np.ascontiguousarray(out[k]).tobytes())
  return h.hexdigest()
"""


def _digest_here() -> str:
  namespace: dict = {}
  exec(_DIGEST_SCRIPT, namespace)  # the same code the subprocess runs
  return namespace["digest"]()


def test_same_seed_same_sample(rng):
  s = random_sample(rng)
  for chain in (T.ssd_train_transforms(64), T.rcnn_train_transforms([(40, 64), (56, 90)], mode="range",
                                                                    canvas=(96, 96))):
    a = chain(s, np.random.default_rng(5))
    b = chain(s, np.random.default_rng(5))
    assert sorted(a) == sorted(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert _digest_here() == _digest_here()


def test_same_seed_same_sample_in_another_process():
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  env["JAX_PLATFORMS"] = "cpu"
  code = _DIGEST_SCRIPT + "\nprint(digest())\n"
  res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120, check=True)
  assert res.stdout.strip().splitlines()[-1] == _digest_here()


def test_transforms_do_not_modify_their_input(rng):
  s = random_sample(rng)
  copy = {k: np.array(v, copy=True) for k, v in s.items()}
  for seed in range(5):
    T.ssd_train_transforms(64)(s, np.random.default_rng(seed))
    T.rcnn_train_transforms([(40, 64)], canvas=(96, 96))(s, np.random.default_rng(seed))
  for k in s:
    np.testing.assert_array_equal(s[k], copy[k], err_msg=k)


# ----------------------------------------------------------------------------
# Boxes stay inside; dropped boxes are counted and labels stay aligned.
# ----------------------------------------------------------------------------


SINGLE_TRANSFORMS = {
    "photometric": T.PhotometricDistort(),
    "expand": T.Expand(prob=1.0),
    "crop": T.MinIoURandomCrop(),
    "flip": T.RandomHFlip(prob=1.0),
    "resize": T.Resize((40, 70)),
    "keep_ratio": T.KeepRatioResize([(48, 80), (64, 100)], mode="range"),
    "pad": T.Pad((140, 140)),
}


@pytest.mark.parametrize("name", sorted(SINGLE_TRANSFORMS))
def test_each_transform_keeps_boxes_inside_and_aligned(name):
  t = SINGLE_TRANSFORMS[name]
  for seed in range(40):
    rng = np.random.default_rng(seed)
    s = random_sample(rng, n=10)
    s["labels"] = np.arange(10, dtype=np.int32)  # labels name their input box
    s["difficult"] = np.arange(10) % 3 == 0
    out = t(s, rng)
    assert_boxes_inside(out)
    n = len(out["boxes"])
    assert out["dropped_boxes"] == 10 - n
    np.testing.assert_array_equal(out["crowd"], s["crowd"][out["labels"]])
    np.testing.assert_array_equal(out["difficult"], s["difficult"][out["labels"]])
    assert np.all(np.diff(out["labels"]) > 0)  # a subset, in order
    assert out["image_id"] == s["image_id"]
    np.testing.assert_array_equal(out["orig_size"], s["orig_size"])


@pytest.mark.parametrize("recipe", ["ssd", "rcnn_value", "rcnn_range", "rcnn_buckets"])
def test_random_chains_keep_boxes_inside(recipe):
  chain = {
      "ssd": T.ssd_train_transforms(64, max_boxes=6),
      "rcnn_value": T.rcnn_train_transforms([(48, 80), (64, 100)], canvas=(112, 112), max_boxes=6),
      "rcnn_range": T.rcnn_train_transforms([(48, 80), (64, 100)], mode="range", canvas=(112, 112),
                                            max_boxes=6),
      "rcnn_buckets": T.rcnn_train_transforms([(48, 80), (64, 100)], mode="range",
                                              buckets=[(64, 112), (112, 64), (112, 112)], max_boxes=6),
  }[recipe]
  shapes = set()
  for seed in range(60):
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(40, 160, 2))
    s = random_sample(rng, h, w, n=int(rng.integers(0, 12)))
    ignored = int((s["crowd"] | s["difficult"]).sum())
    out = chain(s, rng)
    assert_boxes_inside(out)
    assert out["image"].dtype == np.float32
    assert out["boxes"].shape == (6, 4)
    kept = int((out["labels"] >= 0).sum())
    # Every input box is accounted for: kept, dropped, cut, or ignored (crowd).
    assert kept + out["dropped_boxes"] + out["truncated_boxes"] + ignored >= len(s["boxes"])
    assert kept + out["dropped_boxes"] + out["truncated_boxes"] <= len(s["boxes"])
    shapes.add(out["image"].shape)
  if recipe == "ssd":
    assert shapes == {(64, 64, 3)}
  elif recipe == "rcnn_buckets":
    assert shapes <= {(64, 112, 3), (112, 64, 3), (112, 112, 3)} and len(shapes) > 1
  else:
    assert shapes == {(112, 112, 3)}


def test_crop_drops_degenerate_boxes_and_keeps_labels_aligned():
  image = np.zeros((100, 100, 3), np.uint8)
  boxes = np.array([[10, 10, 30, 30],     # inside
                    [49.5, 10, 52, 40],   # clipped to a 0.5 px sliver: dropped
                    [60, 60, 90, 90],     # outside: dropped
                    [20, 45, 40, 70],     # clipped to 20 x 5: kept
                    [5, 5, 50, 20]], np.float32)  # clipped, kept
  s = make_sample(image, boxes, labels=[3, 1, 4, 1, 5], crowd=[0, 0, 0, 1, 0],
                  difficult=[0, 1, 0, 0, 0])
  s["dropped_boxes"] = 2
  out = T.crop(s, (0, 0, 50, 50), center_only=False, min_size=1.0)
  np.testing.assert_array_equal(out["boxes"], [[10, 10, 30, 30], [20, 45, 40, 50], [5, 5, 50, 20]])
  np.testing.assert_array_equal(out["labels"], [3, 1, 5])
  np.testing.assert_array_equal(out["crowd"], [False, True, False])
  np.testing.assert_array_equal(out["difficult"], [False, False, False])
  assert out["dropped_boxes"] == 4
  assert out["image"].shape == (50, 50, 3)
  # The SSD rule keeps a box only if its centre is in the crop.
  out = T.crop(s, (0, 0, 50, 50), center_only=True)
  np.testing.assert_array_equal(out["labels"], [3, 5])  # label 1 at (30, 57.5): centre outside
  assert out["dropped_boxes"] == 2 + 3


def test_random_crop_drops_tiny_boxes_and_counts_them():
  rng = np.random.default_rng(0)
  dropped_small = 0
  for seed in range(50):
    s = random_sample(rng, 80, 80, n=12)
    # Thin boxes (1.5 px wide) are dropped when a crop edge cuts them below 1 px.
    s["boxes"][:6, 2] = s["boxes"][:6, 0] + 1.5
    out = T.MinIoURandomCrop(min_ious=(0.1,))(s, np.random.default_rng(seed))
    assert out["dropped_boxes"] == 12 - len(out["boxes"])
    w = out["boxes"][:, 2] - out["boxes"][:, 0]
    h = out["boxes"][:, 3] - out["boxes"][:, 1]
    assert np.all(w >= 1.0) and np.all(h >= 1.0)
    dropped_small += out["dropped_boxes"]
  assert dropped_small > 0


def test_random_crop_meets_min_iou():
  # One large box: every accepted crop has IoU >= 0.7 with it (or the image is unchanged).
  s = make_sample(np.zeros((100, 120, 3), np.uint8), [[20, 10, 100, 90]])
  area = 80 * 80
  changed = 0
  for seed in range(30):
    out = T.MinIoURandomCrop(min_ious=(0.7,))(s, np.random.default_rng(seed))
    h, w = out["image"].shape[:2]
    if (h, w) == (100, 120):
      continue
    changed += 1
    b = out["boxes"][0]
    inter = (b[2] - b[0]) * (b[3] - b[1])
    assert inter / (h * w + area - inter) >= 0.7 - 1e-6
  assert changed > 20


def test_random_crop_none_only_keeps_the_image(rng):
  s = random_sample(rng)
  out = T.MinIoURandomCrop(min_ious=(None,))(s, rng)
  assert out is s


# ----------------------------------------------------------------------------
# Multi-scale resize, padding.
# ----------------------------------------------------------------------------


def _check_keep_ratio(in_hw, out_hw):
  ratio_in = in_hw[1] / in_hw[0]
  ratio_out = out_hw[1] / out_hw[0]
  assert abs(ratio_out - ratio_in) <= ratio_in * (1 / min(out_hw) + 1 / max(out_hw)) + 1e-9


def _keep_ratio_outputs(t, num_seeds):
  """Runs ``t`` on empty images of random sizes; yields each output (h, w), ratio checked."""
  for seed in range(num_seeds):
    rng = np.random.default_rng(seed)
    hw = tuple(int(v) for v in rng.integers(30, 200, 2))
    out = t(make_sample(np.zeros((*hw, 3), np.uint8), np.zeros((0, 4))), rng)
    oh, ow = out["image"].shape[:2]
    _check_keep_ratio(hw, (oh, ow))
    yield hw, oh, ow


def test_multiscale_value_mode_uses_only_listed_scales():
  scales = [(40, 80), (56, 100), (64, 120)]
  t = T.KeepRatioResize(scales, mode="value")
  used = set()
  for hw, oh, ow in _keep_ratio_outputs(t, 60):
    # Either the short side hit a listed short, or the long side hit the matching bound.
    matches = [(s, l) for s, l in scales
               if (min(oh, ow) == s and max(oh, ow) <= l) or (max(oh, ow) == l and min(oh, ow) <= s)]
    assert matches, (hw, (oh, ow))
    used.update(matches)
  assert used == set(scales)


def test_multiscale_range_mode_stays_in_bounds():
  t = T.KeepRatioResize([(40, 80), (64, 120)], mode="range")
  shorts = set()
  for hw, oh, ow in _keep_ratio_outputs(t, 80):
    assert min(oh, ow) <= 64 and max(oh, ow) <= 120
    assert 40 <= min(oh, ow) or max(oh, ow) >= 80  # a short side below 40 only when the long side binds
    if max(oh, ow) < 80:
      shorts.add(min(oh, ow))
  assert len(shorts) > 5 and shorts <= set(range(40, 65))


def test_pad_to_canvas_and_buckets(rng):
  s = random_sample(rng, 50, 70)
  out = T.Pad((64, 96), value=-1.0)(T.ToFloat()(s), None)
  assert out["image"].shape == (64, 96, 3)
  np.testing.assert_array_equal(out["image_size"], (50, 70))
  np.testing.assert_array_equal(out["image"][:50, :70], s["image"])
  assert np.all(out["image"][50:] == -1) and np.all(out["image"][:, 70:] == -1)
  np.testing.assert_array_equal(out["boxes"], s["boxes"])
  out = T.Pad(buckets=[(128, 128), (64, 64), (64, 96)])(s, None)
  assert out["image"].shape == (64, 96, 3)
  with pytest.raises(ValueError):
    T.Pad((40, 96))(s, None)


# ----------------------------------------------------------------------------
# pad_boxes.
# ----------------------------------------------------------------------------


def test_pad_boxes_pads_with_zeros_and_minus_one():
  s = make_sample(np.zeros((10, 10, 3), np.uint8), [[1, 1, 3, 3], [2, 2, 9, 9]], labels=[4, 0])
  out = T.pad_boxes(s, 4)
  np.testing.assert_array_equal(out["boxes"], [[1, 1, 3, 3], [2, 2, 9, 9], [0] * 4, [0] * 4])
  np.testing.assert_array_equal(out["labels"], [4, 0, -1, -1])
  assert out["boxes"].dtype == np.float32 and out["labels"].dtype == np.int32
  assert out["truncated_boxes"] == 0 and out["dropped_boxes"] == 0
  assert out["crowd"].shape == out["difficult"].shape == (4,)


def test_pad_boxes_keeps_largest_and_counts_truncated():
  sizes = [5, 1, 9, 3, 7, 2]
  boxes = [[0, 0, s, s] for s in sizes]
  s = make_sample(np.zeros((10, 10, 3), np.uint8), boxes, labels=[0, 1, 2, 3, 4, 5])
  out = T.pad_boxes(s, 3)
  np.testing.assert_array_equal(out["labels"], [0, 2, 4])  # the 3 largest, in input order
  np.testing.assert_array_equal(out["boxes"][:, 2], [5, 9, 7])
  assert out["truncated_boxes"] == 3


def test_pad_boxes_removes_crowd_and_difficult_when_asked():
  boxes = [[0, 0, 2, 2], [0, 0, 3, 3], [0, 0, 4, 4], [0, 0, 5, 5]]
  s = make_sample(np.zeros((10, 10, 3), np.uint8), boxes, labels=[0, 1, 2, 3],
                  crowd=[0, 1, 0, 0], difficult=[0, 0, 1, 0])
  out = T.pad_boxes(s, 3)
  np.testing.assert_array_equal(out["labels"], [0, 3, -1])
  assert out["truncated_boxes"] == 0 and not out["crowd"].any() and not out["difficult"].any()
  out = T.pad_boxes(s, 3, drop_ignored=False)
  np.testing.assert_array_equal(out["labels"], [1, 2, 3])  # the largest three
  np.testing.assert_array_equal(out["crowd"], [True, False, False])
  np.testing.assert_array_equal(out["difficult"], [False, True, False])
  assert out["truncated_boxes"] == 1


# ----------------------------------------------------------------------------
# Photometric distortion and normalisation.
# ----------------------------------------------------------------------------


def test_photometric_distortion_changes_pixels_not_boxes(rng):
  s = random_sample(rng)
  changed = 0
  for seed in range(30):
    out = T.PhotometricDistort()(s, np.random.default_rng(seed))
    assert out["image"].dtype == np.float32 and out["image"].shape == s["image"].shape
    assert out["image"].min() >= 0 and out["image"].max() <= 255
    assert np.isfinite(out["image"]).all()
    np.testing.assert_array_equal(out["boxes"], s["boxes"])
    np.testing.assert_array_equal(out["labels"], s["labels"])
    changed += not np.allclose(out["image"], s["image"], atol=1.0)
  assert changed >= 25


def test_photometric_hue_and_saturation_keep_grey_grey():
  # A grey image has no hue or saturation to change; only brightness/contrast act.
  grey = np.full((8, 8, 3), 100, np.uint8)
  for seed in range(20):
    out = T.PhotometricDistort(channel_swap=False)(make_sample(grey, np.zeros((0, 4))),
                                                   np.random.default_rng(seed))["image"]
    np.testing.assert_allclose(out, out[..., :1].repeat(3, -1), atol=1e-3)


def test_normalize_is_imagenet_rgb():
  image = np.array([[T.IMAGENET_MEAN, np.add(T.IMAGENET_MEAN, T.IMAGENET_STD)]], np.float32)
  out = T.Normalize()(make_sample(image, np.zeros((0, 4))), None)["image"]
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, [[[0, 0, 0], [1, 1, 1]]], atol=1e-5)


# ----------------------------------------------------------------------------
# From a source's Example to an evaluation batch row.
# ----------------------------------------------------------------------------


def test_eval_recipes_from_example_map_boxes_back():
  from jdet.data.records import Example

  rng = np.random.default_rng(3)
  boxes = random_boxes(rng, 5, size=90, min_side=4.0, max_side=60.0)
  example = Example(image=rng.integers(0, 256, (90, 150, 3)).astype(np.uint8), boxes=boxes,
                    labels=np.arange(5, dtype=np.int32), crowd=np.zeros(5, bool),
                    difficult=np.zeros(5, bool), image_id=42)
  s = T.sample_from_example(example)
  np.testing.assert_array_equal(s["orig_size"], (90, 150))
  for chain, shape in ((T.ssd_eval_transforms(64, max_boxes=8), (64, 64, 3)),
                       (T.rcnn_eval_transforms((60, 100), canvas=(64, 128), max_boxes=8), (64, 128, 3))):
    out = chain(s, None)  # evaluation needs no randomness
    assert out["image"].shape == shape and out["image"].dtype == np.float32
    assert out["image_id"] == 42 and out["dropped_boxes"] == 0 and out["truncated_boxes"] == 0
    np.testing.assert_array_equal(out["labels"], [0, 1, 2, 3, 4, -1, -1, -1])
    back = T.resize_boxes(out["boxes"][:5], 1.0 / out["scale_factor"])
    np.testing.assert_allclose(back, boxes, atol=1e-3)
    np.testing.assert_allclose(out["scale_factor"], out["image_size"] / out["orig_size"], rtol=1e-6)


def test_numpy_box_maths_agree_with_jdet_boxes(rng):
  """The pipeline's NumPy box maths is jdet.boxes's: clip, area and pairwise IoU."""
  from jdet import boxes as B
  from jdet.data.transforms import boxes as npb

  a = random_boxes(rng, 7, size=100.0, max_side=80.0) - 20.0  # some reach outside
  b = np.concatenate([random_boxes(rng, 5, size=100.0), [[10, 10, 10, 30]]]).astype(np.float32)
  np.testing.assert_array_equal(T.clip_boxes(a, (70, 90)), np.asarray(B.clip(a, (70, 90))))
  np.testing.assert_allclose(npb.box_area(b), np.asarray(B.area(b)), rtol=1e-6)
  np.testing.assert_allclose(T.box_iou(a, b), np.asarray(B.iou(a, b)), rtol=1e-5, atol=1e-7)
