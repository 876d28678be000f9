"""Fixed-shape example selection: balanced random sampling and hard negative mining.

Both functions work on one image and return boolean masks of the input's shape,
never index lists of a data-dependent length, so they compile once and batch
with ``jax.vmap`` (with one key per image for :func:`sample_balanced`).

* :func:`sample_balanced`: Faster R-CNN's random positive/negative sampling
  (RPN: 256 anchors, half positive at most; R-CNN: 512 proposals, a quarter
  positive at most), with the counts of torchvision's
  ``BalancedPositiveNegativeSampler``.
* :func:`hard_negative_mask`: SSD's hard negative mining, the negatives with the
  highest loss, ``neg_pos_ratio`` (3) of them per positive.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdet.assign.max_iou import NEGATIVE, POSITIVE

__all__ = ["sample_balanced", "hard_negative_mask"]


def _top_k_mask(priority: jnp.ndarray, k_max: int, k: jnp.ndarray) -> jnp.ndarray:
  """``[N]`` bool mask of the ``k <= k_max`` entries with the highest ``priority``.

  ``k_max`` is static and ``k`` may be traced. Ties go to the lower index.
  """
  k_max = min(k_max, priority.shape[0])
  if k_max == 0:
    return jnp.zeros(priority.shape, bool)
  _, idx = jax.lax.top_k(priority, k_max)  # [k_max], best first
  take = jnp.arange(k_max) < k  # [k_max]
  return jnp.zeros(priority.shape, bool).at[idx].set(take, unique_indices=True)


def sample_balanced(key, labels, *, num_samples: int, positive_fraction: float,
                    valid=None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Samples positives and negatives at random, at most a fraction positive (one image).

  With ``P`` positives and ``N`` negatives available (valid ones only), it picks
  ``num_pos = min(P, int(num_samples * positive_fraction))`` positives and
  ``num_neg = min(N, num_samples - num_pos)`` negatives, each set uniformly at
  random without replacement, so fewer than ``num_samples`` in all when the
  image lacks examples.

  Every candidate gets a random 30-bit priority and the highest ones are taken
  (``lax.top_k`` with the static ``num_samples``, then a mask). Equal priorities,
  which have probability about ``A**2 / 2**31`` per image, go to the lower
  index; otherwise every subset of the right size is equally likely.

  Example::

    labels = jnp.array([1, 1, 1, 0, 0, 0, 0, -1])
    pos, neg = sample_balanced(key, labels, num_samples=4, positive_fraction=0.25)
    # pos: 1 of the 3 positives, neg: 3 of the 4 negatives, index 7 never.

  Args:
    key: a PRNG key (one per image under vmap).
    labels: ``[A]`` int, ``POSITIVE`` (1), ``NEGATIVE`` (0) or ``IGNORE`` (-1),
      as from :func:`jdet.assign.max_iou.max_iou_assign`.
    num_samples: static number of examples per image (256 for the RPN, 512 for R-CNN).
    positive_fraction: static upper bound of the positive share (0.5 / 0.25).
    valid: optional ``[A]`` bool; invalid entries are never chosen.
  Returns:
    ``(pos_mask, neg_mask)``, two disjoint ``[A]`` bool masks, subsets of the
    valid positives and negatives.
  """
  labels = jnp.asarray(labels)
  positive = labels == POSITIVE  # [A]
  negative = labels == NEGATIVE  # [A]
  if valid is not None:
    valid = jnp.asarray(valid, dtype=bool)
    positive &= valid
    negative &= valid

  max_pos = int(num_samples * positive_fraction)
  num_pos = jnp.minimum(jnp.sum(positive), max_pos)  # []
  num_neg = jnp.minimum(jnp.sum(negative), num_samples - num_pos)  # []

  # One draw serves both sets: they are disjoint, so their priorities are independent.
  bits = jax.random.bits(key, labels.shape, jnp.uint32)  # [A]
  priority = (bits >> 2).astype(jnp.int32) + 1  # [A] in [1, 2**30]; 0 marks non-candidates
  pos_mask = _top_k_mask(jnp.where(positive, priority, 0), max_pos, num_pos) & positive
  neg_mask = _top_k_mask(jnp.where(negative, priority, 0), num_samples, num_neg) & negative
  return pos_mask, neg_mask


def hard_negative_mask(neg_loss, pos_mask, *, neg_pos_ratio: float = 3, valid=None,
                       min_negatives: int = 0) -> jnp.ndarray:
  """SSD's hard negative mining: the negatives with the highest loss (one image).

  The negatives are the valid entries that are not positive. With ``P``
  positives, it keeps ``k = min(max(floor(neg_pos_ratio * P), min_negatives), N)``
  of the ``N`` negatives, those with the highest ``neg_loss``; equal losses go to
  the lower index (a stable sort). An image without positives therefore gets no
  hard negatives unless ``min_negatives > 0``.

  torchvision's SSD computes the same ranks by sorting twice
  (``idx.sort()[1] < num_negative``), with two differences: its sort is not
  stable, so its ties are unspecified, and it does not cap ``k`` at ``N``, so
  an image with too few negatives also selects positives. Here ``k`` is capped
  and the mask never contains a positive or an invalid entry.

  Example::

    neg_loss = jnp.array([0.1, 0.9, 0.5, 0.7, 0.5, 2.0])
    pos_mask = jnp.array([False, False, False, False, False, True])
    hard_negative_mask(neg_loss, pos_mask, neg_pos_ratio=3)
    # -> [False, True, True, True, False, False]: losses 0.9, 0.7 and the first 0.5

  Args:
    neg_loss: ``[A]`` float, the loss of each entry as background (e.g. the
      softmax cross-entropy against class 0). Values at positives are unused.
    pos_mask: ``[A]`` bool, the positives.
    neg_pos_ratio: negatives per positive (3 in SSD).
    valid: optional ``[A]`` bool; invalid entries (e.g. ``IGNORE`` labels) are
      neither positives nor candidates.
    min_negatives: the least ``k`` before capping at ``N``, e.g. to train on
      images without objects.
  Returns:
    ``[A]`` bool mask of the chosen negatives.
  """
  neg_loss = jnp.asarray(neg_loss, jnp.float32)
  pos_mask = jnp.asarray(pos_mask, dtype=bool)
  candidate = ~pos_mask  # [A]
  if valid is not None:
    valid = jnp.asarray(valid, dtype=bool)
    pos_mask &= valid
    candidate &= valid

  num_pos = jnp.sum(pos_mask)  # []
  k = jnp.floor(neg_pos_ratio * num_pos.astype(jnp.float32)).astype(jnp.int32)
  k = jnp.maximum(k, min_negatives)  # []; masking with `candidate` below caps it at N

  # Rank: candidates first, then by descending loss, then by index (stable sort).
  index = jnp.arange(neg_loss.shape[0], dtype=jnp.int32)  # [A]
  _, _, order = jax.lax.sort((~candidate, -neg_loss, index), num_keys=2, is_stable=True)  # [A]
  rank = jnp.zeros_like(index).at[order].set(index, unique_indices=True)  # [A]
  return candidate & (rank < k)
