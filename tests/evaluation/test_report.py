"""The evaluation report (:func:`jdet.evaluation.report.write_report`, ``report_text``): every
file ``eval.py`` writes, from an evaluation result made by hand."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest

from jdet.evaluation.loop import EvalResult
from jdet.evaluation.report import report_text, write_report

NAMES = ("cat", "dog")


def _result(*, coco: bool = True, voc: bool = False, examples: int = 3) -> EvalResult:
  rng = np.random.default_rng(0)
  recall = np.linspace(0, 1, 11)
  metrics, curves = {}, {}
  if coco:
    metrics.update(AP=0.5, AP50=0.75, AP75=0.25, APs=float("nan"), APm=0.4, APl=0.6,
                   per_class={"cat": 0.6, "dog": 0.4}, per_class_AP50={"cat": 0.8, "dog": 0.7},
                   summary="pycocotools' summary")
    curves["coco"] = {n: (recall, np.full(11, 0.5)) for n in NAMES}
  if voc:
    metrics.update(VOC07_mAP=0.7, VOC07_per_class={"cat": 0.9, "dog": 0.5})
    curves["voc"] = {n: (recall, np.full(11, 0.25)) for n in NAMES}
  drawn = [dict(image=rng.normal(size=(32, 48, 3)).astype(np.float32),
                boxes=np.array([[2, 3, 20, 30], [5, 5, 9, 9]], np.float32),
                scores=np.array([0.9, 0.1], np.float32), labels=np.array([0, 1], np.int32),
                valid=np.array([True, True]), image_id=k) for k in range(examples)]
  detections = [dict(image_id=1, category_id=3, score=0.9, bbox=[2.0, 3.0, 18.0, 27.0])]
  return EvalResult(metrics=metrics, pr_curves=curves, examples=drawn, class_names=NAMES,
                    detections=detections if coco else None)


def _png(path) -> np.ndarray:
  image = cv2.imread(str(path), cv2.IMREAD_COLOR)
  assert image is not None and image.size > 0, path
  return image


def test_every_file_with_what_it_holds(tmp_path):
  result = _result(voc=True)
  data = dict(skipped=1, fixed=2, by_reason={"a reason": 1})
  metrics = write_report(str(tmp_path / "eval"), result, title="ssd step 7", step=7, split="val",
                         seconds=1.26, data=data, tta=dict(flip=True))
  saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
  assert saved == json.loads(json.dumps(dict(metrics, APs=None)))  # NaN -> null
  assert saved["step"] == 7 and saved["split"] == "val" and saved["seconds"] == 1.3
  assert saved["tta"] == {"flip": True} and saved["data"] == data
  assert saved["per_class"] == {"cat": 0.6, "dog": 0.4} and "summary" not in saved
  assert json.loads((tmp_path / "eval" / "detections.json").read_text()) == result.detections
  coco, voc = _png(tmp_path / "eval" / "pr_curves_coco.png"), _png(tmp_path / "eval" /
                                                                  "pr_curves_voc.png")
  assert coco.shape == voc.shape and not np.array_equal(coco, voc)  # two plots
  grid = _png(tmp_path / "eval" / "detections.png")
  assert grid.shape[0] >= 2 * 32 and grid.shape[1] >= 2 * 48  # 3 examples: a 2 x 2 grid


def test_without_coco_metrics_or_examples_only_what_exists(tmp_path):
  write_report(str(tmp_path), _result(coco=False, voc=True, examples=0), title="t", step=None,
               split="val", seconds=0.0, data={})
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "pr_curves_voc.png"]


@pytest.mark.parametrize("score, boxes_drawn", [(0.0, 2), (0.5, 1), (0.95, 0)])
def test_the_grid_draws_the_detections_above_the_score(tmp_path, score, boxes_drawn):
  result = _result(examples=1)
  result.examples[0].update(image=np.zeros((64, 96, 3), np.float32),
                            boxes=np.array([[4, 6, 30, 60], [60, 6, 90, 60]], np.float32))
  write_report(str(tmp_path), result, title="t", step=1, split="val", seconds=0.0, data={},
               draw_score=score, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
  grid = _png(tmp_path / "detections.png")
  assert grid.shape[:2] == (64, 96)
  # Box edges are drawn over the black image: the boxes' left edges at x = 4 and x = 60,
  # below where their captions go.
  drawn = [bool(grid[30:55, x].any()) for x in (4, 60)]
  assert sum(drawn) == boxes_drawn and (boxes_drawn == 0 or drawn[0])


def test_report_text_has_the_tables_and_the_main_line():
  metrics = dict(_result(voc=True).metrics)
  text = report_text(metrics, summary="SUMMARY", data_summary="  a reason: 1", tta="flip",
                     where="step 7, eval")
  lines = text.splitlines()
  assert lines[0] == "Input skipped or fixed (distinct images or boxes):"
  assert "Test-time augmentation: flip" in lines and "SUMMARY" in lines
  assert "VOC07 mAP: 0.7000" in lines
  assert sum("cat" in line for line in lines) == 2  # the COCO and the VOC table
  assert lines[-1] == ("AP 0.5000  AP50 0.7500  AP75 0.2500  APs nan  APm 0.4000  APl 0.6000 "
                       "(step 7, eval)")
  assert math.isnan(metrics["APs"])
