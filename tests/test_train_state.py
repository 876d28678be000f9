"""jdet.engine.train_state.TrainState: updates, keys, serialisation and a donated jit step."""

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdet.engine.train_state import TrainState


class _Net(nn.Module):

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = nn.Dense(3)(x)
    return nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)


def _state(seed=0, lr=0.5):
  model = _Net()
  variables = model.init(jax.random.key(0), jnp.ones((4, 2)), train=False)
  return model, TrainState.create(params=variables["params"], batch_stats=variables["batch_stats"],
                                  tx=optax.sgd(lr), rng=jax.random.key(seed))


def test_create_and_variables():
  model, state = _state()
  assert state.step.dtype == jnp.int32 and int(state.step) == 0
  assert state.rng.dtype == jnp.uint32
  np.testing.assert_array_equal(state.rng, jax.random.key_data(jax.random.key(0)))
  assert set(state.variables) == {"params", "batch_stats"}
  no_bn = TrainState.create(params={"w": jnp.ones(3)}, batch_stats=None, tx=optax.sgd(0.1),
                            rng=jax.random.key_data(jax.random.key(1)))
  assert no_bn.batch_stats == {} and set(no_bn.variables) == {"params"}
  # The static optimiser is not a leaf.
  assert len(jax.tree.leaves(no_bn)) == 3  # step, params/w, rng (sgd has an empty state)


def test_apply_gradients_is_sgd_and_counts_steps():
  _, state = _state(lr=0.5)
  grads = jax.tree.map(jnp.ones_like, state.params)
  new_stats = jax.tree.map(lambda x: x + 1, state.batch_stats)
  new = state.apply_gradients(grads, batch_stats=new_stats)
  assert int(new.step) == 1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b - 0.5), new.params, state.params)
  jax.tree.map(np.testing.assert_array_equal, new.batch_stats, new_stats)
  kept = new.apply_gradients(grads)  # no batch_stats: unchanged
  assert int(kept.step) == 2
  jax.tree.map(np.testing.assert_array_equal, kept.batch_stats, new_stats)


def test_next_rng_is_split_and_deterministic():
  _, a = _state(seed=3)
  _, b = _state(seed=3)
  a1, ka = a.next_rng()
  b1, kb = b.next_rng()
  np.testing.assert_array_equal(jax.random.key_data(ka), jax.random.key_data(kb))
  # Independent reference: one split of key(3) -> (carried key, step key).
  carried, step_key = jax.random.split(jax.random.key(3))
  np.testing.assert_array_equal(a1.rng, jax.random.key_data(carried))
  np.testing.assert_array_equal(jax.random.key_data(ka), jax.random.key_data(step_key))
  _, ka2 = a1.next_rng()
  assert not np.array_equal(jax.random.key_data(ka2), jax.random.key_data(ka))
  # The original state is not mutated.
  np.testing.assert_array_equal(a.rng, jax.random.key_data(jax.random.key(3)))


def test_serialization_round_trip():
  _, state = _state()
  state = state.apply_gradients(jax.tree.map(jnp.ones_like, state.params))
  state, _ = state.next_rng()
  _, template = _state(seed=9)
  restored = flax.serialization.from_bytes(template, flax.serialization.to_bytes(state))
  assert restored.tx is template.tx
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
    np.testing.assert_array_equal(a, b)
  leaves, treedef = jax.tree.flatten(state)
  assert jax.tree.unflatten(treedef, leaves).tx is state.tx


def test_jit_step_with_donation_matches_eager():
  model, state = _state()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 2)), jnp.float32)

  def step(state, x):
    state, key = state.next_rng()
    noise = jax.random.normal(key, x.shape)

    def loss_fn(params):
      y, updates = model.apply({**state.variables, "params": params}, x + 0.01 * noise,
                               train=True, mutable=["batch_stats"])
      return jnp.mean(y ** 2), updates
    grads, updates = jax.grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads, batch_stats=updates["batch_stats"])

  eager = step(step(state, x), x)
  jitted = jax.jit(step, donate_argnums=0)
  copy = jax.tree.map(jnp.copy, state)
  out = jitted(jitted(copy, x), x)
  assert int(out.step) == 2
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), out, eager)
  assert copy.params["Dense_0"]["kernel"].is_deleted()  # the input buffers were donated
