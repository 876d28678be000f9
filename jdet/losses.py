"""Detection losses as pure functions.

Every loss takes a keyword-only ``normalizer``, with no default, so that each
call site says what it divides by (the number of positives, of sampled anchors,
of boxes ...); mixing up "mean" and "sum / num_pos" is the most common silent
bug in detection code.

* ``normalizer=None`` returns the element-wise loss (times ``weights``).
* Otherwise the result is ``sum(weights * loss) / max(normalizer, eps)``: a
  scalar. With ``normalizer = 0`` (no positives at all) and zero weights the
  result is exactly 0, never NaN.

Losses are computed in float32 whatever the dtype of the logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdet import boxes as box_lib
from jdet.boxes import as_f32  # losses are float32 whatever the network computes in

__all__ = ["smooth_l1", "l1", "giou_loss", "sigmoid_focal", "sigmoid_ce", "softmax_ce"]

_EPS = 1e-6


def _reduce(loss: jnp.ndarray, weights, normalizer) -> jnp.ndarray:
  if weights is not None:
    loss = loss * as_f32(weights)
  if normalizer is None:
    return loss
  return jnp.sum(loss) / jnp.maximum(as_f32(normalizer), _EPS)


def smooth_l1(pred, target, *, beta: float = 1.0, weights=None, normalizer) -> jnp.ndarray:
  """Smooth L1 (Huber / beta) loss, element-wise on ``[...]`` arrays.

  ``0.5 * d**2 / beta`` for ``|d| < beta``, else ``|d| - 0.5 * beta``; ``beta = 0``
  is plain L1. Faster R-CNN's RPN uses ``beta = 1/9``, SSD and R-CNN heads 1.0.
  """
  d = jnp.abs(as_f32(pred) - as_f32(target))
  if beta > 0:
    loss = jnp.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)
  else:
    loss = d
  return _reduce(loss, weights, normalizer)


def l1(pred, target, *, weights=None, normalizer) -> jnp.ndarray:
  """L1 loss, element-wise on ``[...]`` arrays."""
  d = jnp.abs(as_f32(pred) - as_f32(target))
  return _reduce(d, weights, normalizer)


def giou_loss(pred_boxes, target_boxes, *, weights=None, normalizer) -> jnp.ndarray:
  """``1 - GIoU`` of aligned xyxy boxes ``[..., 4]``; element-wise result ``[...]``.

  Degenerate pairs (zero union and enclosure) give GIoU 0, so loss 1.
  """
  loss = 1.0 - box_lib.aligned_giou(pred_boxes, target_boxes)
  return _reduce(loss, weights, normalizer)


def sigmoid_ce(logits, targets, *, weights=None, normalizer) -> jnp.ndarray:
  """Binary cross-entropy on logits, element-wise; ``targets`` in [0, 1]."""
  x = as_f32(logits)
  t = as_f32(targets)
  loss = -(t * jax.nn.log_sigmoid(x) + (1.0 - t) * jax.nn.log_sigmoid(-x))
  return _reduce(loss, weights, normalizer)


def sigmoid_focal(logits, targets, *, alpha: float = 0.25, gamma: float = 2.0,
                  weights=None, normalizer) -> jnp.ndarray:
  """Sigmoid focal loss (Lin et al. 2017), element-wise on ``[..., C]`` logits.

  Args:
    logits: ``[..., C]`` raw scores, one sigmoid per class (no background class).
    targets: ``[..., C]`` in [0, 1], one-hot of the class (all zeros for background).
    alpha: weight of positives (``1 - alpha`` for negatives); ``alpha < 0`` disables it.
    gamma: focusing exponent.
  """
  x = as_f32(logits)
  t = as_f32(targets)
  p = jax.nn.sigmoid(x)
  ce = -(t * jax.nn.log_sigmoid(x) + (1.0 - t) * jax.nn.log_sigmoid(-x))
  p_t = p * t + (1.0 - p) * (1.0 - t)
  loss = ce * (1.0 - p_t) ** gamma
  if alpha >= 0:
    loss = (alpha * t + (1.0 - alpha) * (1.0 - t)) * loss
  return _reduce(loss, weights, normalizer)


def softmax_ce(logits, labels, *, weights=None, normalizer) -> jnp.ndarray:
  """Softmax cross-entropy with integer labels.

  Args:
    logits: ``[..., C]``.
    labels: ``[...]`` int in ``0 .. C-1``. A label outside that range (e.g. -1 for
      padding or "ignore") gives a loss of exactly 0.
  Returns:
    ``[...]`` element-wise loss, or the normalised sum.
  """
  x = as_f32(logits)
  labels = jnp.asarray(labels, jnp.int32)
  num_classes = x.shape[-1]
  in_range = (labels >= 0) & (labels < num_classes)
  logp = jax.nn.log_softmax(x, axis=-1)
  picked = jnp.take_along_axis(logp, jnp.clip(labels, 0, num_classes - 1)[..., None], axis=-1)[..., 0]
  loss = jnp.where(in_range, -picked, 0.0)
  return _reduce(loss, weights, normalizer)
