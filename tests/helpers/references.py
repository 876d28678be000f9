"""NumPy references and a closeness check.

* Pairwise IoU (:func:`np_iou`), the best IoU of each object with a set of
  anchors (:func:`best_iou_per_object`).
* :func:`assert_close`: a relative closeness check for outputs compared with
  another implementation's.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def np_iou(a, b) -> np.ndarray:
  """Pairwise IoU in the inputs' precision: ``a [..., 4]`` and ``b [N, 4]`` xyxy -> ``[..., N]``
  (``[4]`` -> ``[N]``, ``[M, 4]`` -> ``[M, N]``)."""
  a, b = np.asarray(a), np.asarray(b)
  lt = np.maximum(a[..., None, :2], b[:, :2])
  rb = np.minimum(a[..., None, 2:], b[:, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
  return inter / (area(a)[..., None] + area(b) - inter)


def best_iou_per_object(anchors, boxes_per_image: Sequence[np.ndarray]) -> np.ndarray:
  """``[N]`` the highest IoU of each object with any of ``anchors [A, 4]`` (xyxy), over
  the images' ground-truth boxes ``[M_i, 4]`` (images without objects add nothing)."""
  from jdet import boxes as box_lib

  return np.concatenate([np.asarray(box_lib.iou(g, anchors)).max(axis=1)
                         for g in boxes_per_image if len(g)])


def assert_close(got, want, *, rel: float = 1e-4, what: str = "") -> None:
  """``max |got - want| <= rel * max |want|`` (the same shape)."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
  err = np.abs(got - want).max() / np.abs(want).max()
  assert err <= rel, f"{what}: relative error {err:.2e} > {rel:.0e}"
