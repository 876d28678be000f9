"""jdet.losses against torch / torchvision and closed-form values."""

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from jdet import losses
from jdet.testing import assert_traces_once, random_boxes


def _t(x):
  return torch.from_numpy(np.asarray(x))


@pytest.mark.parametrize("beta", [1.0, 1.0 / 9, 0.0])
def test_smooth_l1_matches_torch(rng, beta):
  p, t = rng.normal(size=(50, 4)).astype(np.float32), rng.normal(size=(50, 4)).astype(np.float32)
  ref = F.smooth_l1_loss(_t(p), _t(t), beta=beta, reduction="none").numpy()
  np.testing.assert_allclose(np.asarray(losses.smooth_l1(p, t, beta=beta, normalizer=None)), ref, rtol=1e-6, atol=1e-7)
  # Explicit normaliser: sum / N.
  np.testing.assert_allclose(float(losses.smooth_l1(p, t, beta=beta, normalizer=7)), ref.sum() / 7, rtol=1e-5)


def test_l1_matches_torch(rng):
  p, t = rng.normal(size=(9, 4)).astype(np.float32), rng.normal(size=(9, 4)).astype(np.float32)
  np.testing.assert_allclose(float(losses.l1(p, t, normalizer=p.size)), F.l1_loss(_t(p), _t(t)).item(), rtol=1e-6)


def test_giou_loss_matches_torchvision(rng):
  a, b = random_boxes(rng, 30), random_boxes(rng, 30)
  ref = torchvision.ops.generalized_box_iou_loss(_t(a), _t(b), reduction="none").numpy()
  np.testing.assert_allclose(np.asarray(losses.giou_loss(a, b, normalizer=None)), ref, atol=1e-5)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 2.0), (0.5, 0.0)])
def test_sigmoid_focal_matches_torchvision(rng, alpha, gamma):
  logits = rng.normal(0, 3, size=(64, 5)).astype(np.float32)
  targets = (rng.uniform(size=(64, 5)) < 0.2).astype(np.float32)
  ref = torchvision.ops.sigmoid_focal_loss(_t(logits), _t(targets), alpha=alpha, gamma=gamma, reduction="none").numpy()
  ours = np.asarray(losses.sigmoid_focal(logits, targets, alpha=alpha, gamma=gamma, normalizer=None))
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)


def test_sigmoid_focal_is_stable_for_large_logits():
  logits = np.array([[100.0, -100.0]], np.float32)
  out = np.asarray(losses.sigmoid_focal(logits, np.array([[0.0, 1.0]], np.float32), normalizer=None))
  assert np.all(np.isfinite(out)) and np.all(out > 1.0)


def test_sigmoid_ce_matches_torch(rng):
  x = rng.normal(0, 4, size=(20, 3)).astype(np.float32)
  y = rng.uniform(size=(20, 3)).astype(np.float32)
  ref = F.binary_cross_entropy_with_logits(_t(x), _t(y), reduction="none").numpy()
  np.testing.assert_allclose(np.asarray(losses.sigmoid_ce(x, y, normalizer=None)), ref, rtol=1e-5, atol=1e-6)


def test_softmax_ce_matches_torch_and_ignores_out_of_range(rng):
  logits = rng.normal(0, 2, size=(40, 21)).astype(np.float32)
  labels = rng.integers(0, 21, size=40).astype(np.int32)
  labels[:5] = -1
  ref = F.cross_entropy(_t(logits), _t(labels).long(), ignore_index=-1, reduction="none").numpy()
  ours = np.asarray(losses.softmax_ce(logits, labels, normalizer=None))
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
  assert np.all(ours[:5] == 0)
  w = (labels >= 0).astype(np.float32)
  np.testing.assert_allclose(float(losses.softmax_ce(logits, labels, weights=w, normalizer=w.sum())),
                             ref[5:].mean(), rtol=1e-5)


def test_zero_normalizer_with_zero_weights_is_zero_not_nan():
  x = np.ones((4, 4), np.float32)
  out = losses.smooth_l1(x, 0 * x, weights=np.zeros_like(x), normalizer=0)
  assert float(out) == 0.0


def test_losses_compile_once(rng):
  x1, x2 = rng.normal(size=(2, 8, 3)).astype(np.float32)
  y = (rng.uniform(size=(8, 3)) < 0.5).astype(np.float32)
  assert_traces_once(lambda a, b: losses.sigmoid_focal(a, b, normalizer=3.0), (x1, y), (x2, y))
  g = jax.grad(lambda a: losses.sigmoid_focal(a, y, normalizer=3.0))(x1)
  assert np.all(np.isfinite(np.asarray(g)))
