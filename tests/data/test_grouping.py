"""Aspect-ratio grouping of training batches, and image sizes read without decoding."""

from __future__ import annotations

import collections
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from jdet.data import builder, pipeline
from jdet.data import transforms as T
from jdet.data.coco import CocoSource
from jdet.data.records import SizedSource, SkipLog, image_sizes
from jdet.data.shapes import ShapesSource
from jdet.data.voc import VocSource
from tests.helpers.images import RACCOON, write_image
from tests.helpers.iterators import assert_resumes_from_state, assert_resumes_through_orbax

B = 4
# Keep-ratio resize to short side 16, long side at most 26, padded to one of two
# buckets. The buckets' short side (20) exceeds the resize's (16), as COCO's
# 832 does 800: a nearly square portrait image (17 x 16) fits both buckets and
# ``Pad`` picks the first (landscape) one; grouping pads it to the portrait one.
SCALE = (16, 26)
LANDSCAPE_CANVAS, PORTRAIT_CANVAS = (20, 28), (28, 20)
BUCKETS = (LANDSCAPE_CANVAS, PORTRAIT_CANVAS)
MAX_BOXES = 4


# (stored h, stored w, EXIF orientation): 11 landscape images (two square) and
# 6 portrait ones, one of them nearly square and one stored as landscape
# pixels that EXIF orientation 6 turns upright.
IMAGES = ([(12, 20, None), (10, 18, None), (14, 22, None), (16, 16, None), (9, 30, None)] * 2
          + [(13, 13, None)]
          + [(20, 12, None), (22, 14, None), (17, 16, None), (30, 10, None), (18, 11, None),
             (12, 20, 6)])
UPRIGHT = [(w, h) if o == 6 else (h, w) for h, w, o in IMAGES]
NUM_LANDSCAPE = sum(w >= h for h, w in UPRIGHT)
NUM_PORTRAIT = len(UPRIGHT) - NUM_LANDSCAPE


def write_coco(root: Path, images=IMAGES, missing: tuple[int, ...] = ()) -> Path:
  """A COCO-format set of tiny images (ids 1..n), sizes recorded as stored (EXIF frame)."""
  (root / "img").mkdir(parents=True, exist_ok=True)
  records, annotations = [], []
  for i, (h, w, orientation) in enumerate(images, start=1):
    name = f"{i:04d}.png"
    if i not in missing:
      write_image(root / "img" / name, h, w, seed=i, orientation=orientation)
    records.append(dict(id=i, file_name=name, height=h, width=w))
    annotations.append(dict(id=100 + i, image_id=i, category_id=1, bbox=[1, 1, 6, 5], area=30.0))
  path = root / "instances.json"
  path.write_text(json.dumps(dict(images=records, annotations=annotations,
                                  categories=[dict(id=1, name="thing")])))
  return path


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> CocoSource:
  root = tmp_path_factory.mktemp("coco")
  # check_sizes=False: the recorded sizes (the EXIF image's is its stored frame) are
  # not trusted, image_sizes() reads the headers.
  return CocoSource(write_coco(root), root / "img", check_sizes=False, skip_log=SkipLog("test"))


def _transform():
  return T.rcnn_train_transforms((SCALE,), buckets=BUCKETS, max_boxes=MAX_BOXES)


def _batches(source, n=None, **kw):
  kw = dict(batch_size=B, seed=0, group_by_aspect=True) | kw
  it = pipeline.train_batches(source, _transform(), **kw)
  return list(it) if n is None else [next(it) for _ in range(n)]


def _upright_by_id(source) -> dict[int, tuple[int, int]]:
  return {source.image_id(i): tuple(source[i].image.shape[:2]) for i in range(len(source))}


# ----------------------------------------------------------------------------
# Sizes without decoding.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("check_sizes", [False, True])
def test_header_sizes_equal_decoded_sizes_for_the_raccoon_photos(check_sizes):
  assert RACCOON.is_dir(), f"the raccoon data set is missing: expected it at {RACCOON}"
  for split in ("train", "val"):
    source = VocSource(RACCOON, split, check_sizes=check_sizes, skip_log=SkipLog("raccoon"))
    assert isinstance(source, SizedSource)
    decoded = np.array([source[i].image.shape[:2] for i in range(len(source))])
    np.testing.assert_array_equal(source.image_sizes(), decoded)
    np.testing.assert_array_equal(image_sizes(source, [3, 1]), decoded[[3, 1]])


def test_concatenated_sources_give_their_parts_sizes():
  both = builder._voc(str(RACCOON.parent), (f"{RACCOON.name}/train", f"{RACCOON.name}/val"),
                      class_names=("raccoon",))
  parts = np.concatenate([p.image_sizes() for p in both.parts])
  np.testing.assert_array_equal(both.image_sizes(), parts)
  np.testing.assert_array_equal(image_sizes(both, [170, 2]), parts[[170, 2]])


def test_sizes_are_upright_from_headers_when_the_recorded_ones_are_not_trusted(coco):
  np.testing.assert_array_equal(coco.image_sizes(), UPRIGHT)
  rotated = len(IMAGES) - 1
  assert tuple(coco.image_sizes([rotated])[0]) == (20, 12)  # recorded 12 x 20, EXIF 6
  assert coco[rotated].image.shape[:2] == (20, 12)


def test_source_without_image_sizes_is_decoded_once_with_a_warning(caplog):
  source = ShapesSource(3, image_size=(24, 40), seed=1)
  with caplog.at_level(logging.WARNING, logger="jdet.data"):
    sizes = image_sizes(source)
  np.testing.assert_array_equal(sizes, [(24, 40)] * 3)
  assert "has no image_sizes()" in caplog.text


# ----------------------------------------------------------------------------
# Grouped batches.
# ----------------------------------------------------------------------------


def test_every_batch_holds_one_group_on_its_canvas(coco):
  size_of = _upright_by_id(coco)
  batches = _batches(coco, num_epochs=2)
  assert len(batches) == 2 * (NUM_LANDSCAPE // B + NUM_PORTRAIT // B)
  shapes = collections.Counter()
  for b in batches:
    assert b["valid"].all() and b["image"].shape[0] == B
    landscape = {size_of[int(i)][1] >= size_of[int(i)][0] for i in b["image_id"]}
    assert len(landscape) == 1
    canvas = LANDSCAPE_CANVAS if landscape.pop() else PORTRAIT_CANVAS
    assert b["image"].shape[1:3] == canvas
    shapes[canvas] += 1
    # The real image sits top-left; padding is zero, boxes stay inside the real image.
    for j in range(B):
      h, w = b["image_size"][j]
      assert np.all(b["image"][j, h:] == 0) and np.all(b["image"][j, :, w:] == 0)
      real = b["labels"][j] >= 0
      assert np.all(b["boxes"][j][real][:, 2] <= w) and np.all(b["boxes"][j][real][:, 3] <= h)
  assert shapes[LANDSCAPE_CANVAS] == 2 * (NUM_LANDSCAPE // B)
  assert shapes[PORTRAIT_CANVAS] == 2 * (NUM_PORTRAIT // B)


def test_nearly_square_portrait_is_padded_to_the_portrait_canvas(coco):
  nearly_square = IMAGES.index((17, 16, None))
  example = coco[nearly_square]
  plain = _transform()(T.sample_from_example(example), np.random.default_rng(0))
  assert plain["image"].shape[:2] == LANDSCAPE_CANVAS  # what Pad alone picks
  seen = 0
  for b in _batches(coco, num_epochs=3):
    for j in np.flatnonzero(b["image_id"] == example.image_id):
      assert b["image"].shape[1:3] == PORTRAIT_CANVAS and b["valid"][j]
      seen += 1
  assert seen >= 1


def test_an_epoch_is_the_ungrouped_epoch_less_the_remainder_of_each_group(coco):
  size_of = _upright_by_id(coco)
  ungrouped = pipeline.train_batches(coco, _transform(), batch_size=1, seed=0, num_epochs=1)
  all_ids = collections.Counter(int(b["image_id"][0]) for b in ungrouped)
  assert sum(all_ids.values()) == len(IMAGES)
  batches = _batches(coco, num_epochs=2)
  per_epoch = len(batches) // 2
  epochs = [np.concatenate([b["image_id"] for b in batches[k * per_epoch:(k + 1) * per_epoch]])
            for k in range(2)]
  for ids in epochs:
    grouped = collections.Counter(ids.tolist())
    assert not grouped - all_ids  # nothing new, nothing twice
    left_out = all_ids - grouped
    landscape = sum(n for i, n in left_out.items() if size_of[i][1] >= size_of[i][0])
    assert (landscape, sum(left_out.values()) - landscape) == (NUM_LANDSCAPE % B,
                                                              NUM_PORTRAIT % B)
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch


def test_same_seed_same_batches_other_seed_other_order(coco):
  a, b = _batches(coco, 6, seed=5), _batches(coco, 6, seed=5)
  for x, y in zip(a, b):
    for k in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  c = _batches(coco, 6, seed=6)
  assert not all(np.array_equal(x["image_id"], z["image_id"]) for x, z in zip(a, c))


def test_a_restored_iterator_state_gives_the_same_next_batches(coco):
  per_epoch = NUM_LANDSCAPE // B + NUM_PORTRAIT // B
  # Saved in the second epoch, compared across the next epoch boundary.
  assert_resumes_from_state(
      lambda: pipeline.train_batches(coco, _transform(), batch_size=B, seed=7,
                                     group_by_aspect=True),
      per_epoch + 1, per_epoch, pipeline.BATCH_KEYS)


def test_iterator_state_round_trips_through_an_orbax_checkpoint(coco, tmp_path):
  assert_resumes_through_orbax(
      lambda: pipeline.train_batches(coco, _transform(), batch_size=B, seed=11,
                                     group_by_aspect=True),
      3, tmp_path / "ckpt", pipeline.BATCH_KEYS)


def test_two_shards_are_disjoint_and_in_step(coco):
  shards = [_batches(coco, num_epochs=1, shard_index=s, num_shards=2, batch_size=2)
            for s in range(2)]
  ids = [set(np.concatenate([b["image_id"] for b in batches]).tolist()) for batches in shards]
  assert ids[0] and ids[1] and not ids[0] & ids[1]
  assert ids[0] <= set(range(1, len(IMAGES) + 1)) and all(i % 2 == 1 for i in ids[0])
  # Every shard takes a batch of the same group (shape) at every step.
  assert len(shards[0]) == len(shards[1])
  assert [b["image"].shape for b in shards[0]] == [b["image"].shape for b in shards[1]]


def test_workers_give_the_same_batches(coco):
  want = _batches(coco, 4, seed=2)
  got = _batches(coco, 4, seed=2, num_workers=2)
  for x, y in zip(got, want):
    for k in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_missing_image_is_counted_logged_and_a_filler(tmp_path, caplog):
  # 8 landscape and 4 portrait images: no remainder, so every image is read every epoch.
  images = [(12, 20, None)] * 8 + [(20, 12, None)] * 4
  log = SkipLog("missing")
  source = CocoSource(write_coco(tmp_path, images, missing=(3,)), tmp_path / "img",
                      check_sizes=False, skip_log=log)
  with caplog.at_level(logging.WARNING, logger="jdet.data"):
    batches = _batches(source, num_epochs=2)
  assert "1 of 12 images of CocoSource have no readable size" in caplog.text
  assert log.counts()["skipped: missing image"] >= 1
  assert len(batches) == 2 * 3
  valid = np.concatenate([b["valid"] for b in batches])
  ids = np.concatenate([b["image_id"] for b in batches])
  assert (~valid).sum() == 2 and 3 not in ids[valid].tolist()  # one filler per epoch
  for b in batches:
    for j in np.flatnonzero(~b["valid"]):
      assert b["image"].shape[1:3] == LANDSCAPE_CANVAS and np.all(b["image"][j] == 0)
      assert np.all(b["labels"][j] == -1) and b["image_id"][j] == 0


def test_image_larger_than_its_group_canvas_is_a_counted_filler(coco, caplog):
  class WrongSizes:
    """The coco source with its 20 x 12 (portrait) images' sizes given as 12 x 20."""

    def __init__(self, source):
      self.source = source
      self.class_names = source.class_names

    def __len__(self):
      return len(self.source)

    def __getitem__(self, i):
      return self.source[i]

    def image_sizes(self, indices=None):
      sizes = self.source.image_sizes(indices)
      return np.where(sizes == [20, 12], [12, 20], sizes)

  wrong = WrongSizes(coco)
  with caplog.at_level(logging.WARNING, logger="jdet.data"):
    batches = _batches(wrong, num_epochs=4)
  assert all(b["image"].shape[1:3] in BUCKETS for b in batches)
  assert "larger than its aspect group's canvas" in caplog.text
  valid = np.concatenate([b["valid"] for b in batches])
  wrong_ids = {i + 1 for i, size in enumerate(UPRIGHT) if size == (20, 12)}
  ids = np.concatenate([b["image_id"] for b in batches])
  assert 1 <= (~valid).sum() <= 4 * len(wrong_ids) and not wrong_ids & set(ids[valid].tolist())


def test_too_few_images_for_any_batch_is_a_clear_error(coco):
  with pytest.raises(ValueError, match="no aspect group fills a batch"):
    _batches(coco, 1, batch_size=len(IMAGES))


def test_off_by_default():
  source = ShapesSource(10, image_size=64, seed=3)
  tf = T.ssd_train_transforms(64, max_boxes=8)
  a = next(pipeline.train_batches(source, tf, batch_size=4, seed=1))
  b = next(pipeline.train_batches(source, tf, batch_size=4, seed=1, group_by_aspect=False))
  for k in pipeline.BATCH_KEYS:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # Grouping a fixed-size recipe works too (every image is in one group and shape).
  c = next(pipeline.train_batches(source, tf, batch_size=4, seed=1, group_by_aspect=True))
  assert c["image"].shape == (4, 64, 64, 3) and c["valid"].all()


# ----------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------


def test_rcnn_canvas_and_buckets_pad_training_to_buckets_and_evaluation_to_the_canvas(coco):
  from configs import common

  data = common.data_config(common.coco_data("unused"),
                            common.rcnn_augment((SCALE,), canvas=(28, 28), buckets=BUCKETS),
                            batch_size=B, group_by_aspect=True)
  assert data.group_by_aspect is True
  sample = T.sample_from_example(coco[0])  # landscape
  train = builder.build_transforms(data, train=True)(dict(sample), np.random.default_rng(0))
  evaluation = builder.build_transforms(data, train=False)(dict(sample), None)
  assert train["image"].shape[:2] == LANDSCAPE_CANVAS and evaluation["image"].shape[:2] == (28, 28)
  plain = common.data_config(common.coco_data("unused"), common.rcnn_augment(), batch_size=B)
  assert plain.group_by_aspect is False


def test_faster_rcnn_coco_groups_by_aspect_and_evaluates_on_one_canvas():
  from configs import faster_rcnn_r50_fpn

  for variant in ("coco", "coco_ms"):
    data = faster_rcnn_r50_fpn.get_config(variant).data
    assert data.group_by_aspect is True
    assert data.transforms.buckets == ((832, 1344), (1344, 832))
    assert data.transforms.canvas == (1344, 1344)
    # Every training scale fits its orientation's bucket.
    for short, long in data.transforms.scales:
      assert T.choose_bucket(T.rescale_size((600, 1000), short, long), data.transforms.buckets) \
          == (832, 1344)
  for variant in ("shapes", "smoke"):
    assert not faster_rcnn_r50_fpn.get_config(variant).data.get("group_by_aspect", False)


def test_tfds_sizes_come_from_the_image_headers(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  from jdet.data.tfds import TfdsSource
  from tests.data.test_tfds import _voc_data_source  # its mock VOC records

  with tfds.testing.mock_data(as_data_source_fn=_voc_data_source):
    voc = TfdsSource("voc/2007", "test", data_dir=str(tmp_path))
    sizes = voc.image_sizes()
    # Upright (the third is stored 40 x 60 with EXIF orientation 6); the fourth is corrupt.
    np.testing.assert_array_equal(sizes, [(40, 60), (30, 20), (60, 40), (0, 0)])
    assert any("unreadable image" in k for k in voc.skip_log.counts())
    np.testing.assert_array_equal(voc.image_sizes([2]), [(60, 40)])
    assert voc[2].image.shape[:2] == (60, 40)
