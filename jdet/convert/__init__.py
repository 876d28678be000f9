"""Checkpoints from other frameworks -> jdet parameter trees.

Three steps, each usable alone:

1. **Read** a file into a flat ``{name: np.ndarray}`` dict
   (:func:`read_state_dict`): a torch state dict (``.pth`` / ``.pt``, read
   with ``torch.load(..., weights_only=True)``, so no arbitrary object is ever
   unpickled; ``{"state_dict": ...}`` and ``{"model": ...}`` wrappers and a
   DataParallel ``module.`` prefix are removed), ``.safetensors``, or ``.npz``
   (``allow_pickle=False``).
2. **Convert** names and layouts (:func:`convert_state_dict`, which recognises
   the file): torchvision's dotted names with ``nn.Sequential`` indices
   (``backbone.features.21.weight``) become jdet's module names
   (``backbone/conv4_3/kernel``), and torch's OIHW convolution weights become
   Flax's HWIO kernels. The name tables are in :mod:`jdet.convert.torchvision`.
   A ``.npz`` whose keys are ``/``-joined jdet paths (written by
   :func:`save_params_npz`, e.g. by ``python -m jdet.convert``) is already
   converted and is only unflattened.
3. **Load** into a model's existing params (:func:`load_model_params`,
   :func:`load_backbone_params`): every converted array must exist in the
   model with the same shape; otherwise a ``ValueError`` names each
   parameter path with both shapes and lists the missing and unexpected
   names. The result is a new tree; the input is not modified, and arrays keep
   the model's dtype and sharding.

Command line (torch needed only here, not where the ``.npz`` is used)::

  python -m jdet.convert ssd300_vgg16 ssd300_vgg16_coco.pth ssd300.npz
  python -m jdet.convert vgg16 vgg16_features.pth vgg16.npz

then ``--config.init.weights=ssd300.npz`` (the whole model) or
``--config.init.backbone=vgg16.npz`` (conv1_1 .. conv5_3) in ``train.py``.

ResNets (``python -m jdet.convert resnet50 resnet50.pth resnet50.npz``) carry
BatchNorm numbers, which jdet keeps in the ``batch_stats`` collection (frozen
BatchNorm keeps all four there): they load with :func:`load_backbone_variables`
into a model's ``{"params", "batch_stats"}``, not with the params-only loaders.
The conversions are in :mod:`jdet.convert.resnet`.

Converted weights compute what they computed in torchvision only on the input
they were trained for. torchvision's ``ssd300_vgg16`` (and the
``vgg16_features`` backbone it starts from) takes RGB pixels in 0..255 minus
``(123.0, 117.0, 104.0)``, not divided by a standard deviation (its transform's
mean ``[0.48235, 0.45882, 0.40784]`` and std ``1 / 255``), and the matching jdet
model is ``SSD(num_classes=90, clamp_default_boxes=True, size_rule=(0.15, 0.9, 0.07))``
(torchvision's 91 COCO classes count the background and the unused category
ids). A plain ImageNet ``vgg16`` takes ImageNet mean and std normalisation.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from jdet.convert.resnet import (fpn_params, is_resnet_state_dict, resnet_depth, resnet_params,
                                 resnet_fpn_backbone_params)
from jdet.convert.torchvision import (coco91_to_coco80, ssd300_vgg16_num_classes,
                                      ssd300_vgg16_params, vgg16_backbone_params)

__all__ = [
    "read_state_dict", "convert_state_dict", "coco91_to_coco80", "ssd300_vgg16_params", "ssd300_vgg16_num_classes",
    "vgg16_backbone_params", "load_model_params", "load_backbone_params", "merge_params",
    "save_params_npz", "load_params_npz", "flatten_params", "unflatten_params",
    "resnet_params", "resnet_depth", "fpn_params", "resnet_fpn_backbone_params",
    "is_resnet_state_dict", "convert_variables", "load_backbone_variables", "load_model_variables",
]

_WRAPPERS = ("state_dict", "model")
_SEP = "/"


# ----------------------------------------------------------------------------
# Reading files.
# ----------------------------------------------------------------------------


def _torch_to_numpy(name: str, value: Any) -> np.ndarray:
  import torch  # only reached for .pth files, after torch imported fine
  if isinstance(value, torch.Tensor):
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:  # NumPy has no bfloat16
      value = value.float()
    return value.numpy()
  if isinstance(value, np.ndarray):
    return value
  raise TypeError(f"state dict entry {name!r} is a {type(value).__name__}, not a tensor")


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as err:
    raise ImportError(f"reading {path} needs PyTorch (pip install torch); or convert it to .npz "
                      "with `python -m jdet.convert` where torch is installed") from err
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as err:
    raise ValueError(f"{path} holds objects other than tensors and plain containers; it is not "
                     "unpickled (torch.load weights_only=True). Save `model.state_dict()` "
                     "instead of the model or a custom object.") from err
  while isinstance(obj, Mapping) and any(isinstance(obj.get(k), Mapping) for k in _WRAPPERS):
    obj = next(obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping))
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
  return {str(k): _torch_to_numpy(str(k), v) for k, v in obj.items()}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    from safetensors.numpy import load_file
  except ImportError as err:
    raise ImportError(f"reading {path} needs the safetensors package (pip install safetensors)"
                      ) from err
  return dict(load_file(path))


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A checkpoint file -> flat ``{name: np.ndarray}``.

  ``.pth`` / ``.pt``: ``torch.load(path, map_location="cpu", weights_only=True)``
  (a file holding anything but tensors and plain containers is refused with a
  ``ValueError``); ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers are
  unwrapped, bfloat16 tensors become float32. ``.safetensors``: with the
  ``safetensors`` package. ``.npz``: ``np.load(allow_pickle=False)``. A
  ``module.`` prefix on every name (``nn.DataParallel``) is removed.
  """
  path = os.fspath(path)
  suffix = Path(path).suffix.lower()
  if suffix in (".pth", ".pt"):
    state = _read_torch(path)
  elif suffix == ".safetensors":
    state = _read_safetensors(path)
  elif suffix == ".npz":
    with np.load(path, allow_pickle=False) as data:
      state = {k: data[k] for k in data.files}
  else:
    raise ValueError(f"{path}: unknown checkpoint format {suffix!r}; expected .pth, .pt, "
                     ".safetensors or .npz")
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module."):]: v for k, v in state.items()}
  return state


# ----------------------------------------------------------------------------
# Flat jdet params in .npz files.
# ----------------------------------------------------------------------------


def flatten_params(params: Mapping) -> dict[str, Any]:
  """A nested params dict -> ``{"backbone/conv1_1/kernel": array, ...}``."""
  return traverse_util.flatten_dict(unfreeze(params), sep=_SEP)


def unflatten_params(flat: Mapping[str, Any]) -> dict:
  """Inverse of :func:`flatten_params`."""
  return traverse_util.unflatten_dict({tuple(k.split(_SEP)): v for k, v in flat.items()})


def save_params_npz(path: str | os.PathLike, params: Mapping) -> None:
  """Writes a params tree as an ``.npz`` of ``/``-joined names (exactly ``path``)."""
  flat = {k: np.asarray(jax.device_get(v)) for k, v in flatten_params(params).items()}
  with open(path, "wb") as fh:  # a file object: np.savez would append ".npz" to a name
    np.savez(fh, **flat)


def load_params_npz(path: str | os.PathLike) -> dict:
  """Reads :func:`save_params_npz`'s file -> nested ``{name: np.ndarray}``."""
  return unflatten_params(read_state_dict(path))


# ----------------------------------------------------------------------------
# Converting and loading.
# ----------------------------------------------------------------------------


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
  """A flat state dict of a known layout -> a jdet params tree.

  Recognises jdet's own ``/``-joined names, torchvision's ``ssd300_vgg16``
  (``backbone.features.*``, ``backbone.extra.*``, ``head.*``) and torchvision's
  ImageNet ``vgg16`` (``features.*``; returned as ``{"backbone": ...}``).
  """
  keys = list(state_dict)
  if any(_SEP in k for k in keys):
    return unflatten_params(state_dict)
  if any(k.startswith("backbone.extra.") for k in keys):
    return ssd300_vgg16_params(state_dict)
  if any(k.startswith("features.") for k in keys):
    return {"backbone": vgg16_backbone_params(state_dict)}
  if is_resnet_state_dict(state_dict):
    raise ValueError("a torchvision ResNet state dict carries BatchNorm numbers, which jdet keeps "
                     "in the 'batch_stats' collection, not in params: read it with "
                     "convert_variables / load_backbone_variables")
  raise ValueError(f"unknown state dict layout (keys begin {sorted(keys)[:5]}): expected "
                   "torchvision ssd300_vgg16, torchvision vgg16, or jdet params")


def _listing(names: list[str], limit: int = 20) -> str:
  more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def merge_params(params: Mapping, converted: Mapping, *, partial: bool = False,
                 prefix: str = "", source: str = "the file") -> dict:
  """``params`` with every leaf of ``converted`` put in its place.

  Args:
    params: the model's params tree (arrays or ``jax.ShapeDtypeStruct``).
    converted: a tree of arrays with the same names (a subset if ``partial``).
    partial: allow parameters of ``params`` that ``converted`` lacks (they
      keep their value); names in ``converted`` that ``params`` lacks are an
      error either way.
    prefix: prepended to names in error messages (e.g. ``"backbone/"``).
    source: the file, for error messages.
  Returns:
    a new nested dict; replaced leaves have the old leaf's dtype, and its
    sharding when the old leaf is a ``jax.Array``.
  Raises:
    ValueError: listing every shape mismatch (parameter path, model shape,
    file shape), every unexpected name and, unless ``partial``, every missing one.
  """
  old = flatten_params(params)
  new = flatten_params(converted)
  mismatched = [f"{prefix}{k}: model {tuple(old[k].shape)}, file {tuple(np.shape(new[k]))}"
                for k in sorted(new) if k in old and tuple(old[k].shape) != tuple(np.shape(new[k]))]
  unexpected = sorted(prefix + k for k in new if k not in old)
  missing = [] if partial else sorted(prefix + k for k in old if k not in new)
  problems = []
  if mismatched:
    problems.append("shape mismatch:\n  " + "\n  ".join(mismatched))
  if missing:
    problems.append(f"missing from the file ({len(missing)}): {_listing(missing)}")
  if unexpected:
    problems.append(f"unexpected, not in the model ({len(unexpected)}): {_listing(unexpected)}")
  if problems:
    raise ValueError(f"cannot load {source} into the model's params:\n" + "\n".join(problems))

  def put(o, n):
    n = np.asarray(n, dtype=o.dtype)
    return jax.device_put(n, o.sharding) if isinstance(o, jax.Array) else n

  merged = {k: put(v, new[k]) if k in new else v for k, v in old.items()}
  return unflatten_params(merged)


def _convert_file(path) -> dict:
  return convert_state_dict(read_state_dict(path))


def load_model_params(path: str | os.PathLike, params: Mapping) -> dict:
  """The whole model's params from a file (torchvision ``ssd300_vgg16`` or jdet ``.npz``).

  Every parameter of ``params`` must be in the file with the same shape and
  the file may hold nothing else (see :func:`merge_params` for the errors).

  Args:
    path: ``.pth`` / ``.pt`` / ``.safetensors`` / ``.npz`` (see :func:`read_state_dict`).
    params: the model's params tree, e.g. ``variables["params"]``.
  Returns:
    a new params tree with the file's values.
  """
  converted = _convert_file(path)
  # torchvision's COCO heads score 91 category ids; an 80-class model takes its 80 + background.
  converted = coco91_to_coco80(converted, params)
  return merge_params(params, converted, source=os.fspath(path))


def load_backbone_params(path: str | os.PathLike, params: Mapping) -> dict:
  """``params`` with the backbone entries that a file has (e.g. ImageNet VGG16).

  The file is a torchvision ``vgg16`` (conv1_1 .. conv5_3), a torchvision
  ``ssd300_vgg16`` or a jdet ``.npz``; only its ``backbone`` part is used and only
  ``params["backbone"]`` changes. Backbone parameters the file lacks (fc6,
  fc7, the L2Norm scale, the extra layers, BatchNorm) keep their values; a
  name the model lacks or a shape mismatch is an error.
  """
  converted = _convert_file(path)
  if "backbone" not in converted:
    raise ValueError(f"{os.fspath(path)} has no backbone parameters "
                     f"(its top-level names: {sorted(converted)})")
  if "backbone" not in params:
    raise ValueError(f"the model has no 'backbone' params (its top-level names: {sorted(params)})")
  backbone = merge_params(params["backbone"], converted["backbone"], partial=True,
                          prefix="backbone/", source=os.fspath(path))
  return {**unfreeze(params), "backbone": backbone}


# ----------------------------------------------------------------------------
# Variables (params and batch_stats): ResNet backbones.
# ----------------------------------------------------------------------------

_COLLECTIONS = ("params", "batch_stats")


def convert_variables(state_dict: Mapping[str, np.ndarray]) -> dict:
  """A flat state dict -> jdet variables ``{"params": ..., "batch_stats": ...}``.

  Recognises torchvision's ImageNet ResNets (``conv1.*``, ``layer1.*``, ...;
  returned as ``{"params": {"backbone": ...}, "batch_stats": {"backbone": ...}}``
  in the ``norm="frozen_bn"`` layout of :func:`resnet_params`), jdet ``.npz``
  names that start with a collection (``params/backbone/conv1/kernel``, as
  ``python -m jdet.convert resnet50`` writes them), and every layout of
  :func:`convert_state_dict` (returned as ``{"params": ...}``).
  """
  if is_resnet_state_dict(state_dict):
    norm = "frozen_bn" if "bn1.running_mean" in state_dict else "group"  # GroupNorm: no stats
    variables = resnet_params(state_dict, norm=norm)
    return {name: {"backbone": tree} for name, tree in variables.items()}
  keys = list(state_dict)
  if keys and all(_SEP in k and k.split(_SEP, 1)[0] in _COLLECTIONS for k in keys):
    return unflatten_params(state_dict)
  return {"params": convert_state_dict(state_dict)}


def _is_faster_rcnn(state_dict: Mapping[str, np.ndarray]) -> bool:
  return any(k.startswith("rpn.head.") for k in state_dict) and any(
      k.startswith("roi_heads.") for k in state_dict)


def load_model_variables(path: str | os.PathLike, variables: Mapping) -> dict:
  """The whole model's variables (``params`` and ``batch_stats``) from a file.

  What :func:`load_model_params` does for ``params`` alone, for every layout
  :func:`convert_variables` knows and for torchvision's ``fasterrcnn_resnet50_fpn``
  (its frozen BatchNorm numbers go to ``batch_stats``). COCO's 91-way heads are
  mapped to an 80-class model's labels. Every variable of the model must be in
  the file with the same shape, and the file may hold nothing else.

  Args:
    path: ``.pth`` / ``.pt`` / ``.safetensors`` / ``.npz`` (see :func:`read_state_dict`).
    variables: the model's variables, e.g. ``model.init(...)``.
  Returns:
    a new variables dict (collections the file does not cover are unchanged).
  """
  source = os.fspath(path)
  state_dict = read_state_dict(path)
  params = variables["params"]
  if _is_faster_rcnn(state_dict):
    from jdet.convert.faster_rcnn import fasterrcnn_resnet50_fpn_params
    try:
      num_classes = int(params["roi_head"]["cls_score"]["kernel"].shape[-1]) - 1
    except KeyError as e:
      raise ValueError(f"{source} is a torchvision Faster R-CNN, but the model has no "
                       f"roi_head/cls_score (its top-level names: {sorted(params)})") from e
    converted = fasterrcnn_resnet50_fpn_params(state_dict, num_classes=num_classes)
  else:
    converted = convert_variables(state_dict)
    # torchvision's SSD COCO heads score 91 category ids; an 80-class model takes 80 + background.
    converted["params"] = coco91_to_coco80(converted["params"], params)
  out = {c: unfreeze(v) for c, v in variables.items()}
  for collection, tree in converted.items():
    if collection not in variables:
      raise ValueError(f"{source} holds {collection!r} numbers, which the model does not have "
                       f"(its collections: {sorted(variables)})")
    out[collection] = merge_params(variables[collection], tree, source=f"{source} ({collection})")
  return out


def load_backbone_variables(path: str | os.PathLike, variables: Mapping, *,
                            name: str = "backbone") -> dict:
  """``variables`` with the backbone entries that a file has (e.g. ImageNet ResNet-50).

  What :func:`load_backbone_params` does for ``params`` alone, for all the
  model's collections (``params``, ``batch_stats``): the file's ``backbone``
  part (:func:`convert_variables`) replaces ``variables[c][name]`` leaf by
  leaf. Each leaf goes to the collection where the model has that name, so
  one converted ResNet loads into every BatchNorm kind: ``norm="frozen_bn"``
  (all four numbers in ``batch_stats``) and ``norm="batch"`` (scale and bias
  in ``params``). Entries the file lacks keep their values; a name the model
  has in no collection, or a shape mismatch, is a ``ValueError``.

  Args:
    path: ``.pth`` / ``.pt`` / ``.safetensors`` / ``.npz`` (see :func:`read_state_dict`).
    variables: the model's variables, e.g. ``model.init(...)`` or ``state.variables``.
    name: the backbone's top-level module name in the model.
  Returns:
    a new variables dict (other collections and other modules unchanged).
  """
  source = os.fspath(path)
  converted = convert_variables(read_state_dict(path))
  file_leaves = {}
  for collection, tree in converted.items():
    if name in tree:
      file_leaves.update(flatten_params(tree[name]))
  if not file_leaves:
    raise ValueError(f"{source} has no {name!r} entries (its collections: "
                     f"{ {c: sorted(t) for c, t in converted.items()} })")
  model = {c: flatten_params(variables[c][name]) for c in _COLLECTIONS
           if c in variables and name in variables[c]}
  if not model:
    raise ValueError(f"the model has no {name!r} module in {_COLLECTIONS}")
  placed = {c: {} for c in model}
  unexpected = []
  for key, value in file_leaves.items():
    home = next((c for c in model if key in model[c]), None)
    if home is None:
      unexpected.append(f"{name}/{key}")
    else:
      placed[home][key] = value
  if unexpected:
    raise ValueError(f"cannot load {source} into the model's {name!r}: not in the model's "
                     f"{sorted(model)} ({len(unexpected)}): {_listing(sorted(unexpected))}")
  out = {c: unfreeze(v) for c, v in variables.items()}
  for c, leaves in placed.items():
    if leaves:
      out[c] = {**out[c], name: merge_params(variables[c][name], unflatten_params(leaves),
                                             partial=True, prefix=f"{c}/{name}/", source=source)}
  return out
