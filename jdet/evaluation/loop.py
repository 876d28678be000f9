"""Running a detector over an evaluation split: batches in, metrics out.

Used by ``eval.py`` and by the periodic evaluation in training. Every process
reads its own share of the split (``eval_batches`` with ``shard_index`` /
``num_shards``); all processes run the same number of batches (short shares
are completed with filler batches, ``valid=False``) so that the sharded
``predict`` step always has all of them. The detections of the global batch
are gathered on every host and process 0 feeds the evaluators:
:class:`~jdet.evaluation.coco.CocoEvaluator` (COCO AP with the dataset's
category ids) and, if asked, :class:`~jdet.evaluation.voc.VocEvaluator`
(VOC07 11-point mAP).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from jdet import parallel
from jdet.data import builder, pipeline, records
from jdet.data.records import DetectionSource
from jdet.evaluation.coco import CocoEvaluator
from jdet.evaluation.voc import VocEvaluator

__all__ = ["METRICS", "SubsetSource", "EvalResult", "evaluate_split", "make_predict_fn"]

METRICS = ("coco", "voc")


class SubsetSource:
  """The first ``num_images`` images of a source (for a quick evaluation in training)."""

  def __init__(self, source: DetectionSource, num_images: int):
    self.source = source
    self.num_images = min(int(num_images), len(source))
    self.class_names = source.class_names

  def __len__(self) -> int:
    return self.num_images

  def __getitem__(self, index: int):
    if not 0 <= index < self.num_images:
      raise IndexError(f"index {index} out of range for {self.num_images} images")
    return self.source[index]

  def category_id(self, label: int) -> int:
    return self.source.category_id(label)

  def coco_ground_truth(self) -> dict:
    return self.source.coco_ground_truth()


@dataclasses.dataclass
class EvalResult:
  """What :func:`evaluate_split` returns.

  Attributes:
    metrics: ``AP, AP50, ...``, ``per_class`` (COCO) and ``VOC07_mAP``,
      ``VOC07_per_class`` if asked; empty on processes other than 0.
    pr_curves: per metric name, ``{class: (recall, precision)}`` (process 0).
    examples: up to ``keep_examples`` images with their detections in input
      pixels: dicts of ``image [H, W, 3]`` (normalised), ``boxes``, ``scores``,
      ``labels``, ``valid``, ``image_id``.
    class_names: the split's classes.
    detections: the COCO-format results (process 0, with "coco" metrics).
    data_notes: the images and boxes skipped or fixed while this process's
      batches were read (:func:`jdet.data.records.drain_notes` tuples, from the
      reading workers too); add them to a :class:`~jdet.data.records.DataReport`.
  """

  metrics: dict[str, Any]
  pr_curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]
  examples: list[dict[str, np.ndarray]]
  class_names: tuple[str, ...]
  detections: list[dict[str, Any]] | None = None
  data_notes: list[tuple[str, ...]] = dataclasses.field(default_factory=list)


def make_predict_fn(model) -> Callable:
  """A jitted ``(variables, batch) -> Detections``; its shardings come from the
  arguments (replicated variables, a batch sharded by :func:`jdet.parallel.shard_batch`)."""
  return jax.jit(lambda variables, batch: model.apply(variables, batch, method="predict"))


def _filler_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A batch like ``batch`` with only filler images."""
  return pipeline.pad_batch({k: v[:0] for k, v in batch.items()}, len(batch["valid"]))


def _batches(source, transform, *, local_batch: int, num_batches: int,
             num_workers: int) -> Iterator[dict[str, np.ndarray]]:
  it = pipeline.eval_batches(source, transform, batch_size=local_batch,
                             shard_index=jax.process_index(), num_shards=jax.process_count(),
                             num_workers=num_workers, data_notes=True)
  last = None
  for batch in itertools.islice(it, num_batches):
    last = batch
    yield batch
    num_batches -= 1
  if num_batches > 0:
    if last is None:  # this process has no image at all: build one real sample for the shapes
      last = pipeline.pad_batch(pipeline.first_sample(source, transform), local_batch)
    for _ in range(num_batches):
      yield _filler_batch(last)


def _input_pixels(boxes: np.ndarray, scale_factor: np.ndarray) -> np.ndarray:
  sy, sx = scale_factor[:, 0], scale_factor[:, 1]
  return boxes * np.stack([sx, sy, sx, sy], axis=-1)[:, None, :]


def evaluate_split(model, variables, data_config, *, mesh, split: str = "val",
                   metrics: Sequence[str] = ("coco",), max_images: int = 0,
                   keep_examples: int = 0, predict_fn: Callable | None = None,
                   progress: Callable[[int, int], None] | None = None) -> EvalResult:
  """Predicts over ``split`` of ``data_config`` and evaluates the detections.

  Args:
    model: the detector module.
    variables: its variables, replicated over ``mesh``.
    data_config: the config's ``data`` section.
    mesh: the device mesh (batches are sharded on its ``data`` axis).
    split: the split to evaluate ("val").
    metrics: any of ``"coco"`` and ``"voc"``.
    max_images: evaluate only the first images of the split (0: all).
    keep_examples: images (with detections) to keep for drawing, on process 0.
    predict_fn: a jitted predict from :func:`make_predict_fn` (reused across calls).
    progress: called with ``(batches done, batches total)``.
  """
  unknown = set(metrics) - set(METRICS)
  if unknown:
    raise ValueError(f"unknown evaluation metrics {sorted(unknown)}; choose from {METRICS}")
  source = builder.build_source(data_config, split)
  if max_images:
    source = SubsetSource(source, max_images)
  transform = builder.build_transforms(data_config, train=False)
  global_batch = int(data_config.eval_batch_size)
  local_batch = parallel.local_batch_size(global_batch)
  num_batches = math.ceil(len(source) / global_batch)
  predict_fn = predict_fn or make_predict_fn(model)

  is_main = jax.process_index() == 0
  class_names = tuple(source.class_names)
  evaluators = {}
  if is_main:
    gt = source.coco_ground_truth()
    ids = [source.category_id(k) for k in range(len(class_names))]
    if "coco" in metrics:
      evaluators["coco"] = CocoEvaluator(gt, category_ids=ids, class_names=class_names)
    if "voc" in metrics:
      evaluators["voc"] = VocEvaluator(gt, category_ids=ids, class_names=class_names)

  examples: list[dict[str, np.ndarray]] = []
  batches = _batches(source, transform, local_batch=local_batch, num_batches=num_batches,
                     num_workers=int(data_config.num_workers))
  notes: list[tuple[str, ...]] = []
  for i, batch in enumerate(batches):
    encoded = batch.pop(pipeline.NOTES_KEY, None)
    if encoded is not None:
      notes.extend(records.decode_notes(str(encoded)))
    detections = predict_fn(variables, parallel.shard_batch(batch, mesh))
    detections = parallel.gather_to_host(detections)
    info = parallel.gather_to_host(parallel.shard_batch(
        {k: batch[k] for k in ("image_id", "valid", "scale_factor")}, mesh))
    if is_main:
      for ev in evaluators.values():
        ev.add(info["image_id"], detections.boxes, detections.scores, detections.labels,
               detections.valid, image_valid=info["valid"])
      # Examples come from this process's own images (no need to gather pixels).
      n_local = len(batch["valid"])
      boxes_in = _input_pixels(np.asarray(detections.boxes[:n_local]), batch["scale_factor"])
      for j in range(n_local):
        if len(examples) < keep_examples and batch["valid"][j]:
          examples.append(dict(image=batch["image"][j], boxes=boxes_in[j],
                               scores=np.asarray(detections.scores[j]),
                               labels=np.asarray(detections.labels[j]),
                               valid=np.asarray(detections.valid[j]),
                               image_id=batch["image_id"][j]))
    if progress is not None:
      progress(i + 1, num_batches)

  out: dict[str, Any] = {}
  curves = {}
  if "coco" in evaluators:
    out.update(evaluators["coco"].evaluate())
    curves["coco"] = evaluators["coco"].pr_curves(iou=0.5)
  if "voc" in evaluators:
    voc = evaluators["voc"].evaluate()
    out["VOC07_mAP"] = voc["mAP"]
    out["VOC07_per_class"] = voc["per_class"]
    curves["voc"] = evaluators["voc"].pr_curves()
  return EvalResult(metrics=out, pr_curves=curves, examples=examples, class_names=class_names,
                    detections=evaluators["coco"].results() if "coco" in evaluators else None,
                    data_notes=notes)
