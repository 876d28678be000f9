"""The Region Proposal Network's head (Ren et al., NeurIPS 2015), shared by all FPN levels.

At every location of every level: a 3x3 conv and a ReLU, then a 1x1 conv for
one objectness logit per anchor (a sigmoid score, not a softmax over two) and
a 1x1 conv for 4 offsets per anchor. The same three convolutions run on every
level, as in torchvision's ``RPNHead`` (whose state dict names, ``conv``,
``cls_logits`` and ``bbox_pred``, these modules take).

Outputs are flattened level by level, location by location (row-major), anchor
by anchor: the order of :func:`jdet.ops.anchors.multilevel_grid_anchors` and of
torchvision's ``concat_box_prediction_layers``.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["RPNHead"]

# torchvision and MMDetection: every RPN conv drawn from N(0, 0.01^2), biases 0.
_rpn_kernel_init = nn.initializers.normal(stddev=0.01)


class RPNHead(nn.Module):
  """Objectness logits and box offsets for ``num_anchors`` anchors per location.

  Attributes:
    num_anchors: anchors per location (3 for FPN: one size, ratios 0.5, 1, 2).
    dtype: computation dtype; outputs are float32.
  """

  num_anchors: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jnp.ndarray]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``features``: per level ``[B, h_l, w_l, D]`` (same D) -> ``(logits [B, A],
    deltas [B, A, 4])`` with ``A = sum_l h_l w_l num_anchors``."""
    channels = features[0].shape[-1]
    conv = nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                   kernel_init=_rpn_kernel_init, name="conv")
    cls = nn.Conv(self.num_anchors, (1, 1), dtype=self.dtype, kernel_init=_rpn_kernel_init,
                  name="cls_logits")
    box = nn.Conv(self.num_anchors * 4, (1, 1), dtype=self.dtype, kernel_init=_rpn_kernel_init,
                  name="bbox_pred")
    logits, deltas = [], []
    for x in features:  # one set of weights for every level
      t = jax.nn.relu(conv(x))  # [B, h, w, D]
      b = x.shape[0]
      logits.append(cls(t).reshape(b, -1))  # [B, h * w * P]
      deltas.append(box(t).reshape(b, -1, 4))  # [B, h * w * P, 4]
    return (jnp.concatenate(logits, axis=1).astype(jnp.float32),
            jnp.concatenate(deltas, axis=1).astype(jnp.float32))
