"""Tests of the generated shapes dataset."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jdet.data.records import DetectionSource, Example
from jdet.data.shapes import CLASS_NAMES, ShapesSource

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _digest(source: ShapesSource, indices) -> str:
  h = hashlib.sha256()
  for i in indices:
    e = source[i]
    for a in (e.image, e.boxes, e.labels):
      h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def test_follows_the_source_protocol():
  source = ShapesSource(4)
  assert isinstance(source, DetectionSource)
  e = source[0]
  assert isinstance(e, Example)
  assert e.image.shape == (128, 128, 3) and e.image.dtype == np.uint8
  assert e.boxes.dtype == np.float32 and e.labels.dtype == np.int32
  assert e.crowd.dtype == bool and e.difficult.dtype == bool
  assert e.image_id == 1 and source[3].image_id == 4
  assert list(source.class_names) == list(CLASS_NAMES) and source.num_classes == 5
  assert [source.category_id(k) for k in range(5)] == [1, 2, 3, 4, 5]
  with pytest.raises(IndexError):
    source[4]
  with pytest.raises(IndexError):
    source[-1]
  assert len(list(iter(source))) == 4  # The sequence protocol ends at IndexError.


def test_deterministic_in_process_and_after_pickling():
  a, b = ShapesSource(10, seed=3), ShapesSource(10, seed=3)
  b[7]  # Reading other images first changes nothing.
  assert _digest(a, range(10)) == _digest(b, range(10))
  c = pickle.loads(pickle.dumps(a))
  assert _digest(a, [2, 5]) == _digest(c, [2, 5])


def test_deterministic_in_another_process():
  code = ("import sys; sys.path.insert(0, sys.argv[1]);"
          "from tests.data.test_shapes import _digest; from jdet.data.shapes import ShapesSource;"
          "print(_digest(ShapesSource(6, seed=5, split='val', image_size=(96, 160)), range(6)))")
  env = dict(os.environ, PYTHONHASHSEED="123")
  out = subprocess.run([sys.executable, "-c", code, REPO], capture_output=True, text=True,
                       env=env, check=True, timeout=120)
  here = _digest(ShapesSource(6, seed=5, split="val", image_size=(96, 160)), range(6))
  assert out.stdout.strip() == here


def test_splits_and_seeds_differ():
  train = ShapesSource(5, split="train")
  val = ShapesSource(5, split="val")
  other_seed = ShapesSource(5, split="train", seed=1)
  for i in range(5):
    assert not np.array_equal(train[i].image, val[i].image)
    assert not np.array_equal(train[i].image, other_seed[i].image)


@pytest.mark.parametrize("image_size", [128, (96, 160)])
def test_boxes_valid_and_inside(image_size):
  source = ShapesSource(60, image_size=image_size, max_objects=8)
  h, w = source.image_size
  counts = []
  for i in range(len(source)):
    e = source[i]
    assert e.image.shape == (h, w, 3)
    b = e.boxes
    assert b.shape == (len(e.labels), 4)
    assert np.all(b[:, 0] >= 0) and np.all(b[:, 1] >= 0)
    assert np.all(b[:, 2] <= w) and np.all(b[:, 3] <= h)
    assert np.all(b[:, 2] - b[:, 0] >= 2) and np.all(b[:, 3] - b[:, 1] >= 2)
    assert np.all((e.labels >= 0) & (e.labels < 5))
    assert not e.crowd.any() and not e.difficult.any()
    counts.append(len(e.labels))
    boxes, labels = source.annotations(i)
    np.testing.assert_array_equal(boxes, e.boxes)
    np.testing.assert_array_equal(labels, e.labels)
  assert min(counts) >= 1 and max(counts) <= 8 and np.mean(counts) > 3
  all_labels = np.concatenate([source[i].labels for i in range(len(source))])
  assert set(all_labels.tolist()) == set(range(5))


def test_boxes_are_the_extent_of_the_drawn_shapes():
  """Each box equals its shape's rasterised mask's bounding box within a pixel,
  and overlaps leave every object at least half visible."""
  source = ShapesSource(40, image_size=128, max_objects=8)
  occluded = 0
  for i in range(len(source)):
    e = source[i]
    full, visible = source.instance_masks(i)
    assert full.shape == visible.shape == (len(e.labels), 128, 128)
    for k, box in enumerate(e.boxes):
      ys, xs = np.nonzero(full[k])
      mask_box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
      # cv2 fills every pixel an edge touches (up to 1 px past the outline),
      # from vertices rounded to 1/16 px (1/32 px more).
      np.testing.assert_allclose(mask_box, box, atol=1.0 + 1 / 32 + 1e-4)
      assert visible[k].sum() >= 0.5 * full[k].sum()
      assert not (visible[k] & ~full[k]).any()
      occluded += visible[k].sum() < full[k].sum()
    # Visible masks do not overlap.
    assert (visible.sum(0) <= 1).all()
  assert occluded > 0  # Overlap does happen.


def test_shapes_are_painted_where_visible():
  """Inside an object's visible pixels (away from edges) the image is one
  colour plus noise; a shape is distinguishable from what surrounds it."""
  source = ShapesSource(20, image_size=128, noise=(4.0, 4.0))
  checked = 0
  for i in range(len(source)):
    e = source[i]
    _, visible = source.instance_masks(i)
    for k in range(len(e.labels)):
      core = cv2.erode(visible[k].astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
      if core.sum() < 30:
        continue
      pixels = e.image[core].astype(np.float32)
      assert pixels.std(0).max() < 12  # One colour + noise of std 4 (rims are at the edge).
      checked += 1
  assert checked > 20


def test_size_distribution_covers_coco_ranges():
  """COCO's small / medium / large areas (32**2, 96**2 pixels) all occur at 256."""
  source = ShapesSource(300, image_size=256)
  areas = np.concatenate([(b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
                          for b, _ in map(source.annotations, range(len(source)))])
  fractions = np.array([(areas < 32**2).mean(), ((areas >= 32**2) & (areas < 96**2)).mean(),
                        (areas >= 96**2).mean()])
  print("small/medium/large fractions at 256:", np.round(fractions, 3), "of", len(areas))
  assert np.all(fractions > 0.1), fractions


def test_coco_ground_truth_in_pycocotools():
  source = ShapesSource(20, image_size=256)
  gt = source.coco_ground_truth()
  coco = COCO()
  coco.dataset = gt
  coco.createIndex()
  assert sorted(coco.getImgIds()) == list(range(1, 21))
  assert sorted(coco.getCatIds()) == [1, 2, 3, 4, 5]
  assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASS_NAMES)
  total = 0
  for i in range(len(source)):
    e = source[i]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[e.image_id]))
    total += len(anns)
    xywh = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
    np.testing.assert_allclose(xywh[:, :2], e.boxes[:, :2], atol=1e-4)
    np.testing.assert_allclose(xywh[:, :2] + xywh[:, 2:], e.boxes[:, 2:], atol=1e-4)
    assert [a["category_id"] for a in anns] == (e.labels + 1).tolist()
  assert total == len(gt["annotations"])
  assert len({a["id"] for a in gt["annotations"]}) == total
  gt["images"].clear()  # A copy: the cached ground truth is unchanged.
  assert len(source.coco_ground_truth()["images"]) == 20

  # The ground truth as detections scores AP 1 in every size range.
  dets = [dict(image_id=a["image_id"], category_id=a["category_id"], bbox=a["bbox"], score=1.0)
          for a in coco.dataset["annotations"]]
  evaluator = COCOeval(coco, coco.loadRes(dets), "bbox")
  evaluator.evaluate()
  evaluator.accumulate()
  evaluator.summarize()
  ap, ap50, ap75, aps, apm, apl = evaluator.stats[:6]
  np.testing.assert_allclose([ap, ap50, ap75, aps, apm, apl], 1.0, atol=1e-6)


def test_export_coco_round_trip(tmp_path):
  source = ShapesSource(6, image_size=(64, 80), split="val")
  json_path = source.export_coco(tmp_path)
  with open(json_path) as f:
    assert json.load(f) == source.coco_ground_truth()
  coco = COCO(json_path)
  assert len(coco.getImgIds()) == 6
  assert len(coco.getAnnIds()) == sum(len(source[i].labels) for i in range(6))
  for info in coco.loadImgs(coco.getImgIds()):
    image = cv2.imread(os.path.join(tmp_path, "images", info["file_name"]), cv2.IMREAD_COLOR)
    assert image.shape == (info["height"], info["width"], 3) == (64, 80, 3)
    np.testing.assert_array_equal(image[..., ::-1], source[info["id"] - 1].image)


def test_bad_arguments():
  with pytest.raises(ValueError, match="split"):
    ShapesSource(3, split="training")
  with pytest.raises(ValueError):
    ShapesSource(3, min_objects=4, max_objects=2)
  with pytest.raises(ValueError):
    ShapesSource(3, image_size=8)


@pytest.mark.parametrize("config_module", ["ssd300", "refinedet320", "faster_rcnn_r50_fpn"])
@pytest.mark.parametrize("option, min_visible", [("", 0.75), (",min_visible=0.5", 0.5)])
def test_quickstart_variants_share_their_data(config_module, option, min_visible):
  """Every detector's ``shapes`` variant trains and evaluates on the same
  images, each object keeping ``min_visible`` of its pixels (``min_visible=``
  option), which the drawn masks obey and which a lower bound does change."""
  import importlib
  sys.path.insert(0, REPO)
  try:
    from jdet.data import builder
    config = importlib.import_module(f"configs.{config_module}").get_config("shapes" + option)
  finally:
    sys.path.remove(REPO)
  sources = {split: builder.build_source(config.data, split) for split in ("train", "val")}
  for split, source in sources.items():
    assert isinstance(source, ShapesSource) and source.split == split
    assert (source.image_size, source.min_visible) == ((128, 128), min_visible)
  val = sources["val"]
  fractions = []
  for i in range(24):
    full, visible = val.instance_masks(i)
    fractions += (visible.sum((1, 2)) / full.sum((1, 2))).tolist()
  assert min(fractions) >= min_visible
  # The bound binds: the default-0.5 split has objects below 0.75 visible.
  assert (min(fractions) < 0.75) == (min_visible < 0.75)
