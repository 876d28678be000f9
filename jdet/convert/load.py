"""Converted checkpoints -> a model's existing variables (``params`` and ``batch_stats``).

Every converted array must exist in the model with the same shape; otherwise a
``ValueError`` names each path with both shapes and lists the missing and
unexpected names. The result is a new tree; the input is not modified, and
arrays keep the model's dtype and sharding.

One exception, for fine-tuning: a whole-model file
(:func:`load_model_variables`) may differ from the model in the layers that
depend on the class count or on the number of learned proposals
(:data:`RESIZABLE`, e.g. a COCO Faster R-CNN's 91-way ``roi_head/cls_score``
loaded into a 1-class model, or the 100 proposals of an MMDetection Sparse
R-CNN loaded into a 300-proposal model). Those parameters keep the model's
initial values; everything else is loaded, and the :class:`LoadReport`
(logged, and returned with ``return_report=True``) lists what was loaded,
what was re-initialised and why. A shape mismatch anywhere else is still a
``ValueError`` naming the parameter and both shapes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Mapping

import jax
import numpy as np
from flax.core import unfreeze

from jdet.convert.architectures import COLLECTIONS, convert_variables, find_architecture
from jdet.convert.files import (flatten_params, is_jdet_state_dict, listing, read_state_dict,
                                unflatten_params)
from jdet.convert.torchvision import coco91_to_coco80

__all__ = ["merge_params", "load_model_variables", "load_backbone_variables", "LoadReport",
           "RESIZABLE"]

log = logging.getLogger(__name__)

# The model parameters whose shapes follow the class count or the number of learned
# proposals, as ``(pattern on the path inside its collection, what it depends on)``.
# On fine-tuning (a file with another count) they are re-initialised instead of
# loaded; any other shape mismatch is an error. C classes, A anchors per position,
# N proposals.
RESIZABLE: tuple[tuple[str, str], ...] = (
    # SSD: one class convolution per level, [3, 3, in, A * (C + 1)].
    (r"head/cls_\d+/(kernel|bias)", "the class count"),
    # RefineDet: the ODM's class convolutions (the ARM's are object / background).
    (r"odm/cls_\d+/(kernel|bias)", "the class count"),
    # Faster R-CNN: class scores [R, C + 1] and class-specific boxes [R, 4 (C + 1)].
    (r"roi_head/(cls_score|bbox_pred)/(kernel|bias)", "the class count"),
    # Sparse R-CNN: every stage's class logits [d, C] (sigmoid, no background) ...
    (r"stage\d+/cls_logits/(kernel|bias)", "the class count"),
    # ... and the learned proposals [N, 4], [N, d].
    (r"proposal_(boxes|features)", "the number of proposals"),
)


def _resizable(name: str) -> str | None:
  """What ``name`` (a path inside a collection) depends on, if it is in :data:`RESIZABLE`."""
  for pattern, reason in RESIZABLE:
    if re.fullmatch(pattern, name):
      return reason
  return None


@dataclasses.dataclass
class LoadReport:
  """What :func:`load_model_variables` did, parameter by parameter.

  Attributes:
    source: the file.
    architecture: the layout it was read as (an :data:`ARCHITECTURES` name or
      ``"jdet"`` for a jdet ``.npz``).
    loaded: ``"collection/path"`` of every variable taken from the file.
    reinitialised: ``{"collection/path": why}`` for every variable that keeps
      the model's initial value (a :data:`RESIZABLE` layer of another shape).
    file_classes, model_classes: the class counts where known (else None).
  """

  source: str
  architecture: str
  loaded: list[str] = dataclasses.field(default_factory=list)
  reinitialised: dict[str, str] = dataclasses.field(default_factory=dict)
  file_classes: int | None = None
  model_classes: int | None = None

  def summary(self) -> str:
    """Readable lines: counts, then every re-initialised parameter with its reason."""
    classes = ""
    if self.file_classes is not None and self.model_classes is not None:
      classes = f"; file {self.file_classes} classes, model {self.model_classes}"
    lines = [f"{self.source} ({self.architecture}{classes}): loaded {len(self.loaded)} "
             f"variables, re-initialised {len(self.reinitialised)}"]
    groups: dict[str, int] = {}
    for name in self.loaded:  # by collection and top-level module
      top = "/".join(name.split("/")[:2])
      groups[top] = groups.get(top, 0) + 1
    lines += [f"  loaded {top}: {n} variable{'s' * (n != 1)}" for top, n in groups.items()]
    lines += [f"  re-initialised {name}: {why}" for name, why in self.reinitialised.items()]
    return "\n".join(lines)


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
                 prefix: str = "", source: str = "the file",
                 skipped: dict[str, str] | None = None) -> dict:
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
    skipped: if given, a leaf whose ``prefix + name`` is in :data:`RESIZABLE`
      and whose shape differs keeps the model's value instead of being an
      error, and ``skipped[prefix + name]`` says why (both shapes).
  Returns:
    a new nested dict; replaced leaves have the old leaf's dtype, and its
    sharding when the old leaf is a ``jax.Array``.
  Raises:
    ValueError: listing every shape mismatch (path, model shape, file shape),
    every unexpected name and, unless ``partial``, every missing one.
  """
  old = flatten_params(params)
  new = flatten_params(converted)
  mismatched, kept = [], set()
  for k in sorted(new):
    if k not in old or tuple(old[k].shape) == tuple(np.shape(new[k])):
      continue
    model_shape, file_shape = tuple(old[k].shape), tuple(np.shape(new[k]))
    reason = _resizable(prefix + k) if skipped is not None else None
    if reason is None:
      mismatched.append(f"{prefix}{k}: model {model_shape}, file {file_shape}")
    else:
      skipped[prefix + k] = (f"depends on {reason}: model {model_shape}, file {file_shape}; "
                             f"kept as initialised")
      kept.add(k)
  unexpected = sorted(prefix + k for k in new if k not in old)
  missing = [] if partial else sorted(prefix + k for k in old if k not in new)
  new = {k: v for k, v in new.items() if k not in kept}
  problems = _problems(mismatched, missing, unexpected)
  if problems:
    raise ValueError(f"cannot load {source} into the model's params:\n" + "\n".join(problems))

  def put(o, n):
    n = np.asarray(n, dtype=o.dtype)
    return jax.device_put(n, o.sharding) if isinstance(o, jax.Array) else n

  merged = {k: put(v, new[k]) if k in new else v for k, v in old.items()}
  return unflatten_params(merged)


def load_model_variables(path: str | os.PathLike, variables: Mapping, *,
                         return_report: bool = False) -> dict | tuple[dict, LoadReport]:
  """The whole model's variables (``params`` and ``batch_stats``) from a file.

  The file is any layout of :data:`jdet.convert.ARCHITECTURES` (converted for
  the model's class count: COCO's 91-way torchvision heads become an 80-class
  model's labels) or a jdet ``.npz``. Every variable of the model must be in
  the file with the same shape, and the file may hold nothing else, except
  for fine-tuning: the layers of :data:`RESIZABLE` (class scores, class-specific
  boxes, learned proposals) may have other shapes; they then keep the model's
  initial values. What was loaded and what was re-initialised, and why, is
  logged (INFO; a WARNING when anything was re-initialised).

  Args:
    path: ``.pth`` / ``.pt`` / ``.safetensors`` / ``.npz`` (see :func:`read_state_dict`).
    variables: the model's variables, e.g. ``model.init(...)`` (arrays or
      ``jax.ShapeDtypeStruct``); ``{"params": params}`` for a model without
      other collections.
    return_report: also return the :class:`LoadReport`.
  Returns:
    a new variables dict (collections the file does not cover are unchanged),
    and the report if ``return_report``.
  Raises:
    ValueError: a shape mismatch outside :data:`RESIZABLE` (naming the
    parameter, the model's shape and the file's), a missing or unexpected name.
  """
  source = os.fspath(path)
  state_dict = read_state_dict(path)
  model_classes = file_classes = None
  if is_jdet_state_dict(state_dict):
    name = "jdet"
    converted = convert_variables(state_dict)
    # A jdet .npz converted from torchvision's SSD COCO heads (91 category ids) still has them.
    if "params" in converted:
      converted["params"] = coco91_to_coco80(converted["params"], variables["params"])
  else:
    arch = find_architecture(state_dict)
    name = arch.name
    model_classes = arch.model_classes(variables) if arch.model_classes else None
    file_classes = arch.checkpoint_classes(state_dict) if arch.checkpoint_classes else None
    try:
      converted = arch.convert(state_dict, model_classes)
    except ValueError as e:
      if model_classes is None or file_classes is None or model_classes == file_classes:
        raise
      # Another class count than the converter can produce (e.g. 1 from COCO's 91):
      # the checkpoint's own heads, whose class layers are then re-initialised.
      log.info("%s: %s; converting its own %d classes and re-initialising the class layers",
               source, e, file_classes)
      converted = arch.convert(state_dict, None)
  out = {c: unfreeze(v) for c, v in variables.items()}
  report = LoadReport(source=source, architecture=name, file_classes=file_classes,
                      model_classes=model_classes)
  for collection, tree in converted.items():
    if collection not in variables:
      raise ValueError(f"{source} holds {collection!r} numbers, which the model does not have "
                       f"(its collections: {sorted(variables)})")
    skipped: dict[str, str] = {}
    out[collection] = merge_params(variables[collection], tree, source=f"{source} ({collection})",
                                   skipped=skipped)
    report.reinitialised.update({f"{collection}/{k}": why for k, why in sorted(skipped.items())})
    report.loaded += sorted(f"{collection}/{k}" for k in flatten_params(tree) if k not in skipped)
  (log.warning if report.reinitialised else log.info)("%s", report.summary())
  return (out, report) if return_report else out


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
