"""Test-time augmentation (TTA) for single-stage detectors: several input sizes, flips, one merge.

The recipe of RefineDet's multi-scale testing (Zhang et al., CVPR 2018), for
any detector with the two methods

* ``candidates(batch) -> (boxes [B, A, 4], scores [B, A, C])``: every anchor
  decoded before NMS, boxes in input pixels clipped to the image, scores the
  foreground probabilities;
* ``at_input_size(side)``: the same module (same variables) for a
  ``side x side`` input;

and the fields ``image_size``, ``score_threshold``, ``pre_nms_top_k``,
``nms_threshold`` and ``max_detections`` (SSD, RefineDet).

1. **Passes.** Each scale ``f`` of :class:`TTASettings` gives an input side
   ``round(f * image_size)``; the batch's square image is resized to it on the
   device (bilinear, like the data pipeline's ``cv2.INTER_LINEAR``) and, with
   ``flip``, also mirrored. A side below the model's own is placed top-left on
   a canvas of the model's side filled with the mean pixel (0 after
   normalisation), as SSD's zoom-out augmentation does in training, so a
   shrunk pass never needs feature maps the network cannot make. Each pass's
   boxes are mapped back to the batch's input pixels (mirrored back for
   flipped passes).
2. **Size ranges.** A pass keeps only boxes whose size ``sqrt(w * h)`` in
   original-image pixels lies in its ``[min, max)``: enlarged inputs are good
   at small objects and poor at large ones, shrunk inputs the reverse. The
   rest get score ``-inf`` (a mask, not a removal).
3. **Per-pass candidates.** Per class, the ``pre_nms_top_k`` best boxes
   scoring above ``score_threshold``; with ``scale_nms``, reduced by the
   pass's own NMS to at most ``max_detections`` (RefineDet merges each
   scale's *detections*).
4. **Merge.** All passes' candidates are concatenated per class and reduced
   by per-class NMS to the ``max_detections`` best over all classes; with
   ``merge="vote"`` each kept box is then replaced by the score-weighted mean
   of the candidates of its class that overlap it with IoU ``>=
   vote_threshold`` (box voting, Gidaris & Komodakis 2015; the kept score
   stays). RefineDet's own voting assigns each candidate to the first kept
   box it overlaps only; here a candidate overlapping two kept boxes votes
   for both, which differs only when two kept boxes share a neighbour.

Every shape is static: a scale is one jitted function (both flips inside),
compiled once; the merge is one more. :func:`make_tta_predict_fn` returns a
``(variables, batch) -> Detections`` function for
:func:`jdet.evaluation.loop.evaluate_split`; :func:`tta_data_config` makes the
evaluation pipeline resize to the largest side, so enlarged passes see the
original image's detail rather than an upsampled copy of the base input.

The default settings are RefineDet320's VOC recipe without its non-square
pass: sides 0.6x to 1.8x with flips; the 0.6x pass keeps boxes of at least 32
pixels, the 1.2x, 1.4x, 1.6x, 1.8x passes boxes under 160, 128, 96, 64
pixels (RefineDet thresholds the longer side of shrunk boxes and the shorter
side of enlarged ones; here both use ``sqrt(w * h)``). The thresholds are in
original pixels, tuned for VOC/COCO-sized images (about 500 pixels): other
datasets should set their own ``size_ranges``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from jdet import boxes as box_lib
from jdet.detections import Detections
from jdet.models.detector import (finalize_detections, real_image_sizes, supports_tta,
                                  to_original_pixels)
from jdet.ops.nms import DEFAULT_TILE_SIZE, nms

__all__ = ["tta_setup", "TTASettings", "default_settings", "make_tta_predict_fn", "scale_candidates",
           "merge_candidates", "tta_data_config", "MERGES"]

MERGES = ("nms", "vote")

_INF = float("inf")

# RefineDet320's multi-scale recipe: scale factors and the [min, max) box size
# (sqrt of the area, original pixels) each keeps.
_RECIPE_SCALES = (0.6, 1.0, 1.2, 1.4, 1.6, 1.8)
_RECIPE_RANGES = ((32.0, _INF), (0.0, _INF), (0.0, 160.0), (0.0, 128.0), (0.0, 96.0),
                  (0.0, 64.0))

# What the model supplies when a setting is None: setting -> model field.
_FROM_MODEL = dict(base_size="image_size", iou_threshold="nms_threshold",
                   score_threshold="score_threshold", pre_nms_top_k="pre_nms_top_k",
                   max_detections="max_detections")


@dataclasses.dataclass(frozen=True)
class TTASettings:
  """What :func:`make_tta_predict_fn` runs. ``None`` means: the model's own value.

  Attributes:
    scales: factors of the model's input side, one pass (two with ``flip``) each.
    flip: also run every scale on the horizontally mirrored image.
    size_ranges: per scale ``(min, max)``: boxes of that scale are kept if
      ``min <= sqrt(w * h) < max`` in original-image pixels; ``max`` None or
      inf is unbounded; None keeps every box of every scale.
    merge: ``"nms"`` (per-class NMS) or ``"vote"`` (NMS, then box voting).
    iou_threshold: the merge's NMS threshold (the model's ``nms_threshold``).
    vote_threshold: IoU with a kept box from which a candidate votes
      (default ``iou_threshold``, as RefineDet).
    scale_nms: each pass's candidates go through that pass's own per-class NMS
      (at ``iou_threshold``) before the merge, keeping at most
      ``max_detections`` per class: the pass's own detections, as RefineDet
      merges them (and a smaller pool to merge).
    score_threshold: candidates must score above it (the model's).
    pre_nms_top_k: candidates per class and pass (the model's).
    max_detections: K, detections per image (the model's).
    base_size: the model's input side that ``scales`` multiply (the model's
      ``image_size``).
  """

  scales: tuple[float, ...] = _RECIPE_SCALES
  flip: bool = True
  size_ranges: tuple[tuple[float, float], ...] | None = _RECIPE_RANGES
  merge: str = "nms"
  iou_threshold: float | None = None
  vote_threshold: float | None = None
  scale_nms: bool = True
  score_threshold: float | None = None
  pre_nms_top_k: int | None = None
  max_detections: int | None = None
  base_size: int | None = None

  def __post_init__(self):
    scales = tuple(float(s) for s in self.scales)
    if not scales or any(not s > 0 for s in scales):
      raise ValueError(f"TTA scales must be positive factors, got {self.scales!r}")
    ranges = self.size_ranges
    if ranges is None:
      ranges = ((0.0, _INF),) * len(scales)
    ranges = tuple((float(lo or 0.0), _INF if hi is None else float(hi)) for lo, hi in ranges)
    if len(ranges) != len(scales):
      raise ValueError(f"TTA size_ranges has {len(ranges)} entries for {len(scales)} scales")
    for lo, hi in ranges:
      if not 0 <= lo < hi:
        raise ValueError(f"TTA size range ({lo}, {hi}) is empty or negative")
    if self.merge not in MERGES:
      raise ValueError(f"TTA merge must be one of {MERGES}, got {self.merge!r}")
    object.__setattr__(self, "scales", scales)
    object.__setattr__(self, "size_ranges", ranges)
    object.__setattr__(self, "flip", bool(self.flip))
    object.__setattr__(self, "scale_nms", bool(self.scale_nms))

  @classmethod
  def from_config(cls, config: Mapping[str, Any] | None) -> "TTASettings":
    """Settings from a config's ``tta`` section (see :func:`default_settings`):
    missing fields keep their defaults; no section gives the defaults."""
    if config is None:
      return cls()
    values = dict(config.items())
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown TTA settings {sorted(unknown)}")
    return cls(**values)

  def resolve(self, model) -> "TTASettings":
    """These settings with every None filled in from ``model``'s fields."""
    filled = {}
    for name, field in _FROM_MODEL.items():
      if getattr(self, name) is None:
        if not hasattr(model, field):
          raise ValueError(f"{type(model).__name__} has no `{field}`: set the TTA setting "
                           f"`{name}` (config.tta.{name})")
        filled[name] = getattr(model, field)
    out = dataclasses.replace(self, **filled)
    if out.vote_threshold is None:
      out = dataclasses.replace(out, vote_threshold=out.iou_threshold)
    return out

  def sides(self) -> tuple[int, ...]:
    """The input side of each scale: ``round(scale * base_size)`` (needs ``base_size``)."""
    if self.base_size is None:
      raise ValueError("TTA settings without base_size: call resolve(model) first")
    return tuple(max(1, int(math.floor(s * self.base_size + 0.5))) for s in self.scales)

  def to_dict(self) -> dict[str, Any]:
    """Plain values for JSON (unbounded range ends as None), with the sides if known."""
    out = dataclasses.asdict(self)
    out["scales"] = list(self.scales)
    out["size_ranges"] = [[lo, None if math.isinf(hi) else hi] for lo, hi in self.size_ranges]
    if self.base_size is not None:
      out["sides"] = list(self.sides())
    return out

  def describe(self) -> str:
    """One line for people: ``sides 192, 320 with flips, merged by per-class NMS at IoU 0.45``."""
    sizes = (", ".join(str(s) for s in self.sides()) if self.base_size is not None
             else ", ".join(f"{s:g}x" for s in self.scales))
    at = "" if self.iou_threshold is None else f" at IoU {self.iou_threshold:g}"
    how = f"per-class NMS{at}"
    if self.merge == "vote":
      vote = self.iou_threshold if self.vote_threshold is None else self.vote_threshold
      how += " and box voting" + ("" if vote is None else f" at IoU {vote:g}")
    word = "sides" if self.base_size is not None else "scales"
    return f"{word} {sizes}{' with flips' if self.flip else ''}, merged by {how}"


def default_settings() -> ml_collections.ConfigDict:
  """A config's ``tta`` section with the defaults of :class:`TTASettings`.

  Fields that default to the model's own value are typed placeholders, so
  ``--config.tta.iou_threshold=0.5`` works on the command line; an
  unbounded range end is None (``--config.tta.size_ranges="((0, None), (0, 64))"``).
  """
  d = TTASettings()
  ph = ml_collections.config_dict.placeholder
  return ml_collections.ConfigDict(dict(
      scales=d.scales, flip=d.flip,
      size_ranges=tuple((lo, None if math.isinf(hi) else hi) for lo, hi in d.size_ranges),
      merge=d.merge, iou_threshold=ph(float), vote_threshold=ph(float), scale_nms=d.scale_nms,
      score_threshold=ph(float), pre_nms_top_k=ph(int), max_detections=ph(int),
      base_size=ph(int)))


def tta_data_config(data_config, settings: TTASettings):
  """``data_config`` with evaluation images resized to the largest TTA side.

  Every pass then resizes down (or not at all) from an image resized once
  from the original, instead of up from the model's input. Needs the
  ``"ssd"`` transforms recipe (a square resize that the image fills: flips
  mirror the whole input).
  """
  if data_config.transforms.recipe != "ssd":
    raise ValueError(f"test-time augmentation needs the square-resize 'ssd' transforms recipe, "
                     f"not {data_config.transforms.recipe!r}")
  out = data_config.copy_and_resolve_references()
  with out.unlocked():
    out.transforms.size = max(settings.sides())
  return out


# ----------------------------------------------------------------------------
# One scale.
# ----------------------------------------------------------------------------


def _resize_square(image, side: int):
  """``[B, S, S, ch]`` -> ``[B, side, side, ch]``, bilinear without antialiasing."""
  b, h, w, ch = image.shape
  if (h, w) == (side, side):
    return image
  return jax.image.resize(image, (b, side, side, ch), method="bilinear", antialias=False)


def _gather_kept(boxes, scores, keep):
  """Boxes ``[..., N, 4]``, scores ``[..., N]`` at NMS indices ``keep [..., K]`` (-1: -inf)."""
  idx = jnp.maximum(keep, 0)
  kept_boxes = jnp.take_along_axis(boxes, idx[..., None], axis=-2)
  kept_scores = jnp.where(keep >= 0, jnp.take_along_axis(scores, idx, axis=-1), -jnp.inf)
  return kept_boxes, kept_scores


def scale_candidates(model, variables, batch, *, side: int, flips: Sequence[bool] = (False,),
                     size_range: tuple[float, float] = (0.0, _INF), score_threshold: float,
                     pre_nms_top_k: int, nms_threshold: float | None = None,
                     keep_top_k: int | None = None):
  """The candidates of one scale: ``model`` run on ``batch``'s image resized to ``side``.

  Args:
    model: a detector with ``candidates`` and ``at_input_size`` (see the module docstring).
    variables: its variables.
    batch: ``image [B, S, S, 3]`` (the image fills it), ``image_size``,
      ``scale_factor``, ``orig_size`` (see :mod:`jdet.data.pipeline`).
    side: the pass's input side; below ``model.image_size`` the resized image
      lies top-left on a ``model.image_size`` canvas of zeros (the mean pixel).
    flips: run unmirrored (False) and/or mirrored (True); concatenated in this order.
    size_range: ``(min, max)``: only boxes with ``min <= sqrt(w * h) < max`` in
      original pixels count.
    score_threshold: candidates score above it; the others get ``-inf``.
    pre_nms_top_k: k, candidates per class and flip.
    nms_threshold: if given, each flip's candidates go through per-class NMS
      at it (the pass's own detections).
    keep_top_k: with ``nms_threshold``, at most this many survivors per class
      and flip (default k).
  Returns:
    ``(boxes [B, C, F * k', 4]`` in the input pixels of ``batch``,
    ``scores [B, C, F * k']`` with ``-inf`` for no candidate), F = ``len(flips)``,
    k' = k, or ``min(k, keep_top_k)`` after NMS.
  """
  image = batch["image"]  # [B, S, S, ch]
  b, h, w, ch = image.shape
  if h != w:
    raise ValueError(f"test-time augmentation needs square inputs, got {h}x{w}")
  flips = tuple(bool(f) for f in flips)
  f = len(flips)
  canvas = max(side, int(model.image_size))
  net = model.at_input_size(canvas)
  ratio = side / h  # pass pixels per input pixel

  # The flips run as one batch of B * F images, each image's flips side by side
  # (the rows of a batch sharded on "data" stay on their device).
  x = jnp.stack([image[:, :, ::-1] if flip else image for flip in flips], axis=1)
  x = _resize_square(x.reshape(b * f, h, w, ch), side)  # [B * F, side, side, ch]
  if canvas > side:
    x = jnp.pad(x, ((0, 0), (0, canvas - side), (0, canvas - side), (0, 0)))
  image_size = real_image_sizes(batch)
  pass_size = (image_size.astype(jnp.int32) * side + h // 2) // h  # [B, 2] rounded
  pass_batch = {k: jnp.repeat(jnp.asarray(v), f, axis=0) for k, v in batch.items()
                if k != "image"}  # [B * F, ...]
  pass_batch.update(image=x, image_size=jnp.repeat(pass_size, f, axis=0))
  if "scale_factor" in batch:  # pass pixels per original pixel
    pass_batch["scale_factor"] = pass_batch["scale_factor"] * ratio
  boxes, scores = net.apply(variables, pass_batch, method="candidates")  # [B * F, A, 4|C]
  a, c = scores.shape[1:]
  boxes = boxes.astype(jnp.float32).reshape(b, f, a, 4)
  scores = scores.astype(jnp.float32).reshape(b, f, a, c)

  # Mirror the flipped passes' boxes back, then to the batch's input pixels.
  width = pass_size[:, None, None, 1].astype(jnp.float32)  # [B, 1, 1]
  mirrored = jnp.stack([width - boxes[..., 2], boxes[..., 1], width - boxes[..., 0],
                        boxes[..., 3]], axis=-1)
  boxes = jnp.where(jnp.asarray(flips)[None, :, None, None], mirrored, boxes)
  if side != h:
    boxes = boxes / ratio  # [B, F, A, 4]

  keep = scores > score_threshold  # [B, F, A, C]
  lo, hi = size_range
  if lo > 0 or not math.isinf(hi):
    original = to_original_pixels(boxes.reshape(b, f * a, 4), batch).reshape(b, f, a, 4)
    size = jnp.sqrt(box_lib.area(original))  # [B, F, A]
    keep &= ((size >= lo) & (size < hi))[..., None]
  scores = jnp.where(keep, scores, -jnp.inf)

  k = min(int(pre_nms_top_k), a)
  top_scores, top_idx = lax.top_k(jnp.swapaxes(scores, -1, -2), k)  # [B, F, C, k]
  top_boxes = jnp.take_along_axis(boxes[:, :, None], top_idx[..., None], axis=3)  # [B, F, C, k, 4]
  if nms_threshold is not None:
    k_kept = k if keep_top_k is None else min(k, int(keep_top_k))
    kept = nms(top_boxes, top_scores, iou_threshold=float(nms_threshold), max_output_size=k_kept,
               tile_size=min(DEFAULT_TILE_SIZE, k))  # [B, F, C, k']
    top_boxes, top_scores = _gather_kept(top_boxes, top_scores, kept)
  k = top_scores.shape[-1]
  top_boxes = jnp.swapaxes(top_boxes, 1, 2).reshape(b, c, f * k, 4)
  top_scores = jnp.swapaxes(top_scores, 1, 2).reshape(b, c, f * k)
  return top_boxes, top_scores


# ----------------------------------------------------------------------------
# The merge.
# ----------------------------------------------------------------------------


def merge_candidates(boxes, scores, batch, *, iou_threshold: float, max_detections: int,
                     merge: str = "nms", vote_threshold: float | None = None) -> Detections:
  """Per-class NMS (and box voting) over every pass's candidates -> :class:`Detections`.

  Args:
    boxes: ``[B, C, N, 4]`` candidates per class, input pixels of ``batch``.
    scores: ``[B, C, N]``; ``-inf`` (or any non-finite) marks no candidate.
    batch: ``scale_factor``, ``orig_size`` (to map back), ``valid`` (optional).
    iou_threshold: NMS suppresses at IoU ``>`` it.
    max_detections: K.
    merge: ``"nms"``, or ``"vote"``: each kept box becomes the score-weighted
      mean of its class's candidates with IoU ``>= vote_threshold`` with it
      (itself included); its score stays.
    vote_threshold: the voting IoU (default ``iou_threshold``).
  Returns:
    :class:`Detections` with K rows in original pixels, by descending score.
  """
  if merge not in MERGES:
    raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
  boxes, scores = box_lib.as_f32(boxes), box_lib.as_f32(scores)
  b, c, n = scores.shape
  k_class = min(n, int(max_detections))  # no class can place more in the top K
  keep = nms(boxes, scores, iou_threshold=float(iou_threshold),
             max_output_size=k_class)  # [B, C, k_class] into N
  _, kept_scores = _gather_kept(boxes, scores, keep)
  flat_scores = kept_scores.reshape(b, c * k_class)
  k_out = min(int(max_detections), c * k_class)
  det_scores, pos = lax.top_k(flat_scores, k_out)  # ties: lower class, then higher rank
  valid = jnp.isfinite(det_scores)  # [B, K]
  labels = (pos // k_class).astype(jnp.int32)
  cand = jnp.take_along_axis(keep.reshape(b, c * k_class), pos, axis=-1)  # [B, K] into N
  flat_index = labels * n + jnp.maximum(cand, 0)
  det_boxes = jnp.take_along_axis(boxes.reshape(b, c * n, 4), flat_index[..., None], axis=1)

  if merge == "vote":
    thr = float(iou_threshold if vote_threshold is None else vote_threshold)
    class_boxes = jnp.take_along_axis(boxes, labels[:, :, None, None], axis=1)  # [B, K, N, 4]
    class_scores = jnp.take_along_axis(scores, labels[:, :, None], axis=1)  # [B, K, N]
    overlap = box_lib.aligned_iou(det_boxes[:, :, None, :], class_boxes)  # [B, K, N]
    weight = jnp.where((overlap >= thr) & jnp.isfinite(class_scores), class_scores, 0.0)
    total = jnp.sum(weight, axis=-1)  # [B, K]
    voted = jnp.einsum("bkn,bknd->bkd", weight, class_boxes) / jnp.where(
        total > 0, total, 1.0)[..., None]
    det_boxes = jnp.where((total > 0)[..., None], voted, det_boxes)

  return finalize_detections(det_boxes, det_scores, labels, valid, batch,
                             max_detections=max_detections)


# ----------------------------------------------------------------------------
# The predict function.
# ----------------------------------------------------------------------------


def tta_setup(model, config) -> tuple[Any, Callable, TTASettings]:
  """``(data config, predict_fn, settings)`` of test-time augmentation for ``model``:
  the config's ``tta`` section (or the defaults) resolved for the model, the data
  section that feeds it, and its jitted predict (``eval.py --tta``, the predictor)."""
  settings = TTASettings.from_config(config.get("tta")).resolve(model)
  return tta_data_config(config.data, settings), make_tta_predict_fn(model, settings), settings


def make_tta_predict_fn(model, settings: TTASettings | None = None) -> Callable:
  """A ``(variables, batch) -> Detections`` for :func:`~jdet.evaluation.loop.evaluate_split`.

  One jitted function per scale (its flips inside) and one for the merge,
  each compiled once per batch shape; shardings come from the arguments
  (replicated variables, a batch sharded on ``"data"``), as for
  :func:`~jdet.evaluation.loop.make_predict_fn`. The batch's image may have
  any square side (the model's, or the largest TTA side with
  :func:`tta_data_config`).

  Args:
    model: a detector with ``candidates`` and ``at_input_size``.
    settings: :class:`TTASettings` (None: the defaults, RefineDet's recipe);
      fields left None come from ``model``.
  Returns:
    the predict function; its ``settings`` attribute holds the resolved settings.
  """
  if not supports_tta(model):
    raise ValueError(f"{type(model).__name__} does not support test-time augmentation: it needs "
                     f"candidates() and at_input_size() (see jdet.models.detector)")
  s = (settings or TTASettings()).resolve(model)
  passes = [jax.jit(functools.partial(
      scale_candidates, model, side=side, flips=(False, True) if s.flip else (False,),
      size_range=size_range, score_threshold=float(s.score_threshold),
      pre_nms_top_k=int(s.pre_nms_top_k), nms_threshold=s.iou_threshold if s.scale_nms else None,
      keep_top_k=int(s.max_detections))) for side, size_range in zip(s.sides(), s.size_ranges)]

  def merge(outputs, batch):
    boxes = jnp.concatenate([o[0] for o in outputs], axis=2)  # [B, C, N, 4]
    scores = jnp.concatenate([o[1] for o in outputs], axis=2)  # [B, C, N]
    return merge_candidates(boxes, scores, batch, iou_threshold=float(s.iou_threshold),
                            max_detections=int(s.max_detections), merge=s.merge,
                            vote_threshold=s.vote_threshold)

  merge_fn = jax.jit(merge)

  def predict(variables, batch) -> Detections:
    return merge_fn([fn(variables, batch) for fn in passes], batch)

  predict.settings = s
  return predict
