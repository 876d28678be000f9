"""Evaluation of detections: COCO AP through pycocotools, Pascal VOC AP in NumPy.

Both evaluators take the COCO-format ground truth of a source
(:meth:`jdet.data.records.DetectionSource.coco_ground_truth`), the category id
of each contiguous label and the class names, and are fed the padded
detections of ``predict`` batch by batch with :meth:`add`::

  evaluator = CocoEvaluator(gt, category_ids=ids, class_names=names)
  evaluator.add(image_ids, boxes, scores, labels, valid, image_valid)  # per batch
  metrics = evaluator.evaluate()
  print(format_per_class_table(metrics["per_class"]))

Only the images added are evaluated. Values with nothing to measure (no
ground truth) are NaN; :func:`json_safe` makes them ``null`` for strict JSON.

Test-time augmentation (several scales and flips, one merge) for
single-stage detectors is :mod:`jdet.evaluation.tta`: :class:`TTASettings`
and :func:`make_tta_predict_fn`, a ``predict_fn`` for
:func:`jdet.evaluation.loop.evaluate_split`.
"""

from __future__ import annotations

from jdet.evaluation.coco import CocoEvaluator
from jdet.evaluation.report import format_per_class_table, json_safe
from jdet.evaluation.tta import TTASettings, make_tta_predict_fn
from jdet.evaluation.voc import VocEvaluator, voc_ap

__all__ = ["CocoEvaluator", "VocEvaluator", "voc_ap", "format_per_class_table", "json_safe",
           "TTASettings", "make_tta_predict_fn"]
