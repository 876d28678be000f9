"""The fixed-size detections that every detector's ``predict`` returns."""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp


@flax.struct.dataclass
class Detections:
  """Up to K detections per image, padded to exactly K.

  Attributes:
    boxes: ``[B, K, 4]`` float32 ``[x1, y1, x2, y2]`` in original-image pixels.
    scores: ``[B, K]`` float32, descending within each image; 0 where padded.
    labels: ``[B, K]`` int32 class ids as in the data (no background); -1 where padded.
    valid: ``[B, K]`` bool; False where padded.
  """

  boxes: jnp.ndarray
  scores: jnp.ndarray
  labels: jnp.ndarray
  valid: jnp.ndarray

  @classmethod
  def empty(cls, batch: int, k: int) -> "Detections":
    """All-padding detections of shape ``[batch, k]``."""
    return cls(boxes=jnp.zeros((batch, k, 4), jnp.float32), scores=jnp.zeros((batch, k), jnp.float32),
               labels=jnp.full((batch, k), -1, jnp.int32), valid=jnp.zeros((batch, k), bool))
