"""RefineDet's transfer connection block (TCB), between its ARM and its ODM.

The TCB (Zhang et al., CVPR 2018, Fig. 2) turns the ARM's source features into
the ODM's, top-down, one block per level, as the released Caffe model
(``AddExtraLayers`` in ``examples/refinedet/VGG16_*.py``) builds it. For level
``k`` with source feature ``x_k``::

  top level:    p = relu(conv(relu(conv(relu(conv(x_k))))))         # TL_1, TL_2, P
  other levels: t = conv(relu(conv(x_k)))                           # TL_1, TL_2 (no relu)
                p = relu(conv(relu(t + deconv(p_{k+1}))))           # P{k+1}-up, Elt, P

All convolutions are 3x3, padding 1, ``width`` (256) channels; ``deconv`` is a
2x2 stride-2 transposed convolution (``width`` channels, with bias) that doubles
the higher level's resolution. The ARM and the ODM themselves are
:class:`jdet.models.heads.ssd_head.SSDHead` (2 classes on the backbone's
features; ``num_classes + 1`` on the TCB's).

When the input side is not a multiple of the coarsest stride (64), the
upsampled map can be one pixel larger or smaller than the level below; it is
then cropped or zero-padded at the bottom and right (the Caffe model only
runs at 320 and 512, where the sizes always agree).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jdet.models.initializers import xavier_conv_init

__all__ = ["TransferConnectionBlock", "fit_to"]


def fit_to(x: jnp.ndarray, size: Sequence[int]) -> jnp.ndarray:
  """``[B, h, w, c]`` cropped or zero-padded at the bottom and right to ``[B, *size, c]``."""
  h, w = size
  x = x[:, :h, :w]
  return jnp.pad(x, ((0, 0), (0, h - x.shape[1]), (0, w - x.shape[2]), (0, 0)))


class TransferConnectionBlock(nn.Module):
  """The TCBs of all levels: ARM sources in, ODM sources out.

  Attributes:
    width: channels of every TCB convolution (256).
    norm: ``"none"`` (the paper) or ``"batch"``: BatchNorm after every
      convolution and deconvolution (Caffe's ``use_batchnorm``), for the
      narrow variants trained from scratch.
    dtype: computation dtype; parameters stay float32.
  """

  width: int = 256
  norm: str = "none"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jnp.ndarray], *, train: bool = False) -> list[jnp.ndarray]:
    """``features``: per level ``[B, h_k, w_k, c_k]``, finest first -> per level
    ``[B, h_k, w_k, width]``. ``train`` updates BatchNorm statistics."""
    if self.norm not in ("none", "batch"):
      raise ValueError(f"norm must be 'none' or 'batch', got {self.norm!r}")

    def normed(layer, name):
      if self.norm == "none":
        return layer
      bn = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        dtype=self.dtype, name=f"{name}_bn")
      return lambda y: bn(layer(y))

    def conv(name):
      return normed(nn.Conv(self.width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                            kernel_init=xavier_conv_init, name=name), name)

    def deconv(name):
      return normed(nn.ConvTranspose(self.width, (2, 2), strides=(2, 2), padding="VALID",
                                     dtype=self.dtype, kernel_init=xavier_conv_init, name=name),
                    name)

    outputs: list[jnp.ndarray] = [None] * len(features)  # type: ignore[list-item]
    higher = None
    for k in reversed(range(len(features))):
      x = nn.relu(conv(f"tl{k}_1")(features[k].astype(self.dtype)))
      x = conv(f"tl{k}_2")(x)
      if higher is not None:  # lateral + upsampled top-down path, then relu
        x = x + fit_to(deconv(f"up{k}")(higher), x.shape[1:3])
      x = nn.relu(conv(f"p{k}")(nn.relu(x)))
      outputs[k] = higher = x
    return outputs
