"""Class names: the COCO table, and the names of a run kept beside its checkpoints.

COCO: the 80 detection categories (:data:`COCO_CATEGORY_IDS`,
:data:`COCO_CLASS_NAMES`) in id order, which is the label order of jdet's COCO
sources (label ``l`` is category ``COCO_CATEGORY_IDS[l]``), and
:func:`coco91_columns`, the columns of a 91-way head (background and the
category ids 1 .. 90, 10 of them unused, as torchvision's COCO detectors
score) that make the 81-way one jdet trains (background + 80 labels).

A run: ``train.py`` writes ``WORKDIR/class_names.json`` (``{"class_names":
[...]}``, label ``i`` is ``class_names[i]``) when it starts, from the training
data, so that whatever later reads the checkpoints
(:class:`jdet.inference.Predictor`, ``predict.py``) shows names rather than
label ids even without the data.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

__all__ = ["COCO_CATEGORY_IDS", "COCO_CLASS_NAMES", "coco91_columns", "CLASS_NAMES_FILE",
           "write_class_names", "read_class_names"]

# The 80 COCO detection categories, in id order: (id, name).
_COCO_CATEGORIES = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"),
    (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"),
    (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"),
    (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"),
    (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
    (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"),
    (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
    (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)
# Label l of a COCO source is category COCO_CATEGORY_IDS[l] named COCO_CLASS_NAMES[l].
COCO_CATEGORY_IDS = tuple(i for i, _ in _COCO_CATEGORIES)
COCO_CLASS_NAMES = tuple(name for _, name in _COCO_CATEGORIES)


def coco91_columns() -> np.ndarray:
  """``[81]`` int64: the columns of a 91-way COCO head (0 background, then category
  ids 1 .. 90) that give the 81-way one: background, then the 80 labels in order
  (``(0, 1, 2, ..., 88, 89, 90)`` without the 10 unused ids)."""
  return np.asarray((0,) + COCO_CATEGORY_IDS)


CLASS_NAMES_FILE = "class_names.json"


def write_class_names(workdir: str | os.PathLike, names: Sequence[str]) -> str:
  """Writes ``names`` (in label order) to ``workdir/class_names.json``, atomically.

  Returns the path written."""
  path = os.path.join(os.fspath(workdir), CLASS_NAMES_FILE)
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump({"class_names": [str(n) for n in names]}, f, indent=1)
  os.replace(tmp, path)
  return path


def read_class_names(workdir: str | os.PathLike) -> tuple[str, ...] | None:
  """The names of ``workdir/class_names.json``, or None if the run has none.

  Raises:
    ValueError: the file is not ``{"class_names": [str, ...]}`` (the message names it).
  """
  path = os.path.join(os.fspath(workdir), CLASS_NAMES_FILE)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not JSON: {e}") from None
  names = data.get("class_names") if isinstance(data, dict) else None
  if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
    raise ValueError(f"{path} must hold {{\"class_names\": [\"name\", ...]}}")
  return tuple(names)
