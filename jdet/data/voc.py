"""Pascal VOC-layout detection data (VOC2007, VOC2012, and sets in their layout).

A tree ``root/`` holds ``Annotations/<name>.xml``, ``JPEGImages/<name>.jpg`` and
``ImageSets/Main/<split>.txt`` (one image name per line). :class:`VocSource`
reads the split's XML files once at start-up, checks and cleans them, then
serves :class:`~jdet.data.records.Example` by index; it shares the machinery
of :class:`jdet.data.coco.ImageFileSource` (size checks, EXIF, ``None`` for an
unreadable image, COCO-format ground truth, ``image_sizes()`` without decoding).

Conventions
-----------
* **Coordinates.** VOC stores 1-based inclusive pixel indices: a box covers
  the pixels ``xmin .. xmax`` counted from 1. In jdet's continuous 0-based
  ``[x1, y1, x2, y2]`` that is exactly ``(xmin - 1, ymin - 1, xmax, ymax)``,
  the conversion MMDetection uses; a box covering the whole image becomes
  ``(0, 0, W, H)``. A box with ``xmin == xmax`` (or ``ymin == ymax``) is one
  pixel wide: kept, and counted as a fix (it is often an annotation slip).
* **Classes.** ``class_names=None`` picks the 20 VOC classes
  (:data:`VOC_CLASSES`) when the tree looks like VOC, meaning that at least 10
  of them occur among the object names of all ``Annotations/*.xml``; an object
  of another name is then a typo and raises :class:`AnnotationError`. Otherwise
  the classes are the sorted set of names found in all of ``Annotations/``
  (every split, so train and val agree). With ``class_names`` given, objects of
  other classes are counted as skipped: that is how to train on a subset.
* **Image ids.** When every annotation file's name is digits, optionally in
  ``_``-separated groups (VOC's ``000005``, ``2008_000008``), the id is that
  number with the underscores removed (``2008000008``; all fit int32). Otherwise
  (e.g. ``raccoon-12``) it is the file's position in the sorted names of
  ``Annotations/*.xml``. Either way an image has the same id in every split.
* **Difficult.** Objects flagged ``<difficult>1</difficult>`` are yielded with
  ``difficult=True`` (or left out of examples with ``keep_difficult=False``)
  and are in the COCO-format ground truth with ``iscrowd=1``, so that COCOeval
  ignores detections matched to them, as the VOC protocol does. (COCOeval
  matches to crowd boxes by intersection over the detection's area rather than
  IoU, so a loose detection of a difficult object is ignored a little more
  readily than VOC's devkit would.) Category ids there are ``label + 1``.
* **Errors.** A malformed XML (not XML, an object without ``name`` or a
  numeric ``bndbox``, a non-numeric ``size`` or ``difficult``) raises
  :class:`AnnotationError` naming the file, the image and the field. A name in
  the split file without an XML file is counted as skipped. A missing
  ``size`` (or a size of 0) is read from the image.
* **Sizes.** The image is trusted over ``<size>``: boxes are rescaled only when
  the image is ``<size>`` scaled by one factor (resized after annotation);
  another disagreement (a wrong ``<width>`` alone) keeps the boxes as
  annotated, clips those that leave the image, and counts it as a fix
  (:func:`jdet.data.images.fit_boxes`).
"""

from __future__ import annotations

import dataclasses
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

import numpy as np

from jdet.data.coco import ImageFileSource, ParsedImage
from jdet.data.records import AnnotationError, SkipLog

__all__ = ["VocSource", "VOC_CLASSES"]

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
# A tree whose object names include at least this many VOC classes is taken to be VOC.
_MIN_VOC_CLASSES_FOUND = 10
_NUMERIC_NAME = re.compile(r"\d+(_\d+)*")


@dataclasses.dataclass
class _VocObject:
  name: str
  box: tuple[float, float, float, float]  # VOC's 1-based (xmin, ymin, xmax, ymax)
  difficult: bool


@dataclasses.dataclass
class _VocFile:
  filename: str | None
  size: tuple[int, int] | None  # (h, w)
  objects: list[_VocObject]


def _text(node: ET.Element, path: str) -> str | None:
  """Stripped text of a child element, or None when absent or empty."""
  child = node.find(path)
  if child is None or child.text is None or not child.text.strip():
    return None
  return child.text.strip()


def _number(node: ET.Element, path: str, error) -> float:
  text = _text(node, path)
  if text is None:
    raise error(path, "missing")
  try:
    return float(text)
  except ValueError:
    raise error(path, f"expected a number, got {text!r}") from None


def _parse_size(root: ET.Element, error) -> tuple[int, int] | None:
  """``(h, w)`` from ``<size>``; None when absent or 0."""
  if root.find("size") is None:
    return None
  dims = []
  for key in ("height", "width"):
    text = _text(root, f"size/{key}")
    if text is None:
      return None
    try:
      dims.append(int(float(text)))
    except ValueError:
      raise error(f"size/{key}", f"expected a number, got {text!r}") from None
  return (dims[0], dims[1]) if dims[0] > 0 and dims[1] > 0 else None


def _parse_object(obj: ET.Element, j: int, error) -> _VocObject:
  def field_error(field: str, problem: str) -> AnnotationError:
    return error(f"object[{j}]/{field}", problem)

  name = _text(obj, "name")
  if name is None:
    raise field_error("name", "missing")
  if obj.find("bndbox") is None:
    raise field_error("bndbox", "missing")
  box = tuple(_number(obj, f"bndbox/{k}", field_error) for k in ("xmin", "ymin", "xmax", "ymax"))
  flag = _text(obj, "difficult") or "0"
  if flag not in ("0", "1"):
    raise field_error("difficult", f"expected 0 or 1, got {flag!r}")
  return _VocObject(name=name, box=box, difficult=flag == "1")


def _parse_file(path: Path, record: str) -> _VocFile:
  """Parses one VOC XML file; raises :class:`AnnotationError` if it is malformed."""
  def error(field: str, problem: str) -> AnnotationError:
    return AnnotationError(str(path), record, field, problem)

  try:
    root = ET.parse(path).getroot()
  except ET.ParseError as e:
    raise error("<xml>", f"not well-formed XML: {e}") from e
  if root.tag != "annotation":
    raise error("<root>", f"expected <annotation>, got <{root.tag}>")
  objects = [_parse_object(obj, j, error) for j, obj in enumerate(root.findall("object"))]
  return _VocFile(filename=_text(root, "filename"), size=_parse_size(root, error), objects=objects)


def _image_ids(names: Sequence[str]) -> dict[str, int]:
  """Stable int32 ids for image names (see the module doc)."""
  if names and all(_NUMERIC_NAME.fullmatch(n) for n in names):
    ids = {n: int(n.replace("_", "")) for n in names}
    if len(set(ids.values())) == len(ids) and max(ids.values()) < 2**31:
      return ids
  return {n: i for i, n in enumerate(sorted(names))}


def _read_split(path: Path) -> list[str]:
  if not path.is_file():
    raise FileNotFoundError(f"split file {path} not found")
  names = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
  return list(dict.fromkeys(names))  # drops repeats, keeps order


class VocSource(ImageFileSource):
  """Detection examples from a VOC-layout tree (see the module doc).

  Args:
    root: the folder holding ``Annotations/``, ``JPEGImages/``, ``ImageSets/``.
    split: name of ``ImageSets/Main/<split>.txt`` (e.g. ``"trainval"``).
    class_names: the classes, in label order; None to infer them.
    keep_difficult: yield difficult boxes (flagged) in examples; they stay in
      the ground truth either way.
    skip_log: where skipped and repaired input is counted (a new one if None).
    check_sizes: read every image header at start-up.
  """

  def __init__(self, root: str | Path, split: str, *, class_names: Sequence[str] | None = None,
               keep_difficult: bool = True, skip_log: SkipLog | None = None,
               check_sizes: bool = True):
    self.root = Path(root)
    self.split = split
    skip_log = skip_log if skip_log is not None else SkipLog(f"voc {self.root.name}/{split}")
    ann_dir, image_dir = self.root / "Annotations", self.root / "JPEGImages"
    for folder in (ann_dir, image_dir):
      if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found: not a VOC-layout tree")
    names = _read_split(self.root / "ImageSets" / "Main" / f"{split}.txt")
    all_names = sorted(p.stem for p in ann_dir.glob("*.xml"))
    ids = _image_ids(all_names)
    parsed: dict[str, _VocFile] = {}
    if class_names is None:
      class_names, strict = self._infer_classes(ann_dir, all_names, parsed), True
    else:
      strict = False
    self._next_ann_id = 1
    images = []
    label_of = {n: i for i, n in enumerate(class_names)}
    for name in names:
      xml = ann_dir / f"{name}.xml"
      if name not in ids:
        skip_log.skip("image without annotation file", file=str(xml), record=name)
        continue
      voc = parsed.pop(name, None) or _parse_file(xml, name)
      images.append(self._to_parsed(name, ids[name], voc, xml, label_of, strict, skip_log))
    super().__init__(
        images, image_root=image_dir, class_names=class_names,
        category_ids=range(1, len(class_names) + 1),
        categories=[dict(id=i + 1, name=n) for i, n in enumerate(class_names)],
        skip_log=skip_log, keep_difficult=keep_difficult, check_sizes=check_sizes)

  @staticmethod
  def _infer_classes(ann_dir: Path, all_names: Sequence[str],
                     parsed: dict[str, _VocFile]) -> tuple[str, ...]:
    """Class names from all annotation files (see the module doc); fills ``parsed``."""
    found: set[str] = set()
    for name in all_names:
      try:
        parsed[name] = _parse_file(ann_dir / f"{name}.xml", name)
      except AnnotationError:
        continue  # raised again if the file is in the split being read
      found.update(o.name for o in parsed[name].objects)
    if len(found & set(VOC_CLASSES)) >= _MIN_VOC_CLASSES_FOUND:
      return VOC_CLASSES
    return tuple(sorted(found))

  def _to_parsed(self, name: str, image_id: int, voc: _VocFile, xml: Path, label_of: dict,
                 strict: bool, skip_log: SkipLog) -> ParsedImage:
    """One parsed XML file as a :class:`ParsedImage` in 0-based xyxy."""
    boxes, labels, difficult = [], [], []
    for j, obj in enumerate(voc.objects):
      if obj.name not in label_of:
        if strict:
          raise AnnotationError(str(xml), name, f"object[{j}]/name",
                                f"unknown class {obj.name!r} in a VOC tree; "
                                "pass class_names to read other classes")
        skip_log.skip("object of a class not in class_names", file=str(xml), record=name,
                      detail=f"object {j}: {obj.name!r}")
        continue
      xmin, ymin, xmax, ymax = obj.box
      if xmin == xmax or ymin == ymax:  # one pixel wide in VOC's inclusive pixels
        skip_log.fix("box of one pixel row or column (xmin == xmax or ymin == ymax), kept",
                     file=str(xml), record=name, detail=f"object {j}: {list(obj.box)}")
      boxes.append((xmin - 1.0, ymin - 1.0, xmax, ymax))
      labels.append(label_of[obj.name])
      difficult.append(obj.difficult)
    file_name = f"{name}.jpg"
    if not (self.root / "JPEGImages" / file_name).exists() and voc.filename:
      if (self.root / "JPEGImages" / voc.filename).exists():
        file_name = voc.filename
    n = len(boxes)
    first, self._next_ann_id = self._next_ann_id, self._next_ann_id + n
    return ParsedImage(
        image_id=image_id, file_name=file_name, size=voc.size,
        boxes=np.array(boxes, np.float32).reshape(-1, 4), labels=np.array(labels, np.int32),
        crowd=np.zeros(n, bool), difficult=np.array(difficult, bool),
        ann_ids=np.arange(first, first + n, dtype=np.int64))
