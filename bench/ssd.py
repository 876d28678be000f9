"""SSD300 throughput: jdet against torchvision's ``ssd300_vgg16`` on the same machine and inputs.

  python bench/ssd.py                                 # CPU, float32: train 8, 32; infer 1, 8
  python bench/ssd.py --iters 2 --warmup 1 --train-batches 8
  python bench/ssd.py --device cuda --dtype bfloat16  # on a GPU machine

Measures milliseconds and images per second, side by side (the same steps as
``bench/run_all.py``'s SSD300 cases, :func:`step_makers`):

* training: one step of the multibox loss, forward and backward included.
  jdet: the training step ``train.py`` runs
  (:func:`jdet.engine.training.make_train_step`: ``configs/ssd300.py``'s COCO
  optimiser, SGD with momentum 0.9 and weight decay 5e-4 in its warm-up),
  compiled once with the state donated. torchvision: the model in train mode,
  ``sum(model(images, targets).values()).backward()`` and ``torch.optim.SGD.step()``
  (momentum 0.9, weight decay 5e-4, learning rate 1e-5 so that random-weight
  training stays finite over the timed steps).
* inference: jdet ``method="predict"`` (jitted, per-class NMS included);
  torchvision in eval mode under ``torch.inference_mode()`` (its postprocess,
  NMS included). Both keep 400 candidates per class and 200 detections per image.

Both models are COCO-sized (90 classes plus background) and hold the same
weights: torchvision's random initialisation (seed 0), converted with
:mod:`jdet.convert`, so both post-process the same candidates. jdet's
post-processing has a fixed cost; torchvision's grows with the number of
(default box, class) scores above 0.01. At random initialisation nearly all of
them pass (each class then sends its full 400 candidates, 36k per image, to
NMS), far more than a trained model, which is sure of the background almost
everywhere. ``--background-shift`` (default 8) adds to the background logit
to bring the count nearer that; the count that reaches NMS is recorded with
the results (``--background-shift 0``: the worst case). The input is a
batch of random 300x300 images with 3 random ground-truth boxes each, the
same on both sides. torchvision receives ``[0, 1]`` images and normalises them
itself (its ``GeneralizedRCNNTransform``; the resize is the identity at
300x300); jdet receives the normalised batch, as its data pipeline produces it.

Timing (:func:`bench.harness.time_warm`): jdet's step is compiled first, apart;
then ``--warmup`` untimed calls on each side and the median of ``--iters``
calls, each waited for (``block_until_ready`` / CUDA synchronisation). jdet
runs on JAX's default backend; torchvision on ``--device``. ``--dtype
bfloat16`` builds jdet's SSD with ``dtype=bfloat16`` and runs torchvision
under ``torch.autocast(device, dtype=torch.bfloat16)``; parameters stay
float32 on both sides.

Results: a table (the last column is jdet / torchvision speed, so > 1 means
jdet is faster), written with the settings and machine to
``bench/results/ssd_<device>[_bfloat16].json`` and ``.txt``.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision

from jdet import convert
from jdet.models.ssd import SSD
from jdet.testing import random_boxes
from harness import (SGD_LR, SGD_MOMENTUM, Case, machine_info, model_cases, parse_args, parse_ints,
                     run_side_by_side, side_by_side_parser, side_by_side_steps,
                     torchvision_batch, torchvision_step)  # bench/harness.py

SIZE = 300
TV_CLASSES = 91  # COCO in torchvision: 90 categories and the background
BOXES_PER_IMAGE = 3
WEIGHT_DECAY = 5e-4
# torchvision's GeneralizedRCNNTransform for ssd300_vgg16: mean in [0, 1] units, std 1 / 255.
TV_MEAN = np.float32([0.48235, 0.45882, 0.40784])


# ----------------------------------------------------------------------------
# Inputs and models.
# ----------------------------------------------------------------------------


def make_inputs(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random ``[0, 1]`` images ``[B, 300, 300, 3]``, boxes ``[B, 3, 4]`` and labels ``[B, 3]``
  in ``0 .. 89``."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(batch, SIZE, SIZE, 3)).astype(np.float32)
  boxes = np.stack([random_boxes(rng, BOXES_PER_IMAGE, size=SIZE, min_side=20.0, max_side=200.0)
                    for _ in range(batch)])
  labels = rng.integers(0, TV_CLASSES - 1, size=(batch, BOXES_PER_IMAGE)).astype(np.int32)
  return dict(images=images, boxes=boxes, labels=labels)


def jdet_batch(inputs: dict[str, np.ndarray]) -> dict[str, jnp.ndarray]:
  b = len(inputs["images"])
  return dict(image=jnp.asarray((inputs["images"] - TV_MEAN) * 255.0),
              boxes=jnp.asarray(inputs["boxes"]), labels=jnp.asarray(inputs["labels"]),
              image_size=jnp.full((b, 2), SIZE, jnp.int32), valid=jnp.ones((b,), bool))


def build_models(dtype: str, device: torch.device, background_shift: float):
  """``(torchvision model, jdet model, jdet variables)`` with the same weights."""
  torch.manual_seed(0)
  tv = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None,
                                                 num_classes=TV_CLASSES)
  with torch.no_grad():
    for conv in tv.head.classification_head.module_list:
      conv.bias.view(-1, TV_CLASSES)[:, 0] += background_shift  # channels are (box, class)
  params = convert.ssd300_vgg16_params({k: v.numpy() for k, v in tv.state_dict().items()})
  model = SSD(num_classes=TV_CLASSES - 1, clamp_default_boxes=True, size_rule=(0.15, 0.9, 0.07),
              pre_nms_top_k=tv.topk_candidates, max_detections=tv.detections_per_img,
              score_threshold=tv.score_thresh, nms_threshold=tv.nms_thresh,
              dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
  return tv.to(device), model, {"params": jax.tree.map(jnp.asarray, params)}


def nms_candidates(tv, inputs, device: torch.device) -> float:
  """Mean number of (default box, class) candidates per image that torchvision sends to NMS:
  per class the scores above its threshold, at most ``topk_candidates``."""
  images, _ = torchvision_batch(inputs, device)
  tv.eval()
  with torch.inference_mode():
    normalised = tv.transform(images)[0].tensors
    logits = tv.head(list(tv.backbone(normalised).values()))["cls_logits"]
  passing = (torch.softmax(logits.float(), -1)[..., 1:] > tv.score_thresh).sum(1)  # [B, C]
  return float(passing.clamp(max=tv.topk_candidates).sum(1).float().mean())


def step_makers(models, *, device: torch.device, dtype: str):
  """``(jdet(case, b), torchvision(case, b))`` (:func:`bench.harness.side_by_side_steps`) on
  the same :func:`make_inputs`: jdet's training step is the one ``train.py`` runs, with
  ``configs/ssd300.py``'s COCO optimiser; torchvision's SGD has weight decay 5e-4
  (:func:`bench.harness.torchvision_step`). ``models()`` gives :func:`build_models`'s
  triple."""
  from configs import ssd300 as ssd300_config
  return side_by_side_steps(models, make_inputs, jdet_batch, ssd300_config.get_config("coco").optim,
                            functools.partial(torchvision_step, device=device, dtype=dtype,
                                              weight_decay=WEIGHT_DECAY))


# ----------------------------------------------------------------------------
# The suite's cases (bench/run_all.py).
# ----------------------------------------------------------------------------

# Per profile of run_all: (training batch, inference batches). The GPU's are the
# issue's realistic ones (batch 32 per device, latency at batch 1).
SUITE_BATCHES = {"gpu": (32, (1,)), "cpu": (1, (1,)), "dry": (1, (1,))}


def suite(profile: str, dtype: str, device: torch.device) -> list[Case]:
  """SSD300 training and inference, jdet beside torchvision's ``ssd300_vgg16``
  (:func:`step_makers`), the same converted weights and inputs."""
  train_batch, infer_batches = SUITE_BATCHES[profile]
  models = functools.cache(lambda: build_models(dtype, device, background_shift=8.0))
  settings = dict(num_classes=TV_CLASSES - 1, boxes_per_image=BOXES_PER_IMAGE,
                  background_shift=8.0,
                  peer_optimizer=f"SGD lr {SGD_LR} momentum {SGD_MOMENTUM}")
  return model_cases("SSD300", *step_makers(models, device=device, dtype=dtype),
                     train_batch=train_batch, infer_batches=infer_batches,
                     key=("jdet", "ssd300"), input_size=f"{SIZE}x{SIZE}", peer="torchvision",
                     settings=settings)


# ----------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------


def main() -> None:
  parser = side_by_side_parser(__doc__, iters=5, warmup=2)
  parser.add_argument("--train-batches", type=parse_ints, default=[8, 32])
  parser.add_argument("--infer-batches", type=parse_ints, default=[1, 8])
  parser.add_argument("--batches", type=parse_ints, default=None,
                      help="the same batch sizes for training and inference")
  parser.add_argument("--background-shift", type=float, default=8.0,
                      help="added to the random weights' background logit (0: as initialised)")
  args = parse_args(parser)
  train_batches = args.batches or args.train_batches
  infer_batches = args.batches or args.infer_batches

  device = torch.device(args.device)
  machine = machine_info(device)
  models = functools.cache(lambda: build_models(args.dtype, device, args.background_shift))
  settings = dict(dtype=args.dtype, iters=args.iters, warmup=args.warmup, image_size=SIZE,
                  boxes_per_image=BOXES_PER_IMAGE, num_classes=TV_CLASSES - 1,
                  background_shift=args.background_shift,
                  nms_candidates_per_image=nms_candidates(models()[0], make_inputs(2, seed=1),
                                                          device))
  print("machine:", json.dumps(machine))
  print("settings:", json.dumps(settings))
  runs = [("train", b) for b in train_batches] + [("inference", b) for b in infer_batches]
  run_side_by_side(args, "ssd", runs, *step_makers(models, device=device, dtype=args.dtype),
                   peer="torchvision", label="torchvision", machine=machine, settings=settings)


if __name__ == "__main__":
  main()
