"""CocoEvaluator against pycocotools called directly, and against hand-worked AP values."""

import contextlib
import copy
import io
import json
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jdet.evaluation import CocoEvaluator, json_safe
from jdet.evaluation.coco import STAT_NAMES

def _annotation(ann_id, image_id, category_id, bbox, iscrowd=0):
  return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
          "area": bbox[2] * bbox[3], "iscrowd": iscrowd}


# Three images, two categories with the non-contiguous ids 1 and 7. Boxes are
# [x, y, w, h]; their areas span COCO's small (< 32**2), medium and large ranges.
GROUND_TRUTH = {
    "images": [{"id": i, "height": 100, "width": 120} for i in (3, 10, 42)],
    "categories": [{"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}],
    "annotations": [
        _annotation(1, 3, 1, [10, 10, 20, 25]),
        _annotation(2, 3, 7, [40, 20, 60, 70]),
        _annotation(3, 3, 7, [5, 60, 12, 10]),
        _annotation(4, 10, 1, [0, 0, 110, 95]),
        _annotation(5, 10, 7, [60, 50, 30, 30], iscrowd=1),
        _annotation(6, 42, 1, [30, 30, 40, 40]),
        _annotation(7, 42, 7, [70, 10, 45, 80]),
    ],
}
NAME_OF = {1: "cat", 7: "dog"}


def _xyxy(bbox):
  x, y, w, h = bbox
  return [x, y, x + w, y + h]


def _noisy_batch(rng, category_ids, k=6):
  """Jittered copies of the ground truth (some with the wrong class) plus random false positives.

  Returns the add() arrays for a batch of 4: the three images, then a filler
  row (image id 0, which the ground truth lacks) full of valid detections.
  """
  label_of = {c: i for i, c in enumerate(category_ids)}
  ids = np.array([3, 10, 42, 0], np.int32)
  boxes = np.zeros((4, k, 4), np.float32)
  scores = np.zeros((4, k), np.float32)
  labels = np.full((4, k), -1, np.int32)
  valid = np.zeros((4, k), bool)
  for b, image in enumerate(ids[:3]):
    anns = [a for a in GROUND_TRUTH["annotations"] if a["image_id"] == image]
    for j, a in enumerate(anns):
      boxes[b, j] = np.array(_xyxy(a["bbox"])) + rng.normal(0, 3, 4)
      label = label_of[a["category_id"]]
      labels[b, j] = label if rng.random() < 0.8 else 1 - label
    n = len(anns)
    extra = rng.integers(1, k - n + 1)
    for j in range(n, n + extra):
      x, y = rng.uniform(0, 80, 2)
      boxes[b, j] = [x, y, x + rng.uniform(5, 40), y + rng.uniform(5, 40)]
      labels[b, j] = rng.integers(0, 2)
    valid[b, :n + extra] = True
    scores[b, :n + extra] = rng.uniform(0.05, 1.0, n + extra)
  boxes[3], scores[3], labels[3], valid[3] = boxes[0], scores[0], np.maximum(labels[0], 0), True
  image_valid = np.array([True, True, True, False])
  return ids, boxes, scores, labels, valid, image_valid


def _reference(results, cat_ids=None):
  """pycocotools on the ground truth and a results list, with nothing in between."""
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO()
    gt.dataset = copy.deepcopy(GROUND_TRUTH)
    gt.createIndex()
    ev = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), "bbox")
    if cat_ids is not None:
      ev.params.catIds = cat_ids
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return ev.stats


def _assert_close(value, reference):
  if reference == -1:
    assert math.isnan(value)
  else:
    assert value == pytest.approx(reference, abs=1e-12)


@pytest.mark.parametrize("category_ids", [(1, 7), (7, 1)])
def test_matches_pycocotools_on_the_same_results(category_ids, capsys):
  rng = np.random.default_rng(0)
  names = [NAME_OF[c] for c in category_ids]
  ground_truth = copy.deepcopy(GROUND_TRUTH)
  evaluator = CocoEvaluator(ground_truth, category_ids=category_ids, class_names=names)
  ids, boxes, scores, labels, valid, image_valid = _noisy_batch(rng, category_ids)
  evaluator.add(ids, boxes, scores, labels, valid, image_valid)
  metrics = evaluator.evaluate()

  # The conversion written out by hand: xyxy -> xywh, label -> category id, filler row skipped.
  expected = []
  for b in range(3):
    for j in np.flatnonzero(valid[b]):
      x1, y1, x2, y2 = boxes[b, j].tolist()
      expected.append({"image_id": int(ids[b]), "category_id": category_ids[labels[b, j]],
                       "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(scores[b, j])})
  assert evaluator.results() == expected
  stats = _reference(expected)
  for name, ref in zip(STAT_NAMES, stats):
    _assert_close(metrics[name], ref)
  assert 0 < metrics["AP"] < 1  # a case where the check means something
  for cid in (1, 7):
    per_class = _reference(expected, cat_ids=[cid])
    _assert_close(metrics["per_class"][NAME_OF[cid]], per_class[0])
    _assert_close(metrics["per_class_AP50"][NAME_OF[cid]], per_class[1])
  assert metrics["per_class"]["cat"] != metrics["per_class"]["dog"]  # the mapping matters
  assert metrics["num_images"] == 3 and metrics["num_detections"] == len(expected)
  assert "Average Precision" in metrics["summary"]
  assert capsys.readouterr().out == ""  # pycocotools' printing is captured
  assert ground_truth == GROUND_TRUTH  # the caller's dict is not modified
  json.dumps(json_safe(metrics), allow_nan=False)


def _perfect(evaluator, image_ids):
  for image in image_ids:
    anns = [a for a in GROUND_TRUTH["annotations"] if a["image_id"] == image and not a["iscrowd"]]
    boxes = np.array([[_xyxy(a["bbox"]) for a in anns]], np.float32)
    labels = np.array([[[1, 7].index(a["category_id"]) for a in anns]])
    evaluator.add([image], boxes, np.ones(labels.shape), labels, np.ones(labels.shape, bool))


def test_perfect_detections_give_ap_one():
  evaluator = CocoEvaluator(GROUND_TRUTH, category_ids=[1, 7], class_names=["cat", "dog"])
  _perfect(evaluator, [3, 10, 42])
  m = evaluator.evaluate()
  for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
    assert m[name] == pytest.approx(1.0), name
  assert m["per_class"] == pytest.approx({"cat": 1.0, "dog": 1.0})


def test_subset_of_images_is_evaluated_alone():
  evaluator = CocoEvaluator(GROUND_TRUTH, category_ids=[1, 7], class_names=["cat", "dog"])
  _perfect(evaluator, [3, 42])  # image 10 is never added: its boxes are not missed
  assert evaluator.evaluate()["AP"] == pytest.approx(1.0)
  # Added with no detections, its cat is missed (its dog is a crowd box): cat recall 2/3.
  evaluator.add([10], np.zeros((1, 1, 4)), np.zeros((1, 1)), np.zeros((1, 1), int),
                np.zeros((1, 1), bool))
  m = evaluator.evaluate()
  assert m["per_class"]["dog"] == pytest.approx(1.0)
  # Precision 1 up to recall 2/3: 67 of COCO's 101 recall points (0 .. 0.66), 0 beyond.
  assert m["per_class"]["cat"] == pytest.approx(67 / 101)


def _one_image(boxes, scores, labels, gt_boxes, gt_labels):
  """A ground truth of one 100x100 image (id 5) and an evaluator fed the given detections."""
  gt = {"images": [{"id": 5, "height": 100, "width": 100}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [{"id": n + 1, "image_id": 5, "category_id": l + 1,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                         "area": (b[2] - b[0]) * (b[3] - b[1]), "iscrowd": 0}
                        for n, (b, l) in enumerate(zip(gt_boxes, gt_labels))]}
  evaluator = CocoEvaluator(gt, category_ids=[1, 2], class_names=["a", "b"])
  n = len(scores)
  evaluator.add([5], np.reshape(boxes, (1, n, 4)), [scores], [labels], np.ones((1, n), bool))
  return evaluator


def test_hand_worked_false_positive_before_true_positive():
  # One object; a false positive (score .9) ranks above the true positive (.8).
  # After the FP: recall 0, precision 0; after the TP: recall 1, precision 1/2.
  # The interpolated precision at every recall point r (the best precision at
  # recall >= r) is 1/2, so AP50 = 101 * (1/2) / 101 = 0.5; the TP is exact, so
  # every IoU threshold gives the same and AP = 0.5 too.
  e = _one_image([[60, 60, 90, 90], [10, 10, 40, 40]], [0.9, 0.8], [0, 0],
                 gt_boxes=[[10, 10, 40, 40]], gt_labels=[0])
  m = e.evaluate()
  assert m["AP50"] == pytest.approx(0.5) and m["AP"] == pytest.approx(0.5)
  assert math.isnan(m["per_class"]["b"])  # no ground truth of class b
  # A 30x30 box (area 900 < 32**2) is small: no medium or large ground truth.
  assert m["APs"] == pytest.approx(0.5) and math.isnan(m["APm"]) and math.isnan(m["APl"])


def test_hand_worked_ap50_with_101_point_interpolation():
  # Two objects; detections TP (.9), FP (.8), TP (.7): recall 1/2, 1/2, 1 and
  # precision 1, 1/2, 2/3. The envelope is 1 up to recall 1/2 and 2/3 after.
  # Of the 101 recall points 0, 0.01, .., 1, the 51 up to 0.50 get 1 and the
  # 50 above get 2/3: AP50 = (51 + 50 * 2/3) / 101 = 0.834983...
  e = _one_image([[10, 10, 40, 40], [60, 0, 90, 30], [50, 50, 90, 90]], [0.9, 0.8, 0.7],
                 [0, 0, 0], gt_boxes=[[10, 10, 40, 40], [50, 50, 90, 90]], gt_labels=[0, 0])
  m = e.evaluate()
  assert m["AP50"] == pytest.approx((51 + 50 * 2 / 3) / 101)
  assert m["per_class_AP50"]["a"] == pytest.approx((51 + 50 * 2 / 3) / 101)
  curves = e.pr_curves(iou=0.5)
  assert list(curves) == ["a"]  # class b has no ground truth, hence no curve
  recall, precision = curves["a"]
  np.testing.assert_allclose(recall, np.linspace(0, 1, 101))
  np.testing.assert_allclose(precision, [1.0] * 51 + [2 / 3] * 50)
  with pytest.raises(ValueError, match="thresholds"):
    e.pr_curves(iou=0.52)


def test_zero_detections_give_zero_ap():
  evaluator = CocoEvaluator(GROUND_TRUTH, category_ids=[1, 7], class_names=["cat", "dog"])
  evaluator.add([3, 10], np.zeros((2, 4, 4)), np.zeros((2, 4)), np.full((2, 4), -1),
                np.zeros((2, 4), bool))
  m = evaluator.evaluate()
  assert m["num_detections"] == 0 and evaluator.results() == []
  for name in ("AP", "AP50", "AP75", "AR100"):
    assert m[name] == 0.0
  assert m["per_class"] == {"cat": 0.0, "dog": 0.0}


def test_unknown_and_repeated_image_ids_are_errors():
  evaluator = CocoEvaluator(GROUND_TRUTH, category_ids=[1, 7], class_names=["cat", "dog"])
  args = (np.zeros((2, 1, 4)), np.zeros((2, 1)), np.zeros((2, 1), int), np.zeros((2, 1), bool))
  with pytest.raises(ValueError, match="image id 999 "):
    evaluator.add([3, 999], *args)
  with pytest.raises(ValueError, match="image id 3 was added twice"):
    evaluator.add([3, 3], *args)
  evaluator.add([3, 999], *args, image_valid=[True, False])  # a filler's id is not checked
  with pytest.raises(ValueError, match="image id 3 was added twice"):
    evaluator.add([10, 3], *args)
  assert evaluator.num_images == 1  # a refused batch adds nothing
  with pytest.raises(ValueError, match="label 2"):
    evaluator.add([10], np.zeros((1, 1, 4)), np.zeros((1, 1)), [[2]], [[True]])


def test_nonfinite_detections_are_dropped_and_counted():
  e = _one_image([[10, 10, 40, 40], [np.nan, 0, 5, 5]], [0.8, 0.9], [0, 0],
                 gt_boxes=[[10, 10, 40, 40]], gt_labels=[0])
  m = e.evaluate()
  assert m["num_nonfinite"] == 1 and m["num_detections"] == 1
  assert m["AP"] == pytest.approx(1.0)


def test_evaluate_needs_images():
  evaluator = CocoEvaluator(GROUND_TRUTH, category_ids=[1, 7], class_names=["cat", "dog"])
  with pytest.raises(ValueError, match="no images"):
    evaluator.evaluate()
  with pytest.raises(ValueError, match="not among"):
    CocoEvaluator(GROUND_TRUTH, category_ids=[1, 8], class_names=["cat", "dog"])
