"""Faster R-CNN R50-FPN: jdet against torchvision's ``fasterrcnn_resnet50_fpn``, same machine and inputs.

  python bench/faster_rcnn.py                           # CPU: 384x640 canvas, train 1, latency batch 1
  python bench/faster_rcnn.py --size 800,1333 --train-batch 2 --device cuda --dtype bfloat16

Measures, side by side (the same steps as ``bench/run_all.py``'s Faster R-CNN
cases, :func:`step_makers`):

* training images/s: one step of the full loss (RPN and R-CNN: sampling,
  targets, both losses), forward and backward. jdet: the training step
  ``train.py`` runs (:func:`jdet.engine.training.make_train_step` with
  ``configs/faster_rcnn_r50_fpn.py``'s COCO optimiser: SGD, momentum 0.9,
  weight decay 1e-4), compiled once with the state donated. torchvision: the
  model in train mode, ``sum(model(images, targets).values()).backward()`` and
  ``SGD.step()`` (momentum 0.9, weight decay 1e-4, learning rate 1e-5).
* inference latency (batch 1 by default): jdet ``method="predict"`` (jitted;
  proposals, RoIAlign, per-class NMS); torchvision in eval mode under
  ``torch.inference_mode()``.

Both models hold the same weights (torchvision's random initialisation, seed 0,
converted with :mod:`jdet.convert.faster_rcnn`; 90 classes plus background)
and see the same images: ``--size H,W`` random images (the issue's setting is
800x1333 with batch 2 per device; the CPU default is smaller) with 3 random
boxes each. torchvision gets ``[0, 1]`` images and normalises them itself;
its transform is set to leave an HxW image at HxW (``min_size=H``,
``max_size=W``) and pads it to a multiple of 32. jdet gets the normalised
image padded to a multiple of 64 (its strides are nominal; see
``configs/faster_rcnn_r50_fpn.py``) with ``image_size = (H, W)``. Both
freeze the stem and layer1 and use frozen BatchNorm. With random weights
almost no class score passes 0.05, so both post-processings are near their
cheapest; jdet's cost there is fixed anyway.

Timing (:func:`bench.harness.time_warm`): jdet's step is compiled first, apart;
then ``--warmup`` untimed calls on each side and the median of ``--iters``
calls, each waited for. Results: a table (ratio = jdet speed /
torchvision speed: above 1 means jdet is faster) written with the machine to
``bench/results/faster_rcnn_<device>[_bfloat16].json`` and ``.txt``.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision

from jdet.convert.faster_rcnn import fasterrcnn_resnet50_fpn_params
from jdet.models.faster_rcnn import FasterRCNN
from jdet.testing import random_boxes
from harness import (SGD_LR, SGD_MOMENTUM, Case, machine_info, model_cases, parse_args, parse_hw,
                     run_side_by_side, side_by_side_parser, side_by_side_steps,
                     torchvision_step)  # bench/harness.py

TV_CLASSES = 91
BOXES_PER_IMAGE = 3
WEIGHT_DECAY = 1e-4
MEAN = np.float32([0.485, 0.456, 0.406])
STD = np.float32([0.229, 0.224, 0.225])


def make_inputs(batch: int, size: tuple[int, int], seed: int = 0) -> dict[str, np.ndarray]:
  h, w = size
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(batch, h, w, 3)).astype(np.float32)
  boxes = np.stack([random_boxes(rng, BOXES_PER_IMAGE, size=min(h, w), min_side=32.0,
                                 max_side=0.6 * min(h, w)) for _ in range(batch)])
  labels = rng.integers(0, TV_CLASSES - 1, size=(batch, BOXES_PER_IMAGE)).astype(np.int32)
  return dict(images=images, boxes=boxes, labels=labels)


def jdet_batch(inputs: dict[str, np.ndarray]) -> dict[str, jnp.ndarray]:
  images = (inputs["images"] - MEAN) / STD
  b, h, w, _ = images.shape
  ph, pw = -(-h // 64) * 64, -(-w // 64) * 64
  canvas = np.zeros((b, ph, pw, 3), np.float32)
  canvas[:, :h, :w] = images
  sizes = jnp.tile(jnp.asarray([h, w], jnp.int32), (b, 1))
  return dict(image=jnp.asarray(canvas), boxes=jnp.asarray(inputs["boxes"]),
              labels=jnp.asarray(inputs["labels"]), image_size=sizes, orig_size=sizes,
              valid=jnp.ones((b,), bool))


def build_models(size: tuple[int, int], dtype: str, device: torch.device):
  """``(torchvision model, jdet model, jdet variables)`` with the same weights."""
  torch.manual_seed(0)
  tv = torchvision.models.detection.fasterrcnn_resnet50_fpn(
      weights=None, weights_backbone=None, num_classes=TV_CLASSES, min_size=size[0],
      max_size=size[1], trainable_backbone_layers=3)
  # weights=None builds plain BatchNorm2d; freeze it like the pretrained model's FrozenBatchNorm2d.
  for m in tv.backbone.body.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.eval()
      m.weight.requires_grad_(False)
      m.bias.requires_grad_(False)
  variables = fasterrcnn_resnet50_fpn_params({k: v.numpy() for k, v in tv.state_dict().items()})
  model = FasterRCNN(num_classes=TV_CLASSES - 1, dtype=jnp.bfloat16 if dtype == "bfloat16"
                     else jnp.float32)
  return tv.to(device), model, jax.tree.map(jnp.asarray, variables)


def _keep_backbone_bn_frozen(tv) -> None:
  """Puts the backbone's BatchNorm back in eval mode (after ``tv.train()``)."""
  for m in tv.backbone.body.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.eval()


def step_makers(models, size: tuple[int, int], *, device: torch.device, dtype: str):
  """``(jdet(case, b), torchvision(case, b))`` (:func:`bench.harness.side_by_side_steps`) on
  the same :func:`make_inputs` of ``size``: jdet's training step is the one ``train.py``
  runs, with ``configs/faster_rcnn_r50_fpn.py``'s COCO optimiser; torchvision's SGD has
  weight decay 1e-4 and keeps the backbone's BatchNorm frozen
  (:func:`bench.harness.torchvision_step`). ``models()`` gives :func:`build_models`'s
  triple."""
  from configs import faster_rcnn_r50_fpn as config_file
  return side_by_side_steps(models, lambda b: make_inputs(b, size), jdet_batch,
                            config_file.get_config("coco").optim,
                            functools.partial(torchvision_step, device=device, dtype=dtype,
                                              weight_decay=WEIGHT_DECAY,
                                              after_train_mode=_keep_backbone_bn_frozen))


# ----------------------------------------------------------------------------
# The suite's cases (bench/run_all.py).
# ----------------------------------------------------------------------------

# Per profile of run_all: (image H, W; training batch; inference batches). The GPU's:
# 800x1333 images padded to the 832x1344 landscape bucket, 2 per device (the COCO recipe).
SUITE_SETTINGS = {"gpu": ((800, 1333), 2, (1,)), "cpu": ((256, 384), 1, (1,)),
                  "dry": ((128, 128), 1, (1,))}


def suite(profile: str, dtype: str, device: torch.device) -> list[Case]:
  """Faster R-CNN R50-FPN training and inference, jdet beside torchvision's
  ``fasterrcnn_resnet50_fpn`` (:func:`step_makers`), the same converted weights and images."""
  size, train_batch, infer_batches = SUITE_SETTINGS[profile]
  models = functools.cache(lambda: build_models(size, dtype, device))
  h, w = size
  return model_cases(
      "Faster R-CNN R50-FPN", *step_makers(models, size, device=device, dtype=dtype),
      train_batch=train_batch, infer_batches=infer_batches,
      input_size=f"{h}x{w} in {-(-h // 64) * 64}x{-(-w // 64) * 64}", peer="torchvision",
      settings=dict(num_classes=TV_CLASSES - 1, boxes_per_image=BOXES_PER_IMAGE,
                    peer_optimizer=f"SGD lr {SGD_LR} momentum {SGD_MOMENTUM}"))


def main() -> None:
  parser = side_by_side_parser(__doc__)
  parser.add_argument("--size", type=parse_hw, default=(384, 640), help="H,W of the images")
  parser.add_argument("--train-batch", type=int, default=1)
  parser.add_argument("--infer-batch", type=int, default=1)
  args = parse_args(parser)

  device = torch.device(args.device)
  machine = machine_info(device)
  models = functools.cache(lambda: build_models(args.size, args.dtype, device))
  settings = dict(dtype=args.dtype, size=args.size, iters=args.iters, warmup=args.warmup,
                  boxes_per_image=BOXES_PER_IMAGE, num_classes=TV_CLASSES - 1)
  print("machine:", json.dumps(machine))
  print("settings:", json.dumps(settings))
  runs = [("train", args.train_batch), ("inference", args.infer_batch)]
  run_side_by_side(args, "faster_rcnn", runs,
                   *step_makers(models, args.size, device=device, dtype=args.dtype),
                   peer="torchvision", label="tv", machine=machine, settings=settings)


if __name__ == "__main__":
  main()
