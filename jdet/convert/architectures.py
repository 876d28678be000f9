"""The table of checkpoint layouts that jdet converts: how to recognise each, how to convert it.

Every loader (:func:`jdet.convert.load_model_variables`,
:func:`jdet.convert.load_backbone_variables`) and the command line
(``python -m jdet.convert NAME IN OUT``) go through :data:`ARCHITECTURES` and
nothing else, so a new detector's checkpoints become loadable, and
convertible from the command line, with one more entry::

  Architecture(
      name="sparse_rcnn_r50_fpn_mmdet",                        # python -m jdet.convert NAME ...
      recognise=lambda sd: "init_proposal_bboxes.weight" in sd,  # the file's telltale names
      convert=sparse_rcnn_variables,                           # (state_dict, num_classes) -> variables
      checkpoint_classes=sparse_rcnn_num_classes,              # state_dict -> int (optional)
      model_classes=lambda v: ...,                             # a model's variables -> int | None
      usage="load into SparseRCNN(num_classes={num_classes}) with config.init.weights")

Entries are tried in order and the first whose ``recognise`` says yes
converts the file, so an entry whose names contain another's (Faster R-CNN's
``backbone.body.*`` holds a ResNet) comes before it. A file of jdet's own
``/``-joined names (:func:`jdet.convert.save_params_npz`) needs no entry.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import numpy as np

from jdet.convert.faster_rcnn import fasterrcnn_num_classes, fasterrcnn_resnet50_fpn_params
from jdet.convert.files import SEP, is_jdet_state_dict, unflatten_params
from jdet.convert.mmdet_sparse_rcnn import (is_mmdet_sparse_rcnn_state_dict,
                                            sparse_rcnn_num_classes, sparse_rcnn_variables)
from jdet.convert.resnet import is_resnet_state_dict, resnet_depth, resnet_params
from jdet.convert.torchvision import (coco91_to_coco80, ssd300_vgg16_num_classes,
                                      ssd300_vgg16_params, vgg16_backbone_params)

__all__ = ["Architecture", "ARCHITECTURES", "architecture", "find_architecture",
           "convert_variables", "COLLECTIONS"]

StateDict = Mapping[str, np.ndarray]
# The collections a converted checkpoint fills.
COLLECTIONS = ("params", "batch_stats")


@dataclasses.dataclass(frozen=True)
class Architecture:
  """One checkpoint layout that jdet converts.

  Attributes:
    name: the layout's name on the command line (``python -m jdet.convert NAME IN OUT``).
    recognise: ``state_dict -> bool``: whether a flat state dict has this layout.
    convert: ``(state_dict, num_classes) -> variables``: the jdet model's
      ``{"params": ..., ["batch_stats": ...]}`` of NumPy arrays. ``num_classes``
      is the jdet model's foreground class count, ``None`` for the
      checkpoint's own (a converter that cannot produce the count asked for
      raises, or returns its own and lets loading report the shapes).
    checkpoint_classes: ``state_dict -> int``: the checkpoint's own class
      count in jdet's terms (no background); ``None`` for backbones.
    model_classes: ``variables -> int | None``: the class count of the jdet
      model a file is loaded into, read from the model's variables (``None``
      where the model has no such head); ``None`` for backbones.
    usage: what the converted file loads into, printed by the command line;
      ``{num_classes}`` is filled in.
  """

  name: str
  recognise: Callable[[StateDict], bool]
  convert: Callable[[StateDict, Optional[int]], dict]
  checkpoint_classes: Optional[Callable[[StateDict], int]] = None
  model_classes: Optional[Callable[[Mapping], Optional[int]]] = None
  usage: str = ""


# ----------------------------------------------------------------------------
# The entries' pieces.
# ----------------------------------------------------------------------------


def _keys_start(*prefixes: str) -> Callable[[StateDict], bool]:
  """``recognise``: some name starts with each of ``prefixes``."""
  return lambda sd: all(any(k.startswith(p) for k in sd) for p in prefixes)


def _leaf_shape(tree: Mapping, *path: str) -> Optional[tuple[int, ...]]:
  for p in path:
    if not isinstance(tree, Mapping) or p not in tree:
      return None
    tree = tree[p]
  return tuple(tree.shape)


def _ssd_variables(state_dict: StateDict, num_classes: Optional[int]) -> dict:
  params = ssd300_vgg16_params(state_dict)
  if num_classes == 80 and ssd300_vgg16_num_classes(state_dict) == 90:
    params = coco91_to_coco80(params)  # torchvision's COCO category ids -> jdet's 80 labels
  return {"params": params}


def _ssd_model_classes(variables: Mapping) -> Optional[int]:
  """``SSD.num_classes`` from its first level's class and box convolutions."""
  cls = _leaf_shape(variables.get("params", {}), "head", "cls_0", "kernel")
  box = _leaf_shape(variables.get("params", {}), "head", "box_0", "kernel")
  if cls is None or box is None or box[-1] % 4:
    return None
  return cls[-1] // (box[-1] // 4) - 1


def _fasterrcnn_model_classes(variables: Mapping) -> Optional[int]:
  """``FasterRCNN.num_classes`` from its class scores (which count the background)."""
  cls = _leaf_shape(variables.get("params", {}), "roi_head", "cls_score", "kernel")
  return None if cls is None else cls[-1] - 1


def _sparse_rcnn_model_classes(variables: Mapping) -> Optional[int]:
  """``SparseRCNN.num_classes`` from its first stage's class logits (sigmoid: no background)."""
  cls = _leaf_shape(variables.get("params", {}), "stage0", "cls_logits", "kernel")
  return None if cls is None else cls[-1]


def _vgg16_variables(state_dict: StateDict, num_classes: Optional[int]) -> dict:
  return {"params": {"backbone": vgg16_backbone_params(state_dict)}}


def _resnet_depth_or_none(state_dict: StateDict) -> Optional[int]:
  try:
    return resnet_depth(state_dict)
  except ValueError:
    return None


def _resnet(depth: int) -> Architecture:
  """An ImageNet ``torchvision.models.resnet{depth}``, as ``backbone`` in every collection."""

  def convert(state_dict: StateDict, num_classes: Optional[int]) -> dict:
    norm = "frozen_bn" if "bn1.running_mean" in state_dict else "group"  # GroupNorm: no stats
    variables = resnet_params(state_dict, depth=depth, norm=norm)
    return {collection: {"backbone": tree} for collection, tree in variables.items()}

  return Architecture(
      name=f"resnet{depth}",
      recognise=lambda sd: is_resnet_state_dict(sd) and _resnet_depth_or_none(sd) == depth,
      convert=convert,
      usage=(f"params and batch_stats of ResNet(depth={depth}, norm='frozen_bn' or 'batch') as "
             "'backbone'; load with config.init.backbone (jdet.convert.load_backbone_variables)"))


# ----------------------------------------------------------------------------
# The table.
# ----------------------------------------------------------------------------

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        name="fasterrcnn_resnet50_fpn",
        recognise=_keys_start("rpn.head.", "roi_heads."),
        convert=lambda sd, n: fasterrcnn_resnet50_fpn_params(sd, num_classes=n),
        checkpoint_classes=fasterrcnn_num_classes,
        model_classes=_fasterrcnn_model_classes,
        usage="load into FasterRCNN(num_classes={num_classes}) with config.init.weights"),
    Architecture(
        name="sparse_rcnn_r50_fpn_mmdet",  # MMDetection 3.x SparseRCNN (any depth, N, stages)
        recognise=is_mmdet_sparse_rcnn_state_dict,
        convert=sparse_rcnn_variables,
        checkpoint_classes=sparse_rcnn_num_classes,
        model_classes=_sparse_rcnn_model_classes,
        usage=("load into SparseRCNN(num_classes={num_classes}) with config.init.weights "
               "(configs/sparse_rcnn.py; another class count or number of proposals "
               "re-initialises those layers)")),
    Architecture(
        name="ssd300_vgg16",  # and SSD512: any number of extra and head levels
        recognise=_keys_start("backbone.extra."),
        convert=_ssd_variables,
        checkpoint_classes=ssd300_vgg16_num_classes,
        model_classes=_ssd_model_classes,
        usage=("load into SSD(num_classes={num_classes}, clamp_default_boxes=True, "
               "size_rule=(0.15, 0.9, 0.07)) with config.init.weights")),
    Architecture(
        name="vgg16",
        recognise=_keys_start("features."),
        convert=_vgg16_variables,
        usage="load with config.init.backbone (fc6, fc7 and the extra layers stay as initialised)"),
    *(_resnet(depth) for depth in (18, 34, 50, 101, 152)),
)


def architecture(name: str) -> Architecture:
  """The entry of :data:`ARCHITECTURES` called ``name``."""
  for arch in ARCHITECTURES:
    if arch.name == name:
      return arch
  raise ValueError(f"unknown architecture {name!r}; jdet converts "
                   f"{[a.name for a in ARCHITECTURES]}")


def find_architecture(state_dict: StateDict) -> Architecture:
  """The first entry of :data:`ARCHITECTURES` that recognises ``state_dict``.

  Raises:
    ValueError: no entry recognises it (the message lists the first names).
  """
  for arch in ARCHITECTURES:
    if arch.recognise(state_dict):
      return arch
  raise ValueError(f"unknown state dict layout (keys begin {sorted(state_dict)[:5]}): expected "
                   f"one of {[a.name for a in ARCHITECTURES]} or a jdet .npz")


def _jdet_variables(state_dict: StateDict) -> dict:
  """A jdet ``.npz``: names that start with a collection are variables, others params."""
  if all(k.split(SEP, 1)[0] in COLLECTIONS for k in state_dict):
    return unflatten_params(state_dict)
  return {"params": unflatten_params(state_dict)}


def convert_variables(state_dict: StateDict, *, num_classes: Optional[int] = None) -> dict[str, Any]:
  """A flat state dict of any known layout -> jdet variables ``{"params", ["batch_stats"]}``.

  A jdet ``.npz`` (``/``-joined names) is unflattened as it is; any other
  layout is converted by the entry of :data:`ARCHITECTURES` that recognises it,
  with ``num_classes`` (the jdet model's, ``None`` for the checkpoint's own).
  """
  if is_jdet_state_dict(state_dict):
    return _jdet_variables(state_dict)
  return find_architecture(state_dict).convert(state_dict, num_classes)
