"""CocoSource on COCO JSON files written by the tests, bad records included."""

from __future__ import annotations

import contextlib
import io
import json
import pickle

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jdet.data.coco import CocoSource
from jdet.data.records import (AnnotationError, DetectionSource, Example, SkipLog,
                               clean_annotations)
from tests.helpers.images import write_image

# COCO's category ids have gaps (1..90 for 80 classes); these keep some of them.
def categories() -> list[dict]:
  return [dict(id=90, name="toothbrush"), dict(id=1, name="person"),
          dict(id=47, name="cup"), dict(id=3, name="car")]


def ann(id, image_id, category_id, bbox, **kw):
  return dict(id=id, image_id=image_id, category_id=category_id, bbox=bbox, **kw)


@pytest.fixture
def coco_dir(tmp_path):
  """Images 1..4 (4 has no annotations) and a good annotation file."""
  (tmp_path / "img").mkdir()
  for i, (h, w) in {1: (40, 60), 2: (50, 30), 3: (20, 20), 4: (30, 30)}.items():
    write_image(tmp_path / "img" / f"{i:012d}.png", h, w)
  data = dict(
      images=[dict(id=i, file_name=f"{i:012d}.png", height=h, width=w)
              for i, (h, w) in {1: (40, 60), 2: (50, 30), 3: (20, 20), 4: (30, 30)}.items()],
      categories=categories(),
      annotations=[
          ann(10, 1, 1, [5, 5, 20, 10], area=150.0),
          ann(11, 1, 90, [30, 10, 20, 20], area=123.5),
          ann(12, 2, 47, [0, 0, 30, 50], area=1500.0),
          ann(13, 2, 3, [2, 3, 10, 10], iscrowd=1, area=60.0),
          ann(14, 3, 3, [1, 1, 5, 5], iscrowd=1, area=25.0),  # image 3: crowd only
      ])
  return tmp_path, data


def make(tmp_path, data, **kw) -> CocoSource:
  path = tmp_path / "instances.json"
  path.write_text(json.dumps(data))
  kw.setdefault("skip_log", SkipLog("test"))
  return CocoSource(path, tmp_path / "img", **kw)


def by_id(source: CocoSource) -> dict[int, Example]:
  return {e.image_id: e for e in (source[i] for i in range(len(source)))}


def test_labels_are_contiguous_in_category_id_order_and_map_back(coco_dir):
  src = make(*coco_dir)
  assert isinstance(src, DetectionSource)
  assert src.class_names == ("person", "car", "cup", "toothbrush")  # ids 1, 3, 47, 90
  assert [src.category_id(label) for label in range(4)] == [1, 3, 47, 90]
  assert all(src.label(src.category_id(label)) == label for label in range(4))
  ex = by_id(src)
  assert ex[1].labels.tolist() == [0, 3]
  assert ex[2].labels.tolist() == [2, 1]


def test_examples_have_contract_dtypes_and_xyxy_boxes(coco_dir):
  src = make(*coco_dir)
  ex = by_id(src)[1]
  assert ex.image.shape == (40, 60, 3) and ex.image.dtype == np.uint8
  assert ex.boxes.dtype == np.float32 and ex.labels.dtype == np.int32
  assert ex.crowd.dtype == bool and ex.difficult.dtype == bool
  np.testing.assert_array_equal(ex.boxes, [[5, 5, 25, 15], [30, 10, 50, 30]])
  assert ex.file.endswith("000000000001.png")
  assert src.skip_log.total() == 0


def test_crowd_boxes_are_kept_and_flagged(coco_dir):
  ex = by_id(make(*coco_dir))
  assert ex[2].crowd.tolist() == [False, True]
  assert ex[3].crowd.tolist() == [True]


def test_empty_images_kept_or_dropped(coco_dir):
  tmp_path, data = coco_dir
  kept = make(tmp_path, data)
  assert sorted(by_id(kept)) == [1, 2, 3, 4]
  assert by_id(kept)[4].boxes.shape == (0, 4)
  dropped = make(tmp_path, data, keep_empty=False)
  # Image 4 has no annotations, image 3 only a crowd box: nothing to train on.
  assert sorted(by_id(dropped)) == [1, 2]
  assert dropped.skip_log.counts() == {"skipped: image without boxes dropped": 2}
  assert {im["id"] for im in dropped.coco_ground_truth()["images"]} == {1, 2}


def test_ground_truth_loads_in_pycocotools_with_original_ids(coco_dir):
  tmp_path, data = coco_dir
  src = make(tmp_path, data)
  gt = src.coco_ground_truth()
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
  assert sorted(coco.getImgIds()) == [1, 2, 3, 4]
  assert sorted(coco.getCatIds()) == [1, 3, 47, 90]
  assert sorted(coco.getAnnIds()) == [10, 11, 12, 13, 14]
  a = coco.loadAnns(11)[0]
  assert a["bbox"] == [30, 10, 20, 20] and a["area"] == 123.5 and a["category_id"] == 90
  assert [coco.loadAnns(i)[0]["iscrowd"] for i in (12, 13, 14)] == [0, 1, 1]
  assert coco.loadImgs(2)[0] == dict(id=2, file_name="000000000002.png", height=50, width=30)


def test_perfect_detections_score_ap_one(coco_dir):
  # The ground truth and the examples agree: detections made from the examples'
  # non-crowd boxes, with category_id(label), are perfect for COCOeval.
  src = make(*coco_dir)
  dets = []
  for i in range(len(src)):
    ex = src[i]
    for b, label, crowd in zip(ex.boxes, ex.labels, ex.crowd):
      if not crowd:
        dets.append(dict(image_id=ex.image_id, category_id=src.category_id(int(label)),
                         bbox=[float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                         score=0.9))
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO()
    gt.dataset = src.coco_ground_truth()
    gt.createIndex()
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  assert ev.stats[0] == pytest.approx(1.0)


def test_bad_records_are_counted_not_raised(coco_dir, caplog):
  tmp_path, data = coco_dir
  data["annotations"] += [
      ann(20, 999, 1, [1, 1, 5, 5]),                    # no such image
      ann(21, 1, 2, [1, 1, 5, 5]),                      # no such category
      dict(id=22, image_id=1, category_id=1),           # no bbox
      ann(23, 1, 1, [float("nan"), 1, 5, 5]),           # NaN
      ann(24, 1, 1, [3, 3, 0, 4]),                      # zero width
      ann(25, 1, 1, [50, 30, 20, 20], area=400.0),      # leaves the image: clipped
      ann(26, 1, 1, [70, 1, 5, 5]),                     # entirely outside
  ]
  data["images"].append(dict(file_name="no-id.png"))  # no id
  with caplog.at_level("WARNING", logger="jdet.data"):
    src = make(tmp_path, data)
  assert src.skip_log.counts() == {
      "skipped: annotation of an unknown image": 1,
      "skipped: annotation of an unknown category": 1,
      "skipped: annotation missing key": 1,
      "skipped: image missing key": 1,
      "skipped: box with NaN or infinite coordinate": 1,
      "skipped: empty or inverted box": 1,
      "skipped: box outside image": 1,
      "fixed: box clipped to image": 1,
  }
  assert "annotation id 20" in caplog.text and "image_id 999" in caplog.text
  assert "instances.json" in caplog.text
  assert "(id 24)" in caplog.text  # the box is named by its annotation id
  ex = by_id(src)[1]
  np.testing.assert_array_equal(ex.boxes[-1], [50, 30, 60, 40])  # clipped to 60 x 40
  gt = {a["id"]: a for a in src.coco_ground_truth()["annotations"]}
  assert sorted(gt) == [10, 11, 12, 13, 14, 25]
  assert gt[25]["bbox"] == [50, 30, 10, 10]


@pytest.mark.parametrize("edit, record, field", [
    (lambda d: d.pop("images"), None, "images"),
    (lambda d: d.update(images={}), None, "images"),
    (lambda d: d.pop("categories"), None, "categories"),
    (lambda d: d["annotations"][1].update(bbox=[1, 2, 3]), "annotation id 11", "bbox"),
    (lambda d: d["annotations"][2].update(bbox=[1, 2, "3", 4]), "annotation id 12", "bbox"),
    (lambda d: d["annotations"][2].update(bbox=None), "annotation id 12", "bbox"),
    (lambda d: d["annotations"][0].update(iscrowd=2), "annotation id 10", "iscrowd"),
    (lambda d: d["annotations"][0].update(image_id="1"), "annotations[0]", "image_id"),
    (lambda d: d["annotations"][1].update(id=10), "annotation id 10", "id"),
    (lambda d: d["categories"][2].pop("id"), "categories[2]", "id"),
    (lambda d: d["categories"][2].pop("name"), "category id 47", "name"),
    (lambda d: d["categories"].append(dict(id=3, name="again")), "category id 3", "id"),
    (lambda d: d["images"][1].update(id=1), "image id 1", "id"),
    (lambda d: d["images"][1].update(width="wide"), "image id 2", "width"),
    (lambda d: d["images"].append(7), "images[4]", "<record>"),
])
def test_malformed_files_raise_naming_file_record_and_field(coco_dir, edit, record, field):
  tmp_path, data = coco_dir
  edit(data)
  with pytest.raises(AnnotationError) as info:
    make(tmp_path, data)
  e = info.value
  assert (e.record, e.field) == (record, field)
  message = str(e)
  assert "instances.json" in message and repr(field) in message
  if record is not None:
    assert repr(record) in message


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_a_file_that_is_not_coco_json_raises(tmp_path, text):
  path = tmp_path / "broken.json"
  path.write_text(text)
  with pytest.raises(AnnotationError, match="broken.json"):
    CocoSource(path, tmp_path)


def test_missing_image_dropped_at_startup_or_none_when_read(coco_dir):
  tmp_path, data = coco_dir
  (tmp_path / "img" / "000000000002.png").unlink()
  src = make(tmp_path, data)
  assert sorted(by_id(src)) == [1, 3, 4]
  assert src.skip_log.counts() == {"skipped: missing image": 1}
  lazy = make(tmp_path, data, check_sizes=False)
  assert len(lazy) == 4
  assert [lazy[i] is None for i in range(4)] == [False, True, False, False]
  assert lazy.skip_log.counts() == {"skipped: missing image": 1}


def test_stored_size_of_the_unrotated_frame_rotates_boxes(tmp_path):
  # The file's pixels are 40 wide and 60 high with EXIF orientation 6 (turn
  # clockwise): upright the image is 60 wide and 40 high. The JSON records the
  # stored 40 x 60 frame, so its boxes are in that frame and turn with the image.
  (tmp_path / "img").mkdir()
  write_image(tmp_path / "img" / "a.png", 60, 40, orientation=6)
  write_image(tmp_path / "img" / "b.png", 60, 40, orientation=6)
  data = dict(
      images=[dict(id=1, file_name="a.png", height=60, width=40),    # stored frame
              dict(id=2, file_name="b.png", height=40, width=60)],   # upright frame
      categories=categories(),
      annotations=[ann(1, 1, 1, [0, 0, 10, 20]), ann(2, 2, 1, [0, 0, 10, 20])])
  for check_sizes in (True, False):
    src = make(tmp_path, data, check_sizes=check_sizes)
    ex = by_id(src)
    assert ex[1].image.shape == ex[2].image.shape == (40, 60, 3)
    # Clockwise: the stored top-left corner goes to the top-right.
    np.testing.assert_array_equal(ex[1].boxes, [[40, 0, 60, 10]])
    np.testing.assert_array_equal(ex[2].boxes, [[0, 0, 10, 20]])
    assert [k for k in src.skip_log.counts() if "rotated" in k]
  gt = make(tmp_path, data).coco_ground_truth()
  assert gt["images"][0]["height"] == 40 and gt["images"][0]["width"] == 60
  assert gt["annotations"][0]["bbox"] == [40, 0, 20, 10]


def test_stored_size_of_a_resized_image_rescales_boxes(tmp_path):
  (tmp_path / "img").mkdir()
  write_image(tmp_path / "img" / "a.png", 20, 30)  # annotated at 40 x 60, then halved
  data = dict(images=[dict(id=5, file_name="a.png", height=40, width=60)],
              categories=categories(), annotations=[ann(1, 5, 1, [10, 20, 30, 20], area=500.0)])
  src = make(tmp_path, data)
  np.testing.assert_allclose(src[0].boxes, [[5, 10, 20, 20]])
  assert src.coco_ground_truth()["annotations"][0]["area"] == pytest.approx(125.0)
  assert any("rescaled" in k for k in src.skip_log.counts())


def test_missing_width_and_height_are_read_from_the_image(coco_dir):
  tmp_path, data = coco_dir
  for im in data["images"]:
    del im["height"], im["width"]
  src = make(tmp_path, data, check_sizes=False)
  gt = src.coco_ground_truth()
  assert [(im["height"], im["width"]) for im in gt["images"]] == [(40, 60), (50, 30), (20, 20),
                                                                  (30, 30)]
  assert src.skip_log.total() == 0


def test_source_pickles_for_worker_processes(coco_dir):
  src = make(*coco_dir)
  src.skip_log.fix("something", file="f", record=1)
  copy = pickle.loads(pickle.dumps(src))
  assert len(copy) == len(src) and copy.skip_log.counts() == {"fixed: something": 1}
  for i in range(len(src)):
    a, b = src[i], copy[i]
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.boxes, b.boxes)
  assert copy.coco_ground_truth() == src.coco_ground_truth()


def test_clean_annotations_keeps_order_and_contract_dtypes():
  log = SkipLog("test")
  out = clean_annotations(
      [[1, 2, 5, 6], [np.inf, 0, 3, 3], [4, 4, 4, 9], [5, 5, 3, 9], [-3, 8, 12, 30], [2, 3, 4, 5]],
      [3, 1, 1, 1, 2, 0], [False, False, False, False, True, False], None,
      size=(20, 10), file="a.jpg", record=9, skip_log=log, box_ids=[7, 8, 9, 10, 11, 12])
  np.testing.assert_array_equal(out["boxes"], [[1, 2, 5, 6], [0, 8, 10, 20], [2, 3, 4, 5]])
  assert out["labels"].tolist() == [3, 2, 0] and out["crowd"].tolist() == [False, True, False]
  assert [out[k].dtype for k in ("boxes", "labels", "crowd", "difficult")] == [
      np.float32, np.int32, bool, bool]
  assert set(out) == {"boxes", "labels", "crowd", "difficult"}
  assert log.counts() == {"skipped: box with NaN or infinite coordinate": 1,
                          "skipped: empty or inverted box": 2, "fixed: box clipped to image": 1}
  empty = clean_annotations(np.zeros((0, 4)), [], None, None, size=(5, 5), file="b", record=1,
                            skip_log=log)
  assert empty["boxes"].shape == (0, 4) and empty["labels"].dtype == np.int32
