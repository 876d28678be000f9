"""NumPy weights for a model's abstract variables (:func:`numpy_variables`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def numpy_variables(shapes, seed: int = 0, *, head_std: float | None = None,
                    random_norms: bool = False):
  """Deterministic variables for the abstract ``shapes`` of ``model.init``.

  Conv and dense kernels ``[..., cin, cout]`` are He-normal, or ``N(0,
  head_std^2)`` under a top-level module named ``*_head`` when ``head_std`` is
  given (Faster R-CNN's heads, as their own initialisers); biases and means 0;
  norm scales and variances 1, except an L2Norm's scale (a ``*_norm``
  module): 20, SSD's initial value. With ``random_norms``, scales and
  variances are ``U(0.5, 1.5)`` and biases and means ``U(-0.2, 0.2)`` instead
  (norms that are not identities). Values do not matter to the tests that use
  them, and compiling every layer's random initialiser would cost more than
  the tests.
  """
  rng = np.random.default_rng(seed)

  def make(path, leaf):
    names = [getattr(p, "key", str(p)) for p in path]
    name, parent = names[-1], names[-2] if len(names) > 1 else ""
    if name == "kernel" and head_std is not None and names[1].endswith("_head"):
      value = rng.normal(0.0, head_std, leaf.shape)
    elif name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      value = rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape)
    elif random_norms:
      value = (rng.uniform(0.5, 1.5, leaf.shape) if name in ("scale", "var")
               else rng.uniform(-0.2, 0.2, leaf.shape))
    elif name == "scale":
      value = np.full(leaf.shape, 20.0 if parent.endswith("_norm") else 1.0)
    elif name == "var":
      value = np.ones(leaf.shape)
    else:  # bias, mean
      value = np.zeros(leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(make, shapes)
