"""Data: sources (COCO, VOC, tfds, generated shapes), transforms and the grain pipeline.

Each source yields :class:`~jdet.data.records.Example` records; transforms in
:mod:`jdet.data.transforms` make fixed-shape samples; :mod:`jdet.data.pipeline`
batches them to the contract of the design notes (docs/design.md, "The batch").
"""

from jdet.data.records import AnnotationError, DetectionSource, Example, SkipLog

__all__ = ["AnnotationError", "DetectionSource", "Example", "SkipLog"]
