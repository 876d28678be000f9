"""Detector inputs and steps the model tests share: a predict batch with resized, filler and
padded images; the loss with its gradient."""

from __future__ import annotations

import jax
import numpy as np


def resized_filler_padded_batch(images: np.ndarray) -> dict:
  """A batch of 4 images ``[4, s, s, 3]`` as ``predict`` sees them: (0) the input is the
  original image, (1) resized from a ``2s x 4s`` original with ``(sy, sx) = (0.5, 0.25)``,
  (2) a filler image, (3) a 40 x 50 image padded to the input size."""
  s = images.shape[1]
  return {
      "image": images,
      "image_size": np.array([[s, s], [s, s], [s, s], [40, 50]], np.int32),
      "orig_size": np.array([[s, s], [2 * s, 4 * s], [s, s], [40, 50]], np.int32),
      "scale_factor": np.array([[1.0, 1.0], [0.5, 0.25], [1.0, 1.0], [1.0, 1.0]], np.float32),
      "valid": np.array([True, True, False, True]),
  }


def loss_value_and_grad(model, variables: dict, params, batch: dict):
  """``((loss, metrics), grads)`` of ``model.loss`` on ``batch`` at ``params`` (the other
  collections from ``variables``; the updated BatchNorm statistics are dropped)."""
  def f(p):
    (loss, metrics), _ = model.apply({**variables, "params": p}, batch, method="loss",
                                     mutable=["batch_stats"])
    return loss, metrics
  return jax.value_and_grad(f, has_aux=True)(params)
