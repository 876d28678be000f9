"""Target assignment: max-IoU matching, sampling masks, Hungarian matching."""

from jdet.assign.hungarian import linear_sum_assignment, match_columns
from jdet.assign.max_iou import IGNORE, NEGATIVE, POSITIVE, MaxIoUAssignment, max_iou_assign
from jdet.assign.sampling import hard_negative_mask, sample_balanced

__all__ = [
    "linear_sum_assignment", "match_columns", "IGNORE", "NEGATIVE", "POSITIVE", "MaxIoUAssignment",
    "max_iou_assign", "hard_negative_mask", "sample_balanced",
]
