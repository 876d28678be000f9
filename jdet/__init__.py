"""jdet: object detection in JAX and Flax with fixed shapes everywhere.

Public entry points::

  jdet.build_model(name, **kwargs)       # a detector (Linen module)
  jdet.Detections                        # what predict() returns
  jdet.boxes                             # box maths: iou, giou, encode, decode, ...
  jdet.ops.nms / batched_nms / soft_nms  # padded NMS
  jdet.ops.roi_align / multilevel_roi_align
  jdet.assign.linear_sum_assignment      # Hungarian matching under jit
"""

from jdet import assign, boxes, losses, ops
from jdet.detections import Detections
from jdet.models import MODELS, build_model

__version__ = "0.1.0"

__all__ = ["assign", "boxes", "losses", "ops", "Detections", "MODELS", "build_model", "__version__"]
