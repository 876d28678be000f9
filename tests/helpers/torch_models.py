"""torch references: torchvision ResNets with random norms, layout changes, state
dicts as NumPy (torch is imported on first use)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
  import torch


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Draws every norm layer's affine (and BatchNorm's running statistics) at random, in place."""
  import torch

  g = torch.Generator().manual_seed(seed)
  uniform = lambda t, lo, hi: t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
  with torch.no_grad():
    for m in model.modules():
      if hasattr(m, "running_var") and hasattr(m, "weight"):  # BatchNorm2d, FrozenBatchNorm2d
        uniform(m.running_mean, -0.5, 0.5)
        uniform(m.running_var, 0.5, 2.0)
      if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)) or hasattr(m, "running_var"):
        uniform(m.weight, 0.5, 1.5)
        uniform(m.bias, -0.5, 0.5)
  return model


def torch_resnet(depth: int, *, seed: int = 0, **kwargs) -> torch.nn.Module:
  """torchvision's ``resnet{depth}(weights=None)`` (18, 34 or 50) in eval mode, random norms."""
  import torch
  import torchvision

  torch.manual_seed(seed)
  make = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34,
          50: torchvision.models.resnet50}[depth]
  return randomize_norms(make(weights=None, **kwargs), seed).eval()


def to_nchw(x: np.ndarray) -> torch.Tensor:
  import torch

  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def to_nhwc(x: torch.Tensor) -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1)


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
  """Copies: ``Tensor.numpy()`` shares memory, and torch's train mode updates buffers in place."""
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
