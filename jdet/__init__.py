"""jdet: object detection in JAX and Flax with fixed shapes everywhere.

Public entry points::

  jdet.build_model(name, **kwargs)       # a detector (Linen module)
  jdet.Detections                        # what predict() returns
  jdet.boxes                             # box maths: iou, giou, encode, decode, ...
  jdet.ops.nms / batched_nms / soft_nms  # padded NMS
  jdet.ops.roi_align / multilevel_roi_align
  jdet.assign.linear_sum_assignment      # Hungarian matching under jit
  jdet.Predictor.from_workdir(workdir)           # a trained detector on your own images

``jdet.Predictor`` (:mod:`jdet.inference`) is imported on first use, so that
``import jdet`` does not load the data pipeline.
"""

# Before jax: with ``JDET_KEEP_HOST_MEMORY=1`` the allocator keeps freed host memory
# (jdet/engine/hostmem.py; train.py and eval.py set it).
from jdet.engine import hostmem as _hostmem

_hostmem.apply_from_environment()

from jdet import assign, boxes, losses, ops  # noqa: E402
from jdet.detections import Detections  # noqa: E402
from jdet.models import MODELS, build_model  # noqa: E402

__version__ = "0.1.0"

__all__ = ["assign", "boxes", "losses", "ops", "Detections", "MODELS", "build_model", "Predictor",
           "__version__"]


def __getattr__(name: str):
  if name == "Predictor":
    from jdet.inference.predictor import Predictor
    return Predictor
  raise AttributeError(f"module 'jdet' has no attribute {name!r}")
