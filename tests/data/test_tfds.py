"""Tests of the tfds sources, offline: tfds's mock data and a tiny prepared copy."""

from __future__ import annotations

import importlib.util
import io

import numpy as np
import pytest
from etils import epath
from PIL import Image
from pycocotools.coco import COCO

tfds = pytest.importorskip("tensorflow_datasets")

from jdet import class_names  # noqa: E402
from jdet.data import tfds as jtfds  # noqa: E402
from jdet.data.records import DetectionSource, SkipLog  # noqa: E402

HAS_TF = importlib.util.find_spec("tensorflow") is not None


def _jpeg(h: int, w: int, value: int = 90, orientation: int | None = None) -> bytes:
  buf = io.BytesIO()
  image = Image.fromarray(np.full((h, w, 3), value, np.uint8))
  if orientation is None:
    image.save(buf, format="JPEG")
  else:
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(buf, format="JPEG", exif=exif)
  return buf.getvalue()


def test_coco_category_constants():
  ids = class_names.COCO_CATEGORY_IDS
  assert len(ids) == 80 == len(set(class_names.COCO_CLASS_NAMES))
  assert list(ids) == sorted(ids) and ids[0] == 1 and ids[-1] == 90
  assert set(range(1, 91)) - set(ids) == {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
  assert class_names.COCO_CLASS_NAMES[ids.index(18)] == "dog"
  # The 91 -> 81 columns: background, then the 80 ids in order (the 10 unused ones left out).
  columns = class_names.coco91_columns()
  assert columns.shape == (81,) and columns[0] == 0 and columns[1] == 1 and columns[-1] == 90
  assert set(range(91)) - set(columns.tolist()) == {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}


def test_annotations_from_a_feature_dict():
  record = {"objects": {
      "bbox": [np.array([0.1, 0.2, 0.5, 0.6], np.float32), np.array([0.0, 0.0, 1.0, 1.0], np.float32)],
      "label": [np.int64(3), np.int64(0)], "is_crowd": [np.False_, np.True_],
      "id": [np.int64(11), np.int64(12)], "area": [np.int64(40), np.int64(2400)]}}
  ann = jtfds.tfds_annotations(record, stored_size=(40, 60))
  np.testing.assert_allclose(ann["boxes"], [[12, 4, 36, 20], [0, 0, 60, 40]], atol=1e-4)
  assert ann["labels"].tolist() == [3, 0] and ann["labels"].dtype == np.int32
  assert ann["crowd"].tolist() == [False, True] and ann["difficult"].tolist() == [False, False]
  assert ann["ids"].tolist() == [11, 12] and ann["area"].tolist() == [40, 2400]

  empty = jtfds.tfds_annotations({"objects": {"bbox": [], "label": []}}, stored_size=(5, 5))
  assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
  assert empty["ids"] is None and empty["area"] is None

  log = SkipLog("test")
  ragged = {"objects": {"bbox": np.zeros((3, 4), np.float32), "label": [1, 2],
                        "is_difficult": [True, False, True, False]}}
  ann = jtfds.tfds_annotations(ragged, stored_size=(10, 10), file="f", index=7, skip_log=log)
  assert ann["boxes"].shape == (2, 4) and ann["difficult"].tolist() == [True, False]
  assert log.total() == 1


def test_voc_image_ids_from_file_names():
  assert jtfds._filename_id("000005.jpg") == 5
  assert jtfds._filename_id("2008_000008.jpg") == 2008000008
  assert jtfds._filename_id("abc.jpg") is None
  assert jtfds._filename_id("99999999999.jpg") is None  # Beyond int32.


# ----------------------------------------------------------------------------
# VOC through tfds.testing.mock_data, with records encoded and decoded by the
# builder's own features (the path a prepared copy takes).
# ----------------------------------------------------------------------------

_VOC_RECORDS = [
    # (jpeg, file name, [(bbox ymin xmin ymax xmax, label, difficult)])
    (_jpeg(40, 60), "000005.jpg", [((0.1, 0.2, 0.5, 0.6), 14, False), ((0.0, 0.5, 1.0, 1.0), 8, True)]),
    (_jpeg(30, 20), "000007.jpg", []),
    # Stored 40 x 60 with EXIF orientation 6 (turn 90 degrees clockwise): upright 60 x 40.
    (_jpeg(40, 60, orientation=6), "000009.jpg", [((0.25, 0.0, 0.5, 0.5), 2, False)]),
    (b"not a jpeg", "000012.jpg", [((0.1, 0.1, 0.2, 0.2), 1, False)]),
]


def _voc_data_source(builder, split, *args, decoders=None, **kwargs):
  features = builder.info.features
  out = []
  for data, name, objects in _VOC_RECORDS:
    example = {
        "image": io.BytesIO(data) if data.startswith(b"\xff\xd8") else io.BytesIO(_jpeg(4, 4)),
        "image/filename": name,
        "labels": [o[1] for o in objects], "labels_no_difficult": [],
        "objects": [dict(bbox=tfds.features.BBox(*o[0]), label=o[1], pose=0, is_difficult=o[2],
                         is_truncated=False) for o in objects]}
    record = features.deserialize_example_np(
        features.serialize_example(features.encode_example(example)), decoders=decoders)
    if not data.startswith(b"\xff\xd8"):
      record["image"] = data  # A corrupt file, as a prepared copy may hold.
    out.append(record)
  return out


@pytest.fixture
def voc(tmp_path):
  with tfds.testing.mock_data(as_data_source_fn=_voc_data_source):
    yield jtfds.TfdsSource("voc/2007", "test", data_dir=str(tmp_path))


def test_voc_from_mock_data(voc):
  assert isinstance(voc, DetectionSource) and len(voc) == 4
  assert voc.class_names[14] == "person" and voc.num_classes == 20
  assert voc.category_id(0) == 1 and voc.category_id(19) == 20

  e = voc[0]
  assert e.image.shape == (40, 60, 3) and e.image.dtype == np.uint8
  assert e.image_id == 5 and e.file == "000005.jpg"
  np.testing.assert_allclose(e.boxes, [[12, 4, 36, 20], [30, 0, 60, 40]], atol=1e-4)
  assert e.labels.tolist() == [14, 8] and e.difficult.tolist() == [False, True]
  assert not e.crowd.any()

  empty = voc[1]
  assert empty.boxes.shape == (0, 4) and empty.image.shape == (30, 20, 3)

  rotated = voc[2]
  assert rotated.image.shape == (60, 40, 3)
  # Stored box x 0..30, y 10..20 (w 60, h 40); turned clockwise, (x, y) -> (40 - y, x).
  np.testing.assert_allclose(rotated.boxes, [[20, 0, 30, 30]], atol=1e-4)

  assert voc[3] is None  # Corrupt image: counted, not raised.
  assert any("unreadable" in k for k in voc.skip_log.counts())
  with pytest.raises(IndexError):
    voc[4]


def test_voc_ground_truth_in_pycocotools(voc):
  gt = voc.coco_ground_truth()
  coco = COCO()
  coco.dataset = gt
  coco.createIndex()
  assert sorted(coco.getImgIds()) == [5, 7, 9]  # The corrupt image is left out.
  assert coco.imgs[9]["height"] == 60 and coco.imgs[9]["width"] == 40
  anns = coco.loadAnns(coco.getAnnIds(imgIds=[5]))
  np.testing.assert_allclose([a["bbox"] for a in anns], [[12, 4, 24, 16], [30, 0, 30, 40]], atol=1e-4)
  assert [a["category_id"] for a in anns] == [15, 9]
  assert [a["iscrowd"] for a in anns] == [0, 1]  # Difficult boxes are ignored like crowd.
  assert len(coco.getCatIds()) == 20


def test_unprepared_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError, match="tfds build voc/2007"):
    jtfds.TfdsSource("voc/2007", "test", data_dir=str(tmp_path))


# ----------------------------------------------------------------------------
# COCO: tfds's builder needs TensorFlow to be constructed, so a prepared copy is
# opened from its files. The copy here is prepared (without TensorFlow) by a
# builder with the stock features, under the stock name and version.
# ----------------------------------------------------------------------------

_COCO_IMAGES = [  # (image id, (h, w), [(bbox, label, crowd, annotation id, area)])
    (139, (40, 60), [((0.1, 0.2, 0.5, 0.6), 0, False, 1001, 300), ((0.0, 0.0, 1.0, 0.5), 79, True, 1002, 900)]),
    (285, (30, 30), []),
    (632, (20, 50), [((0.5, 0.5, 1.0, 1.0), 17, False, 1003, 200)]),
]


class Coco(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Stand-in for tfds's coco/2017 with its features, to prepare a tiny copy."""

  VERSION = tfds.core.Version("1.1.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2017")]
  # tfds would find this file through importlib_resources, an optional extra.
  code_path = epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "image/filename": tfds.features.Text(),
        "image/id": np.int64,
        "objects": tfds.features.Sequence({
            "id": np.int64, "area": np.int64, "bbox": tfds.features.BBoxFeature(),
            "label": tfds.features.ClassLabel(names=list(class_names.COCO_CLASS_NAMES)),
            "is_crowd": np.bool_}),
    }))

  def _split_generators(self, dl_manager):
    return {"validation": self._generate_examples()}

  def _generate_examples(self):
    for image_id, (h, w), objects in _COCO_IMAGES:
      yield image_id, {
          "image": _jpeg(h, w), "image/filename": f"{image_id:012d}.jpg", "image/id": image_id,
          "objects": [dict(bbox=tfds.features.BBox(*b), label=label, is_crowd=crowd, id=i, area=a)
                      for b, label, crowd, i, a in objects]}


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  Coco(data_dir=str(data_dir)).download_and_prepare(file_format="array_record")
  return str(data_dir)


def test_prepared_coco_reads_without_tensorflow(coco_dir):
  source = jtfds.TfdsSource("coco/2017", "validation", data_dir=coco_dir)
  assert len(source) == 3 and source.is_coco
  assert list(source.class_names) == list(class_names.COCO_CLASS_NAMES)
  assert source.category_id(0) == 1 and source.category_id(79) == 90
  by_id = {e.image_id: e for e in (source[i] for i in range(len(source)))}
  assert sorted(by_id) == [139, 285, 632]
  e = by_id[139]
  assert e.image.shape == (40, 60, 3) and e.file == "000000000139.jpg"
  np.testing.assert_allclose(e.boxes, [[12, 4, 36, 20], [0, 0, 30, 40]], atol=1e-4)
  assert e.labels.tolist() == [0, 79] and e.crowd.tolist() == [False, True]
  assert by_id[285].boxes.shape == (0, 4)

  gt = source.coco_ground_truth()
  coco = COCO()
  coco.dataset = gt
  coco.createIndex()
  assert sorted(coco.getImgIds()) == [139, 285, 632]
  assert sorted(coco.getAnnIds()) == [1001, 1002, 1003]  # tfds's objects/id.
  a = coco.anns[1002]
  assert a["category_id"] == 90 and a["iscrowd"] == 1 and a["area"] == 900
  np.testing.assert_allclose(a["bbox"], [0, 0, 30, 40], atol=1e-4)
  assert coco.anns[1003]["category_id"] == 19  # Label 17 is "horse", COCO id 19.
  assert coco.cats[19]["name"] == "horse"
  assert sorted(coco.getCatIds()) == list(class_names.COCO_CATEGORY_IDS)


@pytest.mark.skipif(HAS_TF, reason="checks the error raised when TensorFlow is absent")
def test_coco_without_prepared_copy_says_what_to_install(tmp_path):
  with pytest.raises(jtfds.TensorFlowRequiredError, match="pip install tensorflow") as info:
    jtfds.TfdsSource("coco/2017", "validation", data_dir=str(tmp_path))
  assert "tfds build coco/2017" in str(info.value)
