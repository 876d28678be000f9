"""Non-maximum suppression with fixed output shapes: greedy, class-aware and soft.

Every function here returns a fixed number ``K = max_output_size`` of indices
into its input, in descending score order, padded with ``-1``, so that it can
sit inside a jitted detector and be ``vmap``ped or sharded over a batch.

Greedy NMS (:func:`nms`, :func:`batched_nms`) is computed exactly, for every IoU
threshold, with a tiled algorithm made for accelerators:

1. Valid boxes are sorted by score (descending, ties by lower index) and padded
   to a multiple of ``tile_size`` T. (:func:`batched_nms` may instead sort by
   label, then score: see its ``group_by_label``.)
2. A ``lax.while_loop`` walks over the tiles. Each tile is first suppressed by
   the boxes already kept (a ``[T, T]`` IoU per chunk of T kept boxes), then
   suppresses itself: the greedy result inside the tile is the unique fixed
   point of ``keep = candidates & ~any(keep[a] & (iou[a, b] > thr), a < b)``,
   reached by iterating that rule (at most T times; in practice a few).
3. The tile's survivors are appended to a compact buffer of kept boxes, so
   later tiles meet only kept boxes, never suppressed ones. The loop stops as
   soon as K boxes are kept or no valid box is left.

The self-suppression uses the real threshold everywhere. (The tiled NMS of TF
Model Garden, and its ports in MLPerf and Scenic, tests ``0.5`` inside a tile
whatever the threshold, which is wrong for 0.3 and 0.45.)

IoU is computed in float32 with :func:`jdet.boxes.iou`, in the same operation
order as torchvision's CPU kernel, and compared with the threshold as that
kernel does (float32 IoU against a float64 threshold), so on valid boxes the
result equals ``torchvision.ops.nms`` / ``batched_nms`` index for index.

:func:`soft_nms` is Soft-NMS (Bodla et al. 2017, linear or Gaussian decay) as a
loop of at most K argmax-and-rescore steps, ``O(K * N)``.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jdet import boxes as box_lib

__all__ = ["nms", "batched_nms", "soft_nms", "multiclass_nms", "class_specific_nms",
           "DEFAULT_TILE_SIZE"]

# 256 boxes per tile: a [256, 256] IoU block is a good unit of work on a GPU and
# wastes little on small inputs (TF Model Garden uses 512, MLPerf 256).
DEFAULT_TILE_SIZE = 256

_INT_MAX = np.iinfo(np.int32).max


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------


def _f32_threshold(threshold: float) -> np.float32:
  """The float32 ``t`` with ``x > t`` <=> ``x > threshold`` in float64, for float32 ``x``.

  torchvision's CPU kernel compares a float32 IoU with a float64 threshold; a
  plain float32 comparison would disagree when the IoU rounds to
  ``float32(threshold)`` and that is above the float64 value (0.3 is such a case).
  For every float32 ``x``: ``x > threshold`` iff ``x > t`` with ``t`` the largest
  float32 not above ``threshold``.
  """
  t = np.float32(threshold)
  if float(t) > float(threshold):
    t = np.nextafter(t, np.float32(-np.inf))
  return t


def _check_args(iou_threshold: float, max_output_size: int, tile_size: int) -> None:
  if not isinstance(max_output_size, (int, np.integer)) or max_output_size < 0:
    raise ValueError(f"max_output_size must be a static int >= 0, got {max_output_size!r}")
  if not isinstance(tile_size, (int, np.integer)) or tile_size < 1:
    raise ValueError(f"tile_size must be a static int >= 1, got {tile_size!r}")
  if not isinstance(iou_threshold, (int, float, np.floating)) or math.isnan(iou_threshold):
    raise ValueError(f"iou_threshold must be a static float, got {iou_threshold!r}")


def _valid_mask(boxes: jnp.ndarray, scores: jnp.ndarray, labels: jnp.ndarray,
                score_thr: jnp.ndarray) -> jnp.ndarray:
  """``[N, 4]``, ``[N]``, ``[N]``, ``[]`` -> ``[N]`` bool: which boxes take part in NMS."""
  # NaN > x is false, so NaN scores are invalid too.
  return box_lib.is_valid(boxes) & (scores > -jnp.inf) & (scores > score_thr) & (labels >= 0)


def _per_image(fn, boxes: jnp.ndarray, *per_box: jnp.ndarray):
  """Applies ``fn(boxes [N, 4], *per_box [N])`` over any leading dims by ``vmap``."""
  lead = boxes.shape[:-2]
  n = boxes.shape[-2]
  if boxes.shape[-1] != 4:
    raise ValueError(f"boxes must be [..., N, 4], got {boxes.shape}")
  for x in per_box:
    if x.shape != boxes.shape[:-1]:
      raise ValueError(f"boxes {boxes.shape} and per-box array {x.shape} disagree")
  if not lead:
    return fn(boxes, *per_box)
  m = math.prod(lead)
  flat = [boxes.reshape((m, n, 4))] + [x.reshape((m, n)) for x in per_box]
  out = jax.vmap(fn)(*flat)  # [prod(lead), ...]
  return jax.tree.map(lambda y: y.reshape(lead + y.shape[1:]), out)


# ----------------------------------------------------------------------------
# The tiled greedy kernel (one image).
# ----------------------------------------------------------------------------


def _greedy_nms_single(boxes: jnp.ndarray, scores: jnp.ndarray, labels: jnp.ndarray,
                       thr: jnp.ndarray, score_thr: jnp.ndarray, *, max_output_size: int,
                       tile_size: int, group_by_label: bool) -> jnp.ndarray:
  """Exact greedy NMS of one image.

  Args:
    boxes: [N, 4] float32 xyxy.
    scores: [N] float32.
    labels: [N] int32. Boxes of different labels never suppress each other;
      labels < 0 are invalid.
    thr: [] float32 IoU threshold, from :func:`_f32_threshold`.
    score_thr: [] float32; boxes with score <= score_thr are invalid.
    group_by_label: process boxes sorted by (label, score) instead of by score.
      Then a tile is only compared with kept boxes of its own labels, which is
      much cheaper when many boxes of many classes survive, but every tile must
      be visited (no early exit at K) and the kept boxes are re-sorted by score
      at the end.
  Returns:
    [K] int32 indices into the N boxes, by descending score, padded with -1.
  """
  k_out, t = max_output_size, tile_size
  n = boxes.shape[0]
  if n == 0 or k_out == 0:
    return jnp.full((k_out,), -1, jnp.int32)

  valid = _valid_mask(boxes, scores, labels, score_thr)  # [N]
  num_valid = jnp.sum(valid, dtype=jnp.int32)

  # Sort: valid boxes first, by descending score (then by label when grouping),
  # ties by lower index. Invalid boxes go last and are never kept.
  iota = jnp.arange(n, dtype=jnp.int32)
  neg_score = jnp.where(valid, -scores, jnp.inf)
  if group_by_label:
    label_key = jnp.where(valid, labels, _INT_MAX)
    *_, order = lax.sort((label_key, neg_score, iota), num_keys=3)
  else:
    _, order = lax.sort((neg_score, iota), num_keys=2)
  num_tiles = -(-n // t)
  n_pad = num_tiles * t
  pad = n_pad - n
  # Invalid boxes are zeroed so that no NaN or inf enters the IoU.
  s_boxes = jnp.where(valid[order, None], boxes[order], 0.0)
  s_boxes = jnp.pad(s_boxes, ((0, pad), (0, 0)))  # [Np, 4]
  s_labels = jnp.pad(labels[order], (0, pad), constant_values=-1)  # [Np]
  s_index = jnp.pad(order, (0, pad), constant_values=-1)  # [Np]
  s_valid = jnp.pad(valid[order], (0, pad))  # [Np]

  # Buffer of kept boxes, in processing order. Without grouping, it holds the
  # answer itself (so it stops at K); with grouping it holds every kept box.
  cap = n_pad if group_by_label else min(k_out, n_pad)
  buf_boxes = jnp.zeros((cap + t, 4), jnp.float32)  # + t: chunk reads never clamp
  buf_labels = jnp.full((cap + t,), _INT_MAX, jnp.int32)
  buf_index = jnp.full((cap,), -1, jnp.int32)
  upper = jnp.arange(t)[:, None] < jnp.arange(t)[None, :]  # [T, T] a ranks above b

  def suppressed_by_kept(tile_boxes, tile_labels, b_boxes, b_labels, count, start):
    """[T] bool: tile boxes overlapping a kept box (slots start..count) of the same label."""
    def cond(state):
      s, _ = state
      return s < count

    def body(state):
      s, sup = state
      chunk_boxes = lax.dynamic_slice_in_dim(b_boxes, s, t)  # [T, 4]
      chunk_labels = lax.dynamic_slice_in_dim(b_labels, s, t)  # [T]
      live = (s + jnp.arange(t)) < count  # [T]
      hit = box_lib.iou(tile_boxes, chunk_boxes) > thr  # [T, T]
      hit &= (tile_labels[:, None] == chunk_labels[None, :]) & live[None, :]
      return s + t, sup | jnp.any(hit, axis=1)

    _, sup = lax.while_loop(cond, body, (start, jnp.zeros((t,), bool)))
    return sup

  def self_suppress(tile_boxes, tile_labels, candidates):
    """[T] bool: greedy NMS inside the tile, as the fixed point of one step."""
    over = box_lib.iou(tile_boxes, tile_boxes) > thr  # [T, T]
    over &= upper & (tile_labels[:, None] == tile_labels[None, :])

    def step(keep):
      # Box b survives if no kept box a above it overlaps it.
      return candidates & ~jnp.any(keep[:, None] & over, axis=0)  # [T]

    def cond(state):
      return state[1]

    def body(state):
      keep, _ = state
      new = step(keep)
      return new, jnp.any(new != keep)

    keep, _ = lax.while_loop(cond, body, (candidates, jnp.bool_(True)))
    return keep

  def tile_cond(state):
    i, count = state[0], state[1]
    return (i < num_tiles) & (count < cap) & (i * t < num_valid)

  def tile_body(state):
    i, count, b_boxes, b_labels, b_index = state
    tile_boxes = lax.dynamic_slice_in_dim(s_boxes, i * t, t)  # [T, 4]
    tile_labels = lax.dynamic_slice_in_dim(s_labels, i * t, t)  # [T]
    tile_index = lax.dynamic_slice_in_dim(s_index, i * t, t)  # [T]
    candidates = lax.dynamic_slice_in_dim(s_valid, i * t, t)  # [T]
    if group_by_label:
      # Kept boxes are sorted by label: skip those of labels below this tile's.
      start = jnp.searchsorted(b_labels, tile_labels[0], side="left").astype(jnp.int32)
      start = jnp.minimum(start, count)
    else:
      start = jnp.int32(0)
    candidates &= ~suppressed_by_kept(tile_boxes, tile_labels, b_boxes, b_labels, count, start)
    keep = self_suppress(tile_boxes, tile_labels, candidates)  # [T]
    slot = jnp.where(keep, count + jnp.cumsum(keep, dtype=jnp.int32) - 1, cap + t)  # [T]
    slot = jnp.where(slot < cap, slot, cap + t)  # past the capacity: dropped
    b_boxes = b_boxes.at[slot].set(tile_boxes, mode="drop")
    b_labels = b_labels.at[slot].set(tile_labels, mode="drop")
    b_index = b_index.at[slot].set(tile_index, mode="drop")
    count = jnp.minimum(count + jnp.sum(keep, dtype=jnp.int32), cap)
    return i + 1, count, b_boxes, b_labels, b_index

  state = (jnp.int32(0), jnp.int32(0), buf_boxes, buf_labels, buf_index)
  _, count, _, _, kept = lax.while_loop(tile_cond, tile_body, state)  # kept: [cap]

  if group_by_label:
    # Back to descending score (ties by lower index), then the first K.
    live = jnp.arange(cap) < count
    kept_score = jnp.where(live, -scores[jnp.maximum(kept, 0)], jnp.inf)
    kept_key = jnp.where(live, kept, _INT_MAX)
    _, kept = lax.sort((kept_score, kept_key), num_keys=2)
    kept = jnp.where(jnp.arange(cap) < count, kept, -1)  # [cap]
  if cap >= k_out:
    return kept[:k_out]
  return jnp.pad(kept, (0, k_out - cap), constant_values=-1)  # [K]


@functools.partial(jax.jit, static_argnames=("max_output_size", "tile_size", "group_by_label"))
def _greedy_nms(boxes, scores, labels, thr, score_thr, *, max_output_size, tile_size,
                group_by_label):
  """[..., N, 4], [..., N], [..., N] -> [..., K].

  Thresholds are traced, so one compilation serves every threshold (and the
  class-agnostic :func:`nms`, which passes labels of zeros, shares it with
  :func:`batched_nms`). Under an outer ``jit`` this is inlined.
  """
  def one(b, s, l):
    return _greedy_nms_single(b, s, l, thr, score_thr, max_output_size=max_output_size,
                              tile_size=tile_size, group_by_label=group_by_label)

  return _per_image(one, boxes, scores, labels)


def _thresholds(iou_threshold: float, score_threshold: Optional[float]):
  """Static thresholds -> float32 scalars for the traced comparisons.

  The IoU is compared as torchvision does (see :func:`_f32_threshold`), scores
  as ``scores > float32(score_threshold)``, as NumPy or torch would on float32.
  """
  score_thr = -np.inf if score_threshold is None else score_threshold
  return _f32_threshold(iou_threshold), np.float32(score_thr)


def _soft_nms_single(b, s, l, thr, sigma, score_thr, *, method, max_output_size):
  """Soft-NMS of one image: [N, 4], [N], [N] or None -> ([K] int32, [K] float32)."""
  k_out, n = max_output_size, b.shape[0]
  if n == 0 or k_out == 0:
    return jnp.full((k_out,), -1, jnp.int32), jnp.zeros((k_out,), jnp.float32)
  valid = box_lib.is_valid(b) & jnp.isfinite(s)
  if l is not None:
    valid &= l >= 0
  s = jnp.where(valid, s, -jnp.inf)  # [N]
  b = jnp.where(valid[:, None], b, 0.0)  # [N, 4]

  def cond(state):
    i, _, _, _, done = state
    return (i < k_out) & ~done

  def body(state):
    i, cur, out_idx, out_score, _ = state
    j = jnp.argmax(cur)  # first of equal maxima: lower index
    best = cur[j]
    ok = (best > -jnp.inf) & (best >= score_thr)
    out_idx = out_idx.at[i].set(jnp.where(ok, j, -1).astype(jnp.int32))
    out_score = out_score.at[i].set(jnp.where(ok, best, 0.0))
    ov = box_lib.iou(b[j][None], b)[0]  # [N]
    if method == "linear":
      decay = jnp.where(ov > thr, 1.0 - ov, 1.0)
    else:
      decay = jnp.exp(-(ov * ov) / sigma)
    hit = cur > -jnp.inf  # keep -inf out of the product (-inf * 0 is NaN)
    if l is not None:
      hit &= l == l[j]
    cur = jnp.where(hit, cur * decay, cur).at[j].set(-jnp.inf)
    return i + 1, cur, out_idx, out_score, ~ok

  state = (jnp.int32(0), s, jnp.full((k_out,), -1, jnp.int32),
           jnp.zeros((k_out,), jnp.float32), jnp.bool_(False))
  _, _, out_idx, out_score, _ = lax.while_loop(cond, body, state)
  return out_idx, out_score


@functools.partial(jax.jit, static_argnames=("method", "max_output_size"))
def _soft_nms(boxes, scores, labels, thr, sigma, score_thr, *, method, max_output_size):
  """Soft-NMS over any leading dims, thresholds traced (one compilation for all)."""
  def one(b, s, l=None):
    return _soft_nms_single(b, s, l, thr, sigma, score_thr, method=method,
                            max_output_size=max_output_size)

  if labels is None:
    return _per_image(one, boxes, scores)
  return _per_image(one, boxes, scores, labels)


# ----------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------


def nms(boxes, scores, *, iou_threshold: float, max_output_size: int,
        score_threshold: Optional[float] = None,
        tile_size: int = DEFAULT_TILE_SIZE) -> jnp.ndarray:
  """Greedy non-maximum suppression with a fixed number of outputs.

  Boxes are visited by descending score (ties: lower index first); a box is
  kept unless its IoU with an already kept box is strictly greater than
  ``iou_threshold``. On valid inputs this is ``torchvision.ops.nms`` (same set,
  same order), truncated to ``max_output_size`` and padded.

  Degenerate inputs (documented behaviour, which differs from torchvision on
  purpose): a box is *invalid* if it has zero or negative width or height
  (``x2 <= x1`` or ``y2 <= y1``, e.g. all-zero padding rows), a non-finite
  coordinate, a NaN or ``-inf`` score, or a score ``<= score_threshold``. An
  invalid box is never returned and suppresses nothing. (torchvision keeps
  zero-area boxes.) So N = 0, or all boxes invalid, gives all ``-1``; a
  ``+inf`` score is valid and ranks first.

  Args:
    boxes: [..., N, 4] xyxy (computed in float32).
    scores: [..., N].
    iou_threshold: static float; suppress when IoU > iou_threshold.
    max_output_size: static int K >= 0.
    score_threshold: static float or None; boxes with score <= it are invalid.
    tile_size: static int T, boxes per tile (see the module docstring).
  Returns:
    [..., K] int32 indices into the N boxes of each image, by descending
    score, padded with -1 after the kept boxes.
  """
  _check_args(iou_threshold, max_output_size, tile_size)
  boxes, scores = box_lib.as_f32(boxes), box_lib.as_f32(scores)
  thr, score_thr = _thresholds(iou_threshold, score_threshold)
  labels = jnp.zeros(scores.shape, jnp.int32)  # one class: nothing is masked
  return _greedy_nms(boxes, scores, labels, thr, score_thr, max_output_size=int(max_output_size),
                     tile_size=int(tile_size), group_by_label=False)


def batched_nms(boxes, scores, labels, *, iou_threshold: float, max_output_size: int,
                score_threshold: Optional[float] = None,
                tile_size: int = DEFAULT_TILE_SIZE,
                group_by_label: Optional[bool] = None) -> jnp.ndarray:
  """Class-aware greedy NMS: boxes with different labels never suppress each other.

  Same contract as :func:`nms`, and on valid inputs the same result as
  ``torchvision.ops.batched_nms`` (kept set, and order by descending score).
  Labels are compared inside the kernel (no coordinate offset per class, which
  loses float32 precision with many classes and large coordinates). A label
  ``< 0`` marks an invalid (padding) box, in addition to the rules of :func:`nms`.

  Args:
    boxes: [..., N, 4] xyxy (computed in float32).
    scores: [..., N].
    labels: [..., N] int class ids.
    iou_threshold, max_output_size, score_threshold, tile_size: as in :func:`nms`.
    group_by_label: static; visit boxes sorted by (label, score), so that each
      tile only meets kept boxes of its own classes, instead of by score with
      an early exit once K boxes are kept. The result is the same; grouping is
      faster when many boxes survive (large K), score order when K is small.
      None picks grouping when K > 4 * tile_size.
  Returns:
    [..., K] int32 indices by descending score, padded with -1.
  """
  _check_args(iou_threshold, max_output_size, tile_size)
  boxes, scores = box_lib.as_f32(boxes), box_lib.as_f32(scores)
  labels = jnp.asarray(labels).astype(jnp.int32)
  if group_by_label is None:
    group_by_label = max_output_size > 4 * tile_size
  thr, score_thr = _thresholds(iou_threshold, score_threshold)
  return _greedy_nms(boxes, scores, labels, thr, score_thr, max_output_size=int(max_output_size),
                     tile_size=int(tile_size), group_by_label=bool(group_by_label))


def soft_nms(boxes, scores, labels=None, *, iou_threshold: float = 0.3, sigma: float = 0.5,
             method: str = "linear", score_threshold: float = 0.001,
             max_output_size: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Soft-NMS (Bodla et al. 2017) with a fixed number of outputs.

  Repeatedly: take the box with the highest current score (ties: lower index),
  stop if that score is ``< score_threshold``, record it with that score, and
  decay the scores of the remaining boxes (of the same label, if ``labels``
  is given) by their IoU with it:

  * ``"linear"``: ``s *= 1 - iou`` where ``iou > iou_threshold``;
  * ``"gaussian"``: ``s *= exp(-iou**2 / sigma)`` (``iou_threshold`` unused).

  Invalid boxes (zero or negative width or height, non-finite coordinates, a
  non-finite score, a negative label) are never recorded and decay nothing.

  Args:
    boxes: [..., N, 4] xyxy (computed in float32).
    scores: [..., N].
    labels: optional [..., N] int class ids, for class-aware Soft-NMS.
    iou_threshold: static float, for the linear method.
    sigma: static float > 0, for the Gaussian method.
    method: "linear" or "gaussian".
    score_threshold: static float; boxes whose score has decayed below it are
      dropped.
    max_output_size: static int K >= 0.
  Returns:
    indices: [..., K] int32 indices into the N boxes, in pick order (so by
      descending decayed score), padded with -1.
    scores: [..., K] float32 decayed scores, padded with 0.
  """
  if method not in ("linear", "gaussian"):
    raise ValueError(f"method must be 'linear' or 'gaussian', got {method!r}")
  if method == "gaussian" and not sigma > 0:
    raise ValueError(f"sigma must be > 0, got {sigma!r}")
  _check_args(iou_threshold, max_output_size, 1)
  boxes, scores = box_lib.as_f32(boxes), box_lib.as_f32(scores)
  if labels is not None:
    labels = jnp.asarray(labels).astype(jnp.int32)
  return _soft_nms(boxes, scores, labels, _f32_threshold(iou_threshold),
                   np.float32(sigma if method == "gaussian" else 1.0), np.float32(score_threshold),
                   method=method, max_output_size=int(max_output_size))


def multiclass_nms(boxes, scores, *, score_threshold: float, pre_nms_top_k: int,
                   iou_threshold: float, max_detections: int,
                   tile_size: int = DEFAULT_TILE_SIZE):
  """Per-class NMS over class-agnostic boxes (SSD's and RefineDet's post-processing).

  For each class: the boxes scoring ``> score_threshold`` for it, the
  ``pre_nms_top_k`` best of them, greedy NMS at ``iou_threshold``; then the
  ``max_detections`` best survivors over all classes. This is torchvision's
  ``SSD.postprocess_detections`` (its ``topk_candidates`` is ``pre_nms_top_k``,
  its ``batched_nms`` equals per-class NMS) with fixed shapes: classes run as a
  batch of ``[pre_nms_top_k]`` NMS problems, so the cost does not grow with the
  number of candidates that pass the threshold.

  Args:
    boxes: ``[..., A, 4]`` xyxy, shared by all classes.
    scores: ``[..., A, C]`` per-class scores (foreground only; no background column).
    score_threshold: keep scores strictly above it.
    pre_nms_top_k: candidates per class before NMS.
    iou_threshold: NMS threshold (suppress when IoU > it).
    max_detections: K, detections per image.
  Returns:
    ``(indices [..., K] int32 into A or -1, scores [..., K] float32 (0 where
    padded), labels [..., K] int32 class in 0..C-1 (-1 where padded))``, by
    descending score.
  """
  boxes, scores = box_lib.as_f32(boxes), box_lib.as_f32(scores)
  num_anchors = scores.shape[-2]
  k = min(int(pre_nms_top_k), num_anchors)
  top_scores, top_idx = lax.top_k(jnp.swapaxes(scores, -1, -2), k)  # [..., C, k]
  top_scores = jnp.where(top_scores > score_threshold, top_scores, -jnp.inf)
  top_boxes = jnp.take_along_axis(boxes[..., None, :, :], top_idx[..., None], axis=-2)  # [..., C, k, 4]
  pos, out_scores, labels, valid = _nms_per_class_then_best(
      top_boxes, top_scores, iou_threshold=iou_threshold, max_detections=max_detections,
      tile_size=tile_size)
  flat_anchor = top_idx.reshape(top_idx.shape[:-2] + (-1,))  # [..., C * k]
  indices = jnp.where(valid, jnp.take_along_axis(flat_anchor, pos, -1), -1)
  return indices.astype(jnp.int32), out_scores, labels


def class_specific_nms(boxes, scores, *, iou_threshold: float, max_detections: int,
                       pre_nms_top_k: int | None = None, tile_size: int = DEFAULT_TILE_SIZE):
  """Per-class NMS over class-specific boxes (the R-CNN heads' post-processing).

  For each class: its candidates' own boxes, the ``pre_nms_top_k`` best
  (``None``: all), greedy NMS at ``iou_threshold``; then the
  ``max_detections`` best survivors over all classes (torchvision's
  ``RoIHeads.postprocess_detections`` with fixed shapes).

  Args:
    boxes: ``[..., N, C, 4]`` xyxy, one box per candidate and class.
    scores: ``[..., N, C]``; a candidate that must not be kept scores ``-inf``.
  Returns:
    ``(boxes [..., K, 4], scores [..., K], labels [..., K] int32, valid [..., K] bool)``
    by descending score; padded rows are zero boxes, score 0, label -1.
  """
  boxes, scores = box_lib.as_f32(boxes), box_lib.as_f32(scores)
  n = scores.shape[-2]
  k = n if pre_nms_top_k is None else min(int(pre_nms_top_k), n)
  top_scores, top_idx = lax.top_k(jnp.swapaxes(scores, -1, -2), k)  # [..., C, k]
  class_boxes = jnp.swapaxes(boxes, -3, -2)  # [..., C, N, 4]
  top_boxes = jnp.take_along_axis(class_boxes, top_idx[..., None], axis=-2)  # [..., C, k, 4]
  pos, out_scores, labels, valid = _nms_per_class_then_best(
      top_boxes, top_scores, iou_threshold=iou_threshold, max_detections=max_detections,
      tile_size=tile_size)
  flat_boxes = top_boxes.reshape(top_boxes.shape[:-3] + (-1, 4))  # [..., C * k, 4]
  out_boxes = jnp.take_along_axis(flat_boxes, pos[..., None], axis=-2)
  return jnp.where(valid[..., None], out_boxes, 0.0), out_scores, labels, valid


def _nms_per_class_then_best(top_boxes, top_scores, *, iou_threshold: float, max_detections: int,
                             tile_size: int):
  """NMS within each class of ``top_boxes [..., C, k, 4]`` (scores ``[..., C, k]``,
  ``-inf`` for none), then the ``max_detections`` best survivors over all classes.

  Returns ``(pos [..., K] into the flattened C * k (0 where padded), scores [..., K]
  (0 where padded), labels [..., K] (-1 where padded), valid [..., K])``; ties go to
  the lower class, then the higher score rank.
  """
  num_classes, k = top_scores.shape[-2:]
  keep = nms(top_boxes, top_scores, iou_threshold=iou_threshold, max_output_size=k,
             tile_size=min(int(tile_size), max(k, 1)))  # [..., C, k] into k
  safe = jnp.maximum(keep, 0)
  kept_scores = jnp.where(keep >= 0, jnp.take_along_axis(top_scores, safe, -1), -jnp.inf)
  # Position of each kept candidate in the flattened [C * k] top-k arrays.
  kept_pos = safe + jnp.arange(num_classes, dtype=safe.dtype)[:, None] * k
  flat_scores = kept_scores.reshape(kept_scores.shape[:-2] + (num_classes * k,))
  flat_pos = kept_pos.reshape(flat_scores.shape)
  n_out = min(int(max_detections), num_classes * k)
  out_scores, pos = lax.top_k(flat_scores, n_out)
  valid = jnp.isfinite(out_scores)
  labels = jnp.where(valid, (pos // k).astype(jnp.int32), -1)
  pos = jnp.where(valid, jnp.take_along_axis(flat_pos, pos, -1), 0)
  out_scores = jnp.where(valid, out_scores, 0.0)
  if n_out < max_detections:  # fewer candidates than K in all: pad
    pad = [(0, 0)] * (pos.ndim - 1) + [(0, int(max_detections) - n_out)]
    pos, out_scores = jnp.pad(pos, pad), jnp.pad(out_scores, pad)
    labels = jnp.pad(labels, pad, constant_values=-1)
    valid = jnp.pad(valid, pad)
  return pos, out_scores, labels, valid
