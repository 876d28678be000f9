"""SSD300 throughput: jdet against torchvision's ``ssd300_vgg16`` on the same machine and inputs.

  python bench/ssd.py                                 # CPU, float32: train 8, 32; infer 1, 8
  python bench/ssd.py --iters 2 --warmup 1 --train-batches 8
  python bench/ssd.py --device cuda --dtype bfloat16  # on a GPU machine

Measures images per second, side by side:

* training: one SGD step (momentum 0.9, weight decay 5e-4) of the multibox
  loss, forward and backward included. jdet: ``model.apply(..., method="loss")``
  under ``jax.value_and_grad`` and an optax update, jitted with the parameters
  and optimiser state donated. torchvision: the model in train mode,
  ``sum(model(images, targets).values()).backward()`` and ``torch.optim.SGD.step()``.
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

Timing: ``--warmup`` untimed calls first (for jdet these include compilation),
then the median of ``--iters`` calls, each waited for (``block_until_ready`` /
CUDA synchronisation). jdet runs on JAX's default backend; torchvision on
``--device``. ``--dtype bfloat16`` builds jdet's SSD with ``dtype=bfloat16``
and runs torchvision under ``torch.autocast(device, dtype=torch.bfloat16)``;
parameters stay float32 on both sides. The learning rate is tiny (1e-5) so that
random-weight training stays finite over the timed steps.

Results: a table (the last column is jdet / torchvision images per second, so
> 1 means jdet is faster), written with the settings and machine to
``bench/results/ssd_<device>[_bfloat16].json`` and ``.txt``.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torchvision

from jdet import convert
from jdet.models.ssd import SSD
from jdet.testing import random_boxes
from harness import (Case, TorchStep, _jax_sync, _median_time, _torch_sync, jdet_predict_step,
                     jdet_train_step, machine_info, parse_args, parse_ints, report,
                     side_by_side_parser)  # bench/harness.py

SIZE = 300
TV_CLASSES = 91  # COCO in torchvision: 90 categories and the background
BOXES_PER_IMAGE = 3
LR, MOMENTUM, WEIGHT_DECAY = 1e-5, 0.9, 5e-4
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


def torch_batch(inputs: dict[str, np.ndarray], device: torch.device):
  images = [torch.from_numpy(x).permute(2, 0, 1).contiguous().to(device) for x in inputs["images"]]
  targets = [{"boxes": torch.from_numpy(b).to(device),
              "labels": torch.from_numpy(l + 1).long().to(device)}
             for b, l in zip(inputs["boxes"], inputs["labels"])]
  return images, targets


def build_models(dtype: str, device: torch.device, background_shift: float):
  """``(torchvision model, jdet model, jdet params)`` with the same weights."""
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
  return tv.to(device), model, jax.tree.map(jnp.asarray, params)


def nms_candidates(tv, inputs, device: torch.device) -> float:
  """Mean number of (default box, class) candidates per image that torchvision sends to NMS:
  per class the scores above its threshold, at most ``topk_candidates``."""
  images, _ = torch_batch(inputs, device)
  tv.eval()
  with torch.inference_mode():
    normalised = tv.transform(images)[0].tensors
    logits = tv.head(list(tv.backbone(normalised).values()))["cls_logits"]
  passing = (torch.softmax(logits.float(), -1)[..., 1:] > tv.score_thresh).sum(1)  # [B, C]
  return float(passing.clamp(max=tv.topk_candidates).sum(1).float().mean())


def _autocast(device: torch.device, dtype: str):
  return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


# ----------------------------------------------------------------------------
# Timed steps.
# ----------------------------------------------------------------------------


def _time(fn, *, warmup: int, iters: int, sync) -> float:
  """Median seconds per call of ``fn`` after ``warmup`` untimed calls (at least one)."""
  for _ in range(warmup - 1):  # _median_time makes the last warm-up call itself
    sync(fn())
  return _median_time(fn, repeats=iters, sync=sync)


def jdet_train(model, params, batch, *, warmup: int, iters: int) -> float:
  """Median seconds of one jitted SGD step of ``model``'s loss on the jdet ``batch``."""
  tx = optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LR, momentum=MOMENTUM))

  def train_step(params, opt_state, batch):
    def loss_fn(p):
      loss, _ = model.apply({"params": p}, batch, method="loss", train=True)
      return loss
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(train_step, donate_argnums=(0, 1))
  state = [jax.tree.map(jnp.copy, params), None]  # a copy: the donated buffers are consumed
  state[1] = tx.init(state[0])

  def call():
    state[0], state[1], loss = step(state[0], state[1], batch)
    return loss

  return _time(call, warmup=warmup, iters=iters, sync=_jax_sync)


def jdet_infer(model, params, batch, *, warmup: int, iters: int) -> float:
  """Median seconds of one jitted ``predict`` (post-processing included) on ``batch``."""
  predict = jax.jit(lambda p, b: model.apply({"params": p}, b, method="predict"))
  return _time(lambda: predict(params, batch), warmup=warmup, iters=iters, sync=_jax_sync)


def torch_train_fn(tv, inputs, *, device, dtype: str, weight_decay: float = WEIGHT_DECAY,
                   after_train_mode=None):
  """A call of one SGD step of a torchvision detector's summed losses (not yet run).
  ``after_train_mode(tv)`` runs after ``tv.train()`` (e.g. to keep frozen BatchNorm in eval)."""
  tv.train()
  if after_train_mode is not None:
    after_train_mode(tv)
  opt = torch.optim.SGD([p for p in tv.parameters() if p.requires_grad], lr=LR,
                        momentum=MOMENTUM, weight_decay=weight_decay)
  images, targets = torch_batch(inputs, device)

  def call():
    with _autocast(device, dtype):
      losses = tv(images, targets)
    loss = sum(losses.values())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  return call


def torch_train(tv, inputs, *, device, dtype: str, warmup: int, iters: int,
                weight_decay: float = WEIGHT_DECAY, after_train_mode=None) -> float:
  """Median seconds of one SGD step of a torchvision detector's summed losses."""
  call = torch_train_fn(tv, inputs, device=device, dtype=dtype, weight_decay=weight_decay,
                        after_train_mode=after_train_mode)
  return _time(call, warmup=warmup, iters=iters, sync=_torch_sync)


def torch_infer_fn(tv, inputs, *, device, dtype: str):
  """A call of a torchvision detector in eval mode, post-processing included (not yet run)."""
  tv.eval()
  images, _ = torch_batch(inputs, device)

  def call():
    with torch.inference_mode(), _autocast(device, dtype):
      return tv(images)

  return call


def torch_infer(tv, inputs, *, device, dtype: str, warmup: int, iters: int) -> float:
  return _time(torch_infer_fn(tv, inputs, device=device, dtype=dtype), warmup=warmup,
               iters=iters, sync=_torch_sync)


# ----------------------------------------------------------------------------
# The suite's cases (bench/run_all.py).
# ----------------------------------------------------------------------------

# Per profile of run_all: (training batch, inference batches). The GPU's are the
# issue's realistic ones (batch 32 per device, latency at batch 1).
SUITE_BATCHES = {"gpu": (32, (1,)), "cpu": (1, (1,)), "dry": (1, (1,))}


def suite(profile: str, dtype: str, device: torch.device) -> list[Case]:
  """SSD300 training and inference, jdet (the training step ``train.py`` runs, with
  ``configs/ssd300.py``'s optimiser) beside torchvision's ``ssd300_vgg16`` (SGD), the
  same converted weights and inputs."""
  from configs import ssd300 as ssd300_config

  train_batch, infer_batches = SUITE_BATCHES[profile]
  built = {}

  def models():
    if not built:
      built["models"] = build_models(dtype, device, background_shift=8.0)
    return built["models"]

  def train():
    _, model, params = models()
    return jdet_train_step(model, {"params": params}, jdet_batch(make_inputs(train_batch)),
                           ssd300_config.get_config("coco").optim)

  def train_peer():
    return TorchStep(torch_train_fn(models()[0], make_inputs(train_batch), device=device,
                                    dtype=dtype))

  def infer(b):
    _, model, params = models()
    return jdet_predict_step(model, {"params": params}, jdet_batch(make_inputs(b)))

  def infer_peer(b):
    return TorchStep(torch_infer_fn(models()[0], make_inputs(b), device=device, dtype=dtype))

  size = f"{SIZE}x{SIZE}"
  settings = dict(num_classes=TV_CLASSES - 1, boxes_per_image=BOXES_PER_IMAGE,
                  background_shift=8.0, peer_optimizer=f"SGD lr {LR} momentum {MOMENTUM}")
  cases = [Case("SSD300", "train", train, train_peer, batch=train_batch, input_size=size,
                peer="torchvision", key=("jdet", "ssd300", "train", train_batch),
                settings=settings)]
  cases += [Case("SSD300", "inference", lambda b=b: infer(b), lambda b=b: infer_peer(b), batch=b,
                 input_size=size, peer="torchvision", key=("jdet", "ssd300", "inference", b),
                 settings=settings)
            for b in infer_batches]
  return cases


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
  tv, model, params = build_models(args.dtype, device, args.background_shift)
  settings = dict(dtype=args.dtype, iters=args.iters, warmup=args.warmup, image_size=SIZE,
                  boxes_per_image=BOXES_PER_IMAGE, num_classes=TV_CLASSES - 1,
                  background_shift=args.background_shift,
                  nms_candidates_per_image=nms_candidates(tv, make_inputs(2, seed=1), device))
  print("machine:", json.dumps(machine))
  print("settings:", json.dumps(settings))
  timing = dict(warmup=args.warmup, iters=args.iters)
  rows = []
  cases = [("train", b) for b in train_batches] + [("inference", b) for b in infer_batches]
  for case, b in cases:
    inputs = make_inputs(b)
    if case == "train":
      ours = jdet_train(model, params, jdet_batch(inputs), **timing)
      ref = torch_train(tv, inputs, device=device, dtype=args.dtype, **timing)
    else:
      ours = jdet_infer(model, params, jdet_batch(inputs), **timing)
      ref = torch_infer(tv, inputs, device=device, dtype=args.dtype, **timing)
    row = dict(case=case, batch=b, jdet_img_s=b / ours, torchvision_img_s=b / ref, ratio=ref / ours)
    rows.append(row)
    print(f"{case} batch {b}: jdet {row['jdet_img_s']:.2f} img/s, "
          f"torchvision {row['torchvision_img_s']:.2f} img/s", flush=True)

  report(args, "ssd", machine=machine, settings=settings, rows=rows, columns=[
      ("case", "case", ""), ("batch", "batch", ""), ("jdet img/s", "jdet_img_s", ".2f"),
      ("torchvision img/s", "torchvision_img_s", ".2f"), ("jdet/torchvision", "ratio", ".2f")])


if __name__ == "__main__":
  main()
