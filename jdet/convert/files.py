"""Checkpoint files -> flat ``{name: np.ndarray}`` dicts, and jdet trees <-> ``.npz``.

* :func:`read_state_dict`: a torch state dict (``.pth`` / ``.pt``, read with
  ``torch.load(..., weights_only=True)``, so no arbitrary object is ever
  unpickled; ``{"state_dict": ...}`` and ``{"model": ...}`` wrappers and a
  DataParallel ``module.`` prefix are removed), ``.safetensors``, or ``.npz``
  (``allow_pickle=False``).
* :func:`save_params_npz` / :func:`load_params_npz`: a nested jdet tree (params,
  or variables ``{"params", "batch_stats"}``) as an ``.npz`` of ``/``-joined
  names (``backbone/conv4_3/kernel``, ``batch_stats/backbone/bn1/mean``).
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

__all__ = ["read_state_dict", "flatten_params", "unflatten_params", "save_params_npz",
           "load_params_npz", "is_jdet_state_dict", "listing"]

_WRAPPERS = ("state_dict", "model")
SEP = "/"


def listing(names: list[str], limit: int = 20) -> str:
  """``"a, b, c ... and 7 more"``: names for an error message."""
  more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


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


def flatten_params(tree: Mapping) -> dict[str, Any]:
  """A nested tree -> ``{"backbone/conv1_1/kernel": array, ...}``."""
  return traverse_util.flatten_dict(unfreeze(tree), sep=SEP)


def unflatten_params(flat: Mapping[str, Any]) -> dict:
  """Inverse of :func:`flatten_params`."""
  return traverse_util.unflatten_dict({tuple(k.split(SEP)): v for k, v in flat.items()})


def is_jdet_state_dict(state_dict: Mapping[str, Any]) -> bool:
  """Whether the names are jdet's ``/``-joined paths (a file of :func:`save_params_npz`)."""
  return any(SEP in k for k in state_dict)


def save_params_npz(path: str | os.PathLike, tree: Mapping) -> None:
  """Writes a tree (params or variables) as an ``.npz`` of ``/``-joined names (exactly ``path``)."""
  flat = {k: np.asarray(jax.device_get(v)) for k, v in flatten_params(tree).items()}
  with open(path, "wb") as fh:  # a file object: np.savez would append ".npz" to a name
    np.savez(fh, **flat)


def load_params_npz(path: str | os.PathLike) -> dict:
  """Reads :func:`save_params_npz`'s file -> the nested tree of ``np.ndarray``."""
  return unflatten_params(read_state_dict(path))
