"""COCO box AP with pycocotools, fed batch by batch with fixed-size detections.

:class:`CocoEvaluator` takes the ground truth as the COCO-format dict that every
source gives (:meth:`jdet.data.records.DetectionSource.coco_ground_truth`) and
the detections as the padded ``[B, K]`` arrays that ``predict`` returns, moved
to the host. It converts them to COCO results (``bbox`` ``[x, y, w, h]`` in
original-image pixels, the dataset's ``category_id``, a float ``score``) and
runs pycocotools' ``COCOeval`` for boxes, so the numbers are COCO's own.

Conventions
-----------
* **Which images count.** Only the images given to :meth:`CocoEvaluator.add`
  are evaluated (``params.imgIds`` is set to them): evaluating the first 500
  images of val2017 gives the AP of those 500 images, and ground truth of
  images never added is neither missed nor counted. Filler images that
  complete the last batch (``image_valid`` False) are skipped entirely; their
  ids are not even looked at.
* **Which classes count.** ``params.catIds`` is set to ``category_ids``: AP is
  the mean over the model's classes, also when the ground truth has more
  categories (a model trained on a subset of the classes).
* **No ground truth.** COCOeval writes -1 for an AP or AR that has no ground
  truth to measure against (no object of that area range, a class absent from
  the evaluated images). Here that is NaN, in the summary numbers and in the
  per-class ones alike, so that it is never averaged in as a number by
  accident. ``json.dump`` writes it as ``NaN``, which Python reads back; use
  :func:`jdet.evaluation.json_safe` for strict JSON (``null``).
* **No detections.** With no detection at all, every AP with ground truth is 0
  (pycocotools' ``loadRes`` cannot load an empty list, so an empty result set
  is built directly).
* **Bad detections.** A valid detection with a NaN or infinite box or score
  (a diverging model during periodic evaluation) is dropped, counted in
  ``num_nonfinite`` and logged, rather than crashing the run. A valid
  detection whose label is outside the classes raises ``ValueError``.
* **Printing.** pycocotools prints as it works; that output is captured (with
  ``contextlib.redirect_stdout``, which is process-wide for the short time it
  runs) and the summary table comes back under ``"summary"``.

Example::

  evaluator = CocoEvaluator(source.coco_ground_truth(),
                            category_ids=[source.category_id(k) for k in range(n)],
                            class_names=source.class_names)
  for batch in batches:
    det = jax.device_get(predict(batch))
    evaluator.add(batch["image_id"], det.boxes, det.scores, det.labels, det.valid,
                  batch["valid"])
  metrics = evaluator.evaluate()      # {"AP": 0.41, "AP50": ..., "per_class": {...}, ...}
  json.dump(evaluator.results(), f)   # detections.json
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
from typing import Iterable, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["CocoEvaluator", "DetectionStore", "check_classes", "STAT_NAMES"]

log = logging.getLogger("jdet.evaluation")

# COCOeval.stats, in its order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class DetectionStore:
  """Detections gathered batch by batch and checked against the ground truth's images.

  Shared by :class:`CocoEvaluator` and :class:`jdet.evaluation.voc.VocEvaluator`:
  it keeps the valid, finite detections of the images added, as flat arrays.

  Args:
    image_ids: every image id of the ground truth.
    num_classes: number of contiguous labels ``0 .. num_classes-1``.
  """

  def __init__(self, image_ids: Iterable[int], num_classes: int):
    self.known = frozenset(int(i) for i in image_ids)
    self.num_classes = int(num_classes)
    self.image_ids: list[int] = []  # the images added, in order
    self.num_nonfinite = 0  # valid detections dropped for a NaN or infinite value
    self._added: set[int] = set()
    self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

  def add(self, image_ids, boxes, scores, labels, valid, image_valid=None) -> None:
    """Adds one batch; checks everything before keeping anything.

    Args:
      image_ids: ``[B]`` int, the dataset's image ids.
      boxes: ``[B, K, 4]`` float ``[x1, y1, x2, y2]`` in original-image pixels.
      scores: ``[B, K]`` float.
      labels: ``[B, K]`` int contiguous labels.
      valid: ``[B, K]`` bool, False where padded.
      image_valid: optional ``[B]`` bool, False for filler images (skipped).
    Raises:
      ValueError: on mismatched shapes, an image id that is not in the ground
        truth or that was added before, or a valid detection with a label
        outside ``0 .. num_classes-1``.
    """
    ids = np.asarray(image_ids).reshape(-1)
    b = len(ids)
    boxes = np.asarray(boxes, np.float64)
    if boxes.ndim != 3 or boxes.shape[0] != b or boxes.shape[2] != 4:
      raise ValueError(f"boxes must be [B={b}, K, 4], got shape {boxes.shape}")
    k = boxes.shape[1]
    arrays = {}
    for name, value, dtype in (("scores", scores, np.float64), ("labels", labels, np.int64),
                               ("valid", valid, bool)):
      a = np.asarray(value)
      if a.shape != (b, k):
        raise ValueError(f"{name} must be [B={b}, K={k}] like boxes, got shape {a.shape}")
      arrays[name] = a.astype(dtype)
    if image_valid is None:
      keep_image = np.ones(b, bool)
    else:
      keep_image = np.asarray(image_valid, bool).reshape(-1)
      if keep_image.shape != (b,):
        raise ValueError(f"image_valid must be [B={b}], got shape {keep_image.shape}")

    kept_ids = [int(i) for i in ids[keep_image]]
    seen: set[int] = set()
    for i in kept_ids:
      if i not in self.known:
        raise ValueError(f"image id {i} is not in the ground truth")
      if i in self._added or i in seen:
        raise ValueError(f"image id {i} was added twice")
      seen.add(i)

    valid = arrays["valid"] & keep_image[:, None]  # [B, K]
    labels = arrays["labels"]
    bad = valid & ((labels < 0) | (labels >= self.num_classes))
    if bad.any():
      row, col = np.argwhere(bad)[0]
      raise ValueError(f"image id {int(ids[row])}: valid detection {col} has label "
                       f"{labels[row, col]}, outside 0..{self.num_classes - 1}")
    finite = np.isfinite(boxes).all(axis=-1) & np.isfinite(arrays["scores"])
    nonfinite = int((valid & ~finite).sum())
    if nonfinite:
      log.warning("dropped %d valid detections with NaN or infinite boxes or scores", nonfinite)
      self.num_nonfinite += nonfinite
    valid &= finite

    rows, cols = np.nonzero(valid)  # row-major: image by image, in K order
    self._parts.append((ids[rows].astype(np.int64), boxes[rows, cols], arrays["scores"][rows, cols],
                        labels[rows, cols]))
    self.image_ids.extend(kept_ids)
    self._added.update(kept_ids)

  def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All kept detections, in the order added.

    Returns:
      ``(image_ids [N] int64, boxes [N, 4] float64 xyxy, scores [N] float64,
      labels [N] int64)``.
    """
    if not self._parts:
      return (np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))
    return tuple(np.concatenate(p) for p in zip(*self._parts))  # type: ignore[return-value]

  def __len__(self) -> int:
    return sum(len(p[0]) for p in self._parts)


def check_classes(category_ids: Sequence[int], class_names: Sequence[str]
                  ) -> tuple[tuple[int, ...], tuple[str, ...]]:
  """``category_ids`` and ``class_names`` as tuples, checked to be unique and of one length."""
  ids = tuple(int(c) for c in category_ids)
  names = tuple(str(n) for n in class_names)
  if len(ids) != len(names):
    raise ValueError(f"{len(ids)} category ids but {len(names)} class names")
  if not ids:
    raise ValueError("no classes given")
  if len(set(ids)) != len(ids):
    raise ValueError(f"category ids repeat: {list(ids)}")
  if len(set(names)) != len(names):
    raise ValueError(f"class names repeat: {list(names)}")
  return ids, names


def _ground_truth_api(ground_truth: dict) -> COCO:
  """A pycocotools ``COCO`` over a copy of ``ground_truth`` (COCOeval writes into annotations)."""
  for key in ("images", "annotations", "categories"):
    if key not in ground_truth:
      raise ValueError(f"the ground truth has no {key!r}: expected a COCO-format dict")
  annotations = []
  for n, a in enumerate(ground_truth["annotations"]):
    a = dict(a)
    a.setdefault("id", n + 1)
    a.setdefault("iscrowd", 0)
    if "area" not in a:
      a["area"] = float(a["bbox"][2]) * float(a["bbox"][3])
    annotations.append(a)
  dataset = dict(ground_truth, images=[dict(im) for im in ground_truth["images"]],
                 annotations=annotations, categories=copy.deepcopy(ground_truth["categories"]))
  coco = COCO()
  coco.dataset = dataset
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def _nan_if_absent(value: float) -> float:
  """COCOeval's -1 ("nothing to measure") as NaN; anything else as a float."""
  return math.nan if value < 0 else float(value)


def _mean_valid(precision: np.ndarray) -> float:
  """Mean of the entries > -1, as COCOeval.summarize averages; NaN when there are none."""
  kept = precision[precision > -1]
  return float(kept.mean()) if kept.size else math.nan


class CocoEvaluator:
  """COCO box AP of detections added batch by batch (see the module notes).

  Args:
    ground_truth: COCO-format dict (``images``, ``annotations``,
      ``categories``) with the dataset's image and category ids; not modified.
    category_ids: ``category_ids[label]`` is the dataset's category id of the
      contiguous label ``label``; each must be among the ground truth's
      categories.
    class_names: the name of each label, for the per-class results.
  """

  def __init__(self, ground_truth: dict, *, category_ids: Sequence[int],
               class_names: Sequence[str]):
    self.category_ids, self.class_names = check_classes(category_ids, class_names)
    self._gt = _ground_truth_api(ground_truth)
    missing = sorted(set(self.category_ids) - set(self._gt.getCatIds()))
    if missing:
      raise ValueError(f"category ids {missing} are not among the ground truth's categories")
    self._store = DetectionStore(self._gt.getImgIds(), len(self.category_ids))
    self._eval: COCOeval | None = None

  def add(self, image_ids, boxes, scores, labels, valid, image_valid=None) -> None:
    """Adds one batch of detections (host arrays or array-likes).

    Args:
      image_ids: ``[B]`` int, the dataset's image ids.
      boxes: ``[B, K, 4]`` ``[x1, y1, x2, y2]`` in original-image pixels.
      scores: ``[B, K]``.
      labels: ``[B, K]`` contiguous labels.
      valid: ``[B, K]`` bool, False where padded.
      image_valid: optional ``[B]`` bool, False for filler images, which are
        skipped entirely.
    Raises:
      ValueError: an image id not in the ground truth or added before (naming
        it), mismatched shapes, or a valid detection with an unknown label.
    """
    self._store.add(image_ids, boxes, scores, labels, valid, image_valid)

  @property
  def num_images(self) -> int:
    """Number of images added so far."""
    return len(self._store.image_ids)

  def results(self) -> list[dict]:
    """The detections as a COCO results list (what ``detections.json`` holds).

    Returns:
      one dict per detection, image by image in the order added:
      ``{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}``.
    """
    image_ids, boxes, scores, labels = self._store.arrays()
    xywh = boxes.copy()
    xywh[:, 2:] -= xywh[:, :2]
    categories = np.asarray(self.category_ids, np.int64)[labels]
    return [dict(image_id=i, category_id=c, bbox=b, score=s)
            for i, c, b, s in zip(image_ids.tolist(), categories.tolist(), xywh.tolist(),
                                  scores.tolist())]

  def evaluate(self) -> dict:
    """Runs COCOeval (bbox) on the images added so far.

    Returns:
      dict with the floats ``AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100,
      ARs, ARm, ARl`` (COCOeval's stats; NaN where COCO gives -1),
      ``per_class`` and ``per_class_AP50`` (``{class_name: float}``: AP at IoU
      .50:.95 and at .50, area "all", 100 detections; NaN for a class without
      ground truth in these images), ``num_images``, ``num_detections``,
      ``num_nonfinite`` (dropped detections) and ``summary`` (COCOeval's
      printed table).
    Raises:
      ValueError: if no image was added.
    """
    if not self._store.image_ids:
      raise ValueError("no images were added: nothing to evaluate")
    results = self.results()
    with contextlib.redirect_stdout(io.StringIO()):
      if results:
        detections = self._gt.loadRes(results)
      else:  # loadRes cannot take an empty list
        detections = COCO()
        detections.dataset = dict(images=list(self._gt.dataset["images"]), annotations=[],
                                  categories=copy.deepcopy(self._gt.dataset["categories"]))
        detections.createIndex()
      ev = COCOeval(self._gt, detections, iouType="bbox")
      ev.params.imgIds = sorted(self._store.image_ids)
      ev.params.catIds = sorted(self.category_ids)
      ev.evaluate()
      ev.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
      ev.summarize()
    self._eval = ev

    metrics: dict = {name: _nan_if_absent(v) for name, v in zip(STAT_NAMES, ev.stats)}
    p = ev.params
    all_area = p.areaRngLbl.index("all")
    t50 = int(np.flatnonzero(np.isclose(p.iouThrs, 0.5))[0])
    precision = ev.eval["precision"][:, :, :, all_area, -1]  # [T, R, K], maxDets 100
    order = list(p.catIds)  # COCOeval sorts the category ids
    metrics["per_class"], metrics["per_class_AP50"] = {}, {}
    for name, cid in zip(self.class_names, self.category_ids):
      k = order.index(cid)
      metrics["per_class"][name] = _mean_valid(precision[:, :, k])
      metrics["per_class_AP50"][name] = _mean_valid(precision[t50, :, k])
    metrics.update(num_images=len(self._store.image_ids), num_detections=len(results),
                   num_nonfinite=self._store.num_nonfinite, summary=summary.getvalue())
    return metrics

  def pr_curves(self, iou: float = 0.5) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Precision-recall curves of the last :meth:`evaluate`, area "all", 100 detections.

    Args:
      iou: one of COCOeval's IoU thresholds (0.5, 0.55, ..., 0.95).
    Returns:
      ``{class_name: (recall [101], precision [101])}`` float64, recall
      ``0, 0.01, ..., 1`` and COCO's interpolated precision there (0 beyond
      the highest recall reached), for each class with ground truth in the
      evaluated images, in label order.
    """
    if self._eval is None:
      raise RuntimeError("call evaluate() before pr_curves()")
    p = self._eval.params
    t = np.flatnonzero(np.isclose(p.iouThrs, iou))
    if not t.size:
      raise ValueError(f"iou {iou} is not one of COCOeval's thresholds {np.round(p.iouThrs, 2)}")
    precision = self._eval.eval["precision"][t[0], :, :, p.areaRngLbl.index("all"), -1]  # [R, K]
    order = list(p.catIds)
    curves = {}
    for name, cid in zip(self.class_names, self.category_ids):
      column = precision[:, order.index(cid)]
      if (column > -1).all():
        curves[name] = (np.array(p.recThrs, np.float64), column.astype(np.float64))
    return curves
