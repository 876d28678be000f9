"""The grain input pipeline: source -> shuffle -> decode + transforms -> fixed-shape batches.

Training (:func:`train_batches`)::

  source[shard::num_shards]          # each process reads its own share of the index space
    .seed(seed).shuffle().repeat()   # a new permutation every epoch, reproducible
    .random_map(transform)           # per-(seed, epoch, index) RNG: deterministic augmentation
    .to_iter_dataset()               # unreadable images (the source returned None) are skipped
    .batch(B, drop_remainder=True)   # every batch is full: one compile
    .mp_prefetch(workers)            # optional parallel workers

Evaluation (:func:`eval_batches`) reads every image of the process's share once,
in order, and pads the last batch with filler images marked ``valid=False``,
so every image is evaluated exactly once with one batch shape.

Batches follow the contract of the design notes (``image``, ``boxes``,
``labels``, ``image_size``, ``orig_size``, ``image_id``, ``valid``) plus
``scale_factor [B, 2]`` (to map detections back to original pixels),
``dropped_boxes [B]`` and ``truncated_boxes [B]`` (boxes removed by augmentation and
by the ``max_boxes`` cap, so that training can log them).

The iterators are grain ``DatasetIterator`` objects: ``get_state()`` and
``set_state()`` (or orbax's ``grain.checkpoint.CheckpointSave/Restore``) save and
restore the exact position, so a resumed run continues with the next batch.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np
from absl import flags

from jdet.data.records import DetectionSource
from jdet.data.transforms import sample_from_example

__all__ = ["BATCH_KEYS", "train_batches", "eval_batches", "check_num_classes", "pad_batch"]

# Keys of a batch, in the order of the design notes, and the bookkeeping extras.
BATCH_KEYS = ("image", "boxes", "labels", "image_size", "orig_size", "image_id", "valid",
              "scale_factor", "dropped_boxes", "truncated_boxes")

Transform = Callable[[dict, np.random.Generator | None], dict]


def check_num_classes(source: DetectionSource, num_classes: int) -> None:
  """Fails at start-up when a config's ``num_classes`` does not match the data."""
  n = len(source.class_names)
  if n != num_classes:
    raise ValueError(f"the config says num_classes={num_classes} but the dataset "
                     f"{type(source).__name__} has {n} classes: {list(source.class_names)}")


class _Prepare:
  """Example -> batch-ready sample (picklable, for worker processes)."""

  def __init__(self, transform: Transform):
    self.transform = transform

  def __call__(self, example, rng: np.random.Generator | None = None) -> dict | None:
    if example is None:  # unreadable image: the source has counted and logged it
      return None
    sample = self.transform(sample_from_example(example), rng)
    if sample["boxes"].ndim != 2 or sample["labels"].shape != sample["boxes"].shape[:1]:
      raise ValueError("the transform must end with PadBoxes (fixed [M, 4] boxes); "
                       f"got boxes {sample['boxes'].shape} for image {example.file}")
    sample["valid"] = np.bool_(True)
    sample["image"] = np.asarray(sample["image"], np.float32)
    return {k: np.asarray(sample[k]) for k in BATCH_KEYS}


def _shard(ds: grain.MapDataset, shard_index: int, num_shards: int) -> grain.MapDataset:
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index {shard_index} is outside 0..{num_shards - 1}")
  return ds[shard_index::num_shards] if num_shards > 1 else ds


def _maybe_workers(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
  if num_workers > 0:
    # grain's workers read absl flags; programs outside absl.app have not parsed them.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ds


def train_batches(source: DetectionSource, transform: Transform, *, batch_size: int, seed: int,
                  shard_index: int = 0, num_shards: int = 1, num_epochs: int | None = None,
                  num_workers: int = 0) -> grain.DatasetIterator:
  """An endless (or ``num_epochs``) iterator of full training batches.

  Args:
    source: a :class:`~jdet.data.records.DetectionSource`.
    transform: training transforms ending with ``PadBoxes(max_boxes)``.
    batch_size: images per batch in this process (the global batch divided by
      the number of processes).
    seed: shuffling and augmentation seed.
    shard_index, num_shards: this process's share (``jax.process_index()``,
      ``jax.process_count()``): it reads indices ``shard_index::num_shards``.
    num_epochs: None repeats forever.
    num_workers: grain worker processes (0: in this process). Each worker
      batches its own interleaved share of the stream, so the sequence of
      batches depends on ``num_workers``; for a fixed ``num_workers`` it is
      deterministic. Keep it fixed across a resume.
  """
  if len(source) == 0:
    raise ValueError(f"the training source {type(source).__name__} has no images")
  ds = _shard(grain.MapDataset.source(source), shard_index, num_shards)
  if len(ds) < batch_size:
    raise ValueError(f"shard {shard_index} of the training source has {len(ds)} images, "
                     f"fewer than one batch of {batch_size}")
  ds = ds.seed(seed).shuffle().repeat(num_epochs).random_map(_Prepare(transform))
  it = ds.to_iter_dataset().batch(batch_size, drop_remainder=True)
  return iter(_maybe_workers(it, num_workers))


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """Pads a short batch to ``batch_size`` with zero filler images, ``valid=False``."""
  n = batch["valid"].shape[0]
  if n == batch_size:
    return batch
  out = {}
  for k, v in batch.items():
    pad_value = -1 if k == "labels" else 0
    filler = np.full((batch_size - n,) + v.shape[1:], pad_value, v.dtype)
    out[k] = np.concatenate([v, filler])
  return out


class _PadTo:

  def __init__(self, batch_size: int):
    self.batch_size = batch_size

  def __call__(self, batch):
    return pad_batch(batch, self.batch_size)


def eval_batches(source: DetectionSource, transform: Transform, *, batch_size: int,
                 shard_index: int = 0, num_shards: int = 1,
                 num_workers: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """One pass over this process's share of ``source``, in order, every batch full.

  The last batch is completed with filler images (``valid=False``, ``image_id``
  0) so that the step compiles once and every real image is seen exactly once.
  """
  ds = _shard(grain.MapDataset.source(source), shard_index, num_shards)
  ds = ds.map(_Prepare(transform))
  it = ds.to_iter_dataset().batch(batch_size, drop_remainder=False).map(_PadTo(batch_size))
  return iter(_maybe_workers(it, num_workers))


def stack_samples(samples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  """Stacks prepared samples into a batch (what grain's ``batch`` does), for tools."""
  return {k: np.stack([s[k] for s in samples]) for k in samples[0]}
