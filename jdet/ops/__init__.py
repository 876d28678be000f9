"""Fixed-shape detection operators: anchors, padded NMS, RoIAlign."""

from jdet.ops.anchors import grid_anchors, multilevel_grid_anchors, ssd_default_boxes, ssd_sizes
from jdet.ops.nms import batched_nms, class_specific_nms, multiclass_nms, nms, soft_nms
from jdet.ops.roi_align import map_roi_levels, multilevel_roi_align, roi_align

__all__ = [
    "grid_anchors", "multilevel_grid_anchors", "ssd_default_boxes", "ssd_sizes",
    "batched_nms", "class_specific_nms", "multiclass_nms", "nms", "soft_nms",
    "map_roi_levels", "multilevel_roi_align", "roi_align",
]
