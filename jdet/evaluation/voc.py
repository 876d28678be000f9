"""Pascal VOC mean AP in NumPy, from the same COCO-format ground truth as COCO AP.

:class:`VocEvaluator` is fed exactly like :class:`jdet.evaluation.CocoEvaluator`
(same constructor arguments, same :meth:`~VocEvaluator.add`) and computes the
VOC devkit's per-class AP at one IoU threshold, by default VOC2007's
11-point AP at IoU 0.5. It does not use pycocotools: COCO's matching differs
(101 recall points, its own treatment of crowd boxes), and VOC numbers are
what VOC papers report.

Matching, per class, as the devkit's ``voc_eval.py`` does it:

1. All detections of the class, over all evaluated images, are sorted by score,
   highest first (a stable sort: ties keep the order in which they were added;
   the devkit's unstable sort may order ties differently).
2. Each detection is compared with the ground-truth boxes of its class in its
   image, difficult ones included, and takes the one of highest IoU (the first
   of equal ones). If that IoU is not above ``match_iou`` (strictly
   greater, as in the devkit), the detection is a false positive. Otherwise,
   if that box is *difficult* (``iscrowd=1`` in the COCO-format dict, which is
   how VOC sources mark difficult objects), the detection is ignored: neither
   a true nor a false positive. Otherwise it is a true positive if the box was
   not matched before, and a false positive (a duplicate) if it was. A
   duplicate does not move on to the next-best box.
3. Recall is the running number of true positives over the number of
   non-difficult boxes of the class; precision is true over true plus false
   positives; :func:`voc_ap` turns the curve into AP. (Ignored detections are
   left out of the curve; the devkit keeps them as points that repeat the
   previous recall, which gives the same AP.)

Differences from the 2007 devkit, on purpose:

* **Coordinates are continuous.** The devkit counts pixels inclusively and adds
  1 to widths and heights (``x2 - x1 + 1``); jdet's boxes are continuous
  ``[x1, y1, x2, y2]`` (VOC's ``xmin - 1 .. xmax``, see
  :mod:`jdet.data.voc`), so IoU is plain area over area, without the +1. IoUs
  of small boxes differ slightly from the devkit's.
* **The 11 recall points are exactly k/10.** The devkit's
  ``np.arange(0., 1.1, 0.1)`` gives 0.30000000000000004 (and likewise at 0.6
  and 0.7), so a recall of exactly 3/10 does not reach its "0.3"; here it does.

A class with no non-difficult ground truth in the evaluated images has AP NaN
and is left out of the mean (as MMDetection does). Only images given to
:meth:`~VocEvaluator.add` are evaluated, as with COCO; annotations of
categories not in ``category_ids`` are left out.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from jdet.evaluation.coco import DetectionStore, check_classes

__all__ = ["VocEvaluator", "voc_ap"]

# Recall points at which pr_curves() samples precision, as COCO's.
_RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def voc_ap(recall, precision, *, use_07_metric: bool) -> float:
  """Average precision of one class from its precision-recall curve.

  Args:
    recall: ``[N]`` non-decreasing recall after each detection (in score order).
    precision: ``[N]`` precision after each detection.
    use_07_metric: VOC2007's 11-point AP: the mean over ``t = 0, 0.1, ..., 1``
      of the highest precision at a recall ``>= t`` (0 where recall never
      reaches ``t``). Otherwise (VOC2010 on) the area under the monotone
      envelope: precision replaced by the highest precision at any higher
      recall, integrated over recall from 0 to the last recall.
  Returns:
    AP in ``[0, 1]``; 0 for an empty curve.
  """
  rec = np.asarray(recall, np.float64).reshape(-1)
  prec = np.asarray(precision, np.float64).reshape(-1)
  if rec.shape != prec.shape:
    raise ValueError(f"recall {rec.shape} and precision {prec.shape} differ in length")
  if not rec.size:
    return 0.0
  if use_07_metric:
    thresholds = np.arange(11) / 10  # exactly k/10, see the module notes
    reached = rec[None, :] >= thresholds[:, None]  # [11, N]
    return float(np.where(reached, prec[None, :], 0.0).max(axis=1).mean())
  mrec = np.concatenate([[0.0], rec, [1.0]])
  mpre = np.concatenate([[0.0], prec, [0.0]])
  mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # the envelope: best precision to the right
  steps = np.flatnonzero(mrec[1:] != mrec[:-1])
  return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU of continuous ``[x1, y1, x2, y2]`` boxes (no +1): ``[N, 4], [M, 4] -> [N, M]``."""
  wh = np.clip(np.minimum(a[:, None, 2:], b[None, :, 2:])
               - np.maximum(a[:, None, :2], b[None, :, :2]), 0.0, None)  # [N, M, 2]
  inter = wh[..., 0] * wh[..., 1]
  area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0.0, None), axis=1)
  area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0.0, None), axis=1)
  union = area_a[:, None] + area_b[None, :] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _interpolate(recall: np.ndarray, precision: np.ndarray) -> np.ndarray:
  """Precision at :data:`_RECALL_POINTS` as COCO samples it: envelope at the first recall >= r."""
  out = np.zeros(len(_RECALL_POINTS))
  if not len(recall):
    return out
  envelope = np.maximum.accumulate(precision[::-1])[::-1]
  at = np.searchsorted(recall, _RECALL_POINTS, side="left")
  reached = at < len(recall)
  out[reached] = envelope[at[reached]]
  return out


class VocEvaluator:
  """Pascal VOC mean AP of detections added batch by batch (see the module notes).

  Args:
    ground_truth: COCO-format dict (``images``, ``annotations`` with ``bbox``
      ``[x, y, w, h]``, ``category_id``, ``iscrowd`` = difficult); not modified.
    category_ids: ``category_ids[label]`` is the dataset's category id of the
      contiguous label ``label``.
    class_names: the name of each label.
    match_iou: a detection matches a box when their IoU is above this.
    use_07_metric: 11-point AP (VOC2007) or area AP (VOC2010 on); see :func:`voc_ap`.
  """

  def __init__(self, ground_truth: dict, *, category_ids: Sequence[int],
               class_names: Sequence[str], match_iou: float = 0.5,
               use_07_metric: bool = True):
    self.category_ids, self.class_names = check_classes(category_ids, class_names)
    if not 0.0 <= match_iou < 1.0:
      raise ValueError(f"match_iou must be in [0, 1), got {match_iou}")
    self.match_iou = float(match_iou)
    self.use_07_metric = bool(use_07_metric)
    for key in ("images", "annotations"):
      if key not in ground_truth:
        raise ValueError(f"the ground truth has no {key!r}: expected a COCO-format dict")
    image_ids = [int(im["id"]) for im in ground_truth["images"]]
    known = set(image_ids)
    label_of = {cid: k for k, cid in enumerate(self.category_ids)}
    rows = []
    for a in ground_truth["annotations"]:
      label = label_of.get(int(a["category_id"]))
      if label is None:
        continue  # a category the model does not predict
      image = int(a["image_id"])
      if image not in known:
        raise ValueError(f"annotation {a.get('id')!r} refers to image id {image}, "
                         "which is not among the ground truth's images")
      x, y, w, h = (float(v) for v in a["bbox"])
      rows.append((image, x, y, x + w, y + h, label, bool(a.get("iscrowd", 0))))
    order = sorted(range(len(rows)), key=lambda n: rows[n][0])  # group boxes by image
    rows = [rows[n] for n in order]
    self._gt_image = np.array([r[0] for r in rows], np.int64)  # [G]
    self._gt_boxes = np.array([r[1:5] for r in rows], np.float64).reshape(-1, 4)  # [G, 4]
    self._gt_labels = np.array([r[5] for r in rows], np.int64)  # [G]
    self._gt_difficult = np.array([r[6] for r in rows], bool)  # [G]
    firsts, starts = np.unique(self._gt_image, return_index=True)
    ends = np.append(starts[1:], len(rows))
    self._gt_of = {int(i): np.arange(s, e) for i, s, e in zip(firsts, starts, ends)}
    self._store = DetectionStore(image_ids, len(self.category_ids))
    self._curves: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

  def add(self, image_ids, boxes, scores, labels, valid, image_valid=None) -> None:
    """Adds one batch of detections; as :meth:`jdet.evaluation.CocoEvaluator.add`."""
    self._store.add(image_ids, boxes, scores, labels, valid, image_valid)

  @property
  def num_images(self) -> int:
    """Number of images added so far."""
    return len(self._store.image_ids)

  def _best_matches(self, image_ids, boxes, labels) -> tuple[np.ndarray, np.ndarray]:
    """For each detection, its best IoU with a box of its class in its image, and that box.

    Returns:
      ``(iou [N] float64, box [N] int64)``; -1 and -1 where the image has no
      box of the detection's class.
    """
    n = len(image_ids)
    best_iou, best_box = np.full(n, -1.0), np.full(n, -1, np.int64)
    by_image = np.argsort(image_ids, kind="stable")
    images, starts = np.unique(image_ids[by_image], return_index=True)
    for image, dets in zip(images, np.split(by_image, starts[1:])):
      gt = self._gt_of.get(int(image))
      if gt is None:
        continue
      iou = _pairwise_iou(boxes[dets], self._gt_boxes[gt])  # [D, G]
      iou = np.where(labels[dets, None] == self._gt_labels[None, gt], iou, -1.0)
      j = iou.argmax(axis=1)  # the first of equal IoUs, as the devkit
      best_iou[dets] = iou[np.arange(len(dets)), j]
      best_box[dets] = np.where(best_iou[dets] >= 0, gt[j], -1)
    return best_iou, best_box

  def evaluate(self) -> dict:
    """VOC AP of each class over the images added so far, and their mean.

    Returns:
      dict with ``mAP`` (mean over the classes with ground truth; NaN if
      none), ``per_class`` (``{class_name: AP}``, NaN for a class without
      non-difficult ground truth), ``num_images``, ``num_detections`` and
      ``num_nonfinite`` (dropped detections).
    Raises:
      ValueError: if no image was added.
    """
    if not self._store.image_ids:
      raise ValueError("no images were added: nothing to evaluate")
    image_ids, boxes, scores, labels = self._store.arrays()
    best_iou, best_box = self._best_matches(image_ids, boxes, labels)
    evaluated = np.isin(self._gt_image, np.asarray(self._store.image_ids, np.int64))
    per_class, curves = {}, {}
    for label, name in enumerate(self.class_names):
      positives = int(np.sum(evaluated & (self._gt_labels == label) & ~self._gt_difficult))
      dets = np.flatnonzero(labels == label)
      dets = dets[np.argsort(-scores[dets], kind="stable")]  # highest score first
      hit = best_iou[dets] > self.match_iou
      box = best_box[dets]
      ignored = np.zeros(len(dets), bool)
      ignored[hit] = self._gt_difficult[box[hit]]
      candidates = np.flatnonzero(hit & ~ignored)
      # A box's first (highest-scoring) candidate is a true positive, later ones duplicates.
      _, first = np.unique(box[candidates], return_index=True)
      tp = np.zeros(len(dets), bool)
      tp[candidates[first]] = True
      tp = tp[~ignored]  # ignored detections are neither true nor false positives
      if positives == 0:
        per_class[name] = math.nan
        continue
      true_pos = np.cumsum(tp)
      false_pos = np.cumsum(~tp)
      recall = true_pos / positives
      precision = true_pos / np.maximum(true_pos + false_pos, np.finfo(np.float64).eps)
      per_class[name] = voc_ap(recall, precision, use_07_metric=self.use_07_metric)
      curves[name] = (recall, precision)
    self._curves = curves
    measured = [v for v in per_class.values() if not math.isnan(v)]
    return dict(mAP=float(np.mean(measured)) if measured else math.nan, per_class=per_class,
                num_images=len(self._store.image_ids), num_detections=len(image_ids),
                num_nonfinite=self._store.num_nonfinite)

  def pr_curves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Precision-recall curves of the last :meth:`evaluate`, sampled like COCO's.

    Returns:
      ``{class_name: (recall [101], precision [101])}`` float64, recall
      ``0, 0.01, ..., 1`` and the envelope precision at the first point of the
      curve with at least that recall (0 beyond the highest recall reached),
      for each class with ground truth, in label order.
    """
    if self._curves is None:
      raise RuntimeError("call evaluate() before pr_curves()")
    return {name: (_RECALL_POINTS.copy(), _interpolate(rec, prec))
            for name, (rec, prec) in self._curves.items()}
