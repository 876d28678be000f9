"""jdet.assign.hungarian against scipy.optimize.linear_sum_assignment."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from jax.sharding import PartitionSpec as P

from jdet.assign.hungarian import linear_sum_assignment, match_columns
from jdet.testing import assert_traces_once

SOLVERS = ["host", "jax"]

# Hand-worked: the six permutations of the 3x3 matrix cost 5 (0->1, 1->0, 2->2),
# 6, 7, 7, 10, 11. With two valid columns the row pairs {0,1}, {0,2}, {1,2} cost
# at best 3 (0->1, 1->0), 5, 4. With one, column 0's cheapest row is 1.
HAND = np.array([[4, 1, 3],
                 [2, 0, 5],
                 [4, 2, 2]], np.int32)
HAND_EXPECTED = {
    3: ([0, 1, 2], [1, 0, 2], [1, 0, 2]),
    2: ([0, 1, -1], [1, 0, -1], [1, 0, -1]),
    1: ([1, -1, -1], [0, -1, -1], [1, -1, -1]),
    0: ([-1, -1, -1], [-1, -1, -1], [-1, -1, -1]),
}


def _scipy_optimum(cost, nv):
  """Scipy's optimal total and number of pairs on the valid columns."""
  rows, cols = scipy.optimize.linear_sum_assignment(cost[:, :nv])
  return float(cost[rows, cols].astype(np.float64).sum()), len(rows)


def _check(cost, nv, rows, cols, match):
  """Asserts a valid, scipy-optimal, scipy-ordered result for one matrix."""
  n, m = cost.shape
  k = min(n, m)
  assert rows.shape == cols.shape == (k,) and match.shape == (m,)
  assert rows.dtype == cols.dtype == match.dtype == np.int32
  ref_total, num_pairs = _scipy_optimum(cost, nv)
  r, c = rows[:num_pairs], cols[:num_pairs]
  assert (rows[num_pairs:] == -1).all() and (cols[num_pairs:] == -1).all()
  assert (r >= 0).all() and (c >= 0).all() and (c < nv).all()
  assert (np.diff(r) > 0).all()  # sorted by row, so no row twice
  assert len(set(c.tolist())) == num_pairs  # no column twice
  total = float(cost[r, c].astype(np.float64).sum())
  np.testing.assert_allclose(total, ref_total, rtol=1e-5, atol=1e-4)
  expected_match = np.full(m, -1, np.int32)
  expected_match[c] = r
  np.testing.assert_array_equal(match, expected_match)


def _random_costs(rng, batch, n, m):
  """Half float costs in [0, 1), half small integers (many ties), as float32."""
  floats = rng.random((batch // 2, n, m))
  ints = rng.integers(0, 4, (batch - batch // 2, n, m))
  return np.concatenate([floats, ints]).astype(np.float32)


@pytest.mark.parametrize("solver", SOLVERS)
def test_hand_worked_3x3(solver):
  for nv, (rows, cols, match) in HAND_EXPECTED.items():
    got_rows, got_cols = linear_sum_assignment(HAND, nv, solver=solver)
    np.testing.assert_array_equal(got_rows, rows)
    np.testing.assert_array_equal(got_cols, cols)
    np.testing.assert_array_equal(match_columns(HAND, nv, solver=solver), match)
  np.testing.assert_array_equal(linear_sum_assignment(HAND, solver=solver)[1], [1, 0, 2])


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("shape", [(5, 5), (20, 20), (100, 20), (20, 100), (300, 50)])
def test_optimal_and_valid_under_jit_with_batch(rng, solver, shape):
  n, m = shape
  batch = 8
  cost = _random_costs(rng, batch, n, m)
  nv = rng.integers(0, m + 1, batch).astype(np.int32)
  nv[[0, 1, 4, 5]] = [0, m, 0, m]  # empty and full, for float and integer costs
  if n < m:
    nv[2] = n // 2  # fewer valid columns than rows: some rows stay unmatched
  for b in range(batch):
    cost[b, :, nv[b]:] = np.nan  # garbage in the padding must not matter

  def solve(c, v):
    rows, cols = linear_sum_assignment(c, v, solver=solver)
    return rows, cols, match_columns(c, v, solver=solver)

  rows, cols, match = map(np.asarray, jax.jit(solve)(cost, nv))
  for b in range(batch):
    _check(cost[b], nv[b], rows[b], cols[b], match[b])


@pytest.mark.parametrize("solver", SOLVERS)
def test_vmap_and_leading_dims_agree(rng, solver):
  cost = _random_costs(rng, 6, 12, 7).reshape(2, 3, 12, 7)
  nv = np.array([[0, 3, 7], [7, 5, 1]], np.int32)
  lead = linear_sum_assignment(cost, nv, solver=solver)
  vmapped = jax.jit(jax.vmap(jax.vmap(
      lambda c, v: linear_sum_assignment(c, v, solver=solver))))(cost, nv)
  for a, b in zip(lead, vmapped):
    np.testing.assert_array_equal(a, b)
  # A scalar count broadcasts over the batch; None means every column.
  np.testing.assert_array_equal(
      match_columns(cost, 7, solver=solver), match_columns(cost, solver=solver))
  for b in range(6):
    _check(cost.reshape(6, 12, 7)[b], nv.reshape(6)[b],
           *(np.asarray(x).reshape(6, -1)[b] for x in lead),
           np.asarray(match_columns(cost, nv, solver=solver)).reshape(6, 7)[b])


@pytest.mark.parametrize("solver", SOLVERS)
def test_solvers_agree_on_cost_for_integer_dtype(rng, solver):
  cost = rng.integers(-5, 5, (4, 9, 6)).astype(np.int32)
  nv = np.array([6, 2, 0, 4], np.int32)
  rows, cols = map(np.asarray, linear_sum_assignment(cost, nv, solver=solver))
  match = np.asarray(match_columns(cost, nv, solver=solver))
  for b in range(4):
    _check(cost[b], nv[b], rows[b], cols[b], match[b])


@pytest.mark.parametrize("solver", SOLVERS)
def test_num_valid_cols_is_clipped(rng, solver):
  cost = _random_costs(rng, 2, 4, 3)
  rows, _ = linear_sum_assignment(cost, np.array([-2, 9]), solver=solver)
  np.testing.assert_array_equal(rows[0], [-1, -1, -1])
  assert (np.asarray(rows[1]) >= 0).all()


@pytest.mark.parametrize("solver", SOLVERS)
def test_no_retrace_for_same_shape(rng, solver):
  fn = lambda c, v: linear_sum_assignment(c, v, solver=solver)
  args = [(_random_costs(rng, 2, 10, 4), np.array([4, i], np.int32)) for i in (1, 3)]
  outs = assert_traces_once(fn, *args)
  for (cost, nv), (rows, cols) in zip(args, outs):
    for b in range(2):
      ref_total, num_pairs = _scipy_optimum(cost[b], nv[b])
      ok = rows[b] >= 0
      assert ok.sum() == num_pairs
      np.testing.assert_allclose(cost[b][rows[b][ok], cols[b][ok]].sum(), ref_total, rtol=1e-5)


@pytest.mark.parametrize("solver", SOLVERS)
def test_nonfinite_costs_are_avoided_when_possible(rng, solver):
  n, m = 6, 5
  cost = rng.random((n, m)).astype(np.float32)
  bad = np.zeros((n, m), bool)
  bad[[0, 1, 2, 3], [0, 1, 1, 4]] = True
  cost[0, 0], cost[1, 1], cost[2, 1], cost[3, 4] = np.nan, np.inf, np.nan, np.inf
  cost[:4][~bad[:4]] -= 10.0  # non-finite entries would be the "cheapest" if read as 0
  rows, cols = map(np.asarray, linear_sum_assignment(cost, solver=solver))
  assert not bad[rows, cols].any()
  reference = np.where(bad, 1e6, cost)  # forbidden entries as a huge cost for scipy
  np.testing.assert_allclose(cost[rows, cols].sum(), _scipy_optimum(reference, m)[0], rtol=1e-5)


@pytest.mark.parametrize("solver", SOLVERS)
def test_nonfinite_costs_fewest_forbidden_then_optimal(solver):
  # Row 0 has only NaN/inf: it must take one forbidden pair; the others then
  # follow the finite optimum on the remaining columns. -inf is most wanted.
  nan, inf = np.nan, np.inf
  cost = np.array([[nan, inf, nan],
                   [1.0, 5.0, 9.0],
                   [2.0, 3.0, 7.0]], np.float32)
  rows, cols = linear_sum_assignment(cost, solver=solver)
  np.testing.assert_array_equal(rows, [0, 1, 2])
  np.testing.assert_array_equal(cols, [2, 0, 1])  # 1 + 3 beats 1 + 7, 2 + 5, ...
  neg = np.array([[0.0, 1.0], [-inf, 1.0]], np.float32)
  np.testing.assert_array_equal(linear_sum_assignment(neg, solver=solver)[1], [1, 0])
  # All non-finite: still a valid assignment, no error.
  rows, cols = map(np.asarray, linear_sum_assignment(np.full((3, 4), nan), solver=solver))
  np.testing.assert_array_equal(rows, [0, 1, 2])
  assert len(set(cols.tolist())) == 3


@pytest.mark.parametrize("solver", SOLVERS)
def test_gradient_flows_through_a_matched_loss(rng, solver):
  cost = jnp.asarray(rng.random((2, 6, 4)), jnp.float32)
  nv = jnp.array([4, 2])

  def loss(c):
    rows, cols = linear_sum_assignment(c, nv, solver=solver)
    ok = rows >= 0
    picked = jnp.take_along_axis(c.reshape(2, -1), jnp.where(ok, rows * 4 + cols, 0), axis=1)
    return jnp.sum(jnp.where(ok, picked, 0.0))

  grad = np.asarray(jax.jit(jax.grad(loss))(cost))
  rows, cols = map(np.asarray, linear_sum_assignment(cost, nv, solver=solver))
  expected = np.zeros((2, 6, 4), np.float32)
  for b in range(2):
    ok = rows[b] >= 0
    expected[b, rows[b][ok], cols[b][ok]] = 1.0
  np.testing.assert_array_equal(grad, expected)


@pytest.mark.parametrize("solver", SOLVERS)
def test_sharded_batch_matches_single_device(rng, solver):
  devices = jax.devices()
  if len(devices) < 2:
    pytest.skip("needs several (simulated) devices")
  mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batch = 2 * len(devices)
  cost = _random_costs(rng, batch, 30, 10)
  nv = rng.integers(0, 11, batch).astype(np.int32)
  expected = np.asarray(match_columns(cost, nv, solver=solver))
  solve = lambda c, v: match_columns(c, v, solver=solver)
  per_device = jax.jit(jax.shard_map(solve, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
  np.testing.assert_array_equal(per_device(cost, nv), expected)
  sharding = jax.sharding.NamedSharding(mesh, P("data"))
  global_jit = jax.jit(solve)(jax.device_put(cost, sharding), jax.device_put(nv, sharding))
  np.testing.assert_array_equal(global_jit, expected)


def test_empty_and_bad_arguments():
  rows, cols = linear_sum_assignment(np.zeros((3, 0), np.float32))
  assert rows.shape == cols.shape == (0,)
  assert match_columns(np.zeros((0, 2), np.float32)).tolist() == [-1, -1]
  with pytest.raises(ValueError, match="solver must be one of"):
    linear_sum_assignment(HAND, solver="auction")
  with pytest.raises(ValueError, match=r"cost must be \[..., N, M\]"):
    linear_sum_assignment(np.zeros(3))
