"""Sparse R-CNN R50-FPN: jdet against MMDetection 3.3.0's, same machine, weights and inputs.

  python bench/sparse_rcnn.py                            # CPU: 256x384, train 1, inference 1 and 8
  python bench/sparse_rcnn.py --size 800,1333 --train-batch 2 --device cuda --dtype bfloat16

Measures, side by side:

* training: one step of the set loss (six stages, Hungarian matching on the
  host by scipy on both sides, 18 terms), forward and backward, AdamW (lr
  2.5e-5, weight decay 1e-4) with gradient clipping at global norm 1, the
  authors' solver. jdet: the training step ``train.py`` runs
  (:func:`jdet.engine.training.make_train_step` with ``configs/sparse_rcnn.py``'s
  optimiser), compiled once. MMDetection: the model in train mode (its ResNet
  keeps BatchNorm in eval, stem and layer1 frozen), ``sum(model.loss(x,
  samples))`` backward, ``clip_grad_norm_`` and ``torch.optim.AdamW``.
* inference at batch 1 and 8: jdet ``method="predict"`` (the last stage's 100
  best pairs; Sparse R-CNN has no NMS); MMDetection ``model.predict`` under
  ``torch.no_grad()``.

Both hold the same weights: MMDetection's own config
(``sparse-rcnn_r50_fpn_1x_coco``, 80 classes, 100 proposals) built by
``tests/oracles/mmdet_sparse_rcnn.py`` with seeded random weights (its
``build``: MMDetection's initialisation with the proposals spread over the
image), converted by :func:`jdet.convert.mmdet_sparse_rcnn.sparse_rcnn_variables`;
jdet's model takes MMDetection's settings (``configs/sparse_rcnn.py:coco,1x``:
clamp +-4.135, cost epsilon 1e-12). The input: ``--size H,W`` random images
(the COCO recipe's 800x1333 on a GPU; smaller on a CPU) with 3 random boxes
each, normalised with MMDetection's mean and std and padded to a multiple of 32
(MMDetection's ``pad_size_divisor``) on both sides; MMDetection's data
preprocessor is skipped (the tensor goes to ``model.loss`` / ``model.predict``
as the oracle feeds it). One difference in what trains: MMDetection's
ResNet trains the BatchNorm affine (its ``requires_grad=True``), jdet's
``frozen_bn`` keeps it frozen (0.05 % of the parameters).

Timing (:mod:`bench.harness`): jdet's step is compiled apart (compile time
recorded), then ``--warmup`` untimed calls on each side and the median of
``--iters`` calls, each waited for. ``--dtype bfloat16`` builds jdet's model
with ``dtype=bfloat16`` (focal loss, costs, GIoU and box decoding stay float32)
and runs MMDetection under ``torch.autocast(bfloat16)``. Results: a table
(ratio = jdet speed / MMDetection speed, above 1 means jdet is faster) written
with the machine to ``bench/results/sparse_rcnn_<device>[_bfloat16].json`` and
``.txt``.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import torch

from harness import (Case, TorchStep, autocast, machine_info, model_cases, parse_args, parse_hw,
                     parse_ints, run_side_by_side, side_by_side_parser,
                     side_by_side_steps)  # bench/harness.py (puts the repository root on sys.path)
from jdet.convert.mmdet_sparse_rcnn import sparse_rcnn_variables
from jdet.models import build_model
from jdet.testing import random_boxes

NUM_CLASSES = 80
NUM_PROPOSALS = 100
BOXES_PER_IMAGE = 3
LR, WEIGHT_DECAY, CLIP_NORM = 2.5e-5, 1e-4, 1.0


def _oracle():
  from tests.oracles import mmdet_sparse_rcnn
  if not mmdet_sparse_rcnn.available():
    raise SystemExit("MMDetection is not installed: python -m pip install --no-deps -r "
                     "tests/oracles/requirements.txt")
  return mmdet_sparse_rcnn


def canvas_of(size: tuple[int, int]) -> tuple[int, int]:
  """The padded input: H and W rounded up to multiples of 32."""
  return tuple(-(-s // 32) * 32 for s in size)


def make_inputs(batch: int, size: tuple[int, int], seed: int = 0) -> dict[str, np.ndarray]:
  """Normalised images ``[B, Hc, Wc, 3]`` float32 zero-padded to :func:`canvas_of`,
  ``boxes [B, 3, 4]`` inside the ``H x W`` image, ``labels [B, 3]`` in ``0 .. 79``."""
  oracle = _oracle()
  h, w = size
  rng = np.random.default_rng(seed)
  photos = [rng.uniform(0, 255, size=(h, w, 3)) for _ in range(batch)]
  image = oracle.pad_batch(photos, canvas_of(size)).astype(np.float32)
  boxes = np.stack([random_boxes(rng, BOXES_PER_IMAGE, size=min(h, w), min_side=32.0,
                                 max_side=0.6 * min(h, w)) for _ in range(batch)])
  labels = rng.integers(0, NUM_CLASSES, size=(batch, BOXES_PER_IMAGE)).astype(np.int32)
  return dict(image=image, boxes=boxes.astype(np.float32), labels=labels,
              sizes=np.tile(np.asarray([h, w], np.int32), (batch, 1)))


def jdet_batch(inputs: dict[str, np.ndarray]) -> dict[str, jnp.ndarray]:
  b = len(inputs["image"])
  return dict(image=jnp.asarray(inputs["image"]), boxes=jnp.asarray(inputs["boxes"]),
              labels=jnp.asarray(inputs["labels"]), image_size=jnp.asarray(inputs["sizes"]),
              orig_size=jnp.asarray(inputs["sizes"]), valid=jnp.ones((b,), bool))


def mmdet_batch(inputs: dict[str, np.ndarray], device: torch.device, *, with_boxes: bool):
  """``(x [B, 3, Hc, Wc] on device, DetDataSamples)`` as the oracle feeds MMDetection."""
  from tests.oracles.mmdet_sparse_rcnn import data_samples
  x = torch.from_numpy(np.ascontiguousarray(inputs["image"].transpose(0, 3, 1, 2))).to(device)
  boxes = list(inputs["boxes"]) if with_boxes else None
  labels = list(inputs["labels"]) if with_boxes else None
  samples = data_samples([tuple(s) for s in inputs["sizes"]], x.shape[-2:], boxes, labels,
                          torch.float32)
  return x, [s.to(device) for s in samples]


def jdet_model_settings(dtype: str) -> dict:
  """``configs/sparse_rcnn.py:coco,1x``'s model (MMDetection's clamp and cost epsilon)."""
  from configs import sparse_rcnn as config_file
  settings = dict(config_file.get_config("coco,1x").model)
  settings.update(num_classes=NUM_CLASSES, num_proposals=NUM_PROPOSALS,
                  max_detections=NUM_PROPOSALS,
                  dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
  return settings


def build_models(dtype: str, device: torch.device):
  """``(MMDetection model, jdet model, jdet variables)`` with the same weights."""
  oracle = _oracle()
  mm = oracle.build(num_classes=NUM_CLASSES, num_proposals=NUM_PROPOSALS, seed=0, double=False)
  variables = sparse_rcnn_variables(oracle.state_dict_numpy(mm))
  model = build_model("sparse_rcnn", **jdet_model_settings(dtype))
  return mm.to(device), model, jax.tree.map(jnp.asarray, variables)


def mmdet_train_step(mm, inputs, *, device: torch.device, dtype: str) -> TorchStep:
  """One MMDetection training step: summed loss terms, backward, clipping, AdamW."""
  mm.train()  # its ResNet keeps BatchNorm in eval (norm_eval) and stem + layer1 frozen
  params = [p for p in mm.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
  x, samples = mmdet_batch(inputs, device, with_boxes=True)

  def call():
    with autocast(device, dtype):
      losses = mm.loss(x, samples)
    loss = sum(v for k, v in losses.items() if "loss" in k)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
    opt.step()
    return loss

  return TorchStep(call)


def mmdet_predict_step(mm, inputs, *, device: torch.device, dtype: str) -> TorchStep:
  """MMDetection's ``predict`` in eval mode under ``torch.no_grad()``."""
  mm.eval()
  x, samples = mmdet_batch(inputs, device, with_boxes=False)

  def call():
    with torch.no_grad(), autocast(device, dtype):
      return mm.predict(x, samples, rescale=False)

  return TorchStep(call)


def mmdet_step(case: str, mm, inputs, *, device: torch.device, dtype: str) -> TorchStep:
  """:func:`mmdet_train_step` for ``"train"``, :func:`mmdet_predict_step` for ``"inference"``."""
  make = mmdet_train_step if case == "train" else mmdet_predict_step
  return make(mm, inputs, device=device, dtype=dtype)


def step_makers(models, size: tuple[int, int], *, device: torch.device, dtype: str):
  """``(jdet(case, b), mmdet(case, b))`` (:func:`bench.harness.side_by_side_steps`) on the
  same :func:`make_inputs` of ``size``: jdet's training step is the one ``train.py`` runs,
  with ``configs/sparse_rcnn.py``'s COCO optimiser; MMDetection's is :func:`mmdet_step`.
  ``models()`` gives :func:`build_models`'s triple."""
  from configs import sparse_rcnn as config_file
  return side_by_side_steps(models, lambda b: make_inputs(b, size), jdet_batch,
                            config_file.get_config("coco").optim,
                            functools.partial(mmdet_step, device=device, dtype=dtype))


# ----------------------------------------------------------------------------
# The suite's cases (bench/run_all.py).
# ----------------------------------------------------------------------------

# Per profile of run_all: (image H, W; training batch; inference batches). The GPU's:
# the COCO recipe's 800x1333 (an 800x1344 canvas), 2 images per device.
SUITE_SETTINGS = {"gpu": ((800, 1333), 2, (1, 8)), "cpu": ((256, 384), 1, (1, 8)),
                  "dry": ((128, 128), 1, (1, 2))}


def suite(profile: str, dtype: str, device: torch.device) -> list[Case]:
  """Sparse R-CNN R50-FPN training and inference, jdet beside MMDetection's
  (:func:`step_makers`), the same converted weights and inputs."""
  size, train_batch, infer_batches = SUITE_SETTINGS[profile]
  models = functools.cache(lambda: build_models(dtype, device))
  hc, wc = canvas_of(size)
  settings = dict(num_classes=NUM_CLASSES, num_proposals=NUM_PROPOSALS,
                  boxes_per_image=BOXES_PER_IMAGE, matcher="host (scipy) on both sides",
                  optimizer=f"AdamW lr {LR} wd {WEIGHT_DECAY}, clip {CLIP_NORM} on both sides")
  return model_cases(
      "Sparse R-CNN R50-FPN", *step_makers(models, size, device=device, dtype=dtype),
      train_batch=train_batch, infer_batches=infer_batches,
      input_size=f"{size[0]}x{size[1]} in {hc}x{wc}", peer="MMDetection 3.3.0", settings=settings)


# ----------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------


def main() -> None:
  parser = side_by_side_parser(__doc__)
  parser.add_argument("--size", type=parse_hw, default=(256, 384), help="H,W of the images")
  parser.add_argument("--train-batch", type=int, default=1)
  parser.add_argument("--infer-batches", type=parse_ints, default=[1, 8])
  args = parse_args(parser)

  device = torch.device(args.device)
  machine = machine_info(device)
  models = functools.cache(lambda: build_models(args.dtype, device))
  settings = dict(dtype=args.dtype, size=args.size, canvas=canvas_of(args.size), iters=args.iters,
                  warmup=args.warmup, boxes_per_image=BOXES_PER_IMAGE, num_classes=NUM_CLASSES,
                  num_proposals=NUM_PROPOSALS)
  print("machine:", json.dumps(machine))
  print("settings:", json.dumps(settings))
  runs = [("train", args.train_batch)] + [("inference", b) for b in args.infer_batches]
  run_side_by_side(args, "sparse_rcnn", runs,
                   *step_makers(models, args.size, device=device, dtype=args.dtype),
                   peer="mmdet", label="MMDet", machine=machine, settings=settings)


if __name__ == "__main__":
  main()
