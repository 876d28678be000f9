"""VOC AP on hand-computed curves and hand-worked detection cases."""

import math

import numpy as np
import pytest

from jdet.evaluation import VocEvaluator, voc_ap

# The TP, FP, TP curve of two objects: recall 1/2, 1/2, 1 and precision 1, 1/2, 2/3.
RECALL, PRECISION = [0.5, 0.5, 1.0], [1.0, 0.5, 2 / 3]
# 11 points: t = 0 .. 0.5 (6 points) reach precision 1, t = 0.6 .. 1 (5 points) 2/3.
AP07 = (6 * 1 + 5 * 2 / 3) / 11
# Area under the envelope: recall 0 .. 1/2 at precision 1, 1/2 .. 1 at 2/3.
AP_AREA = 0.5 * 1 + 0.5 * 2 / 3


def test_voc_ap_on_hand_computed_curves():
  assert voc_ap(RECALL, PRECISION, use_07_metric=True) == pytest.approx(AP07)
  assert voc_ap(RECALL, PRECISION, use_07_metric=False) == pytest.approx(AP_AREA)
  # Recall stops at 0.4: 11 points t = 0, .1, .2 get 1, t = .3, .4 get 1/2, the other six 0.
  assert voc_ap([0.2, 0.4], [1.0, 0.5], use_07_metric=True) == pytest.approx((3 + 2 * 0.5) / 11)
  # Area: 0.2 * 1 + 0.2 * 1/2; nothing beyond the last recall.
  assert voc_ap([0.2, 0.4], [1.0, 0.5], use_07_metric=False) == pytest.approx(0.3)
  # A dip is filled by the envelope: precision .5 at recall .5 counts as the later .8.
  assert voc_ap([0.25, 0.5, 1.0], [1.0, 0.5, 0.8], use_07_metric=False) == pytest.approx(
      0.25 * 1 + 0.75 * 0.8)
  assert voc_ap([], [], use_07_metric=True) == 0.0 and voc_ap([], [], use_07_metric=False) == 0.0


def test_voc07_recall_points_are_exactly_tenths():
  # Recall exactly 3/10 reaches the point 0.3 (the devkit's 0.30000000000000004 it would miss).
  assert voc_ap([0.1, 0.2, 0.3], [1.0, 1.0, 1.0], use_07_metric=True) == pytest.approx(4 / 11)


def _ground_truth(boxes, labels, difficult=None, images=None):
  """COCO-format ground truth of ``boxes`` (xyxy): category ``label + 1``, iscrowd = difficult."""
  n = len(boxes)
  difficult = difficult or [False] * n
  images = images or [1] * n
  image_ids = sorted(set(images) | {1, 2})
  return {"images": [{"id": i, "height": 100, "width": 100} for i in image_ids],
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
          "annotations": [{"id": k + 1, "image_id": i, "category_id": l + 1,
                           "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "iscrowd": int(d)}
                          for k, (b, l, d, i) in enumerate(zip(boxes, labels, difficult, images))]}


def _add(evaluator, image, boxes, scores, labels):
  n = len(scores)
  evaluator.add([image], np.reshape(np.asarray(boxes, np.float32), (1, n, 4)), [scores], [labels],
                np.ones((1, n), bool))


A, B, FAR = [10, 10, 40, 40], [50, 50, 90, 90], [60, 0, 95, 30]


@pytest.mark.parametrize("use_07_metric", [True, False])
def test_perfect_detections_give_one(use_07_metric):
  gt = _ground_truth([A, B, FAR], [0, 1, 0], images=[1, 1, 2])
  e = VocEvaluator(gt, category_ids=[1, 2], class_names=["a", "b"], use_07_metric=use_07_metric)
  _add(e, 1, [A, B], [0.9, 0.8], [0, 1])
  _add(e, 2, [FAR], [0.7], [0])
  m = e.evaluate()
  assert m["mAP"] == pytest.approx(1.0) and m["per_class"] == pytest.approx({"a": 1.0, "b": 1.0})


@pytest.mark.parametrize("use_07_metric, expected", [(True, AP07), (False, AP_AREA)])
def test_duplicate_is_a_false_positive(use_07_metric, expected):
  # Object A in image 1, object B in image 2. Detections by score: A (.9, TP), a
  # second, shifted detection of A (.8, IoU 0.875 with A, which is taken: FP), B (.7, TP):
  # the TP, FP, TP curve above.
  gt = _ground_truth([A, B], [0, 0], images=[1, 2])
  e = VocEvaluator(gt, category_ids=[1, 2], class_names=["a", "b"], use_07_metric=use_07_metric)
  _add(e, 1, [A, [12, 10, 42, 40]], [0.9, 0.8], [0, 0])
  _add(e, 2, [B], [0.7], [0])
  m = e.evaluate()
  assert m["per_class"]["a"] == pytest.approx(expected)
  assert math.isnan(m["per_class"]["b"])  # no ground truth of b: left out of the mean
  assert m["mAP"] == pytest.approx(expected)
  recall, precision = e.pr_curves()["a"]
  assert list(e.pr_curves()) == ["a"]
  np.testing.assert_allclose(recall, np.linspace(0, 1, 101))
  np.testing.assert_allclose(precision, [1.0] * 51 + [2 / 3] * 50)


@pytest.mark.parametrize("use_07_metric", [True, False])
def test_detection_of_a_difficult_box_is_ignored(use_07_metric):
  # A is a normal object, B a difficult one. Detections by score: B (.9, ignored),
  # FAR (.85, FP), A (.8, TP). One positive (B does not count): the curve is
  # recall 0, 1 at precision 0, 1/2, so both APs are 1/2. (Were B a normal
  # object it would be TP, FP, TP: AP .85 / .83; were its detection an FP: 1/3.)
  gt = _ground_truth([A, B], [0, 0], difficult=[False, True])
  e = VocEvaluator(gt, category_ids=[1, 2], class_names=["a", "b"], use_07_metric=use_07_metric)
  _add(e, 1, [B, FAR, A], [0.9, 0.85, 0.8], [0, 0, 0])
  assert e.evaluate()["per_class"]["a"] == pytest.approx(0.5)
  # An undetected difficult box costs nothing.
  e = VocEvaluator(gt, category_ids=[1, 2], class_names=["a", "b"], use_07_metric=use_07_metric)
  _add(e, 1, [A], [0.8], [0])
  assert e.evaluate()["per_class"]["a"] == pytest.approx(1.0)


def test_iou_must_exceed_the_threshold_in_continuous_coordinates():
  gt = _ground_truth([[0, 0, 10, 10]], [0])
  # [0, 0, 5, 10] covers half of the box: IoU exactly 0.5, not above it: a false positive.
  # (With the devkit's +1 pixels it would be 6 * 11 / (11 * 11) = 0.545, a true positive.)
  e = VocEvaluator(gt, category_ids=[1, 2], class_names=["a", "b"])
  _add(e, 1, [[0, 0, 5, 10]], [0.9], [0])
  assert e.evaluate()["per_class"]["a"] == 0.0
  e = VocEvaluator(gt, category_ids=[1, 2], class_names=["a", "b"], match_iou=0.45)
  _add(e, 1, [[0, 0, 5, 10]], [0.9], [0])
  assert e.evaluate()["per_class"]["a"] == pytest.approx(1.0)


def test_wrong_class_and_unevaluated_images():
  gt = _ground_truth([A, B], [0, 1], images=[1, 2])
  e = VocEvaluator(gt, category_ids=[1, 2], class_names=["a", "b"])
  _add(e, 1, [A], [0.9], [1])  # right box, wrong class: an FP of class b
  m = e.evaluate()
  assert m["per_class"]["a"] == 0.0  # A was missed
  assert math.isnan(m["per_class"]["b"])  # image 2, with b's only object, was never added
  assert m["mAP"] == 0.0 and m["num_images"] == 1 and m["num_detections"] == 1
  with pytest.raises(ValueError, match="image id 7 "):
    e.add([7], np.zeros((1, 1, 4)), [[0.5]], [[0]], [[True]])
