"""Converted checkpoints -> a model's existing variables (``params`` and ``batch_stats``).

Every converted array must exist in the model with the same shape; otherwise a
``ValueError`` names each path with both shapes and lists the missing and
unexpected names. The result is a new tree; the input is not modified, and
arrays keep the model's dtype and sharding.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
import numpy as np
from flax.core import unfreeze

from jdet.convert.architectures import COLLECTIONS, convert_variables, find_architecture
from jdet.convert.files import (flatten_params, is_jdet_state_dict, listing, read_state_dict,
                                unflatten_params)
from jdet.convert.torchvision import coco91_to_coco80

__all__ = ["merge_params", "load_model_variables", "load_backbone_variables"]


def _problems(mismatched: list[str], missing: list[str], unexpected: list[str]) -> list[str]:
  problems = []
  if mismatched:
    problems.append("shape mismatch:\n  " + "\n  ".join(mismatched))
  if missing:
    problems.append(f"missing from the file ({len(missing)}): {listing(missing)}")
  if unexpected:
    problems.append(f"unexpected, not in the model ({len(unexpected)}): {listing(unexpected)}")
  return problems


def merge_params(params: Mapping, converted: Mapping, *, partial: bool = False,
                 prefix: str = "", source: str = "the file") -> dict:
  """``params`` (one collection of a model's variables) with every leaf of ``converted`` put in
  its place.

  Args:
    params: the model's tree (arrays or ``jax.ShapeDtypeStruct``).
    converted: a tree of arrays with the same names (a subset if ``partial``).
    partial: allow leaves of ``params`` that ``converted`` lacks (they keep
      their value); names in ``converted`` that ``params`` lacks are an error
      either way.
    prefix: prepended to names in error messages (e.g. ``"backbone/"``).
    source: the file, for error messages.
  Returns:
    a new nested dict; replaced leaves have the old leaf's dtype, and its
    sharding when the old leaf is a ``jax.Array``.
  Raises:
    ValueError: listing every shape mismatch (path, model shape, file shape),
    every unexpected name and, unless ``partial``, every missing one.
  """
  old = flatten_params(params)
  new = flatten_params(converted)
  mismatched = [f"{prefix}{k}: model {tuple(old[k].shape)}, file {tuple(np.shape(new[k]))}"
                for k in sorted(new) if k in old and tuple(old[k].shape) != tuple(np.shape(new[k]))]
  unexpected = sorted(prefix + k for k in new if k not in old)
  missing = [] if partial else sorted(prefix + k for k in old if k not in new)
  problems = _problems(mismatched, missing, unexpected)
  if problems:
    raise ValueError(f"cannot load {source} into the model's params:\n" + "\n".join(problems))

  def put(o, n):
    n = np.asarray(n, dtype=o.dtype)
    return jax.device_put(n, o.sharding) if isinstance(o, jax.Array) else n

  merged = {k: put(v, new[k]) if k in new else v for k, v in old.items()}
  return unflatten_params(merged)


def load_model_variables(path: str | os.PathLike, variables: Mapping) -> dict:
  """The whole model's variables (``params`` and ``batch_stats``) from a file.

  The file is any layout of :data:`jdet.convert.ARCHITECTURES` (converted for
  the model's class count: COCO's 91-way torchvision heads become an 80-class
  model's labels) or a jdet ``.npz``. Every variable of the model must be in
  the file with the same shape, and the file may hold nothing else.

  Args:
    path: ``.pth`` / ``.pt`` / ``.safetensors`` / ``.npz`` (see :func:`read_state_dict`).
    variables: the model's variables, e.g. ``model.init(...)`` (arrays or
      ``jax.ShapeDtypeStruct``); ``{"params": params}`` for a model without
      other collections.
  Returns:
    a new variables dict (collections the file does not cover are unchanged).
  """
  source = os.fspath(path)
  state_dict = read_state_dict(path)
  if is_jdet_state_dict(state_dict):
    converted = convert_variables(state_dict)
    # A jdet .npz converted from torchvision's SSD COCO heads (91 category ids) still has them.
    if "params" in converted:
      converted["params"] = coco91_to_coco80(converted["params"], variables["params"])
  else:
    arch = find_architecture(state_dict)
    num_classes = arch.model_classes(variables) if arch.model_classes else None
    converted = arch.convert(state_dict, num_classes)
  out = {c: unfreeze(v) for c, v in variables.items()}
  for collection, tree in converted.items():
    if collection not in variables:
      raise ValueError(f"{source} holds {collection!r} numbers, which the model does not have "
                       f"(its collections: {sorted(variables)})")
    out[collection] = merge_params(variables[collection], tree, source=f"{source} ({collection})")
  return out


def load_backbone_variables(path: str | os.PathLike, variables: Mapping, *,
                            name: str = "backbone") -> dict:
  """``variables`` with the backbone entries that a file has (e.g. ImageNet ResNet-50 or VGG16).

  The file's ``name`` part (:func:`jdet.convert.convert_variables`) replaces
  ``variables[c][name]`` leaf by leaf. Each leaf goes to the collection where
  the model has that name, so one converted ResNet loads into every BatchNorm
  kind: ``norm="frozen_bn"`` (all four numbers in ``batch_stats``) and
  ``norm="batch"`` (scale and bias in ``params``). Entries the file lacks keep
  their values (e.g. VGG16's fc6, fc7, L2Norm scale and extra layers); a name
  the model has in no collection, or a shape mismatch, is a ``ValueError``.

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
  model = {c: flatten_params(variables[c][name]) for c in COLLECTIONS
           if c in variables and name in variables[c]}
  if not model:
    raise ValueError(f"the model has no {name!r} module in {COLLECTIONS}")
  placed = {c: {} for c in model}
  unexpected = []
  for key, value in file_leaves.items():
    home = next((c for c in model if key in model[c]), None)
    if home is None:
      unexpected.append(f"{name}/{key}")
    else:
      placed[home][key] = value
  if unexpected:
    raise ValueError(f"cannot load {source} into the model's {name!r} (collections "
                     f"{sorted(model)}):\n" + "\n".join(_problems([], [], sorted(unexpected))))
  out = {c: unfreeze(v) for c, v in variables.items()}
  for c, leaves in placed.items():
    if leaves:
      out[c] = {**out[c], name: merge_params(variables[c][name], unflatten_params(leaves),
                                             partial=True, prefix=f"{c}/{name}/", source=source)}
  return out
