"""Input-pipeline throughput: training images per second of jdet's data pipelines on this machine.

  python bench/data.py                  # the three pipelines, 0 and 2 workers, into bench/results/
  python bench/data.py --small          # a couple of batches each, for a quick check
  python bench/data.py --pipelines ssd300 --workers 0,1,2 --ssd-batch 16 --batches 10

Measures :func:`jdet.data.pipeline.train_batches` (decode, augmentation,
batching; the model is not run) with the sources and transforms that
:mod:`jdet.data.builder` builds from a config's ``data`` section:

* ``ssd300``: ``configs/ssd300.py:coco``'s training transforms (photometric
  distortion, zoom out up to 4x, min-IoU crop, flip, resize to 300x300,
  normalise), batch 32.
* ``faster_rcnn``: ``configs/faster_rcnn_r50_fpn.py:coco``'s training
  transforms (keep-ratio resize to shorter side 800 and longer at most 1333,
  flip, normalise; batches of landscape or of portrait images, padded to
  832x1344 or 1344x832, ``data.group_by_aspect``), batch 2 (the 2 images per
  device of its global batch of 16).
* ``shapes``: ``configs/ssd300.py:shapes``'s whole data section (the CPU
  quick start: 128-pixel generated shapes, flips only), batch 16.

No dataset is downloaded: the two COCO recipes read the raccoon photos
(``../shared/data/raccoon`` next to the repository, a Pascal VOC layout tree;
its ``train`` split of 160 JPEG photos, median 480x360 pixels, repeated epoch
after epoch) instead of COCO, through ``configs/common.py``'s ``raccoon_data``,
and the transforms come from the same helpers as the configs'
(``common.ssd_augment``, ``common.rcnn_augment``; checked against the
configs at start-up). COCO photos are larger (about 640x480), so decoding and
the SSD steps before its resize cost somewhat more there; the R-CNN output
(an 832x1344 or 1344x832 float32 canvas per image) is the same.

Each pipeline runs with every ``--workers`` count (grain worker processes; 0
reads in the main process). As in training, every reading process maps the
transforms with grain's default read options (16 threads, up to 500 samples
read ahead), so 0 workers is not one thread. Timing: the iterator is built and ``--warmup``
batches per worker process (worker start-up included) are taken untimed, then
``--batches`` batches are timed, from the end of the warm-up to the arrival
of the last one; the default batch counts take roughly 10-20 s per
measurement at 0 workers on 2 cores. ``--small`` checks that everything runs;
its two timed batches, after a single warm-up batch per worker, are no
measurement (batches the workers made during start-up are counted).

Results: a table of images per second (and the seconds from building the
iterator to the first batch, which with workers is mostly their start-up:
grain spawns them, and each imports this program), written with the machine
and its load average to ``bench/results/data_cpu.json`` and ``.txt``. The
numbers depend on whatever else runs on the machine: see the load average in
the results.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import ml_collections
import torch

from harness import (ROOT, Case, HostStep, machine_info, parse_ints, text_table,
                     write_results)  # bench/harness.py
from jdet.data import builder, pipeline

# The raccoon photos, in the place the tests look for them (next to the repository).
RACCOON = ROOT.parent / "shared" / "data" / "raccoon"

# The raccoon train split has three greyscale photos, converted to RGB with a warning
# from every process at every epoch; the cost is measured, the notices are not needed.
# (Module level, so that grain's worker processes, which import this file, get it too.)
logging.getLogger("jdet.data").setLevel(logging.ERROR)

PIPELINES = ("ssd300", "faster_rcnn", "shapes")
# Timed batches per pipeline, meant to take roughly 10-20 s each at 0 workers on 2 cores
# (estimated on a machine busy with other work; adjust with --batches).
DEFAULT_BATCHES = {"ssd300": 10, "faster_rcnn": 100, "shapes": 200}
SMALL_BATCHES = 2


def _check_transforms(name: str, ours: ml_collections.ConfigDict,
                      config: ml_collections.ConfigDict) -> None:
  """Fails when ``ours`` (transforms and ``max_boxes``) differs from the config's data section."""
  if (ours.transforms.to_dict() != config.data.transforms.to_dict()
      or ours.max_boxes != config.data.max_boxes
      or ours.group_by_aspect != config.data.group_by_aspect):
    raise ValueError(f"{name}: the benchmark's transforms no longer match the config's; "
                     f"update bench/data.py (config: {config.data.transforms.to_dict()}, "
                     f"max_boxes {config.data.max_boxes})")


def data_section(name: str, batch_size: int, raccoon: Path) -> ml_collections.ConfigDict:
  """The ``data`` section of pipeline ``name`` (see the module docstring) at ``batch_size``."""
  from configs import common, faster_rcnn_r50_fpn, ssd300

  if name == "ssd300":
    data = common.data_config(
        common.raccoon_data(str(raccoon)),
        common.ssd_augment(300, mean=ssd300.VGG_MEAN, std=ssd300.VGG_STD), batch_size=batch_size)
    _check_transforms(name, data, ssd300.get_config("coco"))
  elif name == "faster_rcnn":
    data = common.data_config(
        common.raccoon_data(str(raccoon)),
        common.rcnn_augment(((800, 1333),), canvas=faster_rcnn_r50_fpn.COCO_CANVAS,
                            buckets=faster_rcnn_r50_fpn.COCO_BUCKETS, mode="value",
                            test_scale=(800, 1333)),
        batch_size=batch_size, group_by_aspect=True)
    _check_transforms(name, data, faster_rcnn_r50_fpn.get_config("coco"))
  elif name == "shapes":
    data = ssd300.get_config("shapes").data
    data.batch_size = batch_size
  else:
    raise ValueError(f"unknown pipeline {name!r}; choose from {list(PIPELINES)}")
  return data


def measure(data: ml_collections.ConfigDict, *, num_workers: int, warmup: int,
            batches: int) -> dict:
  """Builds the training iterator of ``data`` and times ``batches`` batches after the warm-up."""
  source = builder.build_source(data, "train")
  transform = builder.build_transforms(data, train=True)
  t0 = time.perf_counter()
  it = pipeline.train_batches(source, transform, batch_size=int(data.batch_size),
                              seed=int(data.seed), num_workers=num_workers,
                              group_by_aspect=bool(data.group_by_aspect))
  try:
    next(it)
    first = time.perf_counter() - t0
    for _ in range(warmup * max(1, num_workers) - 1):
      next(it)
    t1 = time.perf_counter()
    for _ in range(batches):
      batch = next(it)
    seconds = time.perf_counter() - t1
  finally:
    it.close()  # stops the worker processes
  images = batches * int(data.batch_size)
  return dict(seed=int(data.seed), source_images=len(source),
              image_shape=list(batch["image"].shape[1:]),
              batches=batches, seconds=seconds, img_s=images / seconds, first_batch_s=first)


# ----------------------------------------------------------------------------
# The suite's cases (bench/run_all.py).
# ----------------------------------------------------------------------------

# Per profile of run_all: {pipeline: batch size}; no worker process (the main process's
# reading threads), so that start-up stays out of the figure.
SUITE_BATCHES = {"gpu": {"ssd300": 32, "faster_rcnn": 2, "shapes": 16},
                 "cpu": {"ssd300": 32, "faster_rcnn": 2, "shapes": 16},
                 "dry": {"ssd300": 2, "faster_rcnn": 2, "shapes": 2}}
SUITE_IMAGES_PER_CALL = {"gpu": 128, "cpu": 128, "dry": 2}


def suite(profile: str, dtype: str, device) -> list[Case]:
  """Training images per second of the input pipelines, jdet only (no peer): building the
  iterator and the first batch count as its start-up; each timed call then takes
  batches of at least 128 images (the read-ahead holds about 64)."""
  del dtype, device
  cases = []
  for name, batch_size in SUITE_BATCHES[profile].items():
    # Each reading process prepares about 64 images ahead (jdet.data.pipeline): a call
    # takes at least 128 images.
    per_call = max(1, -(-SUITE_IMAGES_PER_CALL[profile] // batch_size))

    def make(name=name, batch_size=batch_size, per_call=per_call):
      if name != "shapes" and not RACCOON.is_dir():
        raise FileNotFoundError(f"the raccoon photos are not at {RACCOON}")
      data = data_section(name, batch_size, RACCOON)
      state = {}

      def start():
        source = builder.build_source(data, "train")
        transform = builder.build_transforms(data, train=True)
        state["it"] = pipeline.train_batches(source, transform, batch_size=batch_size,
                                             seed=int(data.seed), num_workers=0,
                                             group_by_aspect=bool(data.group_by_aspect))
        next(state["it"])

      def take():  # enough batches per call that the read-ahead cannot hide the work
        for _ in range(per_call):
          next(state["it"])

      return HostStep(take, prepare=start)

    image = {"ssd300": "300x300", "faster_rcnn": "832x1344 or 1344x832", "shapes": "128x128"}[name]
    notes = "generated shapes" if name == "shapes" else "raccoon photos through the COCO recipe"
    cases.append(Case("input pipeline", name, make, batch=batch_size, input_size=image,
                      kind="data", images_per_call=per_call * batch_size, notes=notes))
  return cases


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--pipelines", default=",".join(PIPELINES),
                      help=f"comma separated, of {', '.join(PIPELINES)}")
  parser.add_argument("--workers", type=parse_ints, default=[0, 2],
                      help="grain worker process counts, comma separated")
  parser.add_argument("--ssd-batch", type=int, default=32)
  parser.add_argument("--rcnn-batch", type=int, default=2)
  parser.add_argument("--shapes-batch", type=int, default=16)
  parser.add_argument("--batches", type=int, default=None,
                      help="timed batches per measurement (default: per pipeline, "
                           f"{DEFAULT_BATCHES})")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed batches first, per worker process (>= 1)")
  parser.add_argument("--small", action="store_true",
                      help=f"{SMALL_BATCHES} timed batches after 1 warm-up batch, a quick check")
  parser.add_argument("--raccoon", default=str(RACCOON),
                      help="the raccoon VOC tree (default: ../shared/data/raccoon from the "
                           "repository root)")
  parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
  args = parser.parse_args()
  names = [p.strip() for p in args.pipelines.split(",") if p.strip()]
  unknown = sorted(set(names) - set(PIPELINES))
  if unknown:
    parser.error(f"unknown pipelines {unknown}; choose from {list(PIPELINES)}")
  if args.warmup < 1:
    parser.error("--warmup must be at least 1 (the first batch starts the workers)")
  if args.batches is not None and args.batches < 1:
    parser.error("--batches must be at least 1")
  if any(w < 0 for w in args.workers):
    parser.error("--workers must be >= 0")
  raccoon = Path(args.raccoon)
  if {"ssd300", "faster_rcnn"} & set(names) and not raccoon.is_dir():
    parser.error(f"the raccoon data set is not at {raccoon} (see --raccoon)")
  warmup = 1 if args.small else args.warmup
  batch_sizes = {"ssd300": args.ssd_batch, "faster_rcnn": args.rcnn_batch,
                 "shapes": args.shapes_batch}

  machine = machine_info(torch.device("cpu"))
  machine["cpu_count"] = os.cpu_count()
  load = [round(v, 2) for v in os.getloadavg()]
  print("machine:", json.dumps(machine), "load average:", load)
  rows = []
  for name in names:
    data = data_section(name, batch_sizes[name], raccoon)
    batches = SMALL_BATCHES if args.small else args.batches or DEFAULT_BATCHES[name]
    for workers in args.workers:
      result = measure(data, num_workers=workers, warmup=warmup, batches=batches)
      row = dict(pipeline=name, workers=workers, batch=int(data.batch_size), **result)
      rows.append(row)
      print(f"{name} workers {workers} batch {row['batch']}: {row['img_s']:.1f} img/s "
            f"({batches} batches in {row['seconds']:.1f} s; first batch after "
            f"{row['first_batch_s']:.1f} s)", flush=True)

  table = text_table(rows, [
      ("pipeline", "pipeline", ""), ("workers", "workers", ""), ("batch", "batch", ""),
      ("img/s", "img_s", ".1f"), ("first batch s", "first_batch_s", ".2f")])
  print(table)
  settings = dict(warmup_per_worker=warmup, small=args.small,
                  load_average_at_start=load,
                  load_average_at_end=[round(v, 2) for v in os.getloadavg()])
  write_results(args.out, "data_cpu", machine=machine, settings=settings, rows=rows, table=table)


if __name__ == "__main__":
  main()
