"""Look at what a config feeds the model: a grid of samples with their boxes, as PNG.

Usage, from the repository root::

  python -m jdet.data.browse --config configs/ssd300.py:shapes --split train --num 16 \\
      --out grid.png [--cols 4] [--config.data.seed=3]

The samples go through the real input pipeline of that split
(:func:`jdet.data.pipeline.train_batches` with the augmented training
transforms for ``train``, :func:`~jdet.data.pipeline.eval_batches` with the
evaluation transforms for ``val``), built from ``config.data`` by
:mod:`jdet.data.builder`. The images are un-normalised, the ground-truth boxes
drawn in their class colours with the class names (:mod:`jdet.viz`), and the
grid written to ``--out``. A short summary is printed: images, boxes drawn,
boxes dropped by augmentation and truncated by ``max_boxes``, and the counts
of the source's skip log (skipped or repaired input), if it keeps one.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jdet import viz
from jdet.data import builder, pipeline

__all__ = ["sample_batch", "browse", "format_summary", "main"]

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, `path/to/config.py[:variant]`; its `data` section is used.")
_SPLIT = flags.DEFINE_enum("split", "train", list(builder.SPLITS),
                           "Which split: train (augmented) or val (evaluation transforms).")
_NUM = flags.DEFINE_integer("num", 16, "How many samples to draw.", lower_bound=1)
_OUT = flags.DEFINE_string("out", "grid.png", "Where to write the PNG grid.")
_COLS = flags.DEFINE_integer("cols", None, "Images per grid row (default: about a square).",
                             lower_bound=1)


def sample_batch(data_config: Any, split: str, num: int) -> tuple[Any, dict[str, np.ndarray]]:
  """The first ``num`` samples of ``split`` through the real pipeline, as one batch.

  Training batches of ``min(num, len(source))`` images are drawn (shuffled and
  augmented with seed ``data_config.seed``) until ``num`` samples are in; for
  ``val`` the images come in order, once each, so there are at most
  ``len(source)`` of them.

  Returns:
    ``(source, batch)``: the source, and a batch dict of the pipeline's keys
    with ``B <= num`` real images (filler images removed).
  """
  source = builder.build_source(data_config, split)
  if data_config.num_classes is not None:
    pipeline.check_num_classes(source, data_config.num_classes)
  transform = builder.build_transforms(data_config, train=split == "train")
  batch_size = max(min(num, len(source)), 1)
  if split == "train":
    batches = pipeline.train_batches(source, transform, batch_size=batch_size,
                                     seed=int(data_config.seed))
  else:
    batches = pipeline.eval_batches(source, transform, batch_size=batch_size)
  parts, have = [], 0
  for batch in batches:
    batch = {k: v[batch["valid"]] for k, v in batch.items()}
    parts.append(batch)
    have += len(batch["valid"])
    if have >= num:
      break
  if not parts:
    raise ValueError(f"the {split} source {type(source).__name__} gave no images")
  batch = {k: np.concatenate([p[k] for p in parts])[:num] for k in parts[0]}
  return source, batch


def browse(data_config: Any, *, split: str = "train", num: int = 16, out: str = "grid.png",
           cols: int | None = None) -> dict[str, Any]:
  """Draws ``num`` samples of ``split`` with their boxes into a PNG grid at ``out``.

  Args:
    data_config: the config's ``data`` section.
    split: ``"train"`` or ``"val"``.
    num: samples to draw.
    out: the PNG file to write.
    cols: images per row; default ``ceil(sqrt(num))``.
  Returns:
    A summary: ``images``, ``boxes`` (drawn), ``dropped_boxes`` and
    ``truncated_boxes`` (summed over the samples), ``boxes_per_class``,
    ``skips`` (the source's skip-log counts, or None if it keeps no log),
    ``grid_shape`` ``(H, W, 3)`` and ``out``.
  """
  source, batch = sample_batch(data_config, split, num)
  mean, std = builder.normalization(data_config)
  names = source.class_names
  drawn = [viz.draw_boxes(image, boxes, labels, names, valid=labels >= 0, mean=mean, std=std)
           for image, boxes, labels in zip(batch["image"], batch["boxes"], batch["labels"])]
  n = len(drawn)
  grid = viz.image_grid(drawn, cols or math.ceil(math.sqrt(n)))
  viz.save_image(out, grid)
  labels = batch["labels"][batch["labels"] >= 0]
  per_class = collections.Counter(names[int(k)] for k in labels)
  skip_log = getattr(source, "skip_log", None)
  return dict(
      images=n, boxes=int(labels.size), dropped_boxes=int(batch["dropped_boxes"].sum()),
      truncated_boxes=int(batch["truncated_boxes"].sum()),
      boxes_per_class={name: per_class[name] for name in names if per_class[name]},
      skips=None if skip_log is None else skip_log.counts(),
      grid_shape=tuple(grid.shape), out=out, source=type(source).__name__, split=split,
      num_source_images=len(source))


def format_summary(summary: dict[str, Any]) -> str:
  """The summary of :func:`browse` as a few lines of text."""
  lines = [
      f"{summary['split']}: {summary['images']} images of {summary['num_source_images']} "
      f"from {summary['source']}",
      f"boxes drawn: {summary['boxes']}, dropped by augmentation: {summary['dropped_boxes']}, "
      f"truncated by max_boxes: {summary['truncated_boxes']}",
      "boxes per class: " + (", ".join(f"{k} {v}" for k, v in summary["boxes_per_class"].items())
                             or "none"),
  ]
  skips = summary["skips"]
  if skips is None:
    lines.append("skip log: none kept by this source")
  elif not skips:
    lines.append("skip log: nothing skipped or repaired")
  else:
    lines.append("skip log: " + ", ".join(f"{k} x{v}" for k, v in sorted(skips.items())))
  h, w, _ = summary["grid_shape"]
  lines.append(f"wrote {summary['out']} ({w}x{h})")
  return "\n".join(lines)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  summary = browse(_CONFIG.value.data, split=_SPLIT.value, num=_NUM.value, out=_OUT.value,
                   cols=_COLS.value)
  print(format_summary(summary))


if __name__ == "__main__":
  builder.put_configs_on_path()
  flags.mark_flag_as_required("config")
  app.run(main)
