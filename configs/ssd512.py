"""SSD512 with VGG16 (Liu et al., ECCV 2016): SSD300 at 512x512 with a seventh level.

Same variants and options as ``configs/ssd300.py``; what differs is the input
(512x512), the extra layers (conv8_2 .. conv12_2, the last a 4x4 conv), seven
levels of default boxes (maps 64, 32, 16, 8, 4, 2, 1 with steps 8 .. 512:
24564 boxes) and their sizes (COCO: 20.48 .. 460.8 px; VOC: 35.84 .. 460.8 px).

* (none) or ``coco``: batch 32, lr 1e-3, steps at 160k and 200k of 240k.
  Published: 28.8 AP on COCO test-dev (paper, with zoom-out augmentation).

    python train.py --config configs/ssd512.py:coco,root=data/coco --workdir runs/ssd512_coco

* ``voc``: VOC07+12, batch 32, lr 1e-3, steps at 80k and 100k of 120k.
  Published: 79.8 mAP on VOC07 test.
* ``shapes`` and ``smoke``: as in ``configs/ssd300.py`` (small inputs, so the
  seventh level is not used there).
* ``custom``: your own data with SSD512's recipe (see ``configs/ssd300.py``).
"""

from __future__ import annotations

from configs import common, ssd300
from jdet.models.backbones.vgg import SSD512_EXTRAS
from jdet.models.ssd import SSD512_ASPECT_RATIOS

SIZE_RULES_512 = {"coco": (0.1, 0.9, 0.04), "voc": (0.15, 0.9, 0.07)}


def get_config(arg: str | None = None):
  variant, options = common.parse_variant(arg, ("coco", "voc", "shapes", "smoke", "custom"),
                                          default="coco")
  if variant == "custom":  # your own data (configs/common.py: custom_config)
    return common.custom_config(get_config, options, small=ssd300.small_recipe)
  config = ssd300.get_config(arg)
  if variant in ("coco", "voc"):
    config.model.image_size = 512
    config.model.extras = SSD512_EXTRAS
    config.model.aspect_ratios = SSD512_ASPECT_RATIOS
    config.model.strides = (8, 16, 32, 64, 128, 256, 512)
    config.model.size_rule = SIZE_RULES_512[variant]
    config.data.transforms.size = 512
  return config
