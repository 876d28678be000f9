"""The grain pipeline: batch contract, epochs, sharding, padding, checkpointed state."""

import numpy as np
import pytest

from jdet.data import pipeline
from jdet.data import transforms as T
from jdet.data.shapes import ShapesSource
from tests.helpers.iterators import assert_resumes_from_state, assert_resumes_through_orbax

SIZE, MAX_BOXES = 64, 8


def _train_tf():
  return T.ssd_train_transforms(SIZE, max_boxes=MAX_BOXES)


def _eval_tf():
  return T.ssd_eval_transforms(SIZE, max_boxes=MAX_BOXES)


@pytest.fixture(scope="module")
def source():
  return ShapesSource(10, image_size=64, seed=3)


def test_train_batches_follow_the_contract(source):
  it = pipeline.train_batches(source, _train_tf(), batch_size=4, seed=0)
  b = next(it)
  assert set(b) == set(pipeline.BATCH_KEYS)
  assert b["image"].shape == (4, SIZE, SIZE, 3) and b["image"].dtype == np.float32
  assert b["boxes"].shape == (4, MAX_BOXES, 4) and b["boxes"].dtype == np.float32
  assert b["labels"].shape == (4, MAX_BOXES) and b["labels"].dtype == np.int32
  assert b["image_size"].shape == (4, 2) and b["orig_size"].shape == (4, 2)
  assert b["image_id"].shape == (4,) and b["valid"].all()
  real = b["labels"] >= 0
  # Real boxes are valid and inside the image; padded rows are zeros.
  bx = b["boxes"][real]
  assert np.all(bx[:, 2] > bx[:, 0]) and np.all(bx[:, 3] > bx[:, 1])
  assert np.all(bx >= 0) and np.all(bx <= SIZE)
  assert np.all(b["boxes"][~real] == 0)
  assert np.all(b["labels"][real] < len(source.class_names))


def test_epochs_reshuffle_and_cover_every_image(source):
  it = pipeline.train_batches(source, _eval_tf(), batch_size=5, seed=1)
  epoch1 = np.concatenate([next(it)["image_id"] for _ in range(2)])
  epoch2 = np.concatenate([next(it)["image_id"] for _ in range(2)])
  ids = sorted(int(source[i].image_id) for i in range(len(source)))
  assert sorted(epoch1) == ids and sorted(epoch2) == ids
  assert not np.array_equal(epoch1, epoch2)


def test_train_drops_the_remainder(source):
  it = pipeline.train_batches(source, _eval_tf(), batch_size=4, seed=0, num_epochs=1)
  batches = list(it)
  assert len(batches) == 2 and all(b["image"].shape[0] == 4 for b in batches)


def test_eval_pads_last_batch_and_sees_every_image_once(source):
  batches = list(pipeline.eval_batches(source, _eval_tf(), batch_size=4))
  assert len(batches) == 3 and all(b["image"].shape[0] == 4 for b in batches)
  valid = np.concatenate([b["valid"] for b in batches])
  ids = np.concatenate([b["image_id"] for b in batches])[valid]
  assert valid.sum() == 10 and sorted(ids) == sorted(source[i].image_id for i in range(10))
  last = batches[-1]
  assert not last["valid"][2:].any() and np.all(last["labels"][2:] == -1)


def test_shards_are_disjoint_and_cover_the_data(source):
  seen = []
  for shard in range(3):
    for b in pipeline.eval_batches(source, _eval_tf(), batch_size=2, shard_index=shard, num_shards=3):
      seen.extend(b["image_id"][b["valid"]].tolist())
  assert sorted(seen) == sorted(source[i].image_id for i in range(10))


def test_state_restores_exactly_the_next_batch(source):
  # Saved four batches in: in the second epoch.
  assert_resumes_from_state(
      lambda: pipeline.train_batches(source, _train_tf(), batch_size=3, seed=7), 4, 2,
      pipeline.BATCH_KEYS)


def test_same_seed_same_batches_different_seed_differs(source):
  a = next(pipeline.train_batches(source, _train_tf(), batch_size=4, seed=5))
  b = next(pipeline.train_batches(source, _train_tf(), batch_size=4, seed=5))
  c = next(pipeline.train_batches(source, _train_tf(), batch_size=4, seed=6))
  np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(a["image"], c["image"])


def test_unreadable_images_are_skipped_not_fatal(source):
  class Holey:
    class_names = source.class_names

    def __len__(self):
      return len(source)

    def __getitem__(self, i):
      return None if i % 3 == 0 else source[i]

  batches = list(pipeline.eval_batches(Holey(), _eval_tf(), batch_size=4))
  valid = np.concatenate([b["valid"] for b in batches])
  assert valid.sum() == 6  # indices 0, 3, 6, 9 were unreadable


def test_num_classes_mismatch_names_both_numbers(source):
  with pytest.raises(ValueError, match=r"num_classes=80 .* has 5 classes"):
    pipeline.check_num_classes(source, 80)
  pipeline.check_num_classes(source, len(source.class_names))


def test_too_small_shard_is_a_clear_error(source):
  with pytest.raises(ValueError, match="fewer than one batch"):
    pipeline.train_batches(source, _train_tf(), batch_size=8, seed=0, shard_index=0, num_shards=2)


def test_iterator_state_round_trips_through_an_orbax_checkpoint(source, tmp_path):
  assert_resumes_through_orbax(
      lambda: pipeline.train_batches(source, _train_tf(), batch_size=3, seed=11),
      2, tmp_path / "ckpt", pipeline.BATCH_KEYS)


def test_parallel_workers_read_every_image_once_per_epoch(source):
  it = pipeline.train_batches(source, _eval_tf(), batch_size=2, seed=4, num_workers=2)
  ids = np.concatenate([next(it)["image_id"] for _ in range(10)])  # two epochs of 10 images
  counts = np.unique(ids, return_counts=True)
  assert sorted(counts[0].tolist()) == sorted(int(source[i].image_id) for i in range(len(source)))
  assert np.all(counts[1] == 2)
