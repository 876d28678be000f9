"""The record every data source yields, and the bookkeeping of skipped input.

A *source* is a random-access sequence of :class:`Example` (``len(source)`` and
``source[i]``), with the class names and the COCO-format ground truth that the
evaluator needs. Sources do the I/O and the cleaning of annotations; transforms
and batching come after them (``jdet.data.transforms``, ``jdet.data.pipeline``).

Bad input never crashes a run and is never dropped silently: sources call
:meth:`SkipLog.skip` (or :meth:`SkipLog.fix`) with the file, the record and the
reason; the log counts each reason and warns with the details the first few
times. A bad file is warned about once per process, however often it is read
(every epoch, or by a rebuilt source). Every distinct skip and fix is also kept
for :func:`drain_notes`, which the pipeline ships from worker processes inside
the training batches, so that training totals them (:class:`DataReport`:
``data/skipped`` and ``data/fixed`` in ``metrics.jsonl`` and an end-of-run
summary). A malformed annotation *file* is different: it raises
:class:`AnnotationError` at start-up, naming the file, the record and the field.

An image that cannot be decoded when it is read (missing, truncated, not an
image) makes ``source[i]`` return ``None`` after a counted skip; the pipeline
filters ``None`` out. Sources check what they can at start-up, so this is rare.

Image sizes without decoding
----------------------------
A source may also offer ``image_sizes(indices=None)`` (:class:`SizedSource`):
the upright ``(h, w)`` of its images from metadata or image headers, never by
decoding pixels; the pipeline's aspect-ratio grouping needs it. COCO, VOC,
tfds and concatenated sources have it; :func:`image_sizes` falls back to
decoding for a source without it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import threading
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = ["Example", "DetectionSource", "SizedSource", "AnnotationError", "SkipLog",
           "DataReport", "drain_notes", "encode_notes", "decode_notes",
           "empty_annotations", "clean_boxes", "clean_annotations", "image_sizes"]

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


def clean_boxes(boxes, *, size: tuple[int, int], file: str, record: Any, skip_log: SkipLog,
                box_ids: Sequence[Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Drops unusable boxes and clips the rest to the image, counting each change.

  In order: boxes with a NaN or infinite coordinate are skipped; empty or
  inverted boxes (``x2 <= x1`` or ``y2 <= y1``) are skipped; the rest are
  clipped to the image (a counted fix when a coordinate moves); boxes left
  with no area by the clipping (entirely outside the image) are skipped. Each
  skip and fix is counted in ``skip_log`` with the file, the record and the
  box (its index, and its id from ``box_ids`` when given).

  Args:
    boxes: ``[N, 4]`` xyxy in pixels of the upright image.
    size: ``(h, w)`` of the upright image.
    file, record: for messages (e.g. the image file and the image id).
    skip_log: where skips and fixes are counted.
    box_ids: optional ``[N]`` ids of the boxes for messages (e.g. COCO
      annotation ids).
  Returns:
    ``(boxes, kept)``: ``[K, 4]`` float32 with ``0 <= x1 < x2 <= w`` and
    ``0 <= y1 < y2 <= h``, and ``[K]`` int64 indices of the kept boxes in the
    input, in their original order.
  """
  b = np.asarray(boxes, np.float32).reshape(-1, 4)
  h, w = size
  x1, y1, x2, y2 = b.T
  with np.errstate(invalid="ignore"):  # NaN compares False: never "good"
    good = (x1 >= 0) & (y1 >= 0) & (x2 <= w) & (y2 <= h) & (x2 > x1) & (y2 > y1)
  if good.all():  # the common case, kept fast for start-up over big files
    return b, np.arange(len(b))

  def note(kind: str, reason: str, which: np.ndarray) -> None:
    for i in np.flatnonzero(which):
      name = f"box {i}" + (f" (id {box_ids[i]})" if box_ids is not None else "")
      getattr(skip_log, kind)(reason, file=file, record=record,
                              detail=f"{name}: {np.round(b[i], 2).tolist()}")

  finite = np.isfinite(b).all(axis=1)
  note("skip", "box with NaN or infinite coordinate", ~finite)
  with np.errstate(invalid="ignore"):
    ordered = finite & (x2 > x1) & (y2 > y1)
  note("skip", "empty or inverted box", finite & ~ordered)
  clipped = b.copy()
  clipped[:, 0::2] = np.clip(b[:, 0::2], 0.0, float(w))
  clipped[:, 1::2] = np.clip(b[:, 1::2], 0.0, float(h))
  inside = ordered & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
  note("skip", "box outside image", ordered & ~inside)
  note("fix", "box clipped to image", inside & ~good)
  kept = np.flatnonzero(inside)
  return clipped[kept].reshape(-1, 4), kept


def clean_annotations(boxes, labels, crowd, difficult, *, size: tuple[int, int], file: str,
                      record: Any, skip_log: SkipLog,
                      box_ids: Sequence[Any] | None = None) -> dict[str, np.ndarray]:
  """Cleans the annotations of one image (:func:`clean_boxes`); every source calls it.

  Args:
    boxes: ``[N, 4]`` xyxy in pixels of the upright image.
    labels: ``[N]`` contiguous class indices.
    crowd, difficult: ``[N]`` flags, or None for all False.
    size, file, record, skip_log, box_ids: as for :func:`clean_boxes`.
  Returns:
    dict with the kept ``boxes`` ``[K, 4]`` float32, ``labels`` ``[K]`` int32,
    ``crowd`` ``[K]`` bool and ``difficult`` ``[K]`` bool: the annotation
    fields of :class:`Example`.
  """
  b = np.asarray(boxes, np.float32).reshape(-1, 4)
  n = len(b)
  labels = np.asarray(labels, np.int32).reshape(n)
  crowd = np.zeros(n, bool) if crowd is None else np.asarray(crowd, bool).reshape(n)
  difficult = np.zeros(n, bool) if difficult is None else np.asarray(difficult, bool).reshape(n)
  b, kept = clean_boxes(b, size=size, file=file, record=record, skip_log=skip_log, box_ids=box_ids)
  return dict(boxes=b, labels=labels[kept], crowd=crowd[kept], difficult=difficult[kept])


@runtime_checkable
class DetectionSource(Protocol):
  """What a data source offers to the pipeline and to the evaluator."""

  class_names: Sequence[str]

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Example | None:
    """The example, or None (after a counted skip) if its image cannot be decoded."""
    ...

  def coco_ground_truth(self) -> dict:
    """The ground truth as a COCO-format dict (``images``, ``annotations``,
    ``categories``) with the dataset's original image and category ids, so
    that pycocotools evaluates any source the same way."""
    ...

  def category_id(self, label: int) -> int:
    """The dataset's original category id of a contiguous label."""
    ...


@runtime_checkable
class SizedSource(Protocol):
  """A source that knows its images' sizes without decoding them (an optional extra).

  Not part of :class:`DetectionSource`, so that sources without it still are
  one; :func:`image_sizes` works with both.
  """

  def image_sizes(self, indices: Sequence[int] | None = None) -> np.ndarray:
    """``[n, 2]`` int64 ``(h, w)`` of the upright images (EXIF orientation applied,
    as ``source[i].image`` has it) at ``indices`` (default: all), from metadata
    or image headers. ``(0, 0)`` for an image whose size cannot be read (missing
    or unreadable file), after a counted skip in the source's log."""
    ...


def image_sizes(source: DetectionSource, indices: Sequence[int] | None = None) -> np.ndarray:
  """``[n, 2]`` int64 upright ``(h, w)`` of ``source``'s images at ``indices`` (default all).

  Uses the source's own ``image_sizes`` (:class:`SizedSource`: metadata or
  headers only). A source without it has every image decoded once, which is
  slow for a large dataset and is logged as a warning. ``(0, 0)`` marks an
  image whose size is unknown (``source[i]`` is None, or the source could not
  read it; the source has counted it).
  """
  idx = np.arange(len(source)) if indices is None else np.asarray(indices, np.int64).reshape(-1)
  if isinstance(source, SizedSource):
    out = np.asarray(source.image_sizes(idx), np.int64).reshape(-1, 2)
    if len(out) != len(idx):
      raise ValueError(f"{type(source).__name__}.image_sizes gave {len(out)} sizes "
                       f"for {len(idx)} indices")
    return out
  log.warning("%s has no image_sizes(): decoding %d images once to read their sizes",
              type(source).__name__, len(idx))
  out = np.zeros((len(idx), 2), np.int64)
  for k, i in enumerate(idx.tolist()):
    example = source[i]
    if example is not None:
      out[k] = example.orig_size
  return out


# Every distinct skip or fix noted in this process: (log name, kind, reason, file, record,
# detail). A bad file read again (the next epoch, a rebuilt source) is counted by its log
# but not warned about again; the notes not yet collected wait in _PENDING (drain_notes).
_SEEN: set[tuple[str, ...]] = set()
_PENDING: list[tuple[str, ...]] = []
_NOTES_LOCK = threading.Lock()


def drain_notes() -> list[tuple[str, ...]]:
  """The distinct skips and fixes first noted in this process since the last call.

  Each is ``(log name, kind, reason, file, record, detail)``, ``kind`` being
  ``"skipped"`` or ``"fixed"``. The pipeline ships a worker process's notes to
  the training process inside its batches (``train_batches(data_notes=True)``),
  so that :class:`DataReport` totals them across processes.
  """
  with _NOTES_LOCK:
    out = list(_PENDING)
    _PENDING.clear()
  return out


def encode_notes(notes: Sequence[tuple[str, ...]]) -> str:
  """Notes as one JSON string (what a batch carries)."""
  return json.dumps([list(n) for n in notes]) if notes else ""


def decode_notes(text: str) -> list[tuple[str, ...]]:
  """The inverse of :func:`encode_notes`."""
  return [tuple(n) for n in json.loads(text)] if text else []


class DataReport:
  """The distinct skipped and fixed items of a run, from every process, for summaries.

  ``add`` merges notes (:func:`drain_notes`, or decoded from batches); an item
  seen twice (another epoch, another worker) counts once.
  """

  def __init__(self):
    self._items: set[tuple[str, ...]] = set()

  def add(self, notes: Sequence[tuple[str, ...]]) -> int:
    """Merges ``notes``; returns how many were new."""
    new = {tuple(str(v) for v in n) for n in notes} - self._items
    self._items |= new
    return len(new)

  def items(self) -> list[tuple[str, ...]]:
    """The distinct notes, sorted: ``(log name, kind, reason, file, record, detail)``."""
    return sorted(self._items)

  def counts(self) -> dict[str, int]:
    """``{"<log name>: <kind>: <reason>": distinct items}``."""
    c = collections.Counter(f"{n[0]}: {n[1]}: {n[2]}" for n in self._items)
    return dict(sorted(c.items()))

  def totals(self) -> dict[str, int]:
    """``{"skipped": n, "fixed": n}``: distinct items of each kind."""
    c = collections.Counter(n[1] for n in self._items)
    return {"skipped": c.get("skipped", 0), "fixed": c.get("fixed", 0)}

  def summary(self) -> str:
    """Lines ``"  <count> x <log name>: <kind>: <reason>"``, or "" if nothing was noted."""
    return "\n".join(f"  {n} x {k}" for k, n in self.counts().items())


class SkipLog:
  """Counts skipped or repaired input by reason; warns with details, a few times each.

  Thread-safe, because grain workers may share a source in threads. Each
  process keeps its own counts (``counts()``: every occurrence). A bad file is
  warned about once per process (the first ``max_warnings_per_reason`` distinct
  files of each reason; the rest are counted, not shown), however often it is
  read; :func:`drain_notes` and :class:`DataReport` total the distinct items.
  """

  def __init__(self, name: str, max_warnings_per_reason: int = 5):
    self.name = name
    self.max_warnings = max_warnings_per_reason
    self._counts: collections.Counter[str] = collections.Counter()
    self._shown: collections.Counter[str] = collections.Counter()
    self._lock = threading.Lock()

  def _note(self, kind: str, reason: str, file: str, record: Any, detail: str) -> None:
    key = f"{kind}: {reason}"
    item = (str(self.name), kind, reason, str(file), repr(record), str(detail))
    with _NOTES_LOCK:
      new = item not in _SEEN
      if new:
        _SEEN.add(item)
        _PENDING.append(item)
    with self._lock:
      self._counts[key] += 1
      if not new:  # warned about already (an earlier epoch, or a rebuilt source)
        return
      self._shown[key] += 1
      n = self._shown[key]
    if n <= self.max_warnings:
      more = " (further ones counted, not shown)" if n == self.max_warnings else ""
      log.warning("%s: %s %s: file %s, record %r%s%s", self.name, kind, reason, file, record,
                  f": {detail}" if detail else "", more)

  def __getstate__(self) -> dict:
    # Picklable (the lock is not), so that sources holding a log can be sent to
    # data-loading worker processes; each copy then counts on its own.
    state = self.__dict__.copy()
    del state["_lock"]
    state["_counts"] = self.counts()
    state["_shown"] = dict(self._shown)
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._counts = collections.Counter(state["_counts"])
    self._shown = collections.Counter(state.get("_shown", {}))
    self._lock = threading.Lock()

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
