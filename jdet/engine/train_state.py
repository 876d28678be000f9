"""The training state: one pytree that a jitted step takes, donates and returns.

``TrainState`` holds everything that changes during training and must be
checkpointed: the update count, the ``params`` and ``batch_stats`` collections
of a Linen model, the optimiser state and the random key. The optimiser
itself (``tx``, a pair of functions) is a static field: it is part of the
pytree's structure, not of its leaves, so it is never saved and two states
built with the same ``tx`` object share a compiled step.

The key is stored as raw ``uint32`` data (``jax.random.key_data``) so that the
state is a tree of plain arrays that orbax saves and restores like any other;
:meth:`TrainState.next_rng` wraps it back into a typed key (default PRNG
implementation) and advances it, so a run resumed from a checkpoint draws the
same random numbers as an uninterrupted one.

A training step reads::

  def train_step(state, batch):
    state, key = state.next_rng()
    def loss_fn(params):
      (loss, metrics), updates = model.apply(
          {**state.variables, "params": params}, batch, method="loss",
          rngs={"dropout": key}, mutable=["batch_stats"])
      return loss, (metrics, updates)
    grads, (metrics, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads, batch_stats=updates.get("batch_stats"))
    return state, metrics

  train_step = jax.jit(train_step, donate_argnums=0)
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

__all__ = ["TrainState"]


def _raw_key(rng: jax.Array) -> jax.Array:
  """A typed key or raw ``uint32`` key data -> raw key data (``[2]`` uint32 for threefry)."""
  rng = jnp.asarray(rng)
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(rng)
  if rng.dtype != jnp.uint32:
    raise TypeError(f"rng must be a typed key or raw uint32 key data, got dtype {rng.dtype}")
  return rng


@flax.struct.dataclass
class TrainState:
  """Step, variables, optimiser state and random key of a training run.

  Attributes:
    step: ``[] int32``, the number of updates applied.
    params: the ``params`` collection.
    batch_stats: the ``batch_stats`` collection, ``{}`` for a model without BatchNorm.
    opt_state: ``tx``'s state for ``params``.
    rng: raw key data (``jax.random.key_data``), ``[2] uint32`` for the default PRNG.
    tx: the optimiser (static).
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, *, params: Any, batch_stats: Any, tx: optax.GradientTransformation,
             rng: jax.Array) -> TrainState:
    """Step 0 with a fresh optimiser state.

    Args:
      params: the ``params`` collection of ``model.init``.
      batch_stats: its ``batch_stats`` collection, or ``None`` / ``{}``.
      tx: the optimiser, e.g. from :func:`jdet.engine.optim.build_optimizer`.
      rng: a typed key (``jax.random.key(seed)``) or raw key data.
    """
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               batch_stats={} if batch_stats is None else batch_stats,
               opt_state=tx.init(params), rng=_raw_key(rng), tx=tx)

  def apply_gradients(self, grads: Any, *, batch_stats: Any = None) -> TrainState:
    """One optimiser update; ``batch_stats``, if given, replaces the statistics."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state,
                        batch_stats=self.batch_stats if batch_stats is None else batch_stats)

  def next_rng(self) -> tuple[TrainState, jax.Array]:
    """``(state with the advanced key, a typed key for this step)``."""
    key, sub = jax.random.split(jax.random.wrap_key_data(self.rng))
    return self.replace(rng=jax.random.key_data(key)), sub

  @property
  def variables(self) -> dict[str, Any]:
    """``{"params": ..., "batch_stats": ...}`` for ``model.apply``; no ``batch_stats`` if empty."""
    if self.batch_stats:
      return {"params": self.params, "batch_stats": self.batch_stats}
    return {"params": self.params}
