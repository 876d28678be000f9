"""RefineDet320/512 throughput next to SSD300/512, all in jdet, on the same machine and inputs.

  python bench/refinedet.py                         # CPU, float32: train 8; infer 1, 8
  python bench/refinedet.py --models refinedet320,ssd300 --iters 2 --warmup 1
  python bench/refinedet.py --dtype bfloat16 --train-batches 32 --infer-batches 1,32  # on a GPU

There is no RefineDet in torchvision, so the reference here is jdet's own SSD
at the matching input size: ``bench/ssd.py`` places SSD300 next to
torchvision's ``ssd300_vgg16``, and the ratios chain.

Every model is its config's default (the paper's COCO setting: 80 classes,
VGG16 without BatchNorm) with random weights (seed 0). The input is a batch of
random images at the model's input size with 3 random ground-truth boxes each.

* training: one step of the model's loss, forward and backward included: the
  training step ``train.py`` runs (:func:`jdet.engine.training.make_train_step`
  with the model's config's COCO optimiser: SGD, momentum 0.9, weight decay
  5e-4), compiled once with the state donated
  (:func:`bench.harness.jdet_train_step`), as ``bench/run_all.py`` runs it.
* inference: the model's ``predict`` (post-processing and NMS included),
  jitted. jdet's post-processing works on fixed shapes, so its cost does not
  depend on how confident the (random) weights are.

Timing (:func:`bench.harness.time_warm`): each step is compiled first, apart;
then ``--warmup`` untimed calls and the median of ``--iters`` calls, each
waited for. Results: a table of images per second and
of each model's speed relative to the SSD of the same resolution class
(RefineDet320 / SSD300, RefineDet512 / SSD512), written with the machine to
``bench/results/refinedet_<backend>[_bfloat16].json`` and ``.txt``.
"""

from __future__ import annotations

import functools
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jdet.models import build_model
from jdet.testing import random_boxes
from harness import (Case, jdet_step, machine_info, model_cases, parse_args, parse_ints,
                     random_variables, report, side_by_side_parser,
                     time_warm)  # bench/harness.py (it puts the repository root on sys.path)

BOXES_PER_IMAGE = 3
# Each RefineDet row is compared with the SSD of the same resolution class.
REFERENCE = {"refinedet320": "ssd300", "refinedet512": "ssd512"}


def load_model(name: str, dtype: str):
  """``(module, params, input side, number of classes)`` for ``configs/<name>.py``'s default
  variant, with random weights."""
  config = importlib.import_module(f"configs.{name}").get_config()
  kwargs = dict(config.model)
  kwargs["dtype"] = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  model = build_model(config.model_name, **kwargs)
  size = int(config.model.image_size)
  variables = random_variables(model, jnp.zeros((1, size, size, 3)))
  if set(variables) != {"params"}:
    raise ValueError(f"{name}: the benchmark expects a model with parameters only, "
                     f"got collections {sorted(variables)}")
  return model, variables["params"], size, config.model.num_classes


def make_batch(batch: int, size: int, num_classes: int, seed: int = 0) -> dict:
  """A jdet batch of ``batch`` random ``size x size`` images (normalised-pixel scale) with
  3 random boxes each, labels in ``0 .. num_classes-1``."""
  rng = np.random.default_rng(seed)
  boxes = np.stack([random_boxes(rng, BOXES_PER_IMAGE, size=size, min_side=0.07 * size,
                                 max_side=0.66 * size) for _ in range(batch)])
  return dict(image=jnp.asarray(rng.normal(size=(batch, size, size, 3)).astype(np.float32) * 60),
              boxes=jnp.asarray(boxes),
              labels=jnp.asarray(rng.integers(0, num_classes, (batch, BOXES_PER_IMAGE)), jnp.int32),
              image_size=jnp.full((batch, 2), size, jnp.int32),
              orig_size=jnp.full((batch, 2), size, jnp.int32),
              valid=jnp.ones((batch,), bool))


def model_step(name: str, loaded: tuple, case: str, b: int):
  """jdet's step of ``configs/<name>.py``'s model (``loaded``: :func:`load_model`'s tuple)
  for ``case`` at batch ``b`` on :func:`make_batch`: the training step ``train.py`` runs
  with the config's COCO optimiser, or ``predict``."""
  model, params, size, num_classes = loaded
  optim_config = importlib.import_module(f"configs.{name}").get_config("coco").optim
  return jdet_step(case, model, {"params": params}, make_batch(b, size, num_classes), optim_config)


# ----------------------------------------------------------------------------
# The suite's cases (bench/run_all.py).
# ----------------------------------------------------------------------------

# Per profile of run_all: {model: (training batch or None, inference batches)}. The
# GPU trains RefineDet320 at 32 (the realistic set); RefineDet512 and SSD512
# training would add two compilations of a minute each to an 8-minute run, and on
# the CPU about 12 s a step each: inference only for them.
SUITE_BATCHES = {
    "gpu": {"refinedet320": (32, (1,)), "refinedet512": (None, (1,))},
    "cpu": {"refinedet320": (1, (1,)), "refinedet512": (None, (1,))},
    "dry": {"refinedet320": (1, (1,)), "refinedet512": (1, (1,))},
}


def suite(profile: str, dtype: str, device) -> list[Case]:
  """RefineDet320/512 (their configs' COCO models, random weights) beside jdet's SSD of the
  same resolution class: SSD300's figures come from ``bench/ssd.py``'s cases when the
  suite measured the same batch (that SSD300 has torchvision's 90 classes), else from
  ``configs/ssd300.py``'s model; SSD512 from ``configs/ssd512.py``'s."""
  load = functools.cache(lambda name: load_model(name, dtype))

  def step(name, case, b):
    return model_step(name, load(name), case, b)

  cases = []
  for name, (train_batch, infer_batches) in SUITE_BATCHES[profile].items():
    ref, size = REFERENCE[name], int(name[-3:])
    cases += model_cases(
        name.replace("refinedet", "RefineDet"), functools.partial(step, name),
        functools.partial(step, ref), train_batch=train_batch, infer_batches=infer_batches,
        key=("jdet", name), peer_key=("jdet", ref), input_size=f"{size}x{size}",
        peer=f"jdet {ref.upper()}",
        settings=dict(boxes_per_image=BOXES_PER_IMAGE, weights="random"))
  return cases


def main() -> None:
  parser = side_by_side_parser(__doc__, iters=5, warmup=2, torch_device=False)  # jdet only
  parser.add_argument("--models", default="ssd300,refinedet320,ssd512,refinedet512",
                      help="config names under configs/, comma separated")
  parser.add_argument("--train-batches", type=parse_ints, default=[8])
  parser.add_argument("--infer-batches", type=parse_ints, default=[1, 8])
  args = parse_args(parser)

  backend = jax.default_backend()
  machine = machine_info(torch.device("cuda" if backend == "gpu" else "cpu"))
  print("machine:", json.dumps(machine))
  timing = dict(warmup=args.warmup, iters=args.iters)
  rows = []
  for name in [m.strip() for m in args.models.split(",") if m.strip()]:
    loaded = load_model(name, args.dtype)
    size = loaded[2]
    cases = [("train", b) for b in args.train_batches] + [("inference", b)
                                                          for b in args.infer_batches]
    for case, b in cases:
      seconds = time_warm(model_step(name, loaded, case, b), **timing).median_s
      row = dict(model=name, image_size=size, case=case, batch=b, img_s=b / seconds)
      ref = next((r for r in rows if r["model"] == REFERENCE.get(name) and r["case"] == case
                  and r["batch"] == b), None)
      row["vs_ssd"] = row["img_s"] / ref["img_s"] if ref else None
      rows.append(row)
      print(f"{name} {case} batch {b}: {row['img_s']:.2f} img/s", flush=True)

  settings = dict(dtype=args.dtype, boxes_per_image=BOXES_PER_IMAGE, **timing)
  report(args, "refinedet", machine=machine, settings=settings, rows=rows, device=backend,
         columns=[("model", "model", ""), ("case", "case", ""), ("batch", "batch", ""),
                  ("img/s", "img_s", ".2f"), ("vs SSD", "vs_ssd", ".2f")])


if __name__ == "__main__":
  main()
