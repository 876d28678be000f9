"""The grain input pipeline: source -> shuffle -> decode + transforms -> fixed-shape batches.

Training (:func:`train_batches`)::

  source[shard::num_shards]          # each process reads its own share of the index space
    .seed(seed).shuffle().repeat()   # a new permutation every epoch, reproducible
    .random_map(transform)           # per-(seed, epoch, index) RNG: deterministic augmentation
    .to_iter_dataset()               # unreadable images (the source returned None) are skipped
    .batch(B, drop_remainder=True)   # every batch is full: one compile
    .mp_prefetch(workers)            # optional parallel workers

With ``group_by_aspect=True`` a batch holds only landscape (``w >= h``) or only
portrait images, so that the R-CNN recipe can pad to one canvas per
orientation (``buckets=((832, 1344), (1344, 832))``) instead of one square
canvas for both (MMDetection's ``GroupSampler``, detectron2's
``AspectRatioGroupedDataset``), but at the index level, deterministic and
checkpointable::

  image_sizes(source)                # (h, w) from metadata or headers, not decoded
  MapDataset.source(_GroupedOrder)   # element i: (index, group) of epoch i // (K * B):
                                     #   per epoch, seeded: shuffle, split by group,
                                     #   cut into K full batches, interleave them
    .seed(seed).random_map(prepare)  # transform, then pad to the group's canvas
    .batch(B)                        # MapDataset batching: batch k is the k-th row
    .to_iter_dataset()
    .mp_prefetch(workers)

Evaluation (:func:`eval_batches`) reads every image of the process's share once,
in order, and pads the last batch with filler images marked ``valid=False``,
so every image is evaluated exactly once with one batch shape.

Batches follow the contract of the design notes (docs/design.md: ``image``, ``boxes``,
``labels``, ``image_size``, ``orig_size``, ``image_id``, ``valid``) plus
``scale_factor [B, 2]`` (to map detections back to original pixels),
``dropped_boxes [B]`` and ``truncated_boxes [B]`` (boxes removed by augmentation and
by the ``max_boxes`` cap, so that training can log them). Training batches made
with ``data_notes=True`` also carry :data:`NOTES_KEY`, the skips and fixes of
input that the reading process noted first (popped before the devices).

The iterators are grain ``DatasetIterator`` objects: ``get_state()`` and
``set_state()`` (or orbax's ``grain.checkpoint.CheckpointSave/Restore``) save and
restore the exact position, so a resumed run continues with the next batch.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np
from absl import flags

from jdet.data import transforms as T
from jdet.data import records
from jdet.data.records import DetectionSource, SkipLog, image_sizes
from jdet.data.transforms import sample_from_example

__all__ = ["BATCH_KEYS", "NOTES_KEY", "train_batches", "eval_batches", "check_num_classes",
           "pad_batch", "aspect_groups", "LANDSCAPE", "PORTRAIT"]

log = logging.getLogger("jdet.data")

# Keys of a batch, in the order of the design notes (docs/design.md), and the bookkeeping extras.
BATCH_KEYS = ("image", "boxes", "labels", "image_size", "orig_size", "image_id", "valid",
              "scale_factor", "dropped_boxes", "truncated_boxes")

# The extra key of training batches made with ``data_notes=True``: a 0-d string array, the
# skips and fixes first noted by the process that made the batch
# (:func:`jdet.data.records.encode_notes`), to be popped before the batch goes to devices.
NOTES_KEY = "data_notes"

Transform = Callable[[dict, np.random.Generator | None], dict]


class _AttachNotes:
  """Batch -> batch plus :data:`NOTES_KEY` (picklable; runs where the batch is made)."""

  def __call__(self, batch: dict) -> dict:
    out = dict(batch)
    out[NOTES_KEY] = np.asarray(records.encode_notes(records.drain_notes()))
    return out


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


def _check_shard(shard_index: int, num_shards: int) -> None:
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index {shard_index} is outside 0..{num_shards - 1}")


def _shard(ds: grain.MapDataset, shard_index: int, num_shards: int) -> grain.MapDataset:
  _check_shard(shard_index, num_shards)
  return ds[shard_index::num_shards] if num_shards > 1 else ds


# How many images each reading process prepares ahead of the batch it hands out. grain's
# default read-ahead is 500 elements: 6.5 GB of 832x1344 float32 R-CNN samples per process,
# and 500 *batches* where batches are made before reading (aspect grouping), which ran a
# 2-worker COCO-recipe pipeline out of memory on a 24 GiB machine.
READ_AHEAD_IMAGES = 64


def _read_options(batch_size: int, *, batched: bool) -> grain.ReadOptions:
  """Read-ahead of about :data:`READ_AHEAD_IMAGES` images (at least two batches), in
  elements: images, or batches when the dataset is batched before it is read."""
  images = max(READ_AHEAD_IMAGES, 2 * batch_size)
  elements = -(-images // batch_size) if batched else images
  return grain.ReadOptions(num_threads=min(16, elements), prefetch_buffer_size=elements)


def _maybe_workers(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
  if num_workers > 0:
    # grain's workers read absl flags; programs outside absl.app have not parsed them.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ds


def train_batches(source: DetectionSource, transform: Transform, *, batch_size: int, seed: int,
                  shard_index: int = 0, num_shards: int = 1, num_epochs: int | None = None,
                  num_workers: int = 0, group_by_aspect: bool = False,
                  data_notes: bool = False) -> grain.DatasetIterator:
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
    group_by_aspect: each batch holds only landscape (``w >= h``) or only
      portrait images, padded to their group's canvas, so that the R-CNN
      recipe's ``buckets`` give two batch shapes (:func:`_grouped_batches`).
      Each epoch leaves out the images of each group that do not fill a batch:
      with one shard ``n_landscape % B + n_portrait % B`` images (fewer than
      ``2 * B``), different ones every epoch; with several shards, which all
      make the same number of batches of a group (the smallest shard's), a
      shard leaves out ``n_g - B * min_over_shards(n_g // B)`` of group ``g``.
      The grouped batches do not depend on ``num_workers``. Off (default),
      the batches are exactly those of earlier versions.
    data_notes: add :data:`NOTES_KEY` to every batch: the skips and fixes of
      input first noted in the process that made it (a worker's would
      otherwise stay in that worker), for the training summary.
  """
  if len(source) == 0:
    raise ValueError(f"the training source {type(source).__name__} has no images")
  if group_by_aspect:
    it = _grouped_batches(source, transform, batch_size=batch_size, seed=seed,
                          shard_index=shard_index, num_shards=num_shards, num_epochs=num_epochs)
    it = it.map(_AttachNotes()) if data_notes else it
    return iter(_maybe_workers(it, num_workers))
  ds = _shard(grain.MapDataset.source(source), shard_index, num_shards)
  if len(ds) < batch_size:
    raise ValueError(f"shard {shard_index} of the training source has {len(ds)} images, "
                     f"fewer than one batch of {batch_size}")
  ds = ds.seed(seed).shuffle().repeat(num_epochs).random_map(_Prepare(transform))
  it = ds.to_iter_dataset(_read_options(batch_size, batched=False))
  it = it.batch(batch_size, drop_remainder=True)
  it = it.map(_AttachNotes()) if data_notes else it
  return iter(_maybe_workers(it, num_workers))


# ----------------------------------------------------------------------------
# Aspect-ratio grouping (``train_batches(..., group_by_aspect=True)``).
# ----------------------------------------------------------------------------

# Aspect groups: landscape (w >= h, squares included) and portrait (h > w).
LANDSCAPE, PORTRAIT = 0, 1
_GROUP_NAMES = ("landscape", "portrait")


def aspect_groups(source: DetectionSource,
                  indices: Sequence[int] | None = None) -> tuple[np.ndarray, int]:
  """The aspect group of the images at ``indices`` (default all), and how many had no size.

  Sizes come from :func:`jdet.data.records.image_sizes` (upright, from metadata
  or image headers, not decoded). An image whose size cannot be read (a missing
  or unreadable file, which the source counts in its skip log) joins the
  landscape group; how many did is returned and logged as a warning. When such
  an image is read it gives a filler image (``valid=False``), as any image that
  cannot be decoded does.

  Returns:
    ``(groups, num_unknown)``: ``[n]`` int8 :data:`LANDSCAPE` or :data:`PORTRAIT`.
  """
  sizes = image_sizes(source, indices)
  unknown = ~np.all(sizes > 0, axis=1)
  groups = np.where(sizes[:, 1] >= sizes[:, 0], LANDSCAPE, PORTRAIT).astype(np.int8)
  groups[unknown] = LANDSCAPE
  num_unknown = int(unknown.sum())
  if num_unknown:
    log.warning("aspect grouping: %d of %d images of %s have no readable size (counted in the "
                "source's skip log); they join the landscape group", num_unknown, len(sizes),
                type(source).__name__)
  return groups, num_unknown


class _GroupedOrder:
  """The grouped order of a shard: element ``i`` is ``(source index, group)``.

  Element ``i`` is slot ``i % B`` of batch ``(i // B) % K`` of epoch
  ``i // (K * B)``, where ``K`` (batches per epoch) is the same every epoch. An
  epoch's table is a pure function of ``(seed, epoch, shard_index)``: the
  shard's images shuffled, split by group, each group cut into its number of
  full batches (the rest left out), and the batches put in a random order of
  groups that depends on ``(seed, epoch)`` only, so that every shard (process)
  takes a batch of the same group, hence of the same shape, at every step.
  Tables are computed when first asked and the two latest are kept.
  """

  def __init__(self, indices: np.ndarray, groups: np.ndarray, batches_per_group: Sequence[int],
               *, batch_size: int, seed: int, shard_index: int, num_epochs: int | None):
    self.indices = np.asarray(indices, np.int64)
    self.groups = np.asarray(groups, np.int8)
    self.batches_per_group = tuple(int(k) for k in batches_per_group)
    self.batch_size = int(batch_size)
    self.seed, self.shard_index = int(seed), int(shard_index)
    self.per_epoch = sum(self.batches_per_group) * self.batch_size
    if num_epochs is None:  # "endless": the largest whole number of epochs grain can index
      self._length = (sys.maxsize // self.per_epoch) * self.per_epoch
    else:
      self._length = int(num_epochs) * self.per_epoch
    self._tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    self._lock = threading.Lock()

  def __getstate__(self) -> dict:  # for worker processes: no lock, no cached tables
    state = self.__dict__.copy()
    del state["_lock"]
    state["_tables"] = {}
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self._length

  def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """``([K, B] source indices, [K] group)`` of the batches of ``epoch``, in order."""
    with self._lock:
      cached = self._tables.get(epoch)
    if cached is not None:
      return cached
    b = self.batch_size
    schedule = np.repeat(np.arange(len(self.batches_per_group), dtype=np.int8),
                         self.batches_per_group)
    schedule = np.random.default_rng([self.seed, epoch]).permutation(schedule)
    order = np.random.default_rng([self.seed, epoch, self.shard_index]).permutation(
        len(self.indices))
    table = np.empty((len(schedule), b), np.int64)
    for group, k in enumerate(self.batches_per_group):
      members = order[self.groups[order] == group][:k * b]
      table[schedule == group] = self.indices[members].reshape(k, b)
    result = (table, schedule)
    with self._lock:
      self._tables[epoch] = result
      while len(self._tables) > 2:
        del self._tables[min(self._tables)]
    return result

  def __getitem__(self, i: int) -> tuple[int, int]:
    epoch, r = divmod(int(i), self.per_epoch)
    table, schedule = self.epoch(epoch)
    k, slot = divmod(r, self.batch_size)
    return int(table[k, slot]), int(schedule[k])


def _group_canvases(transform: Transform,
                    image_shape: tuple[int, int]) -> tuple[tuple[tuple[int, int], ...], float]:
  """Each group's canvas ``(H, W)`` and the padding value.

  From the transform's last :class:`~jdet.data.transforms.Pad` (a
  :class:`~jdet.data.transforms.Compose` step): its ``size`` for both groups,
  or of its ``buckets`` the largest with ``W >= H`` for landscape and the
  largest with ``H >= W`` for portrait. Without a ``Pad`` (a fixed-size
  resize), both groups have the shape of ``image_shape``.
  """
  pads = [t for t in getattr(transform, "transforms", ()) if isinstance(t, T.Pad)]
  if not pads:
    return (image_shape, image_shape), 0.0
  pad = pads[-1]
  if pad.size is not None:
    return (pad.size, pad.size), float(pad.value)

  def largest(buckets):
    return max(buckets, key=lambda b: b[0] * b[1])  # the first of equal areas

  landscape = largest([b for b in pad.buckets if b[1] >= b[0]] or pad.buckets)
  portrait = largest([b for b in pad.buckets if b[0] >= b[1]] or pad.buckets)
  return (landscape, portrait), float(pad.value)


def _filler_sample(template: dict[str, np.ndarray], channels: int,
            canvas: tuple[int, int]) -> dict[str, np.ndarray]:
  """A blank image of ``canvas`` with no boxes, ``valid=False`` (training ignores it)."""
  out = {k: np.zeros_like(v) for k, v in template.items()}
  out["image"] = np.zeros((*canvas, channels), np.float32)
  out["labels"] = np.full_like(template["labels"], -1)
  out["image_size"] = np.asarray(canvas, template["image_size"].dtype)
  out["orig_size"] = np.asarray(canvas, template["orig_size"].dtype)
  out["scale_factor"] = np.ones_like(template["scale_factor"])
  out["valid"] = np.bool_(False)
  return out


class _PrepareGrouped:
  """``(index, group)`` -> a sample on its group's canvas, or a filler image (picklable).

  A sample that the transform padded to another canvas that its image fits
  (e.g. a nearly square portrait image that ``Pad``'s smallest-bucket rule
  gave the landscape bucket) is padded again to its group's canvas, as ``Pad``
  would have with that size. An image that cannot be read (counted by the
  source), or that is larger than its group's canvas (counted here, in
  ``skip_log``), becomes a filler image, so that every batch is full and has
  its group's shape.
  """

  def __init__(self, source: DetectionSource, transform: Transform,
               canvases: Sequence[tuple[int, int]], pad_value: float,
               template: dict[str, np.ndarray]):
    self.source = source
    self.prepare = _Prepare(transform)
    self.canvases = tuple((int(h), int(w)) for h, w in canvases)
    self.pad_value = float(pad_value)
    self.channels = int(template["image"].shape[-1])
    self.template = {k: v for k, v in template.items() if k != "image"}
    self.skip_log = SkipLog("aspect grouping")

  def __call__(self, item: tuple[int, int], rng: np.random.Generator) -> dict:
    index, group = int(item[0]), int(item[1])
    canvas = self.canvases[group]
    example = self.source[index]
    if example is None:  # unreadable image: the source has counted and logged it
      return _filler_sample(self.template, self.channels, canvas)
    sample = self.prepare(example, rng)
    image = sample["image"]
    if image.shape[:2] == canvas:
      return sample
    h, w = (int(v) for v in sample["image_size"])
    if h > canvas[0] or w > canvas[1] or image.shape[2] != self.channels:
      self.skip_log.skip("image larger than its aspect group's canvas, left out (filler image)",
                         file=example.file, record=example.image_id,
                         detail=f"{_GROUP_NAMES[group]} group, canvas {canvas}, image (h, w) "
                                f"{(h, w)} (wrong size metadata, or buckets that do not "
                                "hold every image of an orientation)")
      return _filler_sample(self.template, self.channels, canvas)
    padded = np.full((*canvas, self.channels), self.pad_value, np.float32)
    padded[:h, :w] = image[:h, :w]
    sample["image"] = padded
    return sample


def _template(source: DetectionSource, transform: Transform,
              indices: np.ndarray, tries: int = 64) -> dict[str, np.ndarray]:
  """One prepared sample (the first readable image of ``indices``): the shapes of fillers."""
  for i in indices[:tries].tolist():
    example = source[i]
    if example is not None:
      return _Prepare(transform)(example, np.random.default_rng(0))
  raise ValueError(f"none of the first {min(tries, len(indices))} images of the training "
                   f"shard of {type(source).__name__} can be read")


def _grouped_batches(source: DetectionSource, transform: Transform, *, batch_size: int,
                     seed: int, shard_index: int, num_shards: int,
                     num_epochs: int | None) -> grain.IterDataset:
  """Training batches that each hold one aspect group (``train_batches(group_by_aspect=True)``).

  Every epoch (a pure function of ``seed``, the epoch and the shard, so that
  it is reproducible and the iterator state is a position, as without
  grouping): the shard's images (``shard_index::num_shards``) are shuffled and
  split into landscape (``w >= h``, squares and images of unknown size
  included) and portrait images; each group is cut into full batches and the
  batches are interleaved in a seeded random order. Every shard makes the same
  number of batches of each group per epoch, the smallest shard's
  (``K_g = min over shards of n_g // B``), in the same order of groups, so
  that the processes of a multi-host run stack batches of one shape at every
  step.

  Left out each epoch (different images every epoch), per group ``g``: the
  ``n_g - B * K_g`` images of the shard that do not fill a batch, where
  ``n_g`` is the shard's number of images of the group; with one shard that
  is ``n_g % B``, so fewer than ``2 * B`` images per epoch in all.

  Images are padded to their group's canvas (:func:`_group_canvases`: for the
  R-CNN recipe with ``buckets=((832, 1344), (1344, 832))``, the first for
  landscape and the second for portrait images); an image that cannot be read
  or is larger than that canvas becomes a filler image (``valid=False``,
  counted), so that every batch is full.
  """
  _check_shard(shard_index, num_shards)
  n = len(source)
  groups, _ = aspect_groups(source)  # every shard's: the group schedule is shared
  counts = np.zeros((num_shards, len(_GROUP_NAMES)), np.int64)
  np.add.at(counts, (np.arange(n) % num_shards, groups), 1)
  batches_per_group = counts.min(axis=0) // batch_size
  indices = np.arange(n)[shard_index::num_shards]
  if batches_per_group.sum() == 0:
    raise ValueError(f"no aspect group fills a batch of {batch_size} in every shard: "
                     f"(landscape, portrait) images per shard {counts.tolist()}")
  kept = batches_per_group * batch_size
  log.info("aspect grouping, shard %d: (landscape, portrait) images %s, batches per epoch %s, "
           "images left out per epoch %s", shard_index, counts[shard_index].tolist(),
           batches_per_group.tolist(), (counts[shard_index] - kept).tolist())
  template = _template(source, transform, indices)
  canvases, pad_value = _group_canvases(transform, tuple(template["image"].shape[:2]))
  order = _GroupedOrder(indices, groups[indices], batches_per_group, batch_size=batch_size,
                        seed=seed, shard_index=shard_index, num_epochs=num_epochs)
  ds = grain.MapDataset.source(order).seed(seed)
  ds = ds.random_map(_PrepareGrouped(source, transform, canvases, pad_value, template))
  return ds.batch(batch_size).to_iter_dataset(_read_options(batch_size, batched=True))


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
                 shard_index: int = 0, num_shards: int = 1, num_workers: int = 0,
                 data_notes: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """One pass over this process's share of ``source``, in order, every batch full.

  The last batch is completed with filler images (``valid=False``, ``image_id``
  0) so that the step compiles once and every real image is seen exactly once.
  ``data_notes`` adds :data:`NOTES_KEY` to every batch, as for training: the
  skips and fixes of the process (a worker's, with ``num_workers > 0``) that
  made it.
  """
  ds = _shard(grain.MapDataset.source(source), shard_index, num_shards)
  ds = ds.map(_Prepare(transform))
  it = ds.to_iter_dataset(_read_options(batch_size, batched=False))
  it = it.batch(batch_size, drop_remainder=False).map(_PadTo(batch_size))
  it = it.map(_AttachNotes()) if data_notes else it
  return iter(_maybe_workers(it, num_workers))


def first_sample(source: DetectionSource, transform: Transform) -> dict[str, np.ndarray]:
  """The first image of ``source`` prepared by ``transform``, as a batch of one: the
  shapes a model is initialised or restored with (training, evaluation, the predictor)."""
  return next(iter(eval_batches(source, transform, batch_size=1)))


def stack_samples(samples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  """Stacks prepared samples into a batch (what grain's ``batch`` does), for tools."""
  return {k: np.stack([s[k] for s in samples]) for k in samples[0]}
