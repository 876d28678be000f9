"""Faster R-CNN with a ResNet-50-FPN backbone (Ren et al., NeurIPS 2015; Lin et al., CVPR 2017).

Variants (the part after ``:``; options follow a comma, e.g. ``coco,root=data/coco,batch=8``):

* (none) or ``coco``: MMDetection's ``faster-rcnn_r50_fpn_1x`` and torchvision's
  ``fasterrcnn_resnet50_fpn`` recipe: train2017 (images with boxes), shorter
  side 800 and longer at most 1333, flips, batches of landscape or of portrait
  images padded to 832x1344 or 1344x832 (1344x1344 in evaluation); SGD
  with momentum 0.9 and weight decay 1e-4, lr 0.02 for a batch of 16 scaled
  linearly to ``batch=`` (default 16), linear warm-up over 500 steps from
  0.001x, lr x0.1 after epochs 8 and 11 of 12 (7,330 steps per epoch at batch
  16: 87,960 steps). Frozen BatchNorm and frozen stem + layer1, from ImageNet
  ResNet-50 weights. Published: 37.4 AP (MMDetection), 37.0 (torchvision) on
  val2017.

    python train.py --config configs/faster_rcnn_r50_fpn.py:coco,root=data/coco \\
        --workdir runs/frcnn_coco --config.init.backbone=resnet50-0676ba61.pth

  Evaluating torchvision's COCO weights (``fasterrcnn_resnet50_fpn_coco-258fb6c6.pth``;
  see ``jdet.convert.faster_rcnn``; its frozen BatchNorm has epsilon 0):

    python eval.py --config configs/faster_rcnn_r50_fpn.py:coco,root=data/coco \\
        --workdir runs/frcnn_tv --config.model.norm_eps=0 \\
        --config.init.weights=fasterrcnn_resnet50_fpn_coco-258fb6c6.pth

* ``coco_ms``: MMDetection's multi-scale 3x schedule (``faster-rcnn_r50_fpn_ms-3x``):
  shorter side uniform in 640..800 in training, 800 at test, 36 epochs with lr
  steps after 27 and 33. Published: about 40 AP (MMDetection).

* ``shapes``: the CPU quick start: a narrow ResNet-18-like backbone with
  trainable BatchNorm, trained from scratch with AdamW on 128x128 generated
  shapes (5 classes), with fewer proposals (300 in training, 100 at test),
  128 sampled RoIs per image, anchors of two sizes per level for objects of
  10 to 110 pixels (``SHAPES_ANCHOR_SIZES``) and aligned RoIAlign. On a 2-core
  CPU:

    python train.py --config configs/faster_rcnn_r50_fpn.py:shapes --workdir runs/frcnn_shapes
    python eval.py  --config configs/faster_rcnn_r50_fpn.py:shapes --workdir runs/frcnn_shapes

  Passes COCO AP 0.70 by step 3000 (0.721) and reaches AP 0.755 / AP50 0.953
  / AP75 0.891 after its 5000 steps (about 47 minutes at 28.5 images/s on 2
  cores).

* ``custom``: your own data, VOC or COCO layout, with this config's recipe
  (``recipe=coco``, the default, or ``shapes`` / ``smoke``) and the class count
  read from the data (``configs/common.py: custom_config``; docs/custom_data.md):

    python train.py --config configs/faster_rcnn_r50_fpn.py:custom,format=voc,root=DIR --workdir runs/mine

* ``smoke``: a tiny network, a few steps on a few 64x64 generated images; seconds
  (used by the tests).
"""

from __future__ import annotations

import ml_collections

from configs import common
from configs.common import COCO_BUCKETS, COCO_CANVAS  # the R50-FPN's COCO canvas and buckets


# The shapes quick start's anchors: two sizes per level, 3x and 4.2x the stride (12 and 17
# pixels on P2 .. 192 and 272 on P6), three ratios each. On the shapes validation split
# every object then overlaps an anchor by IoU >= 0.5 and 53 % one by IoU >= 0.7 (RPN
# positives; the rest are matched as low-quality matches); with one size of 2x the
# stride (8 .. 128, a quarter of COCO's sizes) 17 % overlapped none by 0.5 and 92 % none
# by 0.7.
SHAPES_ANCHOR_SIZES = tuple((s, round(s * 2 ** 0.5, 2)) for s in (12, 24, 48, 96, 192))


def optim(*, lr: float, milestones, warmup_steps: int = 500,
          freeze=()) -> ml_collections.ConfigDict:
  """SGD with momentum 0.9, weight decay 1e-4 (on every parameter, as MMDetection and
  torchvision), linear warm-up from 0.001x, steps of 0.1. The frozen ResNet stages
  need no ``freeze`` entry: the model gives them (``FasterRCNN.frozen_parameters``)."""
  return common.optim_section(name="sgd", lr=lr, weight_decay=1e-4, milestones=milestones,
                              warmup_steps=warmup_steps, freeze=freeze)


# The ``train`` section (steps, logging, evaluation and checkpoint intervals).
train = common.train


def _coco(config: ml_collections.ConfigDict, options: dict, *, scales, mode: str, epochs: int,
          milestones) -> None:
  batch = int(options.get("batch", 16))
  config.model = common.model_section("faster_rcnn", num_classes=80)  # the paper's model
  config.data = common.data_config(
      common.coco_data(options.get("root", "data/coco")),
      common.rcnn_augment(scales, canvas=COCO_CANVAS, buckets=COCO_BUCKETS, mode=mode,
                          test_scale=(800, 1333)),
      batch_size=batch, eval_batch_size=batch, num_workers=8, group_by_aspect=True)
  num_steps, steps = common.epoch_schedule(batch, epochs, milestones)
  # The linear scaling rule: 0.02 for 16 images per step.
  config.optim = optim(lr=0.02 * batch / 16, milestones=steps)
  config.train = train(num_steps=num_steps, eval_every=num_steps // epochs * 4,
                       checkpoint_every=num_steps // epochs)


def small_recipe(config: ml_collections.ConfigDict, num_images: int) -> None:
  """``custom,...,recipe=small``: the ``shapes`` model (narrow ResNet-18-FPN) with scale
  jitter (short side 128..192, long side at most 256, on a 256x256 canvas), batch 8, 60
  epochs (evaluated every 10): what the raccoon photos measured (docs/raccoon.md: 160
  photos, 1200 steps, AP50 0.79 in 16 minutes on 2 cores)."""
  t = config.data.transforms
  t.scales, t.mode, t.canvas, t.test_scale = ((128, 256), (192, 256)), "range", (256, 256), \
      (192, 256)
  config.data.eval_batch_size = 8
  common.small_schedule(config, num_images, epochs=60, eval_epochs=10, warmup_epochs=5)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config, variant, options = common.start_config(
      "faster_rcnn", arg, ("coco", "coco_ms", "shapes", "smoke", "custom"), get_config,
      small=small_recipe)
  if variant == "custom":
    return config

  if variant == "coco":
    _coco(config, options, scales=((800, 1333),), mode="value", epochs=12, milestones=(8, 11))
  elif variant == "coco_ms":
    _coco(config, options, scales=((640, 1333), (800, 1333)), mode="range", epochs=36,
          milestones=(27, 33))
  elif variant == "shapes":
    # From scratch: trainable BatchNorm, nothing frozen, AdamW. Objects are 10..110 px,
    # so the anchors are smaller than COCO's: SHAPES_ANCHOR_SIZES. RoIAlign samples at
    # pixel centres (aligned, as MMDetection), which matters on maps of 32 pixels.
    config.model = common.model_section(
        "faster_rcnn", num_classes=5, **common.narrow_resnet(16), fpn_channels=64,
        anchor_sizes=SHAPES_ANCHOR_SIZES, rpn_pre_nms_top_n=(600, 300),
        rpn_post_nms_top_n=(300, 100), representation_size=256, rcnn_num_samples=128,
        roi_aligned=True, score_threshold=0.02)
    config.data = common.data_config(
        common.shapes_quickstart_data(options),
        common.rcnn_augment(((128, 128),), canvas=(128, 128)),
        batch_size=16, eval_batch_size=32, max_boxes=16, num_workers=1)
    config.optim = optim(lr=1e-3, milestones=(), warmup_steps=100)
    config.optim.update(name="adamw", weight_decay=1e-4, schedule="cosine", min_lr_ratio=0.01,
                        clip_norm=10.0, decay_bias_and_norm=False)
    config.train = train(num_steps=5000, log_every=25, eval_every=500, checkpoint_every=500)
  else:  # smoke
    config.model = common.model_section(
        "faster_rcnn", num_classes=5, **common.narrow_resnet(4), fpn_channels=8,
        anchor_sizes=(8, 16, 32, 64, 128), rpn_pre_nms_top_n=(100, 50),
        rpn_post_nms_top_n=(50, 20), rpn_num_samples=64, representation_size=16,
        rcnn_num_samples=32, max_detections=20)
    config.data = common.data_config(
        common.shapes_data(image_size=64, num_train=16, num_val=8),
        common.rcnn_augment(((64, 64),), canvas=(64, 64)),
        batch_size=4, eval_batch_size=4, max_boxes=8)
    config.optim = optim(lr=0.01, milestones=(), warmup_steps=2)
    config.train = train(num_steps=4, log_every=1, eval_every=4, checkpoint_every=2)
    config.eval.num_draw = 4
  common.check_options(options, variant)
  return config
