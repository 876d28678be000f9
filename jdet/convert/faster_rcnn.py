"""torchvision's ``fasterrcnn_resnet50_fpn`` state dict -> jdet ``FasterRCNN`` variables.

A pure function of a ``{name: np.ndarray}`` state dict (as
:func:`jdet.convert.read_state_dict` returns it); nothing here imports torch.

Name map (the backbone's part is :func:`jdet.convert.resnet.resnet_fpn_backbone_params`)::

  torchvision                                   jdet
  backbone.body.*                               params/backbone/..., batch_stats/backbone/...
  backbone.fpn.*                                params/neck/...
  rpn.head.conv.0.0.{weight,bias}               params/rpn_head/conv/{kernel,bias}
  rpn.head.cls_logits.{weight,bias}             params/rpn_head/cls_logits/...
  rpn.head.bbox_pred.{weight,bias}              params/rpn_head/bbox_pred/...
  roi_heads.box_head.fc6.{weight,bias}          params/roi_head/fc6/...     (rows permuted)
  roi_heads.box_head.fc7.{weight,bias}          params/roi_head/fc7/...
  roi_heads.box_predictor.cls_score.*           params/roi_head/cls_score/...
  roi_heads.box_predictor.bbox_pred.*           params/roi_head/bbox_pred/...

The names of checkpoints saved before torchvision 0.13 (the published COCO
weights among them) are accepted too: ``rpn.head.conv.{weight,bias}`` and
``backbone.fpn.{inner,layer}_blocks.{i}.{weight,bias}`` (torchvision renames them
on loading). Convolutions ``[O, I, kh, kw]`` become ``[kh, kw, I, O]`` kernels,
``Linear`` weights ``[out, in]`` become ``[in, out]`` kernels. ``fc6`` reads the
pooled RoI features, which torchvision flattens ``(c, h, w)`` and jdet
``(h, w, c)``: its rows are permuted accordingly.

Classes: torchvision's ``num_classes`` counts the background (index 0), jdet's
does not, so a 91-way torchvision head is ``FasterRCNN(num_classes=90)``.
torchvision's COCO models score the 91 COCO *category ids* (10 unused);
``num_classes=80`` keeps the background and the 80 used ids in the label order
of jdet's COCO source (:func:`jdet.class_names.coco91_columns`), in ``cls_score`` and in
``bbox_pred``'s per-class blocks.

The model these variables load into is ``FasterRCNN(num_classes=...)`` with
the defaults (R50, ``norm="frozen_bn"``), fed images normalised as torchvision
does (ImageNet mean and std, RGB in 0..1; jdet's data pipeline uses the same
numbers in 0..255 units).
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from jdet.class_names import coco91_columns
from jdet.convert.resnet import resnet_fpn_backbone_params
from jdet.convert.torchvision import Reader

__all__ = ["fasterrcnn_resnet50_fpn_params", "fasterrcnn_num_classes", "rename_legacy_keys"]

_PRED = "roi_heads.box_predictor"
_HEAD = "roi_heads.box_head"
_LEGACY = (
    (re.compile(r"^rpn\.head\.conv\.(weight|bias)$"), r"rpn.head.conv.0.0.\1"),
    (re.compile(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$"), r"\1.0.\2"),
)


def rename_legacy_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Names of torchvision < 0.13 checkpoints -> today's (``rpn.head.conv.weight`` ->
  ``rpn.head.conv.0.0.weight``, ``backbone.fpn.inner_blocks.0.weight`` ->
  ``backbone.fpn.inner_blocks.0.0.weight``); other names unchanged."""
  out = {}
  for key, value in state_dict.items():
    for pattern, new in _LEGACY:
      key = pattern.sub(new, key)
    out[key] = value
  return out


def fasterrcnn_num_classes(state_dict: Mapping[str, np.ndarray]) -> int:
  """jdet's ``num_classes`` (foreground only) of a torchvision Faster R-CNN state dict:
  90 for the COCO models (91 outputs counting the background)."""
  key = f"{_PRED}.cls_score.weight"
  if key not in state_dict:
    raise KeyError(f"{key!r} is missing: not a torchvision Faster R-CNN state dict "
                   f"(its keys begin {sorted(state_dict)[:4]})")
  return int(np.shape(state_dict[key])[0]) - 1


def _coco_columns(num_outputs: int) -> np.ndarray:
  """Background and the 80 used COCO category ids, in jdet's label order."""
  if num_outputs != 91:
    raise ValueError(f"num_classes=80 selects COCO's 80 categories from a 91-way head; "
                     f"this head has {num_outputs} outputs")
  return coco91_columns()


def fasterrcnn_resnet50_fpn_params(state_dict: Mapping[str, np.ndarray], *,
                                   num_classes: int | None = None,
                                   norm: str = "frozen_bn") -> dict:
  """A torchvision ``fasterrcnn_resnet50_fpn`` state dict -> jdet ``FasterRCNN`` variables.

  Args:
    state_dict: ``{torchvision name: array}`` (today's names or those of
      torchvision < 0.13).
    num_classes: the jdet model's foreground classes: ``None`` (or the
      checkpoint's own, :func:`fasterrcnn_num_classes`) converts the heads as
      they are; ``80`` from a 91-way (COCO) checkpoint keeps the background and
      the 80 COCO categories in jdet's label order. Anything else is an error.
    norm: the jdet backbone's ``norm`` (``"frozen_bn"``, as torchvision's
      ``FrozenBatchNorm2d``; see :mod:`jdet.convert.resnet`).
  Returns:
    ``{"params": {"backbone", "neck", "rpn_head", "roi_head"},
    "batch_stats": {"backbone"}}`` of NumPy arrays (no ``batch_stats`` for
    ``norm="group"``).
  Raises:
    KeyError: a torchvision name is missing; ValueError: names this conversion
    does not know, or a class count it cannot produce.
  """
  state_dict = rename_legacy_keys(state_dict)
  backbone = resnet_fpn_backbone_params(state_dict, "backbone.", norm=norm)
  r = Reader(state_dict, "fasterrcnn_resnet50_fpn")
  r.used.update(k for k in state_dict if k.startswith("backbone."))

  rpn_head = {"conv": r.conv("rpn.head.conv.0.0"),
              "cls_logits": r.conv("rpn.head.cls_logits"),
              "bbox_pred": r.conv("rpn.head.bbox_pred")}

  fc6 = r.linear(f"{_HEAD}.fc6")
  channels = backbone["fpn"]["layer_block0"]["kernel"].shape[-1]  # the FPN's width
  rows, out = fc6["kernel"].shape
  side = int(round(np.sqrt(rows / channels)))
  if side * side * channels != rows:
    raise ValueError(f"{_HEAD}.fc6 reads {rows} features, not S x S x {channels} pooled ones")
  # torchvision's rows are (c, h, w), jdet's (h, w, c).
  fc6["kernel"] = np.ascontiguousarray(
      fc6["kernel"].reshape(channels, side, side, out).transpose(1, 2, 0, 3).reshape(rows, out))
  cls_score = r.linear(f"{_PRED}.cls_score")
  bbox_pred = r.linear(f"{_PRED}.bbox_pred")
  outputs = cls_score["kernel"].shape[-1]
  if bbox_pred["kernel"].shape[-1] != 4 * outputs:
    raise ValueError(f"{_PRED}.bbox_pred has {bbox_pred['kernel'].shape[-1]} outputs, not 4 per "
                     f"class for {outputs} classes (a class-agnostic box head does not convert)")
  if num_classes is not None and num_classes != outputs - 1:
    if num_classes != 80:
      raise ValueError(f"the checkpoint has {outputs - 1} classes (plus background); it converts "
                       f"to num_classes={outputs - 1}, or to 80 from COCO's 91-way head, not "
                       f"{num_classes}")
    keep = _coco_columns(outputs)  # [81]
    box_cols = (keep[:, None] * 4 + np.arange(4)[None, :]).reshape(-1)  # [81 * 4]
    cls_score = {k: v[..., keep] for k, v in cls_score.items()}
    bbox_pred = {k: v[..., box_cols] for k, v in bbox_pred.items()}
  roi_head = {"fc6": fc6, "fc7": r.linear(f"{_HEAD}.fc7"),
              "cls_score": cls_score, "bbox_pred": bbox_pred}

  r.check_all_used()
  body = backbone["body"]
  variables = {"params": {"backbone": body["params"], "neck": backbone["fpn"],
                          "rpn_head": rpn_head, "roi_head": roi_head}}
  if "batch_stats" in body:
    variables["batch_stats"] = {"backbone": body["batch_stats"]}
  return variables
