"""SSD300 with VGG16 (Liu et al., ECCV 2016).

Variants (the part after ``:``; options follow a comma, e.g. ``voc,root=data/VOCdevkit``):

* (none) or ``coco``: the paper's COCO setting: trainval35k ≈ train2017,
  batch 32, SGD lr 1e-3 (momentum 0.9, weight decay 5e-4) with warm-up,
  steps at 160k and 200k of 240k iterations; 80 classes, COCO default box
  sizes. ``root=`` is the COCO folder (default ``data/coco``). Published: 25.1
  AP on COCO val (the 23.2 of the paper's first version rose with the zoom-out
  augmentation; torchvision's ``ssd300_vgg16`` reports 25.1). Initialise the
  backbone from ImageNet weights with ``--config.init.backbone=vgg16.pth``
  (a torchvision VGG16 state dict; see ``jdet/convert``).

    python train.py --config configs/ssd300.py:coco,root=data/coco --workdir runs/ssd300_coco

  Evaluating torchvision's COCO weights (``ssd300_vgg16_coco-b556d3b4.pth``)
  needs its default box clamping:

    python eval.py --config configs/ssd300.py:coco,root=data/coco --workdir runs/tv \
        --config.init.weights=ssd300_vgg16_coco-b556d3b4.pth \
        --config.model.clamp_default_boxes=True

* ``voc``: VOC07+12 trainval, tested on VOC07 test (mAP by the VOC07 11-point
  metric and COCO AP); batch 32, lr 1e-3, steps at 80k and 100k of 120k; 20
  classes, VOC default box sizes. ``root=`` is the ``VOCdevkit`` folder.
  Published: 77.2 mAP (VOC07 test).

* ``shapes``: the CPU quick start: a narrow VGG16 with BatchNorm on 128x128
  generated shapes (5 classes, objects of 10 .. 110 pixels keeping at least
  three quarters of their pixels visible), trained from scratch, with conv3_3
  as a sixth, stride-4 source (``SHAPES_SOURCES``). On a 2-core CPU:

    python train.py --config configs/ssd300.py:shapes --workdir runs/ssd_shapes
    python eval.py  --config configs/ssd300.py:shapes --workdir runs/ssd_shapes

  reaches AP50 0.92 (AP 0.63) on the shapes validation split after 1500 steps
  (15 minutes of training) and AP 0.72 / AP50 0.97 / AP75 0.87 after its 2500
  steps (25 minutes at about 27 images/s); AP 0.73 / AP75 0.89 with
  ``eval.py --tta``. Option ``min_visible=0.5`` trains and evaluates on the
  harder split with objects down to half visible.

* ``custom``: your own data, VOC or COCO layout, with this config's recipe
  (``recipe=coco``, the default, or ``shapes`` / ``smoke``) and the class count
  read from the data (``configs/common.py: custom_config``; docs/custom_data.md):

    python train.py --config configs/ssd300.py:custom,format=voc,root=DIR --workdir runs/mine

* ``smoke``: a tiny network, a few steps on a few generated images; seconds
  (used by the tests).
"""

from __future__ import annotations

import ml_collections

from configs import common
from jdet.evaluation import tta


# Pixel normalisation of the Caffe VGG16 weights that SSD starts from (RGB mean
# in 0..255 units, no scaling): torchvision's ssd300_vgg16 uses the same, so its
# converted weights evaluate unchanged.
VGG_MEAN, VGG_STD = (123.0, 117.0, 104.0), (1.0, 1.0, 1.0)

# eval.py --tta on the 128-pixel shapes (objects of 10 .. 110 pixels): a shrunk
# pass for the large objects, the base pass for all, an enlarged pass for the
# small ones (size ranges on sqrt(box area) in original pixels), each with its
# mirror image, merged by box voting. Chosen on the shapes validation split
# with RefineDet320:shapes (see docs/results.md); the paper's six scales with these
# objects help less (more passes, more false positives).
def shapes_tta(config: ml_collections.ConfigDict) -> None:
  config.tta.update(scales=(0.6, 1.0, 1.4), size_ranges=((48, None), (0, None), (0, 32)),
                    merge="vote")


# The shapes quick start's default boxes: objects of 10 .. 110 pixels in a 128-pixel
# image are small for strides 8 .. 128 (SSD300's smallest boxes, 30 pixels, sit on a
# grid of 8), so conv3_3 (stride 4) is the first of six sources, as in S3FD, with
# box sizes 10, 19, 42, 65, 88 and 111 pixels. Every object of the validation split
# then overlaps 5.4 default boxes by IoU >= 0.5 on average, and all but 0.1 % at
# least one; with the five sources of conv4_3 .. 1x1 it was 2.2 boxes, and 13 % (29 %
# of those under 16 pixels) only had the forced best match.
SHAPES_SOURCES = dict(conv3_3_l2norm_scale=10.0, size_rule=(0.15, 0.9, 0.08),
                      aspect_ratios=((2,), (2,), (2, 3), (2, 3), (2,), (2,)))


# The default box sizes' rule (s_min, s_max, first level) of SSD300 on each dataset.
SIZE_RULES = {"coco": (0.15, 0.9, 0.07), "voc": (0.2, 0.9, 0.1)}


def model(num_classes: int, *, dataset: str = "coco") -> ml_collections.ConfigDict:
  """The SSD300 model section (the module's defaults) with ``dataset``'s default box sizes
  ("coco" or "voc")."""
  return common.model_section("ssd", num_classes=num_classes, size_rule=SIZE_RULES[dataset])


def optim(*, lr: float, milestones, warmup_steps: int = 500) -> ml_collections.ConfigDict:
  """SGD with momentum 0.9 and weight decay 5e-4, linear warm-up, steps of 0.1."""
  return common.optim_section(name="sgd", lr=lr, weight_decay=5e-4, milestones=milestones,
                              warmup_steps=warmup_steps)


# The ``train`` section (steps, logging, evaluation and checkpoint intervals).
train = common.train


def paper_recipe(config: ml_collections.ConfigDict, model: ml_collections.ConfigDict,
                 source: ml_collections.ConfigDict, *, milestones, num_steps: int) -> None:
  """The papers' COCO and VOC training of SSD and RefineDet: ``model`` on ``source``
  with the SSD augmentation at the model's input size, batch 32, SGD at 1e-3 with
  steps of 0.1 at ``milestones``; VOC sources add the VOC07 mAP to the evaluation."""
  size = model.image_size
  config.model = model
  config.data = common.data_config(source, common.ssd_augment(size, mean=VGG_MEAN, std=VGG_STD),
                                   batch_size=32, eval_batch_size=32, num_workers=8)
  config.optim = optim(lr=1e-3, milestones=milestones)
  config.train = train(num_steps=num_steps)
  if source.train.kind == "voc":
    config.eval.metrics = ("coco", "voc")


def small_recipe(config: ml_collections.ConfigDict, num_images: int) -> None:
  """``custom,...,recipe=small``: the ``shapes`` model at 192x192 with larger default
  boxes, flips, batch 8, 40 epochs (evaluated every 10): what the raccoon photos measured
  (docs/raccoon.md: 160 photos, 800 steps, AP50 0.82 in 11 minutes on 2 cores)."""
  config.model.image_size = 192
  config.data.transforms.size = 192
  config.model.size_rule = (0.3, 0.95, 0.15)
  common.small_schedule(config, num_images, epochs=40, eval_epochs=10, warmup_epochs=5)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config, variant, options = common.start_config(
      "ssd", arg, ("coco", "voc", "shapes", "smoke", "custom"), get_config, small=small_recipe)
  if variant == "custom":
    return config
  # What eval.py --tta runs (RefineDet's multi-scale and flip recipe; see jdet.evaluation.tta).
  config.tta = tta.default_settings()

  if variant == "coco":
    paper_recipe(config, model(80, dataset="coco"),
                 common.coco_data(options.get("root", "data/coco")),
                 milestones=(160_000, 200_000), num_steps=240_000)
  elif variant == "voc":
    paper_recipe(config, model(20, dataset="voc"),
                 common.voc_data(options.get("root", "data/VOCdevkit")),
                 milestones=(80_000, 100_000), num_steps=120_000)
  elif variant == "shapes":
    # Trained from scratch, so: BatchNorm in the backbone, AdamW, and fc6 without
    # dilation (its map is 8x8 here). The generator never runs out of images,
    # so the SSD augmentation (zoom out, crops, colour) is replaced by flips.
    # A narrow VGG16 (maps 32 with conv3_3, then 16, 8, 4, 2, 1); the default boxes
    # follow the maps (no fixed strides).
    config.model = common.model_section(
        "ssd", num_classes=5, image_size=128, **common.narrow_vgg(16),
        extras=((64, 128, 3, 2, 1), (64, 128, 3, 2, 1), (64, 128, 2, 1, 0)), strides=None,
        fc6_dilation=1, **SHAPES_SOURCES)
    config.data = common.data_config(
        common.shapes_quickstart_data(options),
        common.ssd_augment(128, expand_ratio=1.0, photometric=False, crop=False),
        batch_size=16, eval_batch_size=32, max_boxes=16, num_workers=1)
    shapes_tta(config)
    config.optim = optim(lr=2e-3, milestones=(), warmup_steps=100)
    config.optim.update(name="adamw", weight_decay=1e-4, schedule="cosine", min_lr_ratio=0.01,
                        clip_norm=10.0)
    config.train = train(num_steps=2500, log_every=25, eval_every=500, checkpoint_every=500)
  else:  # smoke
    config.model = common.model_section(
        "ssd", num_classes=5, image_size=64, **common.narrow_vgg(4),
        extras=((16, 32, 3, 2, 1), (16, 32, 2, 1, 0)),  # maps 8, 4, 2, 1
        aspect_ratios=((2,), (2, 3), (2,), (2,)), strides=None, size_rule=(0.2, 0.9, 0.1),
        max_detections=20)
    config.data = common.data_config(
        common.shapes_data(image_size=64, num_train=16, num_val=8),
        common.ssd_augment(64), batch_size=4, eval_batch_size=4, max_boxes=8)
    config.optim = optim(lr=0.01, milestones=(), warmup_steps=2)
    config.train = train(num_steps=4, log_every=1, eval_every=4, checkpoint_every=2)
    config.eval.num_draw = 4
  common.check_options(options, variant)
  return config
