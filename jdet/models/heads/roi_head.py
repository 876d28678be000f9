"""Faster R-CNN's box head: two fully connected layers, then class scores and per-class offsets.

Each RoI's pooled ``[7, 7, D]`` features are flattened and pass through
``fc6`` and ``fc7`` (1024 units, ReLU each: torchvision's ``TwoMLPHead``,
MMDetection's ``Shared2FCBBoxHead``), then ``cls_score`` gives
``num_classes + 1`` logits (background first, a softmax) and ``bbox_pred``
``(num_classes + 1) * 4`` offsets, one set per class (torchvision's
``FastRCNNPredictor``; the background's set is never trained or used).

The features are flattened in ``(h, w, c)`` order (channels last); torchvision
flattens ``(c, h, w)``, so converting its ``fc6`` permutes the rows
(:mod:`jdet.convert.faster_rcnn`).

Initialisation as MMDetection: Xavier-uniform ``fc6``/``fc7``, ``N(0, 0.01^2)``
class scores and ``N(0, 0.001^2)`` offsets, zero biases.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["RoIBoxHead"]


class RoIBoxHead(nn.Module):
  """``[..., s, s, D]`` pooled RoI features -> class logits and per-class box offsets.

  Attributes:
    num_classes: foreground classes; the head scores ``num_classes + 1``.
    representation_size: width of ``fc6`` and ``fc7`` (1024).
    dtype: computation dtype; outputs are float32.
  """

  num_classes: int
  representation_size: int = 1024
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, roi_features: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``roi_features [..., s, s, D]`` -> ``(logits [..., num_classes + 1],
    deltas [..., num_classes + 1, 4])``."""
    lead = roi_features.shape[:-3]
    x = roi_features.reshape(lead + (-1,))  # [..., s * s * D], (h, w, channel) order
    fc = lambda n, name: nn.Dense(n, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                                  name=name)
    x = jax.nn.relu(fc(self.representation_size, "fc6")(x))
    x = jax.nn.relu(fc(self.representation_size, "fc7")(x))
    k = self.num_classes + 1
    logits = nn.Dense(k, dtype=self.dtype, kernel_init=nn.initializers.normal(0.01),
                      name="cls_score")(x)
    deltas = nn.Dense(4 * k, dtype=self.dtype, kernel_init=nn.initializers.normal(0.001),
                      name="bbox_pred")(x)
    return (logits.astype(jnp.float32),
            deltas.reshape(lead + (k, 4)).astype(jnp.float32))
