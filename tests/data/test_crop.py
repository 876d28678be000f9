"""Sparse R-CNN's 300-proposal crop augmentation: RandomSizeCrop, RandomChoice, the recipe.

References: a hand-worked crop, MMDetection 3.3's ``RandomCrop`` (the oracle of
``tests/oracles``) on the same crop window, and torchvision's ``v2`` box crop
followed by ``SanitizeBoundingBoxes``.
"""

from __future__ import annotations

import pathlib
import sys

import grain
import numpy as np
import pytest

from jdet.data import builder
from jdet.data import transforms as T
from jdet.data.records import Example
from jdet.testing import random_boxes

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from configs import sparse_rcnn as sparse_config  # noqa: E402


def make_sample(image, boxes, labels=None, crowd=None, difficult=None):
  """A sample dict as sample_from_example builds it."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  n = len(boxes)
  return T.sample_from_example(Example(
      image=image, boxes=boxes,
      labels=np.arange(n, dtype=np.int32) if labels is None else np.asarray(labels, np.int32),
      crowd=np.zeros(n, bool) if crowd is None else np.asarray(crowd, bool),
      difficult=np.zeros(n, bool) if difficult is None else np.asarray(difficult, bool),
      image_id=5))


def numbered_image(h, w):
  """Every pixel different: channel 0 the row, channel 1 the column (mod 256), channel 2 both."""
  ys, xs = np.mgrid[0:h, 0:w]
  return np.stack([ys % 256, xs % 256, (ys * 7 + xs) % 256], -1).astype(np.uint8)


class ScriptedRng:
  """Stands in for a np.random.Generator: ``integers`` returns scripted values and records
  the (low, high) it was asked for."""

  def __init__(self, values):
    self.values = list(values)
    self.calls = []

  def integers(self, low, high):
    self.calls.append((int(low), int(high)))
    return self.values.pop(0)


def reference_crop(boxes, rect, min_size):
  """Independent NumPy statement of the rule: shift into the crop, clip, keep the boxes with
  width and height >= min_size (and > 0). Returns (boxes kept, keep mask)."""
  x1, y1, x2, y2 = rect
  out = []
  keep = []
  for bx1, by1, bx2, by2 in np.asarray(boxes, np.float64):
    nx1, nx2 = min(max(bx1 - x1, 0), x2 - x1), min(max(bx2 - x1, 0), x2 - x1)
    ny1, ny2 = min(max(by1 - y1, 0), y2 - y1), min(max(by2 - y1, 0), y2 - y1)
    ok = nx2 - nx1 > 0 and ny2 - ny1 > 0 and nx2 - nx1 >= min_size and ny2 - ny1 >= min_size
    keep.append(ok)
    if ok:
      out.append([nx1, ny1, nx2, ny2])
  return np.asarray(out, np.float32).reshape(-1, 4), np.asarray(keep, bool)


# ----------------------------------------------------------------------------
# The crop, hand-worked and against references.
# ----------------------------------------------------------------------------

# Image (h, w) = (100, 120), crop window x 20..80, y 10..70 (60 x 60).
HAND_BOXES = [
    [30, 20, 50, 40],    # 0: inside           -> [10, 10, 30, 30]
    [70, 30, 95, 50],    # 1: past the right   -> [50, 20, 60, 40]
    [90, 80, 110, 95],   # 2: outside          -> dropped
    [10, 5, 30, 25],     # 3: past top-left    -> [0, 0, 10, 15]
    [79.5, 30, 100, 40], # 4: 0.5 px left      -> [59.5, 20, 60, 30]: dropped at min_size 1
]


def test_random_size_crop_hand_worked():
  image = numbered_image(100, 120)
  sample = make_sample(image, HAND_BOXES, labels=[4, 3, 2, 1, 0], crowd=[0, 0, 0, 1, 0],
                       difficult=[0, 1, 0, 0, 0])
  sample["dropped_boxes"] = 2  # from earlier transforms
  # Draws, in order: crop_h, crop_w, top, left.
  rng = ScriptedRng([60, 60, 10, 20])
  out = T.RandomSizeCrop((50, 70))(sample, rng)
  # MMDetection's absolute_range bounds: [min(h, lo), min(h, hi)], then offsets in [0, h - crop_h].
  assert rng.calls == [(50, 71), (50, 71), (0, 41), (0, 61)]
  np.testing.assert_array_equal(out["image"], image[10:70, 20:80])
  np.testing.assert_array_equal(out["boxes"], [[10, 10, 30, 30], [50, 20, 60, 40], [0, 0, 10, 15]])
  np.testing.assert_array_equal(out["labels"], [4, 3, 1])
  np.testing.assert_array_equal(out["crowd"], [False, False, True])
  np.testing.assert_array_equal(out["difficult"], [False, True, False])
  assert out["dropped_boxes"] == 2 + 2
  np.testing.assert_array_equal(out["image_size"], [60, 60])
  np.testing.assert_array_equal(out["orig_size"], [100, 120])
  np.testing.assert_array_equal(out["scale_factor"], [1, 1])
  # The input is not modified.
  np.testing.assert_array_equal(sample["boxes"], np.asarray(HAND_BOXES, np.float32))
  # min_size 0 keeps the 0.5 pixel sliver (MMDetection's rule: any area left).
  out0 = T.RandomSizeCrop((50, 70), min_size=0)(sample, ScriptedRng([60, 60, 10, 20]))
  np.testing.assert_array_equal(out0["boxes"][-1], [59.5, 20, 60, 30])
  assert out0["dropped_boxes"] == 2 + 1


def test_small_sides_are_kept_whole():
  """A side shorter than the range's low end is not cropped (min(h, lo) = h)."""
  rng = ScriptedRng([30, 45, 0, 7])
  out = T.RandomSizeCrop((40, 50))(make_sample(numbered_image(30, 90), [[0, 0, 30, 30]]), rng)
  assert rng.calls == [(30, 31), (40, 51), (0, 1), (0, 46)]
  np.testing.assert_array_equal(out["image_size"], [30, 45])
  np.testing.assert_array_equal(out["boxes"], [[0, 0, 23, 30]])


def test_crop_that_removes_every_box_keeps_the_image():
  sample = make_sample(numbered_image(80, 80), [[0, 0, 10, 10], [70, 70, 80, 80]])
  out = T.RandomSizeCrop((40, 40))(sample, ScriptedRng([40, 40, 20, 20]))
  assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)
  assert out["dropped_boxes"] == 2
  padded = T.PadBoxes(4)(out)
  np.testing.assert_array_equal(padded["labels"], [-1] * 4)
  assert int(padded["dropped_boxes"]) == 2


@pytest.fixture(scope="module")
def mmdet_random_crop():
  from tests.oracles import mmdet_sparse_rcnn as oracle
  if not oracle.available():
    pytest.skip("MMDetection oracle not installed: "
                "python -m pip install --no-deps -r tests/oracles/requirements.txt")
  oracle.install_cpu_ops()
  from mmdet.datasets.transforms.transforms import RandomCrop
  from mmdet.structures.bbox import HorizontalBoxes

  class ForcedCrop(RandomCrop):
    """MMDetection's crop of the recipe, at a given window."""

    def __init__(self, window):
      super().__init__(crop_size=(384, 600), crop_type="absolute_range",
                       allow_negative_crop=True)
      self.window = window

    def _get_crop_size(self, image_size):
      x1, y1, x2, y2 = self.window
      return y2 - y1, x2 - x1

    def _rand_offset(self, margin):
      return self.window[1], self.window[0]

  def run(image, boxes, labels, window):
    res = ForcedCrop(window).transform(dict(
        img=image, img_shape=image.shape[:2], gt_bboxes=HorizontalBoxes(boxes),
        gt_bboxes_labels=labels, gt_ignore_flags=np.zeros(len(labels), bool)))
    return res["img"], res["gt_bboxes"].numpy(), res["gt_bboxes_labels"]

  return run


def test_crop_matches_mmdetection_random_crop(mmdet_random_crop):
  """min_size=0 is MMDetection's RandomCrop(absolute_range, allow_negative_crop=True)."""
  rng = np.random.default_rng(0)
  crop = T.RandomSizeCrop((24, 60), min_size=0)
  for trial in range(40):
    h, w = (int(v) for v in rng.integers(20, 90, 2))
    image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    boxes = random_boxes(rng, 12, size=(h, w), min_side=0.5, max_side=0.7 * min(h, w))
    labels = rng.integers(0, 80, 12).astype(np.int32)
    sample = make_sample(image, boxes, labels=labels)
    draw = np.random.default_rng(trial)
    window = crop.sample_rect(np.random.default_rng(trial), (h, w))
    out = crop(sample, draw)
    ref_image, ref_boxes, ref_labels = mmdet_random_crop(image, boxes, labels, window)
    np.testing.assert_array_equal(out["image"], ref_image)
    np.testing.assert_allclose(out["boxes"], ref_boxes, atol=1e-5)
    np.testing.assert_array_equal(out["labels"], ref_labels)
    assert out["dropped_boxes"] == len(boxes) - len(ref_boxes)


def test_crop_matches_torchvision_and_numpy_reference():
  """min_size=1 (the project default): torchvision's v2 crop + SanitizeBoundingBoxes(min_size=1)."""
  import torch
  from torchvision import tv_tensors
  from torchvision.transforms import v2
  from torchvision.transforms.v2 import functional as F

  rng = np.random.default_rng(1)
  crop = T.RandomSizeCrop((16, 48))
  for trial in range(40):
    h, w = (int(v) for v in rng.integers(12, 80, 2))
    image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    boxes = random_boxes(rng, 10, size=(h, w), min_side=0.5, max_side=0.6 * min(h, w))
    sample = make_sample(image, boxes)
    x1, y1, x2, y2 = crop.sample_rect(np.random.default_rng(100 + trial), (h, w))
    out = crop(sample, np.random.default_rng(100 + trial))

    ref, keep = reference_crop(boxes, (x1, y1, x2, y2), 1.0)
    np.testing.assert_allclose(out["boxes"], ref, atol=1e-5)
    np.testing.assert_array_equal(out["labels"], np.flatnonzero(keep))

    tv_boxes = tv_tensors.BoundingBoxes(torch.as_tensor(boxes), format="XYXY",
                                        canvas_size=(h, w))
    tv_image = tv_tensors.Image(torch.as_tensor(image).permute(2, 0, 1))
    cropped_image = F.crop(tv_image, y1, x1, y2 - y1, x2 - x1)
    cropped = F.crop(tv_boxes, y1, x1, y2 - y1, x2 - x1)
    kept = v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=lambda d: d["labels"])(
        {"boxes": cropped, "labels": torch.arange(len(boxes))})
    np.testing.assert_array_equal(out["image"], cropped_image.permute(1, 2, 0).numpy())
    np.testing.assert_allclose(out["boxes"], kept["boxes"].numpy(), atol=1e-5)
    np.testing.assert_array_equal(out["labels"], kept["labels"].numpy())


def test_crop_size_within_range_and_image():
  rng = np.random.default_rng(2)
  crop = T.RandomSizeCrop((10, 20))
  seen_h, seen_w, seen_top = set(), set(), set()
  for _ in range(3000):
    h, w = (int(v) for v in rng.integers(5, 40, 2))
    x1, y1, x2, y2 = crop.sample_rect(rng, (h, w))
    ch, cw = y2 - y1, x2 - x1
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    assert min(h, 10) <= ch <= min(h, 20) and min(w, 10) <= cw <= min(w, 20)
    if h >= 20:
      seen_h.add(ch)
    if w >= 20:
      seen_w.add(cw)
  # Every size of the range is drawn (uniform integers, both ends included) ...
  assert seen_h == seen_w == set(range(10, 21))
  # ... and every offset: in a 30 x 30 image, tops 0..20 (20 only below a 10-pixel crop).
  for _ in range(3000):
    x1, y1, x2, y2 = crop.sample_rect(rng, (30, 30))
    assert y2 <= 30 and x2 <= 30
    seen_top.add(y1)
  assert seen_top == set(range(0, 21))


# ----------------------------------------------------------------------------
# Randomness: the pipeline's per-(seed, index) generators.
# ----------------------------------------------------------------------------


def _mapped(transform, sample, seed, n=6):
  """grain's random_map, as the training pipeline applies transforms."""
  ds = grain.MapDataset.source([sample] * n).seed(seed).random_map(transform)
  return [ds[i] for i in range(n)]


def test_same_seed_and_index_same_output_different_index_different():
  sample = make_sample(numbered_image(300, 400), random_boxes(np.random.default_rng(3), 8,
                                                              size=(300, 400), min_side=8))
  chain = T.rcnn_train_transforms(((160, 300), (200, 300)), canvas=(320, 320), max_boxes=8,
                                  crop=True, crop_scales=((150, 300), (180, 300)),
                                  crop_size=(96, 160))
  a = _mapped(chain, sample, seed=7)
  b = _mapped(T.rcnn_train_transforms(((160, 300), (200, 300)), canvas=(320, 320), max_boxes=8,
                                      crop=True, crop_scales=((150, 300), (180, 300)),
                                      crop_size=(96, 160)), sample, seed=7)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  crops = _mapped(T.RandomSizeCrop((96, 160)), sample, seed=7)
  rects = {(int(c["image_size"][0]), int(c["image_size"][1]), c["image"][0, 0].tobytes())
           for c in crops}
  assert len(rects) == len(crops)  # six indices, six different crops
  other = _mapped(T.RandomSizeCrop((96, 160)), sample, seed=8)
  assert any(not np.array_equal(c["image"], o["image"]) for c, o in zip(crops, other))


def test_random_choice_picks_each_branch_at_its_probability():
  def tag(name):
    return lambda s, rng: {**s, "branch": name}

  choice = T.RandomChoice([tag("plain"), tag("crop")], probs=(0.5, 0.5))
  rng = np.random.default_rng(4)
  n = 4000
  picks = [choice({}, rng)["branch"] for _ in range(n)]
  # Binomial(4000, 0.5): standard deviation 31.6; 4 of them.
  assert abs(picks.count("crop") - n / 2) < 4 * np.sqrt(n * 0.25)
  skewed = T.RandomChoice([tag("a"), tag("b")], probs=(0.8, 0.2))
  picks = [skewed({}, rng)["branch"] for _ in range(n)]
  assert abs(picks.count("b") - 0.2 * n) < 4 * np.sqrt(n * 0.16)
  assert {T.RandomChoice([tag("a"), tag("b")], probs=(0.0, 1.0))({}, rng)["branch"]
          for _ in range(50)} == {"b"}
  with pytest.raises(ValueError):
    T.RandomChoice([tag("a"), tag("b")], probs=(0.7, 0.7))


def test_recipe_crop_branch_about_half_the_time():
  """An image three times as wide as high keeps that shape through the resize alone; the crop
  branch (sides 24..36) makes it at most 1.5 times as wide."""
  sample = make_sample(numbered_image(32, 96), [[4, 4, 90, 28], [40, 2, 60, 30]])
  chain = T.rcnn_train_transforms(((40, 200),), canvas=(208, 208), max_boxes=4, crop=True,
                                  crop_scales=((40, 200), (50, 200)), crop_size=(24, 36))
  n = 600
  cropped = 0
  for i in range(n):
    out = chain(sample, np.random.default_rng([11, i]))
    h, w = (int(v) for v in out["image_size"])
    if w / h < 2:
      cropped += 1
      assert h == 40 or w == 40  # the multi-scale resize after the crop: short side 40
    else:
      assert (h, w) == (40, 120)
    real = out["labels"] >= 0
    b = out["boxes"][real]
    assert np.all(b[:, :2] >= 0) and np.all(b[:, 2] <= w) and np.all(b[:, 3] <= h)
    assert np.all(b[:, 2] > b[:, 0]) and np.all(b[:, 3] > b[:, 1])
  assert abs(cropped - n / 2) < 4 * np.sqrt(n * 0.25)


def test_recipe_without_crop_is_the_plain_chain():
  """crop=False (every other config) builds the chain it always did: same outputs, same draws."""
  scales = ((40, 80), (56, 100))
  plain = T.Compose([T.KeepRatioResize(scales, "value"), T.RandomHFlip(0.5), T.Normalize(),
                     T.Pad(size=(112, 112)), T.PadBoxes(6)])
  recipe = T.rcnn_train_transforms(scales, canvas=(112, 112), max_boxes=6)
  sample = make_sample(numbered_image(60, 90), [[5, 5, 40, 50], [50, 10, 88, 58]])
  for i in range(20):
    a, b = plain(sample, np.random.default_rng(i)), recipe(sample, np.random.default_rng(i))
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ----------------------------------------------------------------------------
# The config.
# ----------------------------------------------------------------------------


def _steps(transform):
  """Every transform of a chain, nested choices and chains included."""
  for t in getattr(transform, "transforms", [transform]):
    yield t
    for branch in getattr(t, "branches", ()):
      yield from _steps(branch)


def test_sparse_rcnn_coco_300_builds_the_crop():
  config = sparse_config.get_config("coco_300")
  train = builder.build_transforms(config.data, train=True)
  steps = list(_steps(train))
  crops = [t for t in steps if isinstance(t, T.RandomSizeCrop)]
  assert len(crops) == 1 and crops[0].crop_size == (384, 600)
  choice = next(t for t in steps if isinstance(t, T.RandomChoice))
  assert choice.probs == (0.5, 0.5)
  pre, crop, post = choice.branches[1].transforms
  assert pre.scales == ((400, 1333), (500, 1333), (600, 1333))
  assert post.scales == choice.branches[0].scales == tuple((s, 1333) for s in range(480, 801, 32))
  # Evaluation has no crop, and the 100-proposal config none at all.
  assert not any(isinstance(t, (T.RandomSizeCrop, T.RandomChoice))
                 for t in _steps(builder.build_transforms(config.data, train=False)))
  coco = sparse_config.get_config("coco")
  assert not any(isinstance(t, (T.RandomSizeCrop, T.RandomChoice))
                 for t in _steps(builder.build_transforms(coco.data, train=True)))
  assert coco.data.group_by_aspect and not config.data.group_by_aspect

  # A generated landscape image with boxes: both branches, every output on the one canvas.
  rng = np.random.default_rng(5)
  image = rng.integers(0, 256, (240, 320, 3)).astype(np.uint8)
  boxes = random_boxes(rng, 6, size=(240, 320), min_side=10, max_side=150)
  example = Example(image=image, boxes=boxes, labels=np.arange(6, dtype=np.int32),
                    crowd=np.zeros(6, bool), difficult=np.zeros(6, bool), image_id=1)
  shapes = set()
  for i in range(16):
    out = train(T.sample_from_example(example), np.random.default_rng([0, i]))
    assert out["image"].shape == (1344, 1344, 3)
    h, w = (int(v) for v in out["image_size"])
    assert min(h, w) in range(480, 801, 32) and max(h, w) <= 1333
    b = out["boxes"][out["labels"] >= 0]
    assert np.all(b[:, 2] <= w) and np.all(b[:, 3] <= h) and np.all(b[:, :2] >= 0)
    shapes.add(round(w / h, 2))
  # The plain branch keeps the 4:3 shape; crops of 384..600 a side give others.
  assert 1.33 in shapes and len(shapes) > 1
