"""Converts a torchvision checkpoint to a jdet ``.npz`` of params.

  python -m jdet.convert ssd300_vgg16 IN.pth OUT.npz   # the whole detector
  python -m jdet.convert vgg16 IN.pth OUT.npz          # ImageNet VGG16: conv1_1 .. conv5_3
  python -m jdet.convert resnet50 IN.pth OUT.npz       # ImageNet ResNet (also resnet18/34/101/152)
  python -m jdet.convert fasterrcnn_resnet50_fpn IN.pth OUT.npz --num_classes 80  # whole detector

``IN`` is a state dict (``.pth``/``.pt`` read with ``weights_only=True``,
``.safetensors`` or ``.npz``). ``OUT`` holds ``/``-joined jdet names
(``backbone/conv4_3/kernel``), for ``config.init.weights`` (ssd300_vgg16) or
``config.init.backbone`` (vgg16); loading it needs no torch. A ResNet's names
start with their collection (``params/backbone/conv1/kernel``,
``batch_stats/backbone/bn1/mean``): load it with
:func:`jdet.convert.load_backbone_variables`. A Faster R-CNN's names also start
with their collection; ``config.init.weights`` loads it (``--num_classes 80``
maps COCO's 91 outputs to jdet's 80 labels first).
"""

from __future__ import annotations

import argparse

import numpy as np

from jdet import convert

__all__ = ["main"]

_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m jdet.convert",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("architecture",
                      choices=("ssd300_vgg16", "vgg16", "fasterrcnn_resnet50_fpn") + _RESNETS)
  parser.add_argument("input", help="torchvision state dict: .pth, .pt, .safetensors or .npz")
  parser.add_argument("output", help="the jdet .npz to write")
  parser.add_argument("--num_classes", type=int, default=None,
                      help="fasterrcnn_resnet50_fpn: the jdet model's classes (80 for COCO)")
  args = parser.parse_args(argv)

  state_dict = convert.read_state_dict(args.input)
  if args.architecture == "ssd300_vgg16":
    params = convert.ssd300_vgg16_params(state_dict)
    note = (f"load into SSD(num_classes={convert.ssd300_vgg16_num_classes(state_dict)}, "
            "clamp_default_boxes=True, size_rule=(0.15, 0.9, 0.07)) with config.init.weights")
  elif args.architecture == "fasterrcnn_resnet50_fpn":
    from jdet.convert.faster_rcnn import fasterrcnn_num_classes, fasterrcnn_resnet50_fpn_params
    num_classes = args.num_classes or fasterrcnn_num_classes(state_dict)
    params = fasterrcnn_resnet50_fpn_params(state_dict, num_classes=num_classes)
    note = f"load into FasterRCNN(num_classes={num_classes}) with config.init.weights"
  elif args.architecture in _RESNETS:
    depth = int(args.architecture[len("resnet"):])
    variables = convert.resnet_params(state_dict, depth=depth)
    params = {name: {"backbone": tree} for name, tree in variables.items()}
    note = (f"params and batch_stats of ResNet(depth={depth}, norm='frozen_bn' or 'batch') as "
            "'backbone'; load with jdet.convert.load_backbone_variables")
  else:
    params = {"backbone": convert.vgg16_backbone_params(state_dict)}
    note = "load with config.init.backbone (fc6, fc7 and the extra layers stay as initialised)"
  convert.save_params_npz(args.output, params)
  flat = convert.flatten_params(params)
  count = sum(int(np.size(v)) for v in flat.values())
  print(f"wrote {args.output}: {len(flat)} arrays, {count:,} parameters; {note}")


if __name__ == "__main__":
  main()
