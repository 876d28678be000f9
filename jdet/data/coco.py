"""COCO-format detection data: ``instances_*.json`` plus a folder of images.

:class:`CocoSource` reads a COCO annotation file once at start-up, checks it,
cleans every box, and then serves :class:`~jdet.data.records.Example` by index.
:class:`ImageFileSource`, the machinery behind it, is shared with the VOC reader.

What is an error and what is counted
------------------------------------
A *bad record in a big file* is counted in the skip log and left out, never
raised: an image or annotation with a missing key (``id``, ``file_name``,
``image_id``, ``category_id``, ``bbox``), an annotation of an image or category
that does not exist, a box with NaN/inf coordinates, or an empty, inverted or
outside box. A *structurally malformed file* raises
:class:`~jdet.data.records.AnnotationError` naming the file, the record (e.g.
``'annotation id 17'``) and the field: not JSON; no ``images``,
``categories`` or ``annotations`` list (an image-info file without ground
truth); a record that is not an object; a key present with a
value of the wrong type (``bbox`` not 4 numbers, a string id, ``iscrowd`` not
0/1); a category without an integer ``id`` or a ``name``; duplicate ids.
In short: a missing key is a bad record, a wrong value is a broken writer.

Labels and ids
--------------
Labels are contiguous, ``0 .. C-1``, in the order of the sorted category ids
(COCO's 80 ids ``1..90`` with gaps become ``0..79``); :meth:`category_id` maps
back. Image ids and annotation ids are the file's own.

Sizes and EXIF
--------------
With ``check_sizes=True`` (default) every image header is read at start-up:
missing or unreadable images are counted and dropped, and an image whose real
upright size disagrees with the stored ``width``/``height`` has its boxes moved
into the upright image (:func:`jdet.data.images.fit_boxes`: rotated when the
stored size is the unrotated EXIF frame, rescaled when the image is the stored
size scaled by one factor, else kept as annotated and clipped), counted as a fix.
This costs one header read per image (about a millisecond each).

:meth:`ImageFileSource.image_sizes` gives the upright sizes without decoding
(for the pipeline's aspect-ratio grouping): the checked sizes as they are, and
for sizes only recorded in the annotation file (``check_sizes=False``) the
image header, read once, because a recorded size may be the unrotated EXIF
frame. A missing or unreadable image then gives ``(0, 0)`` after a counted skip.

Unreadable images
-----------------
``source[i]`` returns ``None`` (after a counted skip) when the image cannot be
decoded; the pipeline filters ``None`` out.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from jdet.data.images import DECODE_ERRORS, RESCALED, decode_fitted, fit_boxes, probe_image
from jdet.data.records import AnnotationError, Example, SkipLog, clean_annotations, clean_boxes

__all__ = ["CocoSource", "ImageFileSource", "ParsedImage"]


@dataclasses.dataclass
class ParsedImage:
  """One image's annotations as read from an annotation file, before any check.

  Attributes:
    image_id: the dataset's image id.
    file_name: path of the image relative to the image root.
    size: ``(h, w)`` recorded in the annotation file, or None if not recorded.
    boxes: ``[N, 4]`` float32 xyxy against ``size``.
    labels: ``[N]`` int32 contiguous labels.
    crowd, difficult: ``[N]`` bool.
    ann_ids: ``[N]`` int64 annotation ids (for the ground truth and messages).
    areas: ``[N]`` float64 object areas as recorded (COCO segment areas), or
      None to use the box areas.
    size_checked: whether ``size`` was read from the image header (the upright
      size) rather than taken from the annotation file.
  """

  image_id: int
  file_name: str
  size: tuple[int, int] | None
  boxes: np.ndarray
  labels: np.ndarray
  crowd: np.ndarray
  difficult: np.ndarray
  ann_ids: np.ndarray
  areas: np.ndarray | None = None
  size_checked: bool = False


def _box_areas(boxes: np.ndarray) -> np.ndarray:
  """``[N, 4]`` xyxy -> ``[N]`` float64 areas."""
  b = boxes.astype(np.float64)
  return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])


class ImageFileSource:
  """A source over image files with per-image boxes, checked and cleaned at start-up.

  Stores all boxes in flat arrays (``[T, ...]``, images delimited by offsets),
  so that it pickles quickly into data-loading workers.

  Attributes:
    class_names: names of the contiguous labels.
    category_ids: the dataset's category id of each label.
    skip_log: where skipped and repaired input is counted.
  """

  def __init__(self, images: Iterable[ParsedImage], *, image_root: str | Path,
               class_names: Sequence[str], category_ids: Sequence[int],
               categories: Sequence[dict], skip_log: SkipLog, keep_empty: bool = True,
               keep_difficult: bool = True, check_sizes: bool = True):
    self.image_root = Path(image_root)
    self.class_names = tuple(class_names)
    self.category_ids = tuple(int(c) for c in category_ids)
    self._label_of = {c: i for i, c in enumerate(self.category_ids)}
    self._categories = [dict(c) for c in categories]
    self.skip_log = skip_log
    self.keep_difficult = keep_difficult
    rows = [r for r in (self._check(p, keep_empty, check_sizes) for p in images) if r is not None]
    self._image_ids = np.array([r.image_id for r in rows], np.int64)
    self._files = [r.file_name for r in rows]
    self._sizes = np.array([r.size for r in rows], np.int32).reshape(-1, 2)
    self._size_checked = np.array([r.size_checked for r in rows], bool)
    self._header_sizes: dict[int, tuple[int, int]] = {}  # read by image_sizes()
    self._offsets = np.cumsum([0] + [len(r.boxes) for r in rows]).astype(np.int64)

    def cat(name, dtype, shape=()):
      parts = [getattr(r, name) for r in rows]
      return np.concatenate(parts).astype(dtype) if parts else np.zeros((0, *shape), dtype)

    self._boxes = cat("boxes", np.float32, (4,)).reshape(-1, 4)
    self._labels = cat("labels", np.int32)
    self._crowd = cat("crowd", bool)
    self._difficult = cat("difficult", bool)
    self._ann_ids = cat("ann_ids", np.int64)
    self._areas = cat("areas", np.float64)

  # --------------------------------------------------------------------------
  # Start-up checks.
  # --------------------------------------------------------------------------

  def _check(self, p: ParsedImage, keep_empty: bool, check_sizes: bool) -> ParsedImage | None:
    """Checks one image's size and boxes; None if it is dropped (counted)."""
    path = self.image_root / p.file_name
    file, record = str(path), p.image_id
    boxes, size = np.asarray(p.boxes, np.float32).reshape(-1, 4), p.size
    areas = _box_areas(boxes) if p.areas is None else np.asarray(p.areas, np.float64)
    checked = check_sizes or size is None
    if checked:
      try:
        info = probe_image(path)
      except FileNotFoundError as e:
        self.skip_log.skip("missing image", file=file, record=record, detail=str(e))
        return None
      except DECODE_ERRORS as e:
        self.skip_log.skip("unreadable image", file=file, record=record,
                           detail=f"{type(e).__name__}: {e}")
        return None
      if size is not None:
        boxes, reason = fit_boxes(boxes, size, info)
        if reason:
          self.skip_log.fix(reason, file=file, record=record,
                            detail=f"recorded (h, w) {tuple(size)}, image {info.size}")
        if reason == RESCALED:
          areas = areas * (info.height * info.width) / (size[0] * size[1])
      size = info.size
    boxes, kept = clean_boxes(boxes, size=size, file=file, record=record,
                              skip_log=self.skip_log, box_ids=p.ann_ids)
    crowd = np.asarray(p.crowd, bool)[kept]
    if not keep_empty and crowd.all():
      self.skip_log.skip("image without boxes dropped", file=file, record=record)
      return None
    if p.areas is None:
      areas = _box_areas(boxes)
    else:
      areas = areas[kept]
    return ParsedImage(
        image_id=int(p.image_id), file_name=p.file_name, size=(int(size[0]), int(size[1])),
        boxes=boxes, labels=np.asarray(p.labels, np.int32)[kept], crowd=crowd,
        difficult=np.asarray(p.difficult, bool)[kept],
        ann_ids=np.asarray(p.ann_ids, np.int64)[kept], areas=areas, size_checked=checked)

  # --------------------------------------------------------------------------
  # DetectionSource.
  # --------------------------------------------------------------------------

  def __len__(self) -> int:
    return len(self._files)

  def _slice(self, index: int) -> slice:
    return slice(int(self._offsets[index]), int(self._offsets[index + 1]))

  def image_id(self, index: int) -> int:
    """The dataset's id of the ``index``-th image."""
    return int(self._image_ids[index])

  def path(self, index: int) -> Path:
    """The file of the ``index``-th image."""
    return self.image_root / self._files[index]

  def image_sizes(self, indices: Sequence[int] | None = None) -> np.ndarray:
    """``[n, 2]`` int64 upright ``(h, w)`` of the images at ``indices`` (default all), undecoded.

    Sizes checked at start-up are returned as they are. A size only recorded
    in the annotation file (``check_sizes=False``) is not trusted: it may be
    the unrotated frame of an image with an EXIF orientation, so the image
    header is read (once; later calls reuse it). A missing or unreadable
    image gives ``(0, 0)`` after a counted skip.
    """
    idx = np.arange(len(self)) if indices is None else np.asarray(indices, np.int64).reshape(-1)
    if len(idx) and not (0 <= idx.min() and idx.max() < len(self)):
      raise IndexError(f"indices out of range for {len(self)} images")
    out = self._sizes[idx].astype(np.int64)
    for k in np.flatnonzero(~self._size_checked[idx]).tolist():
      out[k] = self._header_size(int(idx[k]))
    return out

  def _header_size(self, index: int) -> tuple[int, int]:
    """The upright size from the image header, or ``(0, 0)`` (counted) if unreadable."""
    if index not in self._header_sizes:
      path, record = self.path(index), self.image_id(index)
      try:
        size = probe_image(path).size
      except FileNotFoundError as e:
        self.skip_log.skip("missing image", file=str(path), record=record,
                           detail=f"size unknown: {e}")
        size = (0, 0)
      except DECODE_ERRORS as e:
        self.skip_log.skip("unreadable image", file=str(path), record=record,
                           detail=f"size unknown: {type(e).__name__}: {e}")
        size = (0, 0)
      self._header_sizes[index] = (int(size[0]), int(size[1]))
    return self._header_sizes[index]

  def __getitem__(self, index: int) -> Example | None:
    """The ``index``-th example, or None (counted) if its image cannot be decoded."""
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} images")
    index %= len(self)
    s, path, image_id = self._slice(index), self.path(index), self.image_id(index)
    file = str(path)
    size = tuple(int(v) for v in self._sizes[index])
    loaded = decode_fitted(path, self._boxes[s], size, file=file, record=image_id,
                           skip_log=self.skip_log)
    if loaded is None:
      return None
    image, boxes, fitted = loaded
    ann = dict(boxes=boxes, labels=self._labels[s], crowd=self._crowd[s],
               difficult=self._difficult[s])
    if fitted:
      ann = clean_annotations(**ann, size=image.shape[:2], file=file, record=image_id,
                              skip_log=self.skip_log)
    if not self.keep_difficult:
      keep = ~ann["difficult"]
      ann = {k: v[keep] for k, v in ann.items()}
    return Example(image=image, image_id=image_id, file=file,
                   boxes=np.array(ann["boxes"], np.float32).reshape(-1, 4),
                   labels=np.array(ann["labels"], np.int32),
                   crowd=np.array(ann["crowd"], bool),
                   difficult=np.array(ann["difficult"], bool))

  def category_id(self, label: int) -> int:
    """The dataset's category id of a contiguous label."""
    return self.category_ids[label]

  def label(self, category_id: int) -> int:
    """The contiguous label of a dataset category id."""
    return self._label_of[category_id]

  def num_boxes(self) -> int:
    """Number of boxes kept over all images (crowd and difficult included)."""
    return len(self._boxes)

  def coco_ground_truth(self) -> dict:
    """The ground truth in COCO format, for ``pycocotools.coco.COCO``.

    Holds every image of the source with its upright ``height``/``width``, and
    every kept box with ``bbox`` ``[x, y, w, h]``, ``area``, ``iscrowd`` and the
    original image, annotation and category ids. Boxes are those the source
    yields (cleaned, in upright pixels), so detections in the pixels of the
    decoded images evaluate against them. Crowd boxes, and VOC's difficult
    boxes, have ``iscrowd=1``: COCOeval ignores detections matched to them.
    """
    images = [dict(id=int(i), file_name=f, height=int(h), width=int(w))
              for i, f, (h, w) in zip(self._image_ids, self._files, self._sizes)]
    xywh = self._boxes.astype(np.float64)
    xywh[:, 2:] -= xywh[:, :2]
    image_of_box = np.repeat(self._image_ids, np.diff(self._offsets))
    annotations = [
        dict(id=int(a), image_id=int(i), category_id=self.category_ids[l],
             bbox=[float(v) for v in b], area=float(ar), iscrowd=int(c or d))
        for a, i, l, b, ar, c, d in zip(self._ann_ids, image_of_box, self._labels, xywh,
                                        self._areas, self._crowd, self._difficult)]
    return dict(images=images, annotations=annotations,
                categories=[dict(c) for c in self._categories])


# ----------------------------------------------------------------------------
# COCO JSON parsing.
# ----------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Parser:
  """Reads and checks the parts of a COCO JSON dict; raises or counts as documented."""

  def __init__(self, file: str, skip_log: SkipLog):
    self.file, self.skip_log = file, skip_log

  def error(self, record: Any, field: str, problem: str) -> AnnotationError:
    return AnnotationError(self.file, record, field, problem)

  def load(self) -> dict:
    try:
      with open(self.file, "rb") as f:
        data = json.load(f)
    except json.JSONDecodeError as e:
      raise self.error(None, "<file>", f"not valid JSON: {e}") from e
    except UnicodeDecodeError as e:
      raise self.error(None, "<file>", f"not valid JSON (bad text encoding): {e}") from e
    if not isinstance(data, dict):
      raise self.error(None, "<file>", f"expected a JSON object, got {type(data).__name__}")
    for key in ("images", "categories"):
      if not isinstance(data.get(key), list):
        raise self.error(None, key, "missing" if key not in data else
                         f"expected a list, got {type(data[key]).__name__}")
    if "annotations" not in data:
      # An image-info file (COCO's image_info_test-dev2017.json) has no ground truth:
      # training would see no objects and evaluation would give AP nan, silently.
      raise self.error(None, "annotations", "missing: a detection annotation file needs an "
                       "'annotations' list (an empty one for images without objects); an "
                       "image-info file without ground truth cannot be trained or evaluated on")
    if not isinstance(data["annotations"], list):
      raise self.error(None, "annotations", f"expected a list, got "
                       f"{type(data['annotations']).__name__}")
    return data

  def categories(self, raw: list) -> list[dict]:
    """Checked categories, sorted by id."""
    seen: set[int] = set()
    out = []
    for i, c in enumerate(raw):
      record = f"categories[{i}]"
      if not isinstance(c, dict):
        raise self.error(record, "<record>", f"expected an object, got {type(c).__name__}")
      if "id" not in c:
        raise self.error(record, "id", "missing")
      if not _is_int(c["id"]):
        raise self.error(record, "id", f"expected an integer, got {c['id']!r}")
      record = f"category id {c['id']}"
      if not isinstance(c.get("name"), str):
        raise self.error(record, "name", "missing" if "name" not in c else
                         f"expected a string, got {c['name']!r}")
      if c["id"] in seen:
        raise self.error(record, "id", "duplicate category id")
      seen.add(c["id"])
      out.append(c)
    if not out:
      raise self.error(None, "categories", "no categories")
    return sorted(out, key=lambda c: c["id"])

  def _missing(self, kind: str, record: Any, keys: Sequence[str], obj: dict) -> bool:
    """Counts a record with a missing key as skipped; True if one is missing."""
    missing = [k for k in keys if k not in obj]
    if missing:
      self.skip_log.skip(f"{kind} missing key", file=self.file, record=record,
                         detail=f"missing {', '.join(missing)}")
    return bool(missing)

  def images(self, raw: list) -> dict[int, dict]:
    """Checked image records by id, in file order."""
    out: dict[int, dict] = {}
    for i, im in enumerate(raw):
      record = f"images[{i}]"
      if not isinstance(im, dict):
        raise self.error(record, "<record>", f"expected an object, got {type(im).__name__}")
      if "id" in im and not _is_int(im["id"]):
        raise self.error(record, "id", f"expected an integer, got {im['id']!r}")
      if "id" in im:
        record = f"image id {im['id']}"
      if self._missing("image", record, ("id", "file_name"), im):
        continue
      if not isinstance(im["file_name"], str):
        raise self.error(record, "file_name", f"expected a string, got {im['file_name']!r}")
      for key in ("height", "width"):
        if key in im and not (_is_number(im[key]) and im[key] >= 0):
          raise self.error(record, key, f"expected a size in pixels, got {im[key]!r}")
      if im["id"] in out:
        raise self.error(record, "id", "duplicate image id")
      out[im["id"]] = im
    return out

  def annotation(self, i: int, a: Any, images: dict, label_of: dict) -> tuple | None:
    """``(image_id, label, xyxy, crowd, ann_id, area)`` of a checked record, or None."""
    record = f"annotations[{i}]"
    if not isinstance(a, dict):
      raise self.error(record, "<record>", f"expected an object, got {type(a).__name__}")
    for key in ("id", "image_id", "category_id"):
      if key in a and not _is_int(a[key]):
        raise self.error(record, key, f"expected an integer, got {a[key]!r}")
    if "id" in a:
      record = f"annotation id {a['id']}"
    if "bbox" in a:
      bbox = a["bbox"]
      if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise self.error(record, "bbox", f"expected 4 numbers [x, y, w, h], got {bbox!r}")
    crowd = a.get("iscrowd", 0)
    if crowd not in (0, 1) or not isinstance(crowd, (int, bool)):
      raise self.error(record, "iscrowd", f"expected 0 or 1, got {crowd!r}")
    area = a.get("area")
    if area is not None and not _is_number(area):
      raise self.error(record, "area", f"expected a number, got {area!r}")
    if self._missing("annotation", record, ("id", "image_id", "category_id", "bbox"), a):
      return None
    if a["image_id"] not in images:
      self.skip_log.skip("annotation of an unknown image", file=self.file, record=record,
                         detail=f"image_id {a['image_id']}")
      return None
    if a["category_id"] not in label_of:
      self.skip_log.skip("annotation of an unknown category", file=self.file, record=record,
                         detail=f"category_id {a['category_id']}")
      return None
    x, y, w, h = (float(v) for v in a["bbox"])
    return (a["image_id"], label_of[a["category_id"]], (x, y, x + w, y + h), bool(crowd), a["id"],
            np.nan if area is None else float(area))


def _group(rows: list[tuple], images: dict[int, dict]) -> Iterable[ParsedImage]:
  """Annotation rows grouped into one :class:`ParsedImage` per image, in file order."""
  n = len(rows)
  image_ids = np.fromiter((r[0] for r in rows), np.int64, n)
  labels = np.fromiter((r[1] for r in rows), np.int32, n)
  boxes = np.array([r[2] for r in rows], np.float32).reshape(n, 4)
  crowd = np.fromiter((r[3] for r in rows), bool, n)
  ann_ids = np.fromiter((r[4] for r in rows), np.int64, n)
  areas = np.fromiter((r[5] for r in rows), np.float64, n)
  missing = np.isnan(areas)
  areas[missing] = _box_areas(boxes[missing])
  order = np.argsort(image_ids, kind="stable")  # keeps file order within an image
  sorted_ids = image_ids[order]
  ids = np.fromiter(images, np.int64, len(images))
  starts = np.searchsorted(sorted_ids, ids, side="left").tolist()
  ends = np.searchsorted(sorted_ids, ids, side="right").tolist()
  for (image_id, im), lo, hi in zip(images.items(), starts, ends):
    take = order[lo:hi]
    h, w = im.get("height"), im.get("width")
    yield ParsedImage(
        image_id=image_id, file_name=im["file_name"],
        size=(int(h), int(w)) if h and w else None, boxes=boxes[take], labels=labels[take],
        crowd=crowd[take], difficult=np.zeros(len(take), bool), ann_ids=ann_ids[take],
        areas=areas[take])


class CocoSource(ImageFileSource):
  """Detection examples from a COCO-format annotation file (see the module doc).

  Args:
    annotation_file: path of the ``instances_*.json`` file.
    image_root: folder the images' ``file_name`` is relative to.
    keep_empty: keep images without non-crowd boxes (needed for evaluation);
      when False they are dropped and counted.
    skip_log: where skipped and repaired input is counted (a new one if None).
    check_sizes: read every image header at start-up (see the module doc).
  """

  def __init__(self, annotation_file: str | Path, image_root: str | Path, *,
               keep_empty: bool = True, skip_log: SkipLog | None = None,
               check_sizes: bool = True):
    file = str(annotation_file)
    skip_log = skip_log if skip_log is not None else SkipLog(f"coco {Path(file).name}")
    parser = _Parser(file, skip_log)
    data = parser.load()
    categories = parser.categories(data["categories"])
    category_ids = [c["id"] for c in categories]
    label_of = {c: i for i, c in enumerate(category_ids)}
    images = parser.images(data["images"])
    rows = [parser.annotation(i, a, images, label_of)
            for i, a in enumerate(data["annotations"])]
    rows = [r for r in rows if r is not None]
    seen: set[int] = set()
    for r in rows:
      if r[4] in seen:
        raise AnnotationError(file, f"annotation id {r[4]}", "id", "duplicate annotation id")
      seen.add(r[4])
    self.annotation_file = file
    super().__init__(
        _group(rows, images), image_root=image_root,
        class_names=[c["name"] for c in categories], category_ids=category_ids,
        categories=[{k: c[k] for k in ("id", "name", "supercategory") if k in c}
                    for c in categories],
        skip_log=skip_log, keep_empty=keep_empty, check_sizes=check_sizes)
