"""Converts a checkpoint to a jdet ``.npz``, once, where torch is installed.

  python -m jdet.convert ssd300_vgg16 IN.pth OUT.npz   # the whole detector
  python -m jdet.convert vgg16 IN.pth OUT.npz          # ImageNet VGG16: conv1_1 .. conv5_3
  python -m jdet.convert resnet50 IN.pth OUT.npz       # ImageNet ResNet (also resnet18/34/101/152)
  python -m jdet.convert fasterrcnn_resnet50_fpn IN.pth OUT.npz --num_classes 80  # whole detector

The names are those of :data:`jdet.convert.ARCHITECTURES`. ``IN`` is a state
dict (``.pth``/``.pt`` read with ``weights_only=True``, ``.safetensors`` or
``.npz``). ``OUT`` holds ``/``-joined jdet names, for ``config.init.weights``
(a whole detector) or ``config.init.backbone``; loading it needs no torch.
Variables with BatchNorm numbers keep their collection in the name
(``params/backbone/conv1/kernel``, ``batch_stats/backbone/bn1/mean``); params
alone are written without it (``backbone/conv4_3/kernel``). ``--num_classes 80``
maps COCO's 91 torchvision outputs to jdet's 80 labels.
"""

from __future__ import annotations

import argparse

import numpy as np

from jdet import convert

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m jdet.convert",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("architecture", choices=[a.name for a in convert.ARCHITECTURES])
  parser.add_argument("input", help="the checkpoint: .pth, .pt, .safetensors or .npz")
  parser.add_argument("output", help="the jdet .npz to write")
  parser.add_argument("--num_classes", type=int, default=None,
                      help="the jdet model's classes (80 for COCO); default: the checkpoint's")
  args = parser.parse_args(argv)

  arch = convert.architecture(args.architecture)
  state_dict = convert.read_state_dict(args.input)
  variables = arch.convert(state_dict, args.num_classes)
  num_classes = args.num_classes
  if num_classes is None and arch.checkpoint_classes is not None:
    num_classes = arch.checkpoint_classes(state_dict)
  tree = variables["params"] if set(variables) == {"params"} else variables
  convert.save_params_npz(args.output, tree)
  flat = convert.flatten_params(tree)
  count = sum(int(np.size(v)) for v in flat.values())
  print(f"wrote {args.output}: {len(flat)} arrays, {count:,} parameters; "
        f"{arch.usage.format(num_classes=num_classes)}")


if __name__ == "__main__":
  main()
