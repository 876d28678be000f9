"""Detectors by name: ``MODELS[name](**config.model)`` builds a Linen module.

Each detector implements ``loss(batch, *, train=True) -> (loss, metrics)`` and
``predict(batch) -> jdet.Detections`` (the contract: ``jdet/models/detector.py`` and
docs/design.md).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

from jdet.models.detector import field_names
from jdet.models.faster_rcnn import FasterRCNN
from jdet.models.refinedet import RefineDet
from jdet.models.sparse_rcnn import SparseRCNN
from jdet.models.ssd import SSD

MODELS: dict[str, Callable[..., nn.Module]] = {
    "ssd": SSD, "refinedet": RefineDet, "faster_rcnn": FasterRCNN,
    "sparse_rcnn": SparseRCNN}


def build_model(name: str, **kwargs: Any) -> nn.Module:
  """Returns the detector module registered as ``name``, built with ``kwargs``.

  Raises:
    KeyError: ``name`` is not registered.
    ValueError: a key of ``kwargs`` is none of the model's fields (the message
      names it and lists the fields).
  """
  if name not in MODELS:
    raise KeyError(f"unknown model {name!r}; available: {sorted(MODELS)}")
  fields = field_names(MODELS[name])
  unknown = sorted(set(kwargs) - set(fields))
  if unknown:
    raise ValueError(f"unknown {name} model settings {unknown}; its fields are "
                     f"{', '.join(sorted(fields))}")
  return MODELS[name](**kwargs)
