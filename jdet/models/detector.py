"""The shared detector layer: the contract every detector keeps, and the glue they share.

Layers (a file imports only from the layers below it, never from a sibling
detector; :mod:`jdet.evaluation` imports no detector file)::

  jdet/models/ssd.py refinedet.py faster_rcnn.py sparse_rcnn.py   detectors
  jdet/models/multibox.py rpn.py                                 stages two detectors share
  jdet/models/heads/  necks/  backbones/                         Linen modules
  jdet/models/detector.py (this file)  body.py                   contract, glue, ResNet-FPN body
  jdet/boxes.py ops/ assign/ losses.py detections.py             pure maths

The contract
------------
A detector is a Linen module built as ``MODELS[name](**config.model)`` (its
fields' defaults are the paper's settings; configs override them) with two
methods, called through ``model.apply(variables, batch, method=...)``:

* ``loss(batch, *, train=True) -> (loss, metrics)``: a scalar loss and a dict
  of scalar metrics (each loss term, numbers of positives, ...). Random
  choices (sampling) draw from the ``"sampling"`` RNG stream, dropout from
  ``"dropout"``; BatchNorm statistics are the ``"batch_stats"`` collection.
* ``predict(batch) -> Detections``: exactly ``max_detections`` per image in
  original-image pixels (:func:`finalize_detections` builds them).

Single-stage detectors also offer what test-time augmentation
(:mod:`jdet.evaluation.tta`) runs: ``candidates(batch) -> (boxes [B, A, 4],
scores [B, A, C])`` before NMS, ``at_input_size(side)`` (the same variables at
another input side) and the fields ``image_size``, ``score_threshold``,
``pre_nms_top_k``, ``nms_threshold``, ``max_detections``.
:func:`supports_tta` tells whether a module has them.

Parameters that never train come from the model too: ``frozen_parameters()``
returns regular expressions over parameter paths (``"backbone/layer1/..."``)
that the optimiser leaves alone (no update, no weight decay); the training
program reads them from the model, so they always agree with its fields
(``frozen_stages``).

The batch
---------
A dict of arrays with static shapes (DESIGN: "Data contracts"):

==============  =====================  ===============================================
key             shape, dtype           meaning
==============  =====================  ===============================================
``image``       [B, H, W, 3] float     normalised pixels, padded bottom/right
``boxes``       [B, M, 4] float32      ground truth xyxy in input pixels; 0 where padded
``labels``      [B, M] int32           class ``0 .. C-1``; -1 where padded
``image_size``  [B, 2] int32           ``(h, w)`` of the real image inside the input
``orig_size``   [B, 2] int32           ``(h, w)`` of the image as stored
``scale_factor`` [B, 2] float32        ``(sy, sx)`` of the resize from stored to input
``image_id``    [B] int32              the dataset's id
``valid``       [B] bool               false for filler images completing a batch
==============  =====================  ===============================================

Only ``image`` is required by ``predict``; the helpers below supply the
defaults (the whole input is the image, every image valid).

Fields shared with parts
------------------------
A setting has one home, the field of the module that uses it. Where a
detector passes settings on to a part, both inherit the part's *field class*
(``BodyFields``, ``VGGFields``, ``StageFields``, ...) and the part is built
from the detector's values of those fields: :func:`build_from_fields`.
:func:`field_names` lists a module's fields (``jdet.build_model`` refuses
any other key).

Shape letters (one letter, one meaning, across :mod:`jdet.models`)
-----------------------------------------------------------------
B images, H x W input, M padded ground-truth boxes, C foreground classes (a
softmax head adds background internally: ``C + 1``), A anchors or default
boxes, L feature levels, P proposals (RPN), S sampled RoIs, N learnable
proposals (Sparse R-CNN), R RoIs of any of these three kinds, D feature
channels, K detections per image (``max_detections``), T Sparse R-CNN stages.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence, TypeVar, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdet import boxes as box_lib
from jdet.detections import Detections

__all__ = ["Detector", "supports_tta", "field_names", "build_from_fields", "real_image_sizes",
           "image_valid", "gt_labels", "to_original_pixels", "finalize_detections", "pad_to",
           "encode_positives", "TTA_METHODS"]


@runtime_checkable
class Detector(Protocol):
  """What ``train.py`` and ``eval.py`` call on every detector (see the module docstring)."""

  max_detections: int

  def loss(self, batch: dict[str, Any], *, train: bool = True) -> tuple[jax.Array, dict]:
    ...

  def predict(self, batch: dict[str, Any]) -> Detections:
    ...

  def frozen_parameters(self) -> tuple[str, ...]:
    ...


# The methods and fields a detector needs for multi-scale and flip testing.
TTA_METHODS = ("candidates", "at_input_size")
_TTA_FIELDS = ("image_size", "score_threshold", "pre_nms_top_k", "nms_threshold",
               "max_detections")


def supports_tta(model: Any) -> bool:
  """Whether ``model`` offers ``candidates`` / ``at_input_size`` and the TTA fields."""
  return all(callable(getattr(model, m, None)) for m in TTA_METHODS) and all(
      hasattr(model, f) for f in _TTA_FIELDS)


# ----------------------------------------------------------------------------
# Fields shared with parts.
# ----------------------------------------------------------------------------

_Part = TypeVar("_Part", bound=nn.Module)


def field_names(cls: type[nn.Module]) -> tuple[str, ...]:
  """The settings of a Linen module class, in order: its dataclass fields without
  Flax's ``parent`` and ``name`` (``field_names(BodyFields)`` -> ``("depth", ...)``)."""
  return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name"))


def _field_classes(cls: type) -> list[type]:
  return [c for c in cls.__mro__ if c is not nn.Module and isinstance(c, type)
          and issubclass(c, nn.Module)]


def build_from_fields(part: type[_Part], owner: nn.Module, **settings: Any) -> _Part:
  """``part`` built with ``owner``'s values of the fields they share, plus ``settings``.

  The shared fields are those of every field class that both ``part`` and
  ``owner``'s class inherit: ``build_from_fields(ResNetFPN, faster_rcnn,
  num_extra=1)`` passes ``depth``, ``widths``, ... (:class:`BodyFields`) from
  the detector and ``num_extra`` as given. ``part``'s other fields keep their
  defaults unless ``settings`` name them; a setting may not name a shared
  field (the owner's field is its one home). Lists become tuples (a config
  override may give a list).
  """
  owner_classes = set(_field_classes(type(owner)))
  shared = []
  for cls in _field_classes(part):
    if cls in owner_classes and cls is not part:
      shared += [f for f in field_names(cls) if f not in shared]
  twice = sorted(set(shared) & set(settings))
  if twice:
    raise ValueError(f"{part.__name__}: {twice} come from {type(owner).__name__}'s fields, "
                     f"not from settings")
  values = {f: getattr(owner, f) for f in shared}
  values = {f: tuple(v) if isinstance(v, list) else v for f, v in values.items()}
  return part(**values, **settings)


# ----------------------------------------------------------------------------
# Reading the batch.
# ----------------------------------------------------------------------------


def real_image_sizes(batch) -> jnp.ndarray:
  """``(h, w)`` of each real image inside the input, ``[B, 2]`` int32:
  ``batch["image_size"]`` or, without it, the whole input."""
  if "image_size" in batch:
    return jnp.asarray(batch["image_size"], jnp.int32)
  image = batch["image"]
  return jnp.broadcast_to(jnp.asarray(image.shape[1:3], jnp.int32), (image.shape[0], 2))




def image_valid(batch) -> jnp.ndarray:
  """``batch["valid"]`` or all true: ``[B]`` bool (false for filler images)."""
  b = batch["image"].shape[0]
  if "valid" in batch:
    return jnp.asarray(batch["valid"], bool)
  return jnp.ones((b,), bool)


def gt_labels(batch) -> jnp.ndarray:
  """``batch["labels"]`` with every box of a filler image marked as padding: ``[B, M]`` int32."""
  labels = jnp.asarray(batch["labels"], jnp.int32)
  return jnp.where(image_valid(batch)[:, None], labels, -1)


# ----------------------------------------------------------------------------
# Building Detections.
# ----------------------------------------------------------------------------


def to_original_pixels(boxes, batch) -> jnp.ndarray:
  """Input-image boxes ``[B, K, 4]`` -> original-image pixels, clipped to ``orig_size``.

  Undoes the resize recorded in ``batch["scale_factor"]`` (``[B, 2]`` ``(sy, sx)``);
  without it the input is taken to be the original image.
  """
  if "scale_factor" in batch:
    sy, sx = batch["scale_factor"][:, 0], batch["scale_factor"][:, 1]
    boxes = boxes / jnp.stack([sx, sy, sx, sy], axis=-1)[:, None, :]
  if "orig_size" in batch:
    boxes = box_lib.clip(boxes, batch["orig_size"][:, None, :])
  return boxes


def pad_to(x, k: int, *, axis: int = 1, value=0) -> jnp.ndarray:
  """``x`` padded with ``value`` along ``axis`` to length ``k`` (unchanged if already ``k``)."""
  n = x.shape[axis]
  if n > k:
    raise ValueError(f"cannot pad length {n} down to {k}")
  if n == k:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, k - n)
  return jnp.pad(x, widths, constant_values=value)


def finalize_detections(boxes, scores, labels, valid, batch, *, max_detections: int,
                        in_input_pixels: bool = True) -> Detections:
  """The common tail of every ``predict``: pad to K, mask, map to original pixels.

  Args:
    boxes: ``[B, K', 4]`` xyxy (input pixels unless ``in_input_pixels=False``).
    scores: ``[B, K']``; labels: ``[B, K']`` int; valid: ``[B, K']`` bool, by
      descending score, ``K' <= max_detections``.
    batch: for ``scale_factor``, ``orig_size`` and ``valid`` (filler images
      get no detections).
  Returns:
    :class:`Detections` of exactly ``max_detections`` per image; padded and
    invalid rows are zero boxes, score 0, label -1.
  """
  k = int(max_detections)
  valid = pad_to(jnp.asarray(valid, bool), k)
  if "valid" in batch:  # filler images detect nothing
    valid &= jnp.asarray(batch["valid"], bool)[:, None]
  boxes = pad_to(box_lib.as_f32(boxes), k)
  if in_input_pixels:
    boxes = to_original_pixels(boxes, batch)
  return Detections(boxes=jnp.where(valid[..., None], boxes, 0.0),
                    scores=jnp.where(valid, pad_to(box_lib.as_f32(scores), k), 0.0),
                    labels=jnp.where(valid, pad_to(jnp.asarray(labels, jnp.int32), k, value=-1), -1),
                    valid=valid)


# ----------------------------------------------------------------------------
# Regression targets.
# ----------------------------------------------------------------------------


def encode_positives(targets, anchors, positive, *, stds: Sequence[float]) -> jnp.ndarray:
  """Offsets of ``targets`` against ``anchors`` where ``positive``, 0 elsewhere.

  Non-positive rows are encoded against themselves first, so neither padding
  boxes (size 0) nor degenerate anchors produce ``log(0)`` or a NaN gradient.

  Args:
    targets: ``[..., 4]`` xyxy matched boxes; anchors: ``[..., 4]`` xyxy.
    positive: ``[...]`` bool.
  Returns:
    ``[..., 4]`` float32 deltas (:func:`jdet.boxes.encode` with ``stds``).
  """
  anchors = box_lib.as_f32(anchors)
  pos = jnp.asarray(positive, bool)[..., None]
  safe_anchor = jnp.where(pos, anchors, jnp.asarray([0.0, 0.0, 1.0, 1.0], anchors.dtype))
  safe_target = jnp.where(pos, box_lib.as_f32(targets), safe_anchor)
  return jnp.where(pos, box_lib.encode(safe_target, safe_anchor, stds=stds), 0.0)
