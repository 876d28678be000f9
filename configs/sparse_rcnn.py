"""Sparse R-CNN R50-FPN (Sun et al., CVPR 2021): learnable proposals, six dynamic stages.

Variants (the part after ``:``; options follow a comma, e.g. ``coco,root=data/coco,r101``):

* (none) or ``coco``: the authors' R50-FPN, 100 proposals, 3x multi-scale
  recipe on COCO: train2017 (images without boxes kept), shorter side one of
  480..800 (step 32) with the longer at most 1333, flips; AdamW lr 2.5e-5 at
  batch 16 (not scaled with the batch, as the authors), weight decay 1e-4,
  gradient clipping at global norm 1, linear warm-up over 1000 steps from
  0.01x, 270k steps with lr x0.1 at 210k and 250k; frozen BatchNorm, stem and
  layer1 frozen, from ImageNet ResNet-50 weights. Published: 42.8 AP on val2017.

    python train.py --config configs/sparse_rcnn.py:coco,root=data/coco \\
        --workdir runs/sparse_rcnn --config.init.backbone=resnet50-0676ba61.pth

* ``coco_300``: 300 proposals (and 300 detections per image) and the
  authors' crop augmentation (DETR's; MMDetection's
  ``sparse-rcnn_r50_fpn_300-proposals_crop-ms-480-800-3x_coco``): with
  probability 0.5, instead of the multi-scale resize alone, the shorter side
  is resized to one of 400, 500, 600 (longer at most 1333), a random crop of
  384..600 pixels a side is taken (boxes clipped to it, the ones left with
  less than a pixel dropped and counted, images left with no box kept), then
  the multi-scale resize. A crop can turn a landscape image into a portrait
  one, so every training image is padded to the square 1344 x 1344 canvas
  (no aspect grouping). Published: 45.0 AP on val2017.
* Options: ``r101`` (ResNet-101: 44.1 / 46.4 AP published for 100 / 300
  proposals; start from ``resnet101`` ImageNet weights), ``1x``
  (MMDetection's single-scale 1x: shorter side 800, 12 epochs, lr x0.1 after
  epochs 8 and 11, warm-up 500 steps from 0.001x, its clamp of +-4.135;
  published 37.9 AP), ``batch=N``, ``root=DIR``, ``matcher=jax``.

  Evaluating MMDetection's model-zoo weights (converted on the fly; see
  ``jdet.convert``):

    python eval.py --config configs/sparse_rcnn.py:coco,root=data/coco,1x \\
        --workdir runs/sparse_rcnn_mmdet \\
        --config.init.weights=sparse_rcnn_r50_fpn_1x_coco_20201222_214453-dc79b137.pth

* ``shapes``: the CPU quick start, from scratch on the generated shapes
  (5 classes, 128x128, 1 to 6 objects an image): a narrow ResNet-18 with
  BatchNorm, FPN and proposal features of 64, 25 proposals, six stages,
  AdamW 2.5e-4 with the body (backbone and FPN) at 4x that rate, cosine
  decay, batch 8, 15,000 steps (option ``steps=N``). On a 2-core CPU:

    python train.py --config configs/sparse_rcnn.py:shapes --workdir runs/sparse_shapes
    python eval.py  --config configs/sparse_rcnn.py:shapes --workdir runs/sparse_shapes

  Alone on 2 cores (41 images/s) it passes AP 0.65 and AP50 0.90 at step
  10,000 (34 minutes) and ends at AP 0.759 / AP50 0.927 (51 minutes). The
  curve and the measurements behind these settings are in docs/results.md.

* ``custom``: your own data, VOC or COCO layout, with this config's recipe
  (``recipe=coco``, the default, or ``shapes`` / ``smoke``) and the class count
  read from the data (``configs/common.py: custom_config``; docs/custom_data.md):

    python train.py --config configs/sparse_rcnn.py:custom,format=voc,root=DIR --workdir runs/mine

* ``smoke``: a tiny network, a few steps on a few 64x64 generated images;
  seconds (used by the tests).
"""

from __future__ import annotations

import ml_collections

from configs import common
from jdet.models.heads.sparse_rcnn_head import MMDET_SCALE_CLAMP

# train2017 with the images without boxes (the authors keep them): 7,393 steps per epoch at 16.
COCO_TRAIN_IMAGES_ALL = 118_287
# The authors' multi-scale training: shorter side one of 480, 512, ..., 800.
MULTI_SCALES = tuple((s, 1333) for s in range(480, 801, 32))


def optim(*, lr: float, milestones, warmup_steps: int = 1000,
          warmup_factor: float = 0.01) -> ml_collections.ConfigDict:
  """AdamW (0.9, 0.999, 1e-8), weight decay 1e-4 on every trainable parameter, clipping
  at global norm 1, linear warm-up, steps of 0.1 (the authors' solver)."""
  return common.optim_section(name="adamw", lr=lr, weight_decay=1e-4, milestones=milestones,
                              warmup_steps=warmup_steps, warmup_factor=warmup_factor,
                              clip_norm=1.0, lr_mult=dict(backbone=1.0, neck=1.0))


def _coco(config: ml_collections.ConfigDict, options: dict, *, proposals: int) -> None:
  batch = int(options.get("batch", 16))
  one_x = "1x" in options
  depth = 101 if "r101" in options else 50
  config.model = common.model_section(  # the authors' model, with the options
      "sparse_rcnn", num_classes=80, depth=depth, num_proposals=proposals,
      max_detections=proposals, matcher=options.get("matcher", "host"))
  if one_x:  # MMDetection's sparse-rcnn_r50_fpn_1x_coco
    config.model.update(symmetric_clamp=True, scale_clamp=MMDET_SCALE_CLAMP, cost_eps=1e-12)
    scales, mode = ((800, 1333),), "value"
    num_steps, milestones = common.epoch_schedule(batch, 12, (8, 11))
    config.optim = optim(lr=2.5e-5, milestones=milestones, warmup_steps=500, warmup_factor=0.001)
  else:  # the authors' 3x multi-scale recipe, in iterations at batch 16
    scales, mode = MULTI_SCALES, "value"
    scale = 16 / batch
    num_steps = round(270_000 * scale)
    config.optim = optim(lr=2.5e-5, milestones=(round(210_000 * scale), round(250_000 * scale)))
  # The 300-proposal model's crop branch (DETR's, the recipe's defaults: shorter side one
  # of 400, 500, 600, a crop of 384..600 pixels a side, then the multi-scale resize, for
  # half of the images) can change an image's orientation: one square canvas.
  crop = proposals == 300
  transforms = common.rcnn_augment(scales, canvas=common.COCO_CANVAS,
                                   buckets=None if crop else common.COCO_BUCKETS, mode=mode,
                                   test_scale=(800, 1333), crop=crop)
  config.data = common.data_config(
      common.coco_data(options.get("root", "data/coco"), train_keep_empty=not one_x),
      transforms, batch_size=batch, eval_batch_size=batch, num_workers=8,
      group_by_aspect=not crop)
  config.train = common.train(num_steps=num_steps, eval_every=num_steps // 12,
                              checkpoint_every=5000)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config, variant, options = common.start_config(
      "sparse_rcnn", arg, ("coco", "coco_300", "shapes", "smoke", "custom"), get_config)
  if variant == "custom":
    return config
  # Flag-like options (``r101``, ``1x``) are given without a value.
  if variant in ("coco", "coco_300"):
    _coco(config, options, proposals=300 if variant == "coco_300" else 100)
  elif variant == "shapes":
    config.model = common.model_section(
        "sparse_rcnn", num_classes=5, **common.narrow_resnet(16), fpn_channels=64,
        num_proposals=25, num_heads=4, dim_feedforward=256, dim_dynamic=16, max_detections=50,
        matcher=options.get("matcher", "host"))
    config.data = common.data_config(
        common.shapes_quickstart_data(options),
        common.rcnn_augment(((128, 128),), canvas=(128, 128)),
        batch_size=8, eval_batch_size=32, max_boxes=16, num_workers=1)
    # From scratch the body learns too slowly at the heads' rate: at 4x the AP
    # was 1.7-2x as high at steps 1000-3000 (8x was worse than 4x).
    config.optim = optim(lr=2.5e-4, milestones=(), warmup_steps=200)
    config.optim.update(schedule="cosine", min_lr_ratio=0.01,
                        lr_mult=dict(backbone=4.0, neck=4.0))
    config.train = common.train(num_steps=int(options.get("steps", 15_000)), log_every=50,
                                eval_every=2000, checkpoint_every=1000)
  else:  # smoke
    config.model = common.model_section(
        "sparse_rcnn", num_classes=5, **common.narrow_resnet(4), fpn_channels=16,
        num_proposals=10, num_stages=2, num_heads=2, dim_feedforward=32, dim_dynamic=4,
        max_detections=20)
    config.data = common.data_config(
        common.shapes_data(image_size=64, num_train=16, num_val=8),
        common.rcnn_augment(((64, 64),), canvas=(64, 64)),
        batch_size=4, eval_batch_size=4, max_boxes=8)
    config.optim = optim(lr=1e-3, milestones=(), warmup_steps=2)
    config.train = common.train(num_steps=4, log_every=1, eval_every=4, checkpoint_every=2)
    config.eval.num_draw = 4
  common.check_options(options, variant)
  return config
