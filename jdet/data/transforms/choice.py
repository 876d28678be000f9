"""Picking one of several transform chains per sample (MMCV's ``RandomChoice``)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jdet.data.transforms.core import Compose, Repr, Sample, Transform

__all__ = ["RandomChoice"]


class RandomChoice(Repr):
  """Applies one of ``branches``, branch ``i`` with probability ``probs[i]`` (default: uniform).

  A branch is a transform or a sequence of transforms (made a
  :class:`~jdet.data.transforms.core.Compose`). One number ``u = rng.random()``
  picks the first branch whose cumulative probability exceeds ``u``; the
  chosen branch then draws from the same generator, so the result is a
  function of the generator's state, like every transform's.
  """

  def __init__(self, branches: Sequence[Transform | Sequence[Transform]],
               probs: Sequence[float] | None = None):
    self.branches = [b if callable(b) else Compose(b) for b in branches]
    if not self.branches:
      raise ValueError("RandomChoice needs at least one branch")
    n = len(self.branches)
    p = np.full(n, 1.0 / n) if probs is None else np.asarray(probs, np.float64).reshape(-1)
    if p.shape != (n,) or (p < 0).any() or not np.isclose(p.sum(), 1.0):
      raise ValueError(f"probs must be {n} non-negative numbers summing to 1, not {probs}")
    self.probs = tuple(float(v) for v in p)

  def pick(self, rng: np.random.Generator) -> int:
    """The index of the branch used for one sample (draws one number)."""
    u = rng.random()
    i = int(np.searchsorted(np.cumsum(self.probs), u, side="right"))
    return min(i, len(self.branches) - 1)

  def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
    return self.branches[self.pick(rng)](sample, rng)
