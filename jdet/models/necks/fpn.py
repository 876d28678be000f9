"""Feature Pyramid Network (Lin et al., CVPR 2017), as torchvision's ``FeaturePyramidNetwork``.

For input maps ``C_0 .. C_{n-1}`` (finest first, e.g. ResNet's C2..C5)::

  inner_i = inner_block{i}(C_i)                                 1x1 conv, out_channels
  top     = inner_{n-1};  for i = n-2 .. 0:  top = inner_i + upsample(top to inner_i's size)
  P_i     = layer_block{i}(top at level i)                      3x3 conv (pad 1)

then ``num_extra`` coarser levels (``extra``):

* ``"maxpool"``: each level is the previous one subsampled with a 1x1 max pool
  of stride 2 (torchvision's ``LastLevelMaxPool``, Faster R-CNN's P6);
* ``"p6p7"``: 3x3 stride-2 convolutions ``p6``, ``p7``, ... (RetinaNet's
  P6/P7, torchvision's ``LastLevelP6P7``): the first reads P5
  (``extra_input="p5"``) or C5 (``"c5"``), each later one ReLU of the
  previous extra level;
* ``"none"``: no extra level.

The upsampling is nearest neighbour to the exact size of the finer lateral,
with PyTorch's index rule ``src = min(floor(dst * in / out), in - 1)``
(``F.interpolate(mode="nearest", size=...)``), so odd sizes (13 -> 25) pick
the same pixels as torchvision. Convolutions have biases and torchvision's
initialisation (``kaiming_uniform_(a=1)``, zero bias).

Params (torchvision name on the right, under ``fpn.``)::

  inner_block{i}/{kernel,bias}    inner_blocks.{i}.0.{weight,bias}
  layer_block{i}/{kernel,bias}    layer_blocks.{i}.0.{weight,bias}
  p6/, p7/                        extra_blocks.p6, extra_blocks.p7
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

__all__ = ["FPN", "EXTRAS", "fpn_conv_init", "resize_nearest"]

EXTRAS = ("maxpool", "p6p7", "none")

# torchvision's FPN init: kaiming_uniform_(a=1), i.e. uniform with variance 1 / fan_in.
fpn_conv_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """PyTorch's ``nearest`` source index of each output pixel (float32 scale, as ATen)."""
  if in_size == out_size:
    return np.arange(out_size)
  if out_size == 2 * in_size:
    return np.arange(out_size) // 2
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1)


def resize_nearest(x: jnp.ndarray, size: Sequence[int]) -> jnp.ndarray:
  """``x: [B, h, w, D]`` -> ``[B, H, W, D]`` by PyTorch's ``F.interpolate(x, size=(H, W),
  mode="nearest")`` (static gathers; ``size`` is static)."""
  rows = _nearest_indices(x.shape[1], int(size[0]))
  cols = _nearest_indices(x.shape[2], int(size[1]))
  return x[:, rows][:, :, cols]


class FPN(nn.Module):
  """Top-down feature pyramid with lateral connections.

  Attributes:
    out_channels: channels of every output level (256).
    extra: ``"maxpool"`` (Faster R-CNN), ``"p6p7"`` (RetinaNet) or ``"none"``.
    num_extra: number of extra levels after the last input level (1: P6).
    extra_input: for ``"p6p7"``, whether the first extra conv reads ``"p5"``
      (the last output level; torchvision when C5 and P5 have the same
      channels) or ``"c5"`` (the last input map; torchvision otherwise,
      MMDetection's ``add_extra_convs="on_input"``).
    dtype: computation dtype; parameters stay float32.
  """

  out_channels: int = 256
  extra: str = "maxpool"
  num_extra: int = 1
  extra_input: str = "p5"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jnp.ndarray]) -> list[jnp.ndarray]:
    """``features``: ``[B, h_i, w_i, c_i]`` maps, finest first (strides 4, 8, 16, 32 for
    C2..C5) -> ``[P2, P3, P4, P5, P6]``: the same sizes with ``out_channels`` each, then
    ``num_extra`` levels each ``ceil(h / 2)`` of the one before (stride 64, ...)."""
    if self.extra not in EXTRAS:
      raise ValueError(f"extra must be one of {EXTRAS}, got {self.extra!r}")
    if self.extra_input not in ("p5", "c5"):
      raise ValueError(f"extra_input must be 'p5' or 'c5', got {self.extra_input!r}")
    if not features:
      raise ValueError("FPN needs at least one feature map")

    def conv(kernel: int, stride: int, name: str) -> nn.Conv:
      pad = kernel // 2
      return nn.Conv(self.out_channels, (kernel, kernel), strides=(stride, stride),
                     padding=((pad, pad), (pad, pad)), dtype=self.dtype,
                     kernel_init=fpn_conv_init, name=name)

    features = [f.astype(self.dtype) for f in features]
    n = len(features)
    top = conv(1, 1, f"inner_block{n - 1}")(features[-1])
    outputs = [conv(3, 1, f"layer_block{n - 1}")(top)]
    for i in range(n - 2, -1, -1):
      lateral = conv(1, 1, f"inner_block{i}")(features[i])  # [B, h_i, w_i, out]
      top = lateral + resize_nearest(top, lateral.shape[1:3])
      outputs.insert(0, conv(3, 1, f"layer_block{i}")(top))

    if self.extra == "maxpool":
      for _ in range(self.num_extra):
        outputs.append(outputs[-1][:, ::2, ::2])  # max_pool2d(kernel 1, stride 2)
    elif self.extra == "p6p7":
      x = outputs[-1] if self.extra_input == "p5" else features[-1]
      for k in range(self.num_extra):
        x = conv(3, 2, f"p{6 + k}")(x if k == 0 else nn.relu(x))
        outputs.append(x)
    return outputs
