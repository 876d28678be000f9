"""The optimiser and learning-rate schedule of a config's ``optim`` section.

Detection recipes are written for PyTorch (MMDetection, torchvision), so the
optimisers here reproduce ``torch.optim`` update for update:

* ``sgd``: ``torch.optim.SGD(lr, momentum, weight_decay, nesterov)``. The decay
  is added to the gradient *before* momentum, the momentum buffer has no
  dampening (its first value is the gradient itself) and the learning rate
  multiplies the buffer::

    g = grad + wd * p;  buf = momentum * buf + g
    p = p - lr * (g + momentum * buf if nesterov else buf)

* ``adamw``: ``torch.optim.AdamW``, decoupled decay ``p -= lr * wd * p``
  (computed from the parameter before the Adam step).

The chain is::

  partition(train | frozen)            # labels from optim.freeze regexps
    train:  clip_by_global_norm        # optim.clip_norm, the norm of trained params only
            -> sgd or adamw (decay masked to ndim > 1 unless decay_bias_and_norm)
            -> scale_by_learning_rate(schedule)
            -> scale_by_pattern(lr_mult)   # optim.lr_mult, when given
    frozen: set_to_zero                # no update and no decay

``lr_mult`` (optional) maps path prefixes to learning-rate multipliers, as
MMDetection's ``paramwise_cfg.custom_keys`` ``lr_mult`` and DETR's backbone
rate: ``{"backbone": 4.0, "neck": 4.0}`` trains the body at four times the
rate of the rest. The multiplier scales the whole update, so a decoupled
(AdamW) decay scales with it, as in a torch parameter group with its own
``lr``.

Every mask is a function of the parameter tree that ``tx.init`` receives, so
the transformation is built before the model is initialised.

Schedules multiply a linear warm-up (MMDetection's and torchvision's: the
factor goes from ``warmup_factor`` at step 0 to 1 at ``warmup_steps``) with a
constant, step (``gamma`` at each milestone) or cosine (from the end of the
warm-up to ``total_steps``, down to ``min_lr_ratio * lr``) decay. The step
given to the schedule is the number of updates already applied, as in
``optax``: the first update uses ``schedule(0)``.

Config fields are read with plain attribute access, only those the chosen
options use; a missing field or a bad value raises ``ValueError`` naming
``optim.<field>``.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

__all__ = ["SCHEDULES", "OPTIMIZERS", "build_schedule", "build_optimizer", "param_labels",
           "param_path", "lr_multipliers", "scale_by_pattern"]

SCHEDULES = ("constant", "step", "cosine")
OPTIMIZERS = ("sgd", "adamw")


def _get(cfg: Any, name: str) -> Any:
  try:
    return getattr(cfg, name)
  except (AttributeError, KeyError):
    raise ValueError(f"the optimiser config has no field optim.{name}") from None


def _number(cfg: Any, name: str, *, low: float | None = None, high: float | None = None,
            strict_low: bool = False) -> float:
  value = _get(cfg, name)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"optim.{name} must be a number, got {value!r}")
  if low is not None and (value < low or (strict_low and value == low)):
    raise ValueError(f"optim.{name} must be {'>' if strict_low else '>='} {low}, got {value}")
  if high is not None and value > high:
    raise ValueError(f"optim.{name} must be <= {high}, got {value}")
  return float(value)


def _choice(cfg: Any, name: str, choices: Sequence[str]) -> str:
  value = _get(cfg, name)
  if value not in choices:
    raise ValueError(f"optim.{name} must be one of {list(choices)}, got {value!r}")
  return value


def build_schedule(cfg: Any, *, total_steps: int) -> optax.Schedule:
  """The learning rate as a function of the number of applied updates.

  Args:
    cfg: the ``optim`` section: ``lr``, ``schedule`` (one of :data:`SCHEDULES`),
      ``warmup_steps``, ``warmup_factor`` (read when ``warmup_steps > 0``),
      ``milestones`` and ``gamma`` (``step``), ``min_lr_ratio`` (``cosine``).
    total_steps: the length of the run; the cosine reaches its floor there.

  Returns:
    ``schedule(count) -> float32 scalar``, traceable under ``jit``.
  """
  lr = _number(cfg, "lr", low=0.0, strict_low=True)
  kind = _choice(cfg, "schedule", SCHEDULES)
  warmup_steps = _get(cfg, "warmup_steps")
  if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
    raise ValueError(f"optim.warmup_steps must be an int >= 0, got {warmup_steps!r}")
  warmup_factor = _number(cfg, "warmup_factor", low=0.0, high=1.0) if warmup_steps else 1.0

  if kind == "step":
    milestones = tuple(_get(cfg, "milestones"))
    if (not all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in milestones)
        or list(milestones) != sorted(set(milestones))):
      raise ValueError(f"optim.milestones must be increasing positive step numbers, "
                       f"got {milestones!r}")
    gamma = _number(cfg, "gamma", low=0.0, strict_low=True)
    bounds = jnp.asarray(milestones, jnp.int32)

    def decay(count):
      return gamma ** jnp.sum(count >= bounds).astype(jnp.float32)
  elif kind == "cosine":
    min_lr_ratio = _number(cfg, "min_lr_ratio", low=0.0, high=1.0)
    if total_steps <= warmup_steps:
      raise ValueError(f"a cosine schedule needs total_steps ({total_steps}) > "
                       f"optim.warmup_steps ({warmup_steps})")
    length = total_steps - warmup_steps

    def decay(count):
      t = jnp.clip((count - warmup_steps) / length, 0.0, 1.0)
      return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
  else:

    def decay(count):
      del count
      return jnp.float32(1.0)

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    factor = decay(count)
    if warmup_steps:
      warm = warmup_factor + (1.0 - warmup_factor) * jnp.minimum(count, warmup_steps) / warmup_steps
      factor = factor * warm
    return jnp.asarray(lr * factor, jnp.float32)

  return schedule


def param_path(path: Sequence[Any]) -> str:
  """A key path of ``jax.tree_util`` as ``"backbone/conv1_1/kernel"``."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      parts.append(str(key.key))
    else:
      parts.append(str(key))
  return "/".join(parts)


def _compile_freeze(freeze: Sequence[str] | str | None) -> list[re.Pattern]:
  if not freeze:
    return []
  if isinstance(freeze, str):
    freeze = (freeze,)
  patterns = []
  for pattern in freeze:
    try:
      patterns.append(re.compile(pattern))
    except (re.error, TypeError) as e:
      raise ValueError(f"optim.freeze: {pattern!r} is not a regular expression: {e}") from None
  return patterns


def param_labels(params: Any, freeze: Sequence[str] | str | None) -> Any:
  """``"frozen"`` for parameters whose path matches a ``freeze`` regexp, else ``"train"``.

  Paths are ``'/'``-joined keys of the ``params`` collection
  (``"backbone/conv1_1/kernel"``), matched with ``re.search``. A pattern that
  matches no parameter is an error: it is almost always a typo.

  Returns:
    A tree of strings with the structure of ``params``.
  """
  patterns = _compile_freeze(freeze)
  used = set()

  def label(path, _):
    name = param_path(path)
    hits = {p.pattern for p in patterns if p.search(name)}
    used.update(hits)
    return "frozen" if hits else "train"

  labels = jax.tree_util.tree_map_with_path(label, params)
  unused = [p.pattern for p in patterns if p.pattern not in used]
  if unused:
    names = [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    raise ValueError(f"optim.freeze patterns {unused} match no parameter; parameters are "
                     f"{names[:8]}{' ...' if len(names) > 8 else ''}")
  return labels


def _lr_mult_items(lr_mult: Any) -> list[tuple[str, float]]:
  """``optim.lr_mult`` (a mapping, empty or None) as checked ``(prefix, factor)`` pairs."""
  if not lr_mult:
    return []
  if not hasattr(lr_mult, "items"):
    raise ValueError(f"optim.lr_mult must map parameter path prefixes to numbers, got {lr_mult!r}")
  items = []
  for prefix, factor in lr_mult.items():
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 0:
      raise ValueError(f"optim.lr_mult.{prefix} must be a number >= 0, got {factor!r}")
    items.append((str(prefix), float(factor)))
  return items


def lr_multipliers(params: Any, lr_mult: Any) -> Any:
  """The learning-rate multiplier of every parameter: a tree of floats like ``params``.

  A parameter whose path (``"backbone/layer1_0/conv1/kernel"``) is a key of
  ``lr_mult`` or lies under one (whole path parts: ``"backbone"`` covers
  ``backbone/...``, not ``backbone2/...``) gets that key's factor, every
  other parameter 1. A
  parameter that two keys match, or a key that matches no parameter, is an
  error (a typo would otherwise train at the wrong rate unnoticed).
  """
  items = _lr_mult_items(lr_mult)
  used = set()

  def factor(path, _):
    name = param_path(path)
    hits = [(prefix, f) for prefix, f in items
            if name == prefix or name.startswith(prefix.rstrip("/") + "/")]
    if len(hits) > 1:
      raise ValueError(f"optim.lr_mult keys {[h[0] for h in hits]} all match parameter {name}")
    used.update(h[0] for h in hits)
    return hits[0][1] if hits else 1.0

  factors = jax.tree_util.tree_map_with_path(factor, params)
  unused = [prefix for prefix, _ in items if prefix not in used]
  if unused:
    names = sorted({param_path(p).split("/")[0]
                    for p, _ in jax.tree_util.tree_leaves_with_path(params)})
    raise ValueError(f"optim.lr_mult keys {unused} match no trained parameter; the "
                     f"parameters' top-level names are {names}")
  return factors


def scale_by_pattern(lr_mult: Any) -> optax.GradientTransformation:
  """Multiplies each update by its parameter's :func:`lr_multipliers` factor."""
  _lr_mult_items(lr_mult)  # fail at build time on a bad value

  def init(params):
    lr_multipliers(params, lr_mult)  # fail at init on a key that matches nothing
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    factors = lr_multipliers(updates, lr_mult)
    return jax.tree.map(lambda u, f: u if f == 1.0 else u * jnp.asarray(f, u.dtype),
                        updates, factors), state

  return optax.GradientTransformation(init, update)


def _decay_mask(params: Any) -> Any:
  """True for parameters with ``ndim > 1`` (kernels), False for biases and norm scales."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def build_optimizer(cfg: Any, *, total_steps: int, frozen: Sequence[str] = ()
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimiser of the ``optim`` section and its learning-rate schedule.

  Args:
    cfg: the ``optim`` section: the schedule's fields (:func:`build_schedule`),
      ``name`` (one of :data:`OPTIMIZERS`), ``weight_decay``,
      ``decay_bias_and_norm``, ``clip_norm`` (0 or None: off), ``freeze``
      (regexps of frozen parameter paths), optionally ``lr_mult`` (path
      prefix -> learning-rate multiplier); ``momentum`` and ``nesterov`` for
      ``sgd``; ``b1``, ``b2``, ``eps`` for ``adamw``.
    total_steps: the length of the run, for the schedule.
    frozen: more regexps of frozen parameters: the model's own
      (``model.frozen_parameters()``, e.g. its frozen ResNet stages), joined
      with ``freeze`` so that they follow the model's fields.

  Returns:
    ``(tx, schedule)``: ``tx.init(params)`` takes the ``params`` collection;
    ``schedule(step)`` is the learning rate of update ``step`` (for logging).
  """
  name = _choice(cfg, "name", OPTIMIZERS)
  schedule = build_schedule(cfg, total_steps=total_steps)
  weight_decay = _number(cfg, "weight_decay", low=0.0)
  decay_bias_and_norm = _get(cfg, "decay_bias_and_norm")
  if not isinstance(decay_bias_and_norm, bool):
    raise ValueError(f"optim.decay_bias_and_norm must be a bool, got {decay_bias_and_norm!r}")
  clip_norm = _get(cfg, "clip_norm")
  if clip_norm is not None and (isinstance(clip_norm, bool)
                                or not isinstance(clip_norm, (int, float)) or clip_norm < 0):
    raise ValueError(f"optim.clip_norm must be None or a number >= 0, got {clip_norm!r}")
  freeze = _get(cfg, "freeze")
  if isinstance(freeze, str):
    freeze = (freeze,)
  freeze = tuple(freeze or ()) + tuple(frozen)
  _compile_freeze(freeze)  # fail now on a bad pattern, not at init
  lr_mult = getattr(cfg, "lr_mult", None)  # optional: configs written before it lack it
  lr_factors = [factor for _, factor in _lr_mult_items(lr_mult)]  # checked now, not at init

  decay_mask = None if decay_bias_and_norm else _decay_mask
  decay = ([optax.add_decayed_weights(weight_decay, mask=decay_mask)] if weight_decay > 0 else [])
  parts = [optax.clip_by_global_norm(float(clip_norm))] if clip_norm else []
  if name == "sgd":
    momentum = _number(cfg, "momentum", low=0.0, high=1.0)
    nesterov = _get(cfg, "nesterov")
    if not isinstance(nesterov, bool):
      raise ValueError(f"optim.nesterov must be a bool, got {nesterov!r}")
    if nesterov and momentum == 0:
      raise ValueError("optim.nesterov needs optim.momentum > 0 (as in torch.optim.SGD)")
    parts += decay  # coupled: added to the gradient before momentum
    if momentum > 0:
      parts.append(optax.trace(decay=momentum, nesterov=nesterov))
  else:
    b1 = _number(cfg, "b1", low=0.0, high=1.0)
    b2 = _number(cfg, "b2", low=0.0, high=1.0)
    eps = _number(cfg, "eps", low=0.0)
    parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    parts += decay  # decoupled: lr * wd * p, added to the Adam direction
  parts.append(optax.scale_by_learning_rate(schedule))
  if any(factor != 1.0 for factor in lr_factors):
    # Only then: multipliers of 1 leave the optimiser state's structure as it
    # was without the field, so checkpoints written before it still restore.
    parts.append(scale_by_pattern(lr_mult))
  train = optax.chain(*parts)

  if not freeze:
    return train, schedule
  tx = optax.multi_transform({"train": train, "frozen": optax.set_to_zero()},
                             lambda params: param_labels(params, freeze))
  return tx, schedule
