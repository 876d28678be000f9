"""Evaluation results for people and for files: per-class tables, strict JSON.

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

import math
from typing import Any, Mapping

import numpy as np

__all__ = ["format_per_class_table", "json_safe"]


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
