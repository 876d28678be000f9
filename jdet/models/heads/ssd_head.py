"""SSD's prediction head: one 3x3 conv per level for class scores and one for box offsets.

At every location of level ``k`` there are ``P_k`` default boxes; the class
conv has ``P_k * num_scores`` output channels (SSD: ``num_scores = C + 1``,
background first) and
the box conv ``P_k * 4``. Outputs are flattened level by level, location by
location (row-major), box by box: the order of
:func:`jdet.ops.anchors.ssd_default_boxes` and of torchvision's ``SSDHead``.
RefineDet's ARM and ODM are this head with other class counts.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jdet.models.initializers import xavier_conv_init

__all__ = ["SSDHead", "flatten_level"]


def flatten_level(x: jnp.ndarray, num_columns: int) -> jnp.ndarray:
  """``[B, h, w, P * num_columns]`` -> ``[B, h * w * P, num_columns]``."""
  return x.reshape(x.shape[0], -1, num_columns)


class SSDHead(nn.Module):
  """Per-level class and box convolutions.

  Attributes:
    num_scores: class scores per box, background included (``C + 1`` for
      SSD and RefineDet's ODM, 2 for RefineDet's ARM).
    boxes_per_location: ``P_k`` for each level.
    dtype: computation dtype; outputs are float32.
  """

  num_scores: int
  boxes_per_location: Sequence[int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jnp.ndarray]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``features``: per level ``[B, h_k, w_k, c_k]`` -> ``(logits [B, A, num_scores],
    deltas [B, A, 4])`` with ``A = sum_k h_k w_k P_k``."""
    if len(features) != len(self.boxes_per_location):
      raise ValueError(f"{len(features)} feature levels but boxes_per_location has "
                       f"{len(self.boxes_per_location)} entries")
    logits, deltas = [], []
    for k, (x, p) in enumerate(zip(features, self.boxes_per_location)):
      conv = lambda n, name: nn.Conv(n, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                                     kernel_init=xavier_conv_init, name=name)
      logits.append(flatten_level(conv(p * self.num_scores, f"cls_{k}")(x), self.num_scores))
      deltas.append(flatten_level(conv(p * 4, f"box_{k}")(x), 4))
    return (jnp.concatenate(logits, axis=1).astype(jnp.float32),
            jnp.concatenate(deltas, axis=1).astype(jnp.float32))
