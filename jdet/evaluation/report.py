"""Evaluation results for people and for files: the report, per-class tables, strict JSON.

:func:`write_report` writes every file of an evaluation (``eval.py``'s
``WORKDIR/eval/``): ``metrics.json``, ``detections.json``, the precision-recall
curves and a grid of images with their detections; :func:`report_text` is what
the program prints.

:func:`format_per_class_table` lays out ``{class_name: AP}`` as a fixed-width
text table for the terminal and logs, several (class, AP) pairs per row when
there are many classes, filled row by row as MMDetection's COCO table is::

  +-----------+-------+-----------+-------+
  | class     |    AP | class     |    AP |
  +-----------+-------+-----------+-------+
  | aeroplane | 0.712 | bicycle   | 0.801 |
  | bird      |   nan |           |       |
  +-----------+-------+-----------+-------+

The evaluators return NaN where there is nothing to measure;
:func:`json_safe` turns that into ``null`` for strict JSON readers.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["write_report", "report_text", "format_per_class_table", "json_safe"]


def write_report(out_dir: str, result, *, title: str, step: int | None, split: str,
                 seconds: float, data: Mapping[str, Any], tta: Mapping[str, Any] | None = None,
                 draw_score: float = 0.3, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> dict[str, Any]:
  """Writes an evaluation's files to ``out_dir``; returns the metrics as written.

  Files: ``metrics.json`` (the metrics of ``result``, with ``step``, ``split``,
  ``seconds``, ``tta`` and the input report ``data``), ``detections.json`` (COCO
  results, when there are COCO metrics), ``pr_curves_<kind>.png`` per metric
  kind (IoU 0.5) and ``detections.png`` (``result.examples`` with their
  detections scoring at least ``draw_score``; ``mean``/``std`` undo the
  normalisation).

  Args:
    result: a :class:`jdet.evaluation.loop.EvalResult`.
    title: the start of the plots' titles (model, step, TTA).
  """
  from jdet import viz
  metrics = dict(result.metrics, step=step, split=split, seconds=round(float(seconds), 1),
                 tta=dict(tta) if tta else None, data=dict(data))
  metrics.pop("summary", None)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(json_safe(metrics), f, indent=2, allow_nan=False)
  if result.detections is not None:
    with open(os.path.join(out_dir, "detections.json"), "w") as f:
      json.dump(json_safe(result.detections), f, allow_nan=False)
  names = result.class_names
  for kind, curves in result.pr_curves.items():
    per_class = metrics["per_class_AP50"] if kind == "coco" else metrics["VOC07_per_class"]
    plot = viz.plot_pr_curves(curves, title=f"{title}: {kind} precision-recall, IoU 0.5",
                              ap=per_class, class_names=names)
    viz.save_image(os.path.join(out_dir, f"pr_curves_{kind}.png"), plot)
  grid = viz.detection_grid(result.examples, names, score=draw_score, mean=mean, std=std)
  if grid is not None:
    viz.save_image(os.path.join(out_dir, "detections.png"), grid)
  return metrics


def report_text(metrics: Mapping[str, Any], *, summary: str = "", data_summary: str = "",
                tta: str = "", where: str = "") -> str:
  """What a person reads after an evaluation: the skipped or fixed inputs, the TTA
  settings, pycocotools' ``summary``, the per-class tables and one line of the main
  numbers (with ``where``: the step and folder)."""
  lines = []
  if data_summary:
    lines.append(f"Input skipped or fixed (distinct images or boxes):\n{data_summary}")
  if tta:
    lines.append(f"Test-time augmentation: {tta}")
  lines.append(summary)
  if "per_class" in metrics:
    lines.append(format_per_class_table(metrics["per_class"], value_name="AP"))
  if "VOC07_per_class" in metrics:
    lines.append(format_per_class_table(metrics["VOC07_per_class"], value_name="VOC07 AP"))
    lines.append(f"VOC07 mAP: {metrics['VOC07_mAP']:.4f}")
  keys = [k for k in ("AP", "AP50", "AP75", "APs", "APm", "APl") if k in metrics]
  lines.append("  ".join(f"{k} {metrics[k]:.4f}" for k in keys) + (f" ({where})" if where else ""))
  return "\n".join(lines)


def format_per_class_table(per_class: Mapping[str, float], *, columns: int = 3,
                           value_name: str = "AP", digits: int = 3) -> str:
  """A fixed-width table of class names and values, ``columns`` pairs per row.

  Args:
    per_class: ``{class_name: value}``, in the order to show; NaN prints as ``nan``.
    columns: (class, value) pairs per row; fewer when there are fewer classes.
    value_name: the header of the value columns (``"AP"``, ``"AP50"``, ...).
    digits: decimals of the values.
  Returns:
    the table as lines joined by newlines, without a trailing newline; rows
    are filled left to right, then top to bottom.
  """
  if columns < 1:
    raise ValueError(f"columns must be at least 1, got {columns}")
  items = [(str(name), "nan" if value is None or math.isnan(value) else f"{value:.{digits}f}")
           for name, value in per_class.items()]
  columns = max(1, min(columns, len(items)))
  name_w = max([len("class")] + [len(n) for n, _ in items])
  value_w = max([len(value_name)] + [len(v) for _, v in items])
  rule = "+" + ("-" * (name_w + 2) + "+" + "-" * (value_w + 2) + "+") * columns

  def row(pairs: list[tuple[str, str]]) -> str:
    pairs = pairs + [("", "")] * (columns - len(pairs))
    return "|" + "".join(f" {n:<{name_w}} | {v:>{value_w}} |" for n, v in pairs)

  lines = [rule, row([("class", value_name)] * columns), rule]
  lines += [row(items[i:i + columns]) for i in range(0, len(items), columns)]
  lines.append(rule)
  return "\n".join(lines)


def json_safe(value: Any) -> Any:
  """``value`` with NaN and infinities as None and NumPy types as Python ones, for strict JSON.

  Dicts, lists and tuples are converted recursively (tuples become lists);
  NumPy arrays become (nested) lists.
  """
  if isinstance(value, Mapping):
    return {str(k): json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, np.ndarray):
    return json_safe(value.tolist())
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value
