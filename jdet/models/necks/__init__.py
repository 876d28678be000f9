"""Necks: maps from backbone features to the feature levels that heads read."""

from jdet.models.necks.fpn import FPN

__all__ = ["FPN"]
