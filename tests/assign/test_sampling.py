"""Tests for jdet.assign.sampling: balanced sampling and hard negative mining."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

from jdet.assign.max_iou import IGNORE, NEGATIVE, POSITIVE
from jdet.assign.sampling import hard_negative_mask, sample_balanced
from jdet.testing import assert_traces_once


def _random_labels(rng: np.random.Generator, num_images: int, num_anchors: int) -> np.ndarray:
  """``[B, A]`` labels with positive and negative counts spread from none to all."""
  labels = np.full((num_images, num_anchors), IGNORE, np.int32)
  for b in range(num_images):
    num_pos = [0, 1, 5, 40, 200, num_anchors][b % 6] if b < 24 else rng.integers(0, num_anchors + 1)
    num_pos = min(num_pos, num_anchors)
    num_neg = rng.integers(0, num_anchors - num_pos + 1) if b % 5 else num_anchors - num_pos
    if b % 7 == 3:
      num_neg = 0
    perm = rng.permutation(num_anchors)
    labels[b, perm[:num_pos]] = POSITIVE
    labels[b, perm[num_pos:num_pos + num_neg]] = NEGATIVE
  return labels


def _batched_sampler(**kwargs):
  return jax.jit(jax.vmap(functools.partial(sample_balanced, **kwargs)))


@pytest.mark.parametrize("num_samples, positive_fraction", [(256, 0.5), (512, 0.25), (64, 0.25), (10, 0.3)])
def test_counts_match_torchvision(num_samples, positive_fraction):
  rng = np.random.default_rng(num_samples)
  labels = _random_labels(rng, 48, 300)
  keys = jax.random.split(jax.random.key(0), len(labels))
  pos, neg = _batched_sampler(num_samples=num_samples, positive_fraction=positive_fraction)(keys, labels)
  pos, neg = np.asarray(pos), np.asarray(neg)

  torch.manual_seed(0)
  ref_pos, ref_neg = BalancedPositiveNegativeSampler(num_samples, positive_fraction)(
      [torch.from_numpy(l) for l in labels])
  np.testing.assert_array_equal(pos.sum(1), [int(m.sum()) for m in ref_pos])
  np.testing.assert_array_equal(neg.sum(1), [int(m.sum()) for m in ref_neg])
  # The closed form, too: num_pos = min(P, int(S * f)), num_neg = min(N, S - num_pos).
  want_pos = np.minimum((labels == POSITIVE).sum(1), int(num_samples * positive_fraction))
  np.testing.assert_array_equal(pos.sum(1), want_pos)
  np.testing.assert_array_equal(neg.sum(1), np.minimum((labels == NEGATIVE).sum(1), num_samples - want_pos))
  assert np.all(labels[pos] == POSITIVE) and np.all(labels[neg] == NEGATIVE)
  assert not np.any(pos & neg)
  assert np.any(want_pos == 0) and np.any((labels == NEGATIVE).sum(1) == 0)  # the data covers both


def test_valid_mask():
  rng = np.random.default_rng(1)
  labels = _random_labels(rng, 24, 200)
  valid = rng.random(labels.shape) < 0.6
  keys = jax.random.split(jax.random.key(1), len(labels))
  def sampler_one(key, labels, valid):
    return sample_balanced(key, labels, num_samples=64, positive_fraction=0.25, valid=valid)

  sampler = jax.jit(jax.vmap(sampler_one))
  pos, neg = (np.asarray(m) for m in sampler(keys, labels, valid))
  assert not np.any((pos | neg) & ~valid)
  num_pos = np.minimum(((labels == POSITIVE) & valid).sum(1), 16)
  np.testing.assert_array_equal(pos.sum(1), num_pos)
  np.testing.assert_array_equal(neg.sum(1), np.minimum(((labels == NEGATIVE) & valid).sum(1), 64 - num_pos))


def test_keys_change_the_sample():
  labels = np.array([POSITIVE] * 50 + [NEGATIVE] * 100 + [IGNORE] * 10, np.int32)
  sampler = functools.partial(sample_balanced, num_samples=32, positive_fraction=0.25)
  keys = jax.random.split(jax.random.key(2), 8)
  pos, neg = (np.asarray(m) for m in jax.jit(jax.vmap(sampler, in_axes=(0, None)))(keys, labels))
  assert len({m.tobytes() for m in pos}) == 8 and len({m.tobytes() for m in neg}) == 8
  again = jax.jit(sampler)(keys[3], labels)
  np.testing.assert_array_equal(again[0], pos[3])  # same key, same sample
  np.testing.assert_array_equal(again[1], neg[3])


def test_uniform():
  # 10 positives of which 4 are drawn (p = 0.4), 6 negatives of which 4 are drawn (p = 2/3).
  labels = np.array([POSITIVE, NEGATIVE, IGNORE, POSITIVE] * 3 + [POSITIVE] * 4 + [NEGATIVE] * 3 + [IGNORE],
                    np.int32)
  assert (labels == POSITIVE).sum() == 10 and (labels == NEGATIVE).sum() == 6
  draws = 4000
  keys = jax.random.split(jax.random.key(3), draws)
  sampler = functools.partial(sample_balanced, num_samples=8, positive_fraction=0.5)
  pos, neg = (np.asarray(m) for m in jax.jit(jax.vmap(sampler, in_axes=(0, None)))(keys, labels))
  np.testing.assert_array_equal(pos.sum(1), 4)
  np.testing.assert_array_equal(neg.sum(1), 4)
  for mask, cand, p in ((pos, labels == POSITIVE, 0.4), (neg, labels == NEGATIVE, 4 / 6)):
    freq = mask.sum(0)[cand]
    sigma = np.sqrt(draws * p * (1 - p))  # each count is Binomial(draws, p)
    assert np.all(np.abs(freq - draws * p) < 6 * sigma), freq
  # Pairs too: each pair of positives is drawn together with p = C(8, 2) / C(10, 4) = 2/15.
  both = (pos[:, None, :] & pos[:, :, None]).sum(0)[np.ix_(labels == POSITIVE, labels == POSITIVE)]
  off_diag = both[~np.eye(10, dtype=bool)]
  p2 = 2 / 15
  assert np.all(np.abs(off_diag - draws * p2) < 6 * np.sqrt(draws * p2 * (1 - p2))), off_diag


def test_sampler_traces_once():
  rng = np.random.default_rng(4)
  sampler = jax.vmap(functools.partial(sample_balanced, num_samples=64, positive_fraction=0.25))
  args = [(jax.random.split(jax.random.key(i), 6), _random_labels(rng, 6, 128)) for i in range(2)]
  outs = assert_traces_once(sampler, *args)
  single = jax.jit(functools.partial(sample_balanced, num_samples=64, positive_fraction=0.25))
  for (keys, labels), (pos, neg) in zip(args, outs):
    for b in range(len(labels)):
      p, n = single(keys[b], labels[b])
      np.testing.assert_array_equal(pos[b], p)
      np.testing.assert_array_equal(neg[b], n)


# ----------------------------------------------------------------------------
# Hard negative mining.
# ----------------------------------------------------------------------------


def _hard_negatives_reference(loss, pos, valid, ratio, min_negatives):
  """torchvision SSD's double sort in NumPy, with the cap on k and a stable sort."""
  loss = np.where(pos | ~valid, -np.inf, loss.astype(np.float64))  # excluded entries rank last
  num_neg_available = int((~pos & valid).sum())
  k = min(max(int(np.floor(ratio * (pos & valid).sum())), min_negatives), num_neg_available)
  order = np.argsort(-loss, kind="stable")  # descending loss, lower index first on ties
  rank = np.argsort(order, kind="stable")
  return (rank < k) & ~pos & valid


def _random_mining_case(rng: np.random.Generator, num_images: int, num_anchors: int):
  loss = rng.exponential(size=(num_images, num_anchors)).astype(np.float32)
  loss[::2] = np.round(loss[::2], 1)  # many ties in every other image
  pos_rate = rng.choice([0.0, 0.01, 0.1, 0.3, 0.6], size=(num_images, 1))
  pos = rng.random((num_images, num_anchors)) < pos_rate
  valid = rng.random((num_images, num_anchors)) < rng.choice([1.0, 0.9, 0.3], size=(num_images, 1))
  return loss, pos, valid


@pytest.mark.parametrize("ratio, min_negatives", [(3, 0), (3, 8), (2.5, 0)])
def test_hard_negatives_match_reference(ratio, min_negatives):
  rng = np.random.default_rng(5)
  loss, pos, valid = _random_mining_case(rng, 40, 500)
  mine = jax.jit(jax.vmap(lambda l, p, v: hard_negative_mask(l, p, neg_pos_ratio=ratio, valid=v,
                                                             min_negatives=min_negatives)))
  got = np.asarray(mine(loss, pos, valid))
  capped = 0
  for b in range(len(loss)):
    want = _hard_negatives_reference(loss[b], pos[b], valid[b], ratio, min_negatives)
    np.testing.assert_array_equal(got[b], want, err_msg=f"image {b}")
    capped += int(want.sum() == (~pos[b] & valid[b]).sum() and want.sum() < ratio * (pos[b] & valid[b]).sum())
  assert capped > 0  # some images have fewer negatives than requested


def test_hard_negatives_without_valid_match_torchvision_sort():
  # Distinct losses and enough negatives: torchvision's own computation applies unchanged.
  rng = np.random.default_rng(6)
  loss = rng.permutation(1000).reshape(4, 250).astype(np.float32)
  pos = rng.random(loss.shape) < 0.05
  got = np.asarray(jax.jit(jax.vmap(hard_negative_mask))(loss, pos))
  neg_loss = torch.from_numpy(loss).clone()
  neg_loss[torch.from_numpy(pos)] = -float("inf")
  _, idx = neg_loss.sort(1, descending=True)
  want = idx.sort(1)[1] < 3 * torch.from_numpy(pos).sum(1, keepdim=True)
  np.testing.assert_array_equal(got, want.numpy())


def test_hard_negatives_edge_cases():
  loss = jnp.array([0.1, 0.9, 0.5, 0.7, 0.5, 2.0])
  pos = jnp.array([False, False, False, False, False, True])
  # The docstring's example: ties at 0.5 go to the lower index.
  np.testing.assert_array_equal(hard_negative_mask(loss, pos), [False, True, True, True, False, False])
  # No positives: nothing, unless min_negatives asks for some.
  none = jnp.zeros(6, bool)
  np.testing.assert_array_equal(hard_negative_mask(loss, none), False)
  np.testing.assert_array_equal(hard_negative_mask(loss, none, min_negatives=2),
                                [False, True, False, False, False, True])
  # More negatives needed than available: all of them, never a positive or an invalid entry.
  two_pos = jnp.array([True, False, False, False, False, True])
  valid = jnp.array([True, True, True, False, True, True])
  np.testing.assert_array_equal(hard_negative_mask(loss, two_pos, valid=valid),
                                [False, True, True, False, True, False])
  np.testing.assert_array_equal(hard_negative_mask(loss, jnp.ones(6, bool)), False)


def test_hard_negatives_trace_once():
  rng = np.random.default_rng(7)
  def mine_one(loss, pos, valid):
    return hard_negative_mask(loss, pos, neg_pos_ratio=3, valid=valid)

  mine = jax.vmap(mine_one)
  args = [_random_mining_case(rng, 4, 300) for _ in range(2)]
  outs = assert_traces_once(mine, *args)
  single = jax.jit(mine_one)
  for (loss, pos, valid), out in zip(args, outs):
    for b in range(len(loss)):
      np.testing.assert_array_equal(out[b], single(loss[b], pos[b], valid[b]))
