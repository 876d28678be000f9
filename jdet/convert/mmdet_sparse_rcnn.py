"""MMDetection Sparse R-CNN state dicts -> jdet ``SparseRCNN`` variables.

A pure function of a state dict (NumPy arrays or torch tensors; nothing here
imports torch): an MMDetection 3.x ``SparseRCNN`` with a ResNet-FPN backbone and
``DIIHead`` stages, e.g. the model zoo's
``sparse-rcnn_r50_fpn_300-proposals_crop-ms-480-800-3x_coco`` ``.pth`` (its
weights are under ``"state_dict"``; read it with ``torch.load(path,
weights_only=True)``), or ``model.state_dict()`` of one built in the tests.

Name map (S stages, N proposals, C classes, d = 256 channels)::

  MMDetection                                                  jdet
  backbone.*  (torchvision's ResNet names)                     params/backbone/..., batch_stats/backbone/...
  neck.lateral_convs.{i}.conv.{weight,bias}                    params/neck/inner_block{i}/{kernel,bias}
  neck.fpn_convs.{i}.conv.{weight,bias}                        params/neck/layer_block{i}/{kernel,bias}
  rpn_head.init_proposal_bboxes.weight       [N, 4]            params/proposal_boxes   (cx, cy, w, h) / image
  rpn_head.init_proposal_features.weight     [N, d]            params/proposal_features
  roi_head.bbox_head.{s}.                                      params/stage{s}/
    attention.attn.in_proj_{weight,bias}     [3d, d]           attention/in_proj/{kernel [d, 3d], bias}
    attention.attn.out_proj.*                                  attention/out_proj/*
    attention_norm.*                                           attention_norm/{scale,bias}
    instance_interactive_conv.dynamic_layer.*  [2 d 64, d]     dynamic_conv/dynamic_layer/*
    instance_interactive_conv.norm_in / norm_out               dynamic_conv/norm_in, norm_out
    instance_interactive_conv.fc_layer.*     [d, 49 d]         dynamic_conv/fc_layer/*  (rows as they are)
    instance_interactive_conv.fc_norm                          dynamic_conv/fc_norm
    instance_interactive_conv_norm                             dynamic_conv_norm
    ffn.layers.0.0.*, ffn.layers.1.*                           ffn/fc1/*, ffn/fc2/*
    ffn_norm                                                   ffn_norm
    cls_fcs.{3i}.weight, cls_fcs.{3i+1}.*                      cls_fc{i}/kernel, cls_norm{i}/*
    reg_fcs.{3i}.weight, reg_fcs.{3i+1}.*                      reg_fc{i}/kernel, reg_norm{i}/*
    fc_cls.*                                 [C, d]            cls_logits/*
    fc_reg.*                                 [4, d]            box_deltas/*

``Linear`` weights ``[out, in]`` become Dense kernels ``[in, out]``; LayerNorm
``weight`` becomes ``scale``; convolutions ``[O, I, kh, kw]`` become ``[kh, kw, I, O]``.
The attention's ``in_proj`` keeps torch's row order (queries, keys, values), so its
kernel's columns are ``[q | k | v]``, each head-major. ``fc_layer`` reads the
dynamic convolution's 7 x 7 x d output flattened spatial-major and channel-minor in
both frameworks, so its rows need no permutation (unlike torchvision's Faster R-CNN
``fc6``).

The backbone's BatchNorm: MMDetection's Sparse R-CNN trains the affine
(``requires_grad=True``) and freezes the statistics (``norm_eval=True``); jdet's
``norm="frozen_bn"`` keeps all four in ``batch_stats`` (``scale``, ``bias``,
``mean``, ``var``), which evaluates identically and fine-tunes with the affine
frozen. ``*.num_batches_tracked`` is not used.

Every entry is checked: an unknown or missing name, or a shape that does not fit
the others (e.g. a ``fc_layer`` that does not read 7 x 7 x d features), raises a
``ValueError`` naming the parameter and both shapes. :func:`check_variables`
compares a result with a model's expected tree (``jax.eval_shape(model.init, ...)``).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from jdet.convert.resnet import fpn_params, resnet_params

__all__ = ["sparse_rcnn_variables", "is_mmdet_sparse_rcnn_state_dict", "sparse_rcnn_sizes",
           "sparse_rcnn_num_classes", "check_variables"]

_HEAD = "roi_head.bbox_head"
_IGNORED_SUFFIX = "num_batches_tracked"


def _numpy(value: Any) -> np.ndarray:
  """A torch tensor (any device, any grad state) or array-like -> NumPy."""
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _unwrap(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
  """The model-zoo checkpoint ``{"meta": ..., "state_dict": {...}}`` -> its state dict."""
  if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
    return state_dict["state_dict"]
  return state_dict


def is_mmdet_sparse_rcnn_state_dict(state_dict: Mapping[str, Any]) -> bool:
  """Whether the names are an MMDetection Sparse R-CNN's (learnable proposals and
  ``DIIHead`` stages), checkpoint wrapper or not."""
  sd = _unwrap(state_dict)
  return ("rpn_head.init_proposal_bboxes.weight" in sd
          and f"{_HEAD}.0.instance_interactive_conv.dynamic_layer.weight" in sd)


def sparse_rcnn_sizes(state_dict: Mapping[str, Any]) -> dict[str, int]:
  """The sizes a jdet model needs to take these weights: ``num_stages``,
  ``num_proposals``, ``num_classes``, ``hidden_dim`` (d), ``dynamic_dim`` (64),
  ``feedforward_dim`` (2048), ``num_cls_fcs``, ``num_reg_fcs``, ``depth`` (ResNet)."""
  from jdet.convert.resnet import resnet_depth
  sd = _unwrap(state_dict)
  if not is_mmdet_sparse_rcnn_state_dict(sd):
    raise ValueError(f"not an MMDetection Sparse R-CNN state dict: no "
                     f"rpn_head.init_proposal_bboxes.weight or {_HEAD}.0.instance_interactive_conv."
                     f"dynamic_layer.weight (its keys begin {sorted(sd)[:4]})")
  stages = 0
  while f"{_HEAD}.{stages}.fc_cls.weight" in sd:
    stages += 1

  def count(tower: str) -> int:
    n = 0
    while f"{_HEAD}.0.{tower}.{3 * n}.weight" in sd:
      n += 1
    return n

  num_proposals, hidden = np.shape(sd["rpn_head.init_proposal_features.weight"])
  dynamic_out = np.shape(sd[f"{_HEAD}.0.instance_interactive_conv.dynamic_layer.weight"])[0]
  return dict(num_stages=stages, num_proposals=int(num_proposals),
              num_classes=int(np.shape(sd[f"{_HEAD}.0.fc_cls.weight"])[0]),
              hidden_dim=int(hidden), dynamic_dim=int(dynamic_out // (2 * hidden)),
              feedforward_dim=int(np.shape(sd[f"{_HEAD}.0.ffn.layers.0.0.weight"])[0]),
              num_cls_fcs=count("cls_fcs"), num_reg_fcs=count("reg_fcs"),
              depth=resnet_depth(sd, "backbone."))


def sparse_rcnn_num_classes(state_dict: Mapping[str, Any]) -> int:
  """The checkpoint's class count (sigmoid classes, no background: 80 for COCO, in the
  order of COCO's category ids, which is jdet's COCO label order)."""
  return sparse_rcnn_sizes(state_dict)["num_classes"]


class _Taker:
  """Takes names out of a state dict, checks shapes, and reports what it never took."""

  def __init__(self, state_dict: Mapping[str, Any]):
    self.sd = state_dict
    self.used: set[str] = set()
    self.missing: list[str] = []

  def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
    if name not in self.sd:
      self.missing.append(name)
      return None
    self.used.add(name)
    value = _numpy(self.sd[name])
    if value.shape != tuple(shape):
      raise ValueError(f"{name} has shape {value.shape}; this model expects {tuple(shape)}")
    return value

  def linear(self, name: str, d_in: int, d_out: int, bias: bool = True) -> dict:
    weight = self.take(f"{name}.weight", (d_out, d_in))
    out = {"kernel": None if weight is None else np.ascontiguousarray(weight.T)}
    if bias:
      out["bias"] = self.take(f"{name}.bias", (d_out,))
    return out

  def layer_norm(self, name: str, d: int) -> dict:
    return {"scale": self.take(f"{name}.weight", (d,)), "bias": self.take(f"{name}.bias", (d,))}


def _stage(t: _Taker, prefix: str, *, d: int, dynamic: int, roi_cells: int, feedforward: int,
           num_classes: int, num_cls_fcs: int, num_reg_fcs: int) -> dict:
  iic = f"{prefix}instance_interactive_conv"
  in_proj_w = t.take(f"{prefix}attention.attn.in_proj_weight", (3 * d, d))
  stage = {
      "attention": {
          "in_proj": {"kernel": None if in_proj_w is None else np.ascontiguousarray(in_proj_w.T),
                      "bias": t.take(f"{prefix}attention.attn.in_proj_bias", (3 * d,))},
          "out_proj": t.linear(f"{prefix}attention.attn.out_proj", d, d),
      },
      "attention_norm": t.layer_norm(f"{prefix}attention_norm", d),
      "dynamic_conv": {
          "dynamic_layer": t.linear(f"{iic}.dynamic_layer", d, 2 * d * dynamic),
          "norm_in": t.layer_norm(f"{iic}.norm_in", dynamic),
          "norm_out": t.layer_norm(f"{iic}.norm_out", d),
          "fc_layer": t.linear(f"{iic}.fc_layer", roi_cells * d, d),
          "fc_norm": t.layer_norm(f"{iic}.fc_norm", d),
      },
      "dynamic_conv_norm": t.layer_norm(f"{iic}_norm", d),
      "ffn": {"fc1": t.linear(f"{prefix}ffn.layers.0.0", d, feedforward),
              "fc2": t.linear(f"{prefix}ffn.layers.1", feedforward, d)},
      "ffn_norm": t.layer_norm(f"{prefix}ffn_norm", d),
      "cls_logits": t.linear(f"{prefix}fc_cls", d, num_classes),
      "box_deltas": t.linear(f"{prefix}fc_reg", d, 4),
  }
  for tower, short, n in (("cls_fcs", "cls", num_cls_fcs), ("reg_fcs", "reg", num_reg_fcs)):
    for i in range(n):
      # Each block is [Linear without bias, LayerNorm, ReLU]: indices 3i, 3i + 1.
      stage[f"{short}_fc{i}"] = t.linear(f"{prefix}{tower}.{3 * i}", d, d, bias=False)
      stage[f"{short}_norm{i}"] = t.layer_norm(f"{prefix}{tower}.{3 * i + 1}", d)
  return stage


def _neck(sd: Mapping[str, Any], used: set[str]) -> dict:
  """MMDetection's FPN names -> torchvision's, then :func:`fpn_params`."""
  pattern = re.compile(r"^neck\.(lateral|fpn)_convs\.(\d+)\.conv\.(weight|bias)$")
  renamed = {}
  for key, value in sd.items():
    if not key.startswith("neck."):
      continue
    m = pattern.match(key)
    if m is None:
      raise ValueError(f"{key}: not a name of MMDetection's FPN without extra levels "
                       f"(neck.lateral_convs.{{i}}.conv.* / neck.fpn_convs.{{i}}.conv.*); "
                       f"Sparse R-CNN uses P2..P5 only")
    kind, i, leaf = m.groups()
    block = "inner_blocks" if kind == "lateral" else "layer_blocks"
    renamed[f"fpn.{block}.{i}.0.{leaf}"] = _numpy(value)
    used.add(key)
  if not renamed:
    raise ValueError("no neck.* entries: an MMDetection Sparse R-CNN state dict has its FPN "
                     "under neck.lateral_convs / neck.fpn_convs")
  return fpn_params(renamed, prefix="fpn.")


def sparse_rcnn_variables(state_dict: Mapping[str, Any], num_classes: int | None = None) -> dict:
  """An MMDetection Sparse R-CNN state dict -> ``SparseRCNN`` variables.

  Args:
    state_dict: ``{MMDetection name: tensor or array}``, or the model-zoo checkpoint
      dict with it under ``"state_dict"``. The sizes (stages, proposals, classes,
      widths, ResNet depth) are read from it (:func:`sparse_rcnn_sizes`) and every
      other entry's shape is checked against them.
    num_classes: the jdet model's class count, for the converter table's signature.
      The class layers convert as they are whatever it says (MMDetection's class
      indices are already jdet's); where it differs from the checkpoint's, loading
      into the model reports the ``cls_logits`` shapes (:func:`check_variables`)
      and can load the rest.
  Returns:
    ``{"params": {"backbone", "neck", "proposal_boxes", "proposal_features",
    "stage0", ...}, "batch_stats": {"backbone"}}`` of NumPy arrays in the state
    dict's dtype (float32 for the model zoo).
  Raises:
    ValueError: naming every missing and every unused entry, or the first entry
    whose shape does not fit (with both shapes).
  """
  del num_classes  # see the docstring
  sd = _unwrap(state_dict)
  sizes = sparse_rcnn_sizes(sd)
  d = sizes["hidden_dim"]
  # The ResNet and FPN helpers read NumPy arrays.
  backbone_sd = {k: _numpy(v) for k, v in sd.items() if k.startswith("backbone.")}
  backbone = resnet_params(backbone_sd, depth=sizes["depth"], norm="frozen_bn",
                           prefix="backbone.")
  used = set(backbone_sd)
  neck = _neck(sd, used)
  if sorted(k for k in neck if k.startswith("inner_block")) != [f"inner_block{i}" for i in range(4)]:
    raise ValueError(f"the FPN has {len([k for k in neck if k.startswith('inner_block')])} "
                     f"levels; Sparse R-CNN's reads C2..C5 (4)")
  for name, block in neck.items():
    if block["kernel"].shape[-1] != d:
      raise ValueError(f"neck {name} has {block['kernel'].shape[-1]} output channels; the "
                       f"proposal features have {d}")

  t = _Taker(sd)
  n = sizes["num_proposals"]
  params = {"backbone": backbone["params"], "neck": neck,
            "proposal_boxes": t.take("rpn_head.init_proposal_bboxes.weight", (n, 4)),
            "proposal_features": t.take("rpn_head.init_proposal_features.weight", (n, d))}
  fc_key = f"{_HEAD}.0.instance_interactive_conv.fc_layer.weight"
  fc_in = np.shape(sd[fc_key])[-1] if fc_key in sd else 49 * d  # missing: reported below
  roi_cells = fc_in // d
  side = int(round(np.sqrt(roi_cells)))
  if side * side * d != fc_in:
    raise ValueError(f"{fc_key} has shape {np.shape(sd[fc_key])}: it reads {fc_in} features, "
                     f"not the S x S x {d} of a square RoI")
  for s in range(sizes["num_stages"]):
    params[f"stage{s}"] = _stage(
        t, f"{_HEAD}.{s}.", d=d, dynamic=sizes["dynamic_dim"], roi_cells=roi_cells,
        feedforward=sizes["feedforward_dim"], num_classes=sizes["num_classes"],
        num_cls_fcs=sizes["num_cls_fcs"], num_reg_fcs=sizes["num_reg_fcs"])

  used |= t.used
  unused = sorted(k for k in sd if k not in used and not k.endswith(_IGNORED_SUFFIX))
  if t.missing or unused:
    raise ValueError(
        "not an MMDetection Sparse R-CNN (ResNet-FPN, DIIHead) state dict:\n"
        + (f"  missing ({len(t.missing)}): {_listing(t.missing)}\n" if t.missing else "")
        + (f"  unused ({len(unused)}): {_listing(unused)}\n" if unused else ""))
  return {"params": params, "batch_stats": {"backbone": backbone["batch_stats"]}}


def _listing(names: list[str], limit: int = 20) -> str:
  more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def check_variables(variables: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
  """Raises a ``ValueError`` listing every leaf of ``expected`` (e.g. ``jax.eval_shape(
  model.init, ...)``) that ``variables`` lacks, every leaf it has that ``expected``
  does not, and every shape that differs (``path: converted (...) vs model (...)``)."""
  got, want = dict(_leaves(variables)), dict(_leaves(expected))
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  shapes = [f"{p}: converted {tuple(np.shape(got[p]))} vs model {tuple(want[p].shape)}"
            for p in sorted(set(got) & set(want))
            if tuple(np.shape(got[p])) != tuple(want[p].shape)]
  if missing or extra or shapes:
    raise ValueError(
        "the converted variables do not fit the model:\n"
        + (f"  missing ({len(missing)}): {_listing(missing)}\n" if missing else "")
        + (f"  not in the model ({len(extra)}): {_listing(extra)}\n" if extra else "")
        + (f"  shapes ({len(shapes)}): {_listing(shapes)}\n" if shapes else ""))


def _leaves(tree: Any, path: str = ""):
  if isinstance(tree, Mapping):
    for key, value in tree.items():
      yield from _leaves(value, f"{path}/{key}" if path else str(key))
  else:
    yield path, tree
