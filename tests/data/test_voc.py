"""VocSource on the raccoon set and on small VOC trees written by the tests."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jdet.data.records import AnnotationError, DetectionSource, SkipLog
from jdet.data.voc import VOC_CLASSES, VocSource
from tests.helpers.images import RACCOON

GREYSCALE = {"raccoon-150", "raccoon-152", "raccoon-161"}


def load_coco(gt: dict) -> COCO:
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
  return coco


# ----------------------------------------------------------------------------
# The raccoon set (VOC layout, one class, three greyscale photos).
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raccoon():
  assert RACCOON.is_dir(), f"the raccoon data set is missing: expected it at {RACCOON}"
  log = SkipLog("raccoon")
  return {split: VocSource(RACCOON, split, skip_log=log) for split in ("train", "val")}, log


def test_raccoon_splits_classes_and_box_count(raccoon):
  sources, _ = raccoon
  assert isinstance(sources["train"], DetectionSource)
  assert (len(sources["train"]), len(sources["val"])) == (160, 40)
  assert sources["train"].class_names == sources["val"].class_names == ("raccoon",)
  assert sources["train"].num_boxes() + sources["val"].num_boxes() == 217
  ids = [s.image_id(i) for s in sources.values() for i in range(len(s))]
  assert len(set(ids)) == 200  # one id per image across the splits


def test_raccoon_examples_are_rgb_with_boxes_inside(raccoon):
  sources, log = raccoon
  before = log.counts().get("fixed: L (greyscale) image converted to RGB", 0)
  n_boxes, grey = 0, set()
  for source in sources.values():
    for i in range(len(source)):
      ex = source[i]
      h, w, c = ex.image.shape
      assert c == 3 and ex.image.dtype == np.uint8
      assert len(ex.boxes) >= 1 and (ex.labels == 0).all() and not ex.difficult.any()
      b = ex.boxes
      assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
      assert (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
      assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
      n_boxes += len(b)
      if (ex.image == ex.image[..., :1]).all():  # all channels equal
        grey.add(Path(ex.file).stem)
  assert n_boxes == 217
  assert grey == GREYSCALE
  assert log.counts()["fixed: L (greyscale) image converted to RGB"] - before == 3


def test_raccoon_ground_truth_loads_in_pycocotools(raccoon):
  sources, _ = raccoon
  total = 0
  for source in sources.values():
    coco = load_coco(source.coco_ground_truth())
    assert len(coco.getImgIds()) == len(source)
    assert coco.getCatIds() == [source.category_id(0)]
    total += len(coco.getAnnIds())
  assert total == 217


def test_raccoon_converts_one_based_coordinates():
  sources = VocSource(RACCOON, "train")
  index = [sources.path(i).stem for i in range(len(sources))].index("raccoon-1")
  # raccoon-1.xml: <xmin>81</xmin> <ymin>88</ymin> <xmax>522</xmax> <ymax>408</ymax>
  np.testing.assert_array_equal(sources[index].boxes, [[80, 87, 522, 408]])


# ----------------------------------------------------------------------------
# Small VOC trees.
# ----------------------------------------------------------------------------


def xml_text(objects, size=(30, 40), filename=None) -> str:
  """A VOC annotation; objects are ``(name, (xmin, ymin, xmax, ymax), difficult)``."""
  parts = ["<annotation>"]
  if filename:
    parts.append(f"<filename>{filename}</filename>")
  if size:
    parts.append(f"<size><width>{size[1]}</width><height>{size[0]}</height><depth>3</depth></size>")
  for name, box, difficult in objects:
    coords = "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
    parts.append(f"<object><name>{name}</name><difficult>{int(difficult)}</difficult>"
                 f"<bndbox>{coords}</bndbox></object>")
  parts.append("</annotation>")
  return "\n".join(parts)


def write_tree(root: Path, images: dict[str, list], splits: dict[str, list[str]],
               size=(30, 40)) -> Path:
  for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
    (root / d).mkdir(parents=True, exist_ok=True)
  for name, objects in images.items():
    Image.new("RGB", (size[1], size[0]), (90, 120, 150)).save(root / "JPEGImages" / f"{name}.jpg")
    (root / "Annotations" / f"{name}.xml").write_text(
        objects if isinstance(objects, str) else xml_text(objects, size))
  for split, names in splits.items():
    (root / "ImageSets/Main" / f"{split}.txt").write_text("\n".join(names) + "\n")
  return root


@pytest.fixture
def voc_tree(tmp_path):
  """A VOC-like tree: 12 VOC classes, numeric names, difficult objects."""
  images = {f"2008_{i:06d}": [(VOC_CLASSES[i], (1, 1, 40, 30), False)] for i in range(12)}
  images["2008_000001"].append(("person", (5, 6, 20, 25), True))
  images["2008_000002"].append(("dog", (11, 3, 30, 12), False))
  names = sorted(images)
  return write_tree(tmp_path / "VOC", images, {"train": names[:8], "val": names[8:]})


def test_voc_tree_classes_ids_and_one_based_boxes(voc_tree):
  src = VocSource(voc_tree, "train")
  assert src.class_names == VOC_CLASSES
  assert [src.category_id(i) for i in range(3)] == [1, 2, 3]
  assert [src.image_id(i) for i in range(len(src))] == [2008000000 + i for i in range(8)]
  ex = src[2]
  # (1, 1, 40, 30) covers the whole 40 x 30 image: 0-based it is (0, 0, 40, 30).
  np.testing.assert_array_equal(ex.boxes, [[0, 0, 40, 30], [10, 2, 30, 12]])
  assert ex.labels.tolist() == [VOC_CLASSES.index("bird"), VOC_CLASSES.index("dog")]
  assert src.skip_log.total() == 0


def test_difficult_objects_flagged_kept_out_on_request_and_ignored_by_eval(voc_tree):
  src = VocSource(voc_tree, "train")
  ex = src[1]
  assert ex.difficult.tolist() == [False, True]
  np.testing.assert_array_equal(ex.boxes[1], [4, 5, 20, 25])
  easy = VocSource(voc_tree, "train", keep_difficult=False)
  assert easy[1].difficult.tolist() == [False] and len(easy[1].boxes) == 1
  for source in (src, easy):  # the ground truth keeps difficult boxes as crowd
    gt = source.coco_ground_truth()
    assert len(gt["annotations"]) == 10
    assert sum(a["iscrowd"] for a in gt["annotations"]) == 1
  # Detecting only the non-difficult objects is perfect under COCOeval.
  dets = [dict(image_id=e.image_id, category_id=src.category_id(int(label)), score=1.0,
               bbox=[float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])])
          for e in (easy[i] for i in range(len(easy))) for b, label in zip(e.boxes, e.labels)]
  gt = load_coco(src.coco_ground_truth())
  with contextlib.redirect_stdout(io.StringIO()):
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  assert ev.stats[1] == pytest.approx(1.0)  # AP50


def test_malformed_xml_names_file_and_field(voc_tree):
  (voc_tree / "Annotations" / "2008_000003.xml").write_text("<annotation><object>")
  with pytest.raises(AnnotationError) as info:
    VocSource(voc_tree, "train")
  assert "2008_000003.xml" in str(info.value) and info.value.field == "<xml>"
  VocSource(voc_tree, "val")  # the broken file is not in this split


@pytest.mark.parametrize("objects, field", [
    ([("dog", (1, 1, "wide", 9), False)], "object[0]/bndbox/xmax"),
    ([("dog", (1, 1, 9, 9), False), ("cat", (1, 1, "", 9), False)], "object[1]/bndbox/xmax"),
    ([("", (1, 1, 9, 9), False)], "object[0]/name"),
])
def test_bad_object_fields_name_file_record_and_field(voc_tree, objects, field):
  (voc_tree / "Annotations" / "2008_000004.xml").write_text(xml_text(objects))
  with pytest.raises(AnnotationError) as info:
    VocSource(voc_tree, "train")
  e = info.value
  assert (e.record, e.field) == ("2008_000004", field)
  assert "2008_000004.xml" in str(e) and field in str(e)


def test_bad_difficult_flag_raises(voc_tree):
  text = xml_text([("dog", (1, 1, 9, 9), False)]).replace("<difficult>0", "<difficult>maybe")
  (voc_tree / "Annotations" / "2008_000004.xml").write_text(text)
  with pytest.raises(AnnotationError, match="object\\[0\\]/difficult"):
    VocSource(voc_tree, "train")


def test_unknown_class_raises_in_a_voc_tree_and_is_skipped_with_given_classes(voc_tree):
  (voc_tree / "Annotations" / "2008_000005.xml").write_text(
      xml_text([("persn", (1, 1, 9, 9), False), ("dog", (2, 2, 9, 9), False)]))
  with pytest.raises(AnnotationError) as info:
    VocSource(voc_tree, "train")
  assert info.value.field == "object[0]/name" and "persn" in str(info.value)
  subset = VocSource(voc_tree, "train", class_names=["dog", "cat"])
  assert subset.class_names == ("dog", "cat")
  # Two "dog"s and one "cat" are kept; the other classes and the typo are counted.
  assert subset.num_boxes() == 3
  counts = subset.skip_log.counts()
  assert counts == {"skipped: object of a class not in class_names": 8}


def test_custom_tree_takes_class_names_from_all_splits(tmp_path):
  images = {"b-img": [("zebra", (1, 1, 9, 9), False)], "a-img": [("ant", (2, 2, 9, 9), False)],
            "c-img": [("yak", (3, 3, 9, 9), False)]}
  root = write_tree(tmp_path, images, {"train": ["b-img"], "val": ["a-img", "c-img"]})
  train, val = VocSource(root, "train"), VocSource(root, "val")
  assert train.class_names == val.class_names == ("ant", "yak", "zebra")
  # Not numeric: ids are positions in the sorted names of Annotations/.
  assert train.image_id(0) == 1 and [val.image_id(i) for i in range(2)] == [0, 2]
  assert train[0].labels.tolist() == [2]


def test_missing_annotation_and_image_files_are_counted(voc_tree):
  split = voc_tree / "ImageSets/Main/train.txt"
  split.write_text(split.read_text() + "2008_999999\n")
  (voc_tree / "JPEGImages" / "2008_000000.jpg").unlink()
  src = VocSource(voc_tree, "train")
  assert len(src) == 7
  assert src.skip_log.counts() == {"skipped: image without annotation file": 1,
                                   "skipped: missing image": 1}


def test_size_missing_from_xml_is_read_from_the_image(tmp_path):
  root = write_tree(tmp_path, {"x": xml_text([("ant", (1, 1, 50, 50), False)], size=None)},
                    {"train": ["x"]})
  src = VocSource(root, "train")
  np.testing.assert_array_equal(src[0].boxes, [[0, 0, 40, 30]])  # clipped to 40 x 30
  assert src.skip_log.counts() == {"fixed: box clipped to image": 1}


def test_missing_split_file_raises(voc_tree):
  with pytest.raises(FileNotFoundError, match="test.txt"):
    VocSource(voc_tree, "test")
