"""RefineDet512 with VGG16 (Zhang et al., CVPR 2018): RefineDet320 at 512x512.

Same variants and options as ``configs/refinedet320.py``; only the input of
``coco`` and ``voc`` differs: 512x512, so the four levels are 64, 32, 16 and 8
pixels wide (strides 8 .. 64, as the released ``VGG16_COCO_512.py``) and there
are 16320 anchors, with the same sizes as RefineDet320 (32, 64, 128, 256
pixels). Published: 33.0 AP on COCO test-dev, 81.8 mAP on VOC07 test.

    python train.py --config configs/refinedet512.py:coco,root=data/coco --workdir runs/rd512_coco
    python eval.py  --config configs/refinedet512.py:coco,root=data/coco --workdir runs/rd512_coco
    python train.py --config configs/refinedet512.py:voc,root=data/VOCdevkit --workdir runs/rd512v
    python eval.py  --config configs/refinedet512.py:voc,root=data/VOCdevkit --workdir runs/rd512v

``shapes`` and ``smoke`` are those of ``configs/refinedet320.py`` (small inputs);
``custom`` (your own data) takes RefineDet512's recipe by default.
"""

from __future__ import annotations

from configs import refinedet320


def get_config(arg: str | None = None):
  return refinedet320.get_config(arg, size=512)
