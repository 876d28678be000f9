"""The record every data source yields, and the bookkeeping of skipped input.

A *source* is a random-access sequence of :class:`Example` (``len(source)`` and
``source[i]``), with the class names and the COCO-format ground truth that the
evaluator needs. Sources do the I/O and the cleaning of annotations; transforms
and batching come after them (``jdet.data.transforms``, ``jdet.data.pipeline``).

Bad input never crashes a run and is never dropped silently: sources call
:meth:`SkipLog.skip` (or :meth:`SkipLog.fix`) with the file, the record and the
reason; the log counts each reason and warns with the details the first few
times. A malformed annotation *file* is different: it raises
:class:`AnnotationError` at start-up, naming the file, the record and the field.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = ["Example", "DetectionSource", "AnnotationError", "SkipLog", "empty_annotations"]

log = logging.getLogger("jdet.data")


class AnnotationError(ValueError):
  """A malformed annotation file: raised at start-up, naming file, record and field."""

  def __init__(self, file: str, record: Any, field: str, problem: str):
    self.file, self.record, self.field, self.problem = file, record, field, problem
    super().__init__(f"{file}: record {record!r}, field {field!r}: {problem}")


@dataclasses.dataclass
class Example:
  """One image with its annotations, as a source yields it.

  Attributes:
    image: ``[H, W, 3]`` uint8 RGB, upright (EXIF orientation applied).
    boxes: ``[N, 4]`` float32 ``[x1, y1, x2, y2]`` in pixels of ``image``,
      ``0 <= x1 < x2 <= W``.
    labels: ``[N]`` int32 contiguous class index in ``0 .. num_classes-1``.
    crowd: ``[N]`` bool, COCO ``iscrowd``: kept out of training targets, kept
      in evaluation ground truth.
    difficult: ``[N]`` bool, VOC ``difficult``: same treatment as crowd.
    image_id: the dataset's id of the image (COCO ``image_id``).
    file: where the image came from (for messages), or a description.
  """

  image: np.ndarray
  boxes: np.ndarray
  labels: np.ndarray
  crowd: np.ndarray
  difficult: np.ndarray
  image_id: int
  file: str = ""

  @property
  def orig_size(self) -> tuple[int, int]:
    """``(h, w)`` of the image as stored."""
    return int(self.image.shape[0]), int(self.image.shape[1])


def empty_annotations() -> dict[str, np.ndarray]:
  """The annotation arrays of an image with no objects."""
  return dict(boxes=np.zeros((0, 4), np.float32), labels=np.zeros((0,), np.int32),
              crowd=np.zeros((0,), bool), difficult=np.zeros((0,), bool))


@runtime_checkable
class DetectionSource(Protocol):
  """What a data source offers to the pipeline and to the evaluator."""

  class_names: Sequence[str]

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Example: ...

  def coco_ground_truth(self) -> dict:
    """The ground truth as a COCO-format dict (``images``, ``annotations``,
    ``categories``) with the dataset's original image and category ids, so
    that pycocotools evaluates any source the same way."""
    ...

  def category_id(self, label: int) -> int:
    """The dataset's original category id of a contiguous label."""
    ...


class SkipLog:
  """Counts skipped or repaired input by reason; warns with details, a few times each.

  Thread-safe, because grain workers may share a source in threads. Each
  process keeps its own counts (``counts()``), which training logs.
  """

  def __init__(self, name: str, max_warnings_per_reason: int = 5):
    self.name = name
    self.max_warnings = max_warnings_per_reason
    self._counts: collections.Counter[str] = collections.Counter()
    self._lock = threading.Lock()

  def _note(self, kind: str, reason: str, file: str, record: Any, detail: str) -> None:
    key = f"{kind}: {reason}"
    with self._lock:
      self._counts[key] += 1
      n = self._counts[key]
    if n <= self.max_warnings:
      more = " (further ones counted, not shown)" if n == self.max_warnings else ""
      log.warning("%s: %s %s: file %s, record %r%s%s", self.name, kind, reason, file, record,
                  f": {detail}" if detail else "", more)

  def skip(self, reason: str, *, file: str, record: Any, detail: str = "") -> None:
    """Records that an image or a box was left out, and why."""
    self._note("skipped", reason, file, record, detail)

  def fix(self, reason: str, *, file: str, record: Any, detail: str = "") -> None:
    """Records that an image or a box was converted or clipped, and why."""
    self._note("fixed", reason, file, record, detail)

  def counts(self) -> dict[str, int]:
    with self._lock:
      return dict(self._counts)

  def total(self) -> int:
    with self._lock:
      return sum(self._counts.values())
