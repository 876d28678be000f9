"""Faster R-CNN R50-FPN: jdet against torchvision's ``fasterrcnn_resnet50_fpn``, same machine and inputs.

  python bench/faster_rcnn.py                           # CPU: 384x640 canvas, train 1, latency batch 1
  python bench/faster_rcnn.py --size 800,1333 --train-batch 2 --device cuda --dtype bfloat16

Measures, side by side:

* training images/s: one SGD step (momentum 0.9, weight decay 1e-4) of the
  full loss (RPN and R-CNN: sampling, targets, both losses), forward and
  backward. jdet: ``model.apply(..., method="loss")`` under
  ``jax.value_and_grad`` with an optax update, jitted, parameters and optimiser
  state donated. torchvision: the model in train mode,
  ``sum(model(images, targets).values()).backward()`` and ``SGD.step()``.
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

Timing: ``--warmup`` untimed calls (jdet's first compiles), then the median of
``--iters`` calls, each waited for. Results: a table (ratio = jdet speed /
torchvision speed: above 1 means jdet is faster) written with the machine to
``bench/results/faster_rcnn_<device>[_bfloat16].json`` and ``.txt``.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torchvision

from jdet.convert.faster_rcnn import fasterrcnn_resnet50_fpn_params
from jdet.models.faster_rcnn import FasterRCNN
from jdet.testing import random_boxes
from harness import (Case, TorchStep, _jax_sync, jdet_predict_step, jdet_train_step, machine_info,
                     parse_args, parse_hw, report, side_by_side_parser)  # bench/harness.py
from ssd import _time, torch_infer, torch_infer_fn, torch_train, torch_train_fn  # bench/ssd.py

TV_CLASSES = 91
BOXES_PER_IMAGE = 3
LR, MOMENTUM, WEIGHT_DECAY = 1e-5, 0.9, 1e-4
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
  for m in tv.backbone.body.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.eval()


def jdet_train(model, variables, batch, *, warmup: int, iters: int) -> float:
  tx = optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LR, momentum=MOMENTUM))
  frozen = {k: v for k, v in variables.items() if k != "params"}

  def train_step(params, opt_state, key, batch):
    def loss_fn(p):
      loss, _ = model.apply({"params": p, **frozen}, batch, method="loss", train=True,
                            rngs={"sampling": key})
      return loss
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(train_step, donate_argnums=(0, 1))
  state = [jax.tree.map(jnp.copy, variables["params"]), None, jax.random.key(0)]
  state[1] = tx.init(state[0])

  def call():
    state[2], key = jax.random.split(state[2])
    state[0], state[1], loss = step(state[0], state[1], key, batch)
    return loss

  return _time(call, warmup=warmup, iters=iters, sync=_jax_sync)


def jdet_infer(model, variables, batch, *, warmup: int, iters: int) -> float:
  predict = jax.jit(lambda v, b: model.apply(v, b, method="predict"))
  return _time(lambda: predict(variables, batch), warmup=warmup, iters=iters, sync=_jax_sync)


# ----------------------------------------------------------------------------
# The suite's cases (bench/run_all.py).
# ----------------------------------------------------------------------------

# Per profile of run_all: (image H, W; training batch; inference batches). The GPU's:
# 800x1333 images padded to the 832x1344 landscape bucket, 2 per device (the COCO recipe).
SUITE_SETTINGS = {"gpu": ((800, 1333), 2, (1,)), "cpu": ((256, 384), 1, (1,)),
                  "dry": ((128, 128), 1, (1,))}


def suite(profile: str, dtype: str, device: torch.device) -> list[Case]:
  """Faster R-CNN R50-FPN training and inference, jdet (the training step ``train.py``
  runs, ``configs/faster_rcnn_r50_fpn.py``'s optimiser) beside torchvision's
  ``fasterrcnn_resnet50_fpn`` (SGD), the same converted weights and images."""
  from configs import faster_rcnn_r50_fpn as config_file

  size, train_batch, infer_batches = SUITE_SETTINGS[profile]
  built = {}

  def models():
    if not built:
      built["models"] = build_models(size, dtype, device)
    return built["models"]

  def train():
    _, model, variables = models()
    return jdet_train_step(model, variables, jdet_batch(make_inputs(train_batch, size)),
                           config_file.get_config("coco").optim)

  def train_peer():
    return TorchStep(torch_train_fn(models()[0], make_inputs(train_batch, size), device=device,
                                    dtype=dtype, weight_decay=WEIGHT_DECAY,
                                    after_train_mode=_keep_backbone_bn_frozen))

  def infer(b):
    _, model, variables = models()
    return jdet_predict_step(model, variables, jdet_batch(make_inputs(b, size)))

  def infer_peer(b):
    return TorchStep(torch_infer_fn(models()[0], make_inputs(b, size), device=device, dtype=dtype))

  h, w = size
  canvas = f"{h}x{w} in {-(-h // 64) * 64}x{-(-w // 64) * 64}"
  settings = dict(num_classes=TV_CLASSES - 1, boxes_per_image=BOXES_PER_IMAGE,
                  peer_optimizer=f"SGD lr {LR} momentum {MOMENTUM}")
  cases = [Case("Faster R-CNN R50-FPN", "train", train, train_peer, batch=train_batch,
                input_size=canvas, peer="torchvision", settings=settings)]
  cases += [Case("Faster R-CNN R50-FPN", "inference", lambda b=b: infer(b),
                 lambda b=b: infer_peer(b), batch=b, input_size=canvas, peer="torchvision",
                 settings=settings) for b in infer_batches]
  return cases


def main() -> None:
  parser = side_by_side_parser(__doc__)
  parser.add_argument("--size", type=parse_hw, default=(384, 640), help="H,W of the images")
  parser.add_argument("--train-batch", type=int, default=1)
  parser.add_argument("--infer-batch", type=int, default=1)
  args = parse_args(parser)

  device = torch.device(args.device)
  machine = machine_info(device)
  tv, model, variables = build_models(args.size, args.dtype, device)
  settings = dict(dtype=args.dtype, size=args.size, iters=args.iters, warmup=args.warmup,
                  boxes_per_image=BOXES_PER_IMAGE, num_classes=TV_CLASSES - 1)
  print("machine:", json.dumps(machine))
  print("settings:", json.dumps(settings))
  timing = dict(warmup=args.warmup, iters=args.iters)
  rows = []
  for case, b in (("train", args.train_batch), ("inference", args.infer_batch)):
    inputs = make_inputs(b, args.size)
    batch = jdet_batch(inputs)
    if case == "train":
      ours = jdet_train(model, variables, batch, **timing)
      ref = torch_train(tv, inputs, device=device, dtype=args.dtype, weight_decay=WEIGHT_DECAY,
                        after_train_mode=_keep_backbone_bn_frozen, **timing)
    else:
      ours = jdet_infer(model, variables, batch, **timing)
      ref = torch_infer(tv, inputs, device=device, dtype=args.dtype, **timing)
    row = dict(case=case, batch=b, jdet_ms=ours * 1e3, torchvision_ms=ref * 1e3,
               jdet_img_s=b / ours, torchvision_img_s=b / ref, ratio=ref / ours)
    rows.append(row)
    print(f"{case} batch {b}: jdet {row['jdet_ms']:.0f} ms, torchvision {row['torchvision_ms']:.0f} ms",
          flush=True)

  report(args, "faster_rcnn", machine=machine, settings=settings, rows=rows, columns=[
      ("case", "case", ""), ("batch", "batch", ""), ("jdet ms", "jdet_ms", ".0f"),
      ("torchvision ms", "torchvision_ms", ".0f"), ("jdet img/s", "jdet_img_s", ".2f"),
      ("tv img/s", "torchvision_img_s", ".2f"), ("jdet/tv speed", "ratio", ".2f")])


if __name__ == "__main__":
  main()
