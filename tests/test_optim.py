"""jdet.engine.optim against torch.optim and hand-computed schedules."""

import types

import jax
import ml_collections
import numpy as np
import optax
import pytest
import torch

from jdet.engine import optim


def _cfg(**overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(dict(
      name="sgd", lr=0.1, schedule="constant", warmup_steps=0, warmup_factor=0.001,
      milestones=(), gamma=0.1, min_lr_ratio=0.0, momentum=0.9, nesterov=False,
      weight_decay=0.0, decay_bias_and_norm=True, b1=0.9, b2=0.999, eps=1e-8,
      clip_norm=None, freeze=()))
  cfg.update(overrides)
  return cfg


def _params(rng):
  shapes = {"backbone": {"conv1": {"kernel": (3, 3, 2, 4), "bias": (4,)}, "bn": {"scale": (4,)}},
            "head": {"kernel": (4, 5), "bias": (5,)}}
  return jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def _run_optax(tx, params, grads_seq):
  state = tx.init(params)

  @jax.jit
  def update(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for grads in grads_seq:
    params, state = update(params, state, grads)
  return jax.tree.map(np.asarray, params)


def _run_torch(make_opt, params, grads_seq, lrs, decay_bias_and_norm, weight_decay):
  """torch.optim on the same leaves; one param group per decay setting."""
  leaves, treedef = jax.tree.flatten(params)
  tensors = [torch.tensor(np.array(p), requires_grad=True) for p in leaves]
  decayed = [t for t in tensors if decay_bias_and_norm or t.ndim > 1]
  plain = [t for t in tensors if not (decay_bias_and_norm or t.ndim > 1)]
  groups = [{"params": decayed, "weight_decay": weight_decay}]
  if plain:
    groups.append({"params": plain, "weight_decay": 0.0})
  opt = make_opt(groups)
  for grads, lr in zip(grads_seq, lrs):
    for group in opt.param_groups:
      group["lr"] = lr
    for t, g in zip(tensors, jax.tree.leaves(grads)):
      t.grad = torch.tensor(np.array(g))
    opt.step()
  return jax.tree.unflatten(treedef, [t.detach().numpy() for t in tensors])


def _grads(rng, params, n):
  return [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
          for _ in range(n)]


def _run_config(rng, cfg, steps: int):
  """Our optimiser for ``cfg`` over ``steps`` random gradients of random parameters:
  ``(params, grads, final params, learning rate of each step)``."""
  tx, schedule = optim.build_optimizer(cfg, total_steps=steps)
  params = _params(rng)
  grads = _grads(rng, params, steps)
  return params, grads, _run_optax(tx, params, grads), [float(schedule(i)) for i in range(steps)]


# ---------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------


def test_step_schedule_with_warmup_hand_computed():
  cfg = _cfg(lr=0.02, schedule="step", warmup_steps=500, warmup_factor=0.001,
             milestones=(1000, 1500), gamma=0.1)
  s = optim.build_schedule(cfg, total_steps=2000)
  expected = {0: 0.02 * 0.001, 250: 0.02 * (0.001 + 0.999 * 0.5), 500: 0.02, 999: 0.02,
              1000: 0.002, 1499: 0.002, 1500: 0.0002, 5000: 0.0002}
  for step, lr in expected.items():
    np.testing.assert_allclose(float(s(step)), lr, rtol=1e-6, err_msg=f"step {step}")
  # Traceable: the same values from a jitted, vectorised call.
  steps = np.array(list(expected), np.int32)
  np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(s))(steps)), list(expected.values()),
                             rtol=1e-6)


def test_cosine_schedule_hand_computed():
  cfg = _cfg(lr=0.1, schedule="cosine", warmup_steps=10, warmup_factor=0.5, min_lr_ratio=0.1)
  s = optim.build_schedule(cfg, total_steps=110)
  np.testing.assert_allclose(float(s(0)), 0.05, rtol=1e-6)  # warm-up start: lr * factor
  np.testing.assert_allclose(float(s(5)), 0.075, rtol=1e-6)
  np.testing.assert_allclose(float(s(10)), 0.1, rtol=1e-6)  # end of warm-up: the peak
  np.testing.assert_allclose(float(s(60)), 0.1 * (0.1 + 0.9 * 0.5), rtol=1e-6)  # midpoint
  quarter = 0.1 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi / 4)))
  np.testing.assert_allclose(float(s(35)), quarter, rtol=1e-6)
  np.testing.assert_allclose(float(s(110)), 0.01, rtol=1e-6)
  np.testing.assert_allclose(float(s(500)), 0.01, rtol=1e-6)


def test_constant_schedule():
  s = optim.build_schedule(_cfg(lr=0.3), total_steps=10)
  assert [float(s(i)) for i in (0, 7, 100)] == pytest.approx([0.3] * 3)


# ---------------------------------------------------------------------------
# Optimisers against torch.optim
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("decay_bias_and_norm", [True, False])
def test_sgd_matches_torch(rng, nesterov, decay_bias_and_norm):
  cfg = _cfg(name="sgd", lr=0.1, schedule="step", warmup_steps=2, warmup_factor=0.1,
             milestones=(4,), gamma=0.5, momentum=0.9, nesterov=nesterov, weight_decay=1e-2,
             decay_bias_and_norm=decay_bias_and_norm)
  params, grads, ours, lrs = _run_config(rng, cfg, 6)
  assert lrs[0] == pytest.approx(0.01) and lrs[5] == pytest.approx(0.05)
  ref = _run_torch(lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, nesterov=nesterov),
                   params, grads, lrs, decay_bias_and_norm, 1e-2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ours, ref)
  # The parameters moved.
  assert not np.allclose(ours["head"]["kernel"], params["head"]["kernel"])


@pytest.mark.parametrize("decay_bias_and_norm", [True, False])
def test_adamw_matches_torch(rng, decay_bias_and_norm):
  cfg = _cfg(name="adamw", lr=1e-3, schedule="cosine", warmup_steps=1, warmup_factor=0.1,
             weight_decay=0.05, b1=0.9, b2=0.99, eps=1e-8, decay_bias_and_norm=decay_bias_and_norm)
  params, grads, ours, lrs = _run_config(rng, cfg, 5)
  ref = _run_torch(lambda g: torch.optim.AdamW(g, lr=1e-3, betas=(0.9, 0.99), eps=1e-8),
                   params, grads, lrs, decay_bias_and_norm, 0.05)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ours, ref)


def test_frozen_params_bit_identical(rng):
  cfg = _cfg(name="sgd", weight_decay=1e-2, freeze=(r"^backbone/conv1/",))
  tx, _ = optim.build_optimizer(cfg, total_steps=3)
  params = _params(rng)
  out = _run_optax(tx, params, _grads(rng, params, 3))
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(out["backbone"]["conv1"][name], params["backbone"]["conv1"][name])
  assert not np.allclose(out["backbone"]["bn"]["scale"], params["backbone"]["bn"]["scale"])
  assert not np.allclose(out["head"]["kernel"], params["head"]["kernel"])
  labels = optim.param_labels(params, (r"^backbone/conv1/",))
  assert labels["backbone"]["conv1"] == {"kernel": "frozen", "bias": "frozen"}
  assert labels["head"] == {"kernel": "train", "bias": "train"}


def test_frozen_params_do_not_count_in_clip_norm(rng):
  # Huge gradients on the frozen parameters must not shrink the trained ones.
  cfg = _cfg(name="sgd", lr=1.0, momentum=0.0, clip_norm=10.0, freeze=("backbone",))
  tx, _ = optim.build_optimizer(cfg, total_steps=1)
  params = _params(rng)
  grads = jax.tree.map(lambda p: np.full_like(p, 1e3), params)
  grads["head"] = jax.tree.map(lambda p: np.full_like(p, 0.1), params["head"])
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(np.asarray(updates["head"]["kernel"]), -0.1, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(updates["backbone"]["conv1"]["kernel"]), 0.0)


def test_no_decay_on_bias_and_norm(rng):
  params = _params(rng)
  grads = [jax.tree.map(np.zeros_like, params)] * 3
  for flag in (False, True):
    tx, _ = optim.build_optimizer(_cfg(weight_decay=0.1, decay_bias_and_norm=flag), total_steps=3)
    out = _run_optax(tx, params, grads)
    for path in (("head", "bias"), ("backbone", "bn", "scale")):
      before, after = params, out
      for key in path:
        before, after = before[key], after[key]
      assert np.array_equal(after, before) == (not flag), path
    # Kernels always decay.
    assert np.all(np.abs(out["head"]["kernel"]) < np.abs(params["head"]["kernel"]))


def test_clip_norm(rng):
  tx, _ = optim.build_optimizer(_cfg(lr=1.0, momentum=0.0, clip_norm=2.0), total_steps=1)
  params = _params(rng)
  grads = jax.tree.map(lambda p: 10 * rng.normal(size=p.shape).astype(np.float32), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(float(optax.tree.norm(updates)), 2.0, rtol=1e-5)
  scale = 2.0 / float(optax.tree.norm(grads))
  jax.tree.map(lambda u, g: np.testing.assert_allclose(-np.asarray(u), g * scale, rtol=1e-5),
               updates, grads)
  # Below the threshold: unchanged.
  small = jax.tree.map(lambda g: g * (1.0 / float(optax.tree.norm(grads))), grads)
  updates, _ = tx.update(small, tx.init(params), params)
  jax.tree.map(lambda u, g: np.testing.assert_allclose(-np.asarray(u), g, rtol=1e-6),
               updates, small)


@pytest.mark.parametrize("field, value", [
    ("name", "adam"), ("schedule", "poly"), ("lr", -1.0), ("milestones", (30, 10)),
    ("freeze", ("(",)), ("nesterov", "yes"), ("clip_norm", -1.0)])
def test_bad_values_name_the_field(field, value):
  # Any attribute object works; a plain namespace lets a value change type.
  cfg = types.SimpleNamespace(**_cfg(schedule="step", milestones=(10,)).to_dict())
  setattr(cfg, field, value)
  with pytest.raises(ValueError, match=f"optim.{field}"):
    optim.build_optimizer(cfg, total_steps=100)


def test_missing_field_and_unmatched_freeze_pattern(rng):
  cfg = _cfg()
  del cfg["momentum"]
  with pytest.raises(ValueError, match="optim.momentum"):
    optim.build_optimizer(cfg, total_steps=10)
  tx, _ = optim.build_optimizer(_cfg(freeze=("backbone/stem",)), total_steps=10)
  with pytest.raises(ValueError, match="optim.freeze"):
    tx.init(_params(rng))


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_lr_mult_matches_torch_param_groups(rng, name):
  # The body at 4x, its conv1 frozen, clipping on: torch with one group per rate.
  cfg = _cfg(name=name, lr=1e-2, schedule="cosine", warmup_steps=1, warmup_factor=0.1,
             weight_decay=0.05, clip_norm=3.0, freeze=(r"^backbone/conv1/",),
             lr_mult={"backbone": 4.0, "head/bias": 0.5})
  params, grads, ours, lrs = _run_config(rng, cfg, 5)
  t = {k: torch.tensor(np.array(v), requires_grad=True)
       for k, v in (("bn", params["backbone"]["bn"]["scale"]), ("kernel", params["head"]["kernel"]),
                    ("bias", params["head"]["bias"]))}
  groups = [{"params": [t["bn"]], "mult": 4.0}, {"params": [t["kernel"]], "mult": 1.0},
            {"params": [t["bias"]], "mult": 0.5}]
  if name == "adamw":
    opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
  else:
    opt = torch.optim.SGD(groups, lr=1e-2, momentum=0.9, weight_decay=0.05)
  for g, lr in zip(grads, lrs):
    for group in opt.param_groups:
      group["lr"] = lr * group["mult"]
    t["bn"].grad = torch.tensor(np.array(g["backbone"]["bn"]["scale"]))
    t["kernel"].grad = torch.tensor(np.array(g["head"]["kernel"]))
    t["bias"].grad = torch.tensor(np.array(g["head"]["bias"]))
    torch.nn.utils.clip_grad_norm_(list(t.values()), 3.0)  # the frozen conv1 does not count
    opt.step()
  np.testing.assert_allclose(ours["backbone"]["bn"]["scale"], t["bn"].detach().numpy(),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ours["head"]["kernel"], t["kernel"].detach().numpy(),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ours["head"]["bias"], t["bias"].detach().numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(ours["backbone"]["conv1"]["kernel"],
                                params["backbone"]["conv1"]["kernel"])
  factors = optim.lr_multipliers(params, cfg.lr_mult)
  assert factors["backbone"]["conv1"]["kernel"] == 4.0 and factors["head"]["bias"] == 0.5
  assert factors["head"]["kernel"] == 1.0


def test_lr_mult_errors_name_the_field(rng):
  params = _params(rng)
  with pytest.raises(ValueError, match=r"optim.lr_mult.backbone must be a number"):
    optim.build_optimizer(_cfg(lr_mult={"backbone": "fast"}), total_steps=10)
  tx, _ = optim.build_optimizer(_cfg(lr_mult={"backbon3": 2.0}), total_steps=10)
  with pytest.raises(ValueError, match=r"optim.lr_mult keys \['backbon3'\] match no"):
    tx.init(params)
  # Whole path parts only: "back" is not a prefix of backbone's parameters.
  with pytest.raises(ValueError, match=r"optim.lr_mult keys \['back'\] match no"):
    optim.lr_multipliers(params, {"back": 2.0})
  with pytest.raises(ValueError, match="all match parameter backbone/bn/scale"):
    optim.lr_multipliers(params, {"backbone": 2.0, "backbone/bn": 3.0})
  # Without the field (configs written before it), every rate is the base rate.
  cfg = _cfg(name="sgd", momentum=0.0)
  tx, _ = optim.build_optimizer(cfg, total_steps=1)
  grads = jax.tree.map(np.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  jax.tree.map(lambda u: np.testing.assert_allclose(np.asarray(u), -0.1), updates)


def test_lr_mult_of_one_keeps_the_state_structure(rng):
  # Configs that carry the field at 1 restore checkpoints written before it existed.
  params = _params(rng)
  cfg = _cfg(name="adamw", weight_decay=0.01)
  without, _ = optim.build_optimizer(cfg, total_steps=3)
  ones, _ = optim.build_optimizer(_cfg(name="adamw", weight_decay=0.01,
                                       lr_mult={"backbone": 1.0}), total_steps=3)
  faster, _ = optim.build_optimizer(_cfg(name="adamw", weight_decay=0.01,
                                         lr_mult={"backbone": 2.0}), total_steps=3)
  structure = lambda tx: jax.tree.structure(tx.init(params))  # noqa: E731
  assert structure(ones) == structure(without)
  assert structure(faster) != structure(without)
  grads = _grads(rng, params, 2)
  jax.tree.map(np.testing.assert_array_equal, _run_optax(ones, params, grads),
               _run_optax(without, params, grads))
