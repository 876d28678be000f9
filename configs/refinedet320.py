"""RefineDet320 with VGG16 (Zhang et al., CVPR 2018).

Variants (the part after ``:``; options follow a comma, e.g. ``voc,root=data/VOCdevkit``):

* (none) or ``coco``: the paper's COCO setting (the released
  ``examples/refinedet/VGG16_COCO_320.py``): trainval35k ≈ train2017, batch
  32, SGD lr 1e-3 (momentum 0.9, weight decay 5e-4; a 500-step warm-up as in
  ``configs/ssd300.py``), divided by 10 at 280k and 360k of 400k iterations;
  80 classes; anchors 32, 64, 128, 256 pixels at strides 8 .. 64. ``root=``
  is the COCO folder (default ``data/coco``).
  Published: 29.4 AP on COCO test-dev. Initialise the backbone from ImageNet
  weights with ``--config.init.backbone=vgg16.pth`` (conv1_1 .. conv5_3; fc6,
  fc7 and the new layers start at random, while the paper starts fc6/fc7 from
  the subsampled "reduced" VGG16 fully connected layers).

    python train.py --config configs/refinedet320.py:coco,root=data/coco --workdir runs/rd320_coco
    python eval.py  --config configs/refinedet320.py:coco,root=data/coco --workdir runs/rd320_coco

* ``voc``: VOC07+12 trainval, tested on VOC07 test (VOC07 11-point mAP and
  COCO AP); batch 32, lr 1e-3 divided by 10 at 80k and 100k of 120k
  iterations; 20 classes; up to 500 detections per image, as the Caffe test
  net keeps. ``root=`` is the ``VOCdevkit`` folder.
  Published: 80.0 mAP (VOC07 test).

    python train.py --config configs/refinedet320.py:voc,root=data/VOCdevkit --workdir runs/rd320v
    python eval.py  --config configs/refinedet320.py:voc,root=data/VOCdevkit --workdir runs/rd320v

* ``shapes``: the CPU quick start, with exactly the budget of
  ``configs/ssd300.py:shapes`` so that the two compare: the same generated
  data (128x128, 5 classes), the same narrow width-16 VGG16 with BatchNorm
  (fc6 undilated), AdamW 2e-3 with cosine decay, 100 warm-up steps, clipping
  at 10, batch 16, 2500 steps, evaluation every 500; TCB of width 64 (with
  BatchNorm). conv3_3 is a fifth, stride-4 source (S3FD's small-object layer,
  as in ``ssd300.py:shapes``) and anchors are 3 x stride (12 .. 192 pixels
  on maps 32, 16, 8, 4, 2): the paper's 4 x stride from stride 8 is for
  320-pixel inputs, and at 128 pixels half of the shapes are smaller than 32
  pixels.

    python train.py --config configs/refinedet320.py:shapes --workdir runs/refinedet_shapes
    python eval.py  --config configs/refinedet320.py:shapes --workdir runs/refinedet_shapes

  Passes AP50 0.90 after 1500 steps (0.915, about 20 minutes of training)
  and reaches AP 0.727 / AP50 0.957 / AP75 0.883 after its 2500 steps (32
  minutes at 20.6 images/s on 2 cores; SSD300 on the same budget: 0.719 /
  0.966 / 0.869), AP 0.776 / AP50 0.967 / AP75 0.910 with ``eval.py --tta``.

* ``custom``: your own data, VOC or COCO layout, with this config's recipe
  (``recipe=coco``, the default, or ``shapes`` / ``smoke``) and the class count
  read from the data (``configs/common.py: custom_config``; docs/custom_data.md):

    python train.py --config configs/refinedet320.py:custom,format=voc,root=DIR --workdir runs/mine

* ``smoke``: a tiny network, a few steps on a few generated 64x64 images;
  seconds (used by the tests).

    python train.py --config configs/refinedet320.py:smoke --workdir /tmp/refinedet_smoke
"""

from __future__ import annotations

import ml_collections

from configs import common, ssd300
from jdet.evaluation import tta

# One anchor size per level (4 x stride) at strides 8, 16, 32, 64, for 320 and 512 inputs.
ANCHOR_SIZES = (32, 64, 128, 256)


def model(num_classes: int, *, size: int = 320) -> ml_collections.ConfigDict:
  """The RefineDet model section (the module's defaults: the Caffe model's settings) for
  a ``size`` input."""
  return common.model_section("refinedet", num_classes=num_classes, image_size=size,
                              anchor_sizes=ANCHOR_SIZES)


def _narrow(width: int) -> dict:
  """A narrow VGG16 (the proportions of ssd300.py's, one extra level) and TCB."""
  w = width
  return dict(**common.narrow_vgg(w), extras=((4 * w, 8 * w, 3, 2, 1),), tcb_width=4 * w)


def get_config(arg: str | None = None, *, size: int = 320) -> ml_collections.ConfigDict:
  """The config of ``arg``; ``size`` is the input of the ``coco`` and ``voc`` variants."""
  config, variant, options = common.start_config(
      "refinedet", arg, ("coco", "voc", "shapes", "smoke", "custom"),
      lambda a: get_config(a, size=size))
  if variant == "custom":
    return config
  # What eval.py --tta runs: the paper's multi-scale and flip testing (jdet.evaluation.tta).
  config.tta = tta.default_settings()

  if variant == "coco":
    ssd300.paper_recipe(config, model(80, size=size),
                        common.coco_data(options.get("root", "data/coco")),
                        milestones=(280_000, 360_000), num_steps=400_000)
  elif variant == "voc":
    voc_model = model(20, size=size)
    voc_model.max_detections = 500  # the Caffe test net's keep_top_k (COCO AP counts 100)
    ssd300.paper_recipe(config, voc_model, common.voc_data(options.get("root", "data/VOCdevkit")),
                        milestones=(80_000, 100_000), num_steps=120_000)
  elif variant == "shapes":
    # ssd300.py:shapes's data, TTA, optimiser and schedule, taken from it unchanged.
    config.model = common.model_section(
        "refinedet", num_classes=5, image_size=128, **_narrow(16), fc6_dilation=1,
        # conv3_3 (stride 4) is a source too, as in ssd300.py:shapes (SHAPES_SOURCES), with
        # anchors of 3x the stride: 12, 24, 48, 96 and 192 pixels. Every object of the
        # validation split then overlaps 3.9 anchors by IoU >= 0.5 on average, all but 0.9 %
        # at least one (strides 8 .. 64 with anchors of 2x the stride: 1.4, and 30 % none).
        conv3_3_l2norm_scale=10.0, strides=(4, 8, 16, 32, 64), anchor_scale=3.0)
    ssd = ssd300.get_config(arg)  # "shapes" with the same options (which it checks)
    config.data, config.tta, config.optim, config.train = ssd.data, ssd.tta, ssd.optim, ssd.train
    return config
  else:  # smoke: maps 8, 4, 2, 1
    config.model = common.model_section(
        "refinedet", num_classes=5, image_size=64, **_narrow(4), fc6_dilation=1,
        pre_nms_top_k=100, max_detections=20)
    config.data = common.data_config(
        common.shapes_data(image_size=64, num_train=16, num_val=8),
        common.ssd_augment(64), batch_size=4, eval_batch_size=4, max_boxes=8)
    config.optim = ssd300.optim(lr=0.01, milestones=(), warmup_steps=2)
    config.train = ssd300.train(num_steps=4, log_every=1, eval_every=4, checkpoint_every=2)
    config.eval.num_draw = 4
  common.check_options(options, variant)
  return config
