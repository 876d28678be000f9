"""COCO and Pascal VOC read from TensorFlow Datasets (tfds), without TensorFlow.

:class:`TfdsSource` reads a *prepared* copy of ``coco/2017`` (or ``coco/2014``),
``voc/2007`` or ``voc/2012`` by random access (``builder.as_data_source``,
ArrayRecord files) and yields :class:`jdet.data.records.Example`. Reading needs
no TensorFlow; preparing does.

Preparing, once, where TensorFlow is installed (``pip install tensorflow``)::

  tfds build coco/2017 --data_dir DIR --file_format=array_record
  tfds build voc/2007 --data_dir DIR --file_format=array_record

The default TFRecord format cannot be read by random access; ``as_dataset``
is not used, because it needs TensorFlow.

What tfds 4.9.10 does without TensorFlow (checked):

* ``voc/2007`` and ``voc/2012`` construct, and read once prepared.
* The stock ``coco`` builder cannot even be constructed: its ``_info()`` uses
  ``tf.int64``. ``tfds.builder("coco/2017")`` therefore fails although the
  files are there; :class:`TfdsSource` then opens the prepared files directly
  (``builder_from_files``, which reads ``dataset_info.json`` and
  ``features.json`` instead of running the builder's code). If no prepared copy
  is found either, the error says what to install and what to run.

How tfds features become an :class:`Example`:

* ``image``: read as the stored bytes (``tfds.decode.SkipDecoding``) and
  decoded by :func:`jdet.data.images.decode_image` (upright RGB; a broken image
  is a counted skip and ``source[i]`` is None).
* ``objects/bbox``: normalised ``[ymin, xmin, ymax, xmax]`` relative to the
  pixels as stored -> ``[x1, y1, x2, y2]`` pixels of the upright image (boxes
  turn with the image when it has an EXIF orientation), then cleaned by
  :func:`jdet.data.records.clean_boxes` (non-finite, empty and outside boxes
  skipped, the rest clipped, each counted).
* ``objects/label``: the tfds ``ClassLabel``, already contiguous. For COCO,
  tfds keeps the 80 classes in the order of the annotation file's categories
  (sorted by id) but not the original category ids (1..90 with gaps), which
  pycocotools and published results use: they are
  :data:`jdet.class_names.COCO_CATEGORY_IDS`,
  and ``category_id(label)`` returns them. For VOC, ``category_id`` is
  ``label + 1``.
* ``objects/is_crowd`` (COCO) -> ``crowd``; ``objects/is_difficult`` (VOC) ->
  ``difficult``; absent fields are all False.
* Image ids: ``image/id`` where the dataset has it (COCO); for VOC the digits
  of ``image/filename`` (``000005.jpg`` -> 5, ``2008_000008.jpg`` ->
  2008000008, all within int32); otherwise ``index + 1``.
* ``objects/id`` and ``objects/area`` (COCO) become the ground truth's
  annotation ids and areas, so that APs/APm/APl use COCO's segment areas;
  elsewhere ids are running numbers and areas are box areas.

Image sizes: tfds's detection datasets record none (``image`` has shape
``(None, None, 3)``; VOC's ``<size>`` is not kept), so :meth:`TfdsSource.image_sizes`
reads each record's image header (upright, EXIF applied), without decoding the
pixels: one record read per image, once per source.

If the fields of ``objects`` disagree in length (real tfds data never does;
tfds's random mock data does), the objects are cut to the shortest field and
the image is counted in the skip log.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

# tfds's coco label k is the k-th of the 80 categories in id order.
from jdet.class_names import COCO_CATEGORY_IDS, COCO_CLASS_NAMES
from jdet.data.images import decode_image, orient_boxes, probe_image
from jdet.data.records import Example, SkipLog, clean_boxes
from jdet.errors import exception_chain

__all__ = ["TfdsSource", "tfds_annotations", "TensorFlowRequiredError"]

_PREPARE_HINT = ("Prepare it once where TensorFlow is installed (pip install tensorflow): "
                 "tfds build {name} --data_dir {data_dir} --file_format=array_record")


class TensorFlowRequiredError(RuntimeError):
  """A tfds dataset that needs TensorFlow for what was asked and has no prepared copy."""


def _tfds():
  import tensorflow_datasets as tfds  # Imported late: it is slow to import.
  return tfds


def _is_missing_tensorflow(error: BaseException) -> bool:
  """Whether ``error`` (or an exception it was raised from) is a failed TensorFlow import."""
  return any((isinstance(e, ImportError) and (getattr(e, "name", None) or "").startswith("tensorflow"))
             or "No module named 'tensorflow'" in str(e) for e in exception_chain(error))


def open_builder(name: str, data_dir: str | None = None):
  """A tfds builder of ``name`` that can be read without TensorFlow.

  Uses the builder's code where it can be constructed; otherwise (``coco``
  without TensorFlow) the prepared files in ``data_dir`` (or tfds's default
  directory).

  Raises:
    TensorFlowRequiredError: the builder needs TensorFlow and no prepared copy
      was found.
  """
  tfds = _tfds()
  try:
    return tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds wraps the ImportError in its own exception types.
    if not _is_missing_tensorflow(e):
      raise
    construct_error = e
  try:
    from tensorflow_datasets.core import read_only_builder
    return read_only_builder.builder_from_files(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError as e:
    hint = _PREPARE_HINT.format(name=name, data_dir=data_dir or "~/tensorflow_datasets")
    raise TensorFlowRequiredError(
        f"tfds's {name!r} builder needs TensorFlow to be constructed ({construct_error}), and no "
        f"prepared copy was found in data_dir={data_dir!r} to read without it. {hint}") from e


def _text(value: Any) -> str:
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8", "replace")
  return str(value)


def tfds_annotations(record: Mapping[str, Any], *, stored_size: tuple[int, int],
                     file: str = "", index: Any = None,
                     skip_log: SkipLog | None = None) -> dict[str, np.ndarray]:
  """The annotations of one decoded tfds record, in pixels of the stored image.

  Args:
    record: one example as ``as_data_source`` returns it; reads ``objects``
      with ``bbox`` (normalised ``[ymin, xmin, ymax, xmax]``) and ``label``,
      and, when present, ``is_crowd``, ``is_difficult``, ``id`` and ``area``.
      Each field may be an array or a list (tfds gives ``[]`` for no objects).
    stored_size: ``(h, w)`` of the image as stored (before EXIF orientation).
    file, index, skip_log: for counting records whose fields disagree in length.
  Returns:
    dict with ``boxes`` ``[N, 4]`` float32 xyxy pixels (not cleaned),
    ``labels`` ``[N]`` int32, ``crowd`` and ``difficult`` ``[N]`` bool,
    ``ids`` ``[N]`` int64 or None, ``area`` ``[N]`` float64 or None.
  """
  objects = record.get("objects") or {}
  bbox = np.asarray(objects.get("bbox", []), np.float32).reshape(-1, 4)
  columns = {key: np.asarray(objects[key]).reshape(-1)
             for key in ("label", "is_crowd", "is_difficult", "id", "area") if key in objects}
  if "label" not in columns:
    columns["label"] = np.zeros((0,), np.int64)
  n = min([len(bbox)] + [len(c) for c in columns.values()])
  if any(len(c) != n for c in columns.values()) or len(bbox) != n:
    if skip_log is not None:
      lengths = {"bbox": len(bbox), **{k: len(c) for k, c in columns.items()}}
      skip_log.skip("objects fields of unequal length, cut to the shortest", file=file,
                    record=index, detail=str(lengths))
  bbox = bbox[:n]
  h, w = stored_size
  boxes = bbox[:, [1, 0, 3, 2]] * np.array([w, h, w, h], np.float32)

  def flag(key: str) -> np.ndarray:
    return columns[key][:n].astype(bool) if key in columns else np.zeros((n,), bool)

  return dict(
      boxes=boxes.astype(np.float32), labels=columns["label"][:n].astype(np.int32),
      crowd=flag("is_crowd"), difficult=flag("is_difficult"),
      ids=columns["id"][:n].astype(np.int64) if "id" in columns else None,
      area=columns["area"][:n].astype(np.float64) if "area" in columns else None)


def _filename_id(filename: str) -> int | None:
  """VOC-style file names to ids: ``000005.jpg`` -> 5, ``2008_000008.jpg`` -> 2008000008."""
  stem = filename.rsplit("/", 1)[-1].split(".", 1)[0]
  if not re.fullmatch(r"[0-9_]+", stem) or not stem.replace("_", ""):
    return None
  value = int(stem.replace("_", ""))
  return value if value < 2**31 else None


class TfdsSource:
  """A prepared tfds detection dataset as a :class:`DetectionSource`.

  Args:
    name: ``"coco/2017"``, ``"voc/2007"``, ``"voc/2012"`` (an explicit version
      may follow, ``"voc/2007:5.0.0"``); another dataset with the same
      ``objects/bbox`` and ``objects/label`` features works too.
    split: a tfds split, e.g. ``"train"``, ``"validation"``, ``"test"``.
    data_dir: where the dataset was prepared (tfds's default if None).
    skip_log: where skipped and repaired input is counted (a new one if None).
    builder: an already constructed tfds builder, instead of ``name``'s.
  """

  def __init__(self, name: str, split: str, *, data_dir: str | None = None,
               skip_log: SkipLog | None = None, builder: Any = None):
    tfds = _tfds()
    self.name, self.split = name, split
    self.skip_log = skip_log if skip_log is not None else SkipLog(f"tfds:{name}:{split}")
    self.builder = builder if builder is not None else open_builder(name, data_dir)
    hint = _PREPARE_HINT.format(name=name, data_dir=data_dir or "~/tensorflow_datasets")
    try:
      self._data = self.builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as e:
      if not self.builder.is_prepared():
        raise FileNotFoundError(
            f"tfds dataset {name!r} is not prepared in {self.builder.data_dir}. {hint}") from e
      if isinstance(e, NotImplementedError):  # Prepared, but as TFRecord.
        raise ValueError(f"tfds dataset {name!r} in {self.builder.data_dir} cannot be read by "
                         f"random access (prepared as TFRecord?). {hint}") from e
      raise
    self.family = name.split("/", 1)[0].split(":", 1)[0]
    label_feature = self.builder.info.features["objects"]["label"]
    names = list(label_feature.names)
    self.is_coco = self.family == "coco" and len(names) == len(COCO_CATEGORY_IDS)
    if self.is_coco and all(n.isdigit() for n in names):
      names = list(COCO_CLASS_NAMES)  # A copy prepared without names.
    self.class_names: Sequence[str] = tuple(names)
    self._ground_truth: dict | None = None
    self._sizes: np.ndarray | None = None  # [N, 2] upright (h, w), -1 until read

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, {self.split!r}, {len(self)} images)"

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self._data)

  def category_id(self, label: int) -> int:
    if self.is_coco:
      return COCO_CATEGORY_IDS[int(label)]
    return int(label) + 1

  def image_sizes(self, indices: Sequence[int] | None = None) -> np.ndarray:
    """``[n, 2]`` int64 upright ``(h, w)`` of the images at ``indices`` (default all).

    Read from the image headers (tfds stores no sizes), once per image; a
    missing or unreadable image gives ``(0, 0)`` after a counted skip.
    """
    idx = np.arange(len(self)) if indices is None else np.asarray(indices, np.int64).reshape(-1)
    if len(idx) and not (0 <= idx.min() and idx.max() < len(self)):
      raise IndexError(f"indices out of range for {self!r}")
    if self._sizes is None:
      self._sizes = np.full((len(self), 2), -1, np.int64)
    for i in idx[self._sizes[idx, 0] < 0].tolist():
      record = self._data[i]
      file = _text(record.get("image/filename", f"{self.name}:{self.split}:{i}"))
      try:
        self._sizes[i] = probe_image(bytes(record["image"])).size
      except Exception as e:  # noqa: BLE001 - any unreadable header is a counted skip.
        self.skip_log.skip("unreadable image", file=file, record=self._image_id(record, i),
                           detail=f"size unknown: {type(e).__name__}: {e}")
        self._sizes[i] = (0, 0)
    return self._sizes[idx].copy()

  def _image_id(self, record: Mapping[str, Any], index: int) -> int:
    if "image/id" in record:
      return int(record["image/id"])
    if self.family == "voc" and "image/filename" in record:
      value = _filename_id(_text(record["image/filename"]))
      if value is not None:
        return value
    return index + 1

  def _read(self, index: int, skip_log: SkipLog, decode: bool):
    """Reads record ``index``: ``(file, image_id, image, annotations)``.

    ``image`` is the decoded upright image when ``decode`` (None if it cannot be
    decoded, and then the annotations are None too); ``annotations`` holds the
    cleaned ``boxes`` in upright pixels, ``labels``, ``crowd``, ``difficult``,
    ``ids``, ``area`` and the upright ``size`` (h, w).
    """
    record = self._data[index]
    file = _text(record.get("image/filename", f"{self.name}:{self.split}:{index}"))
    image_id = self._image_id(record, index)
    data = bytes(record["image"])
    image = None
    if decode:
      image = decode_image(data, file=file, record=image_id, skip_log=skip_log)
      if image is None:
        return file, image_id, None, None
    try:
      info = probe_image(data)
    except Exception as e:  # noqa: BLE001 - any unreadable header is a counted skip.
      skip_log.skip("unreadable image", file=file, record=image_id, detail=f"{type(e).__name__}: {e}")
      return file, image_id, None, None
    ann = tfds_annotations(record, stored_size=info.stored_size, file=file, index=image_id,
                           skip_log=skip_log)
    boxes = ann["boxes"]
    if info.orientation != 1:  # tfds boxes are relative to the pixels as stored.
      boxes = orient_boxes(boxes, info.orientation, info.stored_size)
    boxes, kept = clean_boxes(boxes, size=info.size, file=file, record=image_id, skip_log=skip_log,
                              box_ids=None if ann["ids"] is None else ann["ids"].tolist())
    out = dict(boxes=boxes, labels=ann["labels"][kept], crowd=ann["crowd"][kept],
               difficult=ann["difficult"][kept],
               ids=None if ann["ids"] is None else ann["ids"][kept],
               area=None if ann["area"] is None else ann["area"][kept], size=info.size)
    return file, image_id, image, out

  def __getitem__(self, index: int) -> Example | None:
    """The example, or None (after a counted skip) if its image cannot be decoded."""
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {self!r}")
    file, image_id, image, ann = self._read(index, self.skip_log, decode=True)
    if image is None:
      return None
    return Example(image=image, boxes=ann["boxes"], labels=ann["labels"], crowd=ann["crowd"],
                   difficult=ann["difficult"], image_id=image_id, file=file)

  def coco_ground_truth(self) -> dict:
    """COCO-format ground truth of the split (reads every record; image headers only).

    Crowd and difficult boxes are kept, with ``iscrowd`` set for both, so that
    pycocotools ignores detections matched to them. Computed once and cached;
    each call returns a copy. Problems are counted in a separate log.
    """
    if self._ground_truth is None:
      self._ground_truth = self._make_ground_truth()
    return {k: [dict(d) for d in v] for k, v in self._ground_truth.items()}

  def _make_ground_truth(self) -> dict:
    log = SkipLog(f"{self.skip_log.name} (ground truth)")
    images, annotations = [], []
    for index in range(len(self)):
      file, image_id, _, ann = self._read(index, log, decode=False)
      if ann is None:
        continue
      h, w = ann["size"]
      images.append(dict(id=image_id, file_name=file, height=int(h), width=int(w)))
      for k, (box, label) in enumerate(zip(ann["boxes"].tolist(), ann["labels"].tolist())):
        bw, bh = box[2] - box[0], box[3] - box[1]
        area = float(ann["area"][k]) if ann["area"] is not None else bw * bh
        ann_id = int(ann["ids"][k]) if ann["ids"] is not None else len(annotations) + 1
        annotations.append(dict(
            id=ann_id, image_id=image_id, category_id=self.category_id(label),
            bbox=[box[0], box[1], bw, bh], area=area,
            iscrowd=int(bool(ann["crowd"][k]) or bool(ann["difficult"][k]))))
    categories = [dict(id=self.category_id(k), name=name) for k, name in enumerate(self.class_names)]
    return dict(images=images, annotations=annotations, categories=categories)
