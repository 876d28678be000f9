"""ResNet against torchvision: converted weights give torchvision's C2..C5; norms and freezing.

torchvision's ``resnet18/34/50`` with seeded random weights, and BatchNorm
statistics and affine drawn at random too (torchvision starts them at the
identity, which would leave a wrong mean/var mapping untested), run in eval
mode on two raccoon photos resized to 96x128; jdet's ResNet with the converted
variables must give the same four feature maps. The norms: frozen BatchNorm
(numbers in ``batch_stats``, out of the optimiser's reach), trainable
BatchNorm (train-mode forward and running statistics against torch's train
mode), GroupNorm (a torchvision ResNet-50 built with ``nn.GroupNorm``).
Freezing: the loss's gradient is exactly zero for the frozen stages only, and
one SGD step with weight decay changes neither them nor frozen BatchNorm.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models._utils import IntermediateLayerGetter

from jdet import parallel
from jdet.convert import resnet_params
from jdet.engine import optim
from jdet.engine.train_state import TrainState
from jdet.models.backbones.resnet import ResNet
from tests.helpers.images import photo_batch
from tests.helpers.references import assert_close
from tests.helpers.torch_models import state_dict_numpy, to_nchw, to_nhwc, torch_resnet
from tests.helpers.weights import numpy_variables


def _torch_features(model: torch.nn.Module, x: np.ndarray, stages=(1, 2, 3, 4)) -> list[np.ndarray]:
  getter = IntermediateLayerGetter(model, {f"layer{s}": str(s) for s in stages})
  with torch.no_grad():
    return [to_nhwc(v) for v in getter(to_nchw(x)).values()]


@functools.lru_cache(maxsize=None)
def _apply(model: ResNet):
  return jax.jit(lambda v, x: model.apply(v, x))


def _shapes(model: ResNet, size=(1, 64, 64, 3)):
  return jax.eval_shape(lambda k: model.init(k, jnp.zeros(size)), jax.random.key(0))


def _count(tree) -> int:
  return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


TINY = dict(depth=18, widths=(8, 16, 16, 16), stem_width=8, norm_groups=4)


def _tiny_variables(model: ResNet, x: jnp.ndarray, seed: int = 0) -> dict:
  """Variables of ``model`` from NumPy (He-normal kernels; norms with random affine and
  statistics): compiling ``model.init``'s random initialisers costs more than the tests."""
  shapes = jax.eval_shape(lambda k: model.init(k, x), jax.random.key(0))
  return numpy_variables(shapes, seed, random_norms=True)


@pytest.fixture(scope="module")
def photos():
  return photo_batch()


# ----------------------------------------------------------------------------
# Inference parity with torchvision.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_features_match_torchvision(depth, photos):
  tv = torch_resnet(depth)
  variables = resnet_params(state_dict_numpy(tv))
  model = ResNet(depth)
  assert "bn1" not in variables["params"] and "bn1" in variables["batch_stats"]
  got = _apply(model)(variables, jnp.asarray(photos))
  want = _torch_features(tv, photos)
  assert len(got) == 4
  for s, (g, w, c, stride) in enumerate(zip(got, want, model.out_channels, model.out_strides), 1):
    assert w.shape == (2, 96 // stride, 128 // stride, c)
    assert_close(g, w, what=f"ResNet-{depth} C{s + 1}")
  expected = (64, 128, 256, 512) if depth < 50 else (256, 512, 1024, 2048)
  assert model.out_channels == expected and model.out_strides == (4, 8, 16, 32)


@pytest.mark.parametrize("depth", [18, 50, 101])
@pytest.mark.parametrize("norm", ["frozen_bn", "batch"])
def test_converted_tree_and_parameter_count(depth, norm):
  """The converter's tree has the model's exact names and shapes per collection, and as many
  numbers as torchvision's parameters and buffers (minus ``fc`` and ``num_batches_tracked``)."""
  torch.manual_seed(0)
  tv = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50,
        101: torchvision.models.resnet101}[depth](weights=None)
  variables = resnet_params(state_dict_numpy(tv), norm=norm)
  shapes = _shapes(ResNet(depth, norm=norm))
  assert set(variables) == set(shapes) == {"params", "batch_stats"}
  for c in shapes:
    assert jax.tree.structure(variables[c]) == jax.tree.structure(shapes[c]), c
    assert jax.tree.map(np.shape, variables[c]) == jax.tree.map(lambda s: s.shape, shapes[c]), c
  tv_params = sum(p.numel() for n, p in tv.named_parameters() if not n.startswith("fc."))
  tv_stats = sum(b.numel() for n, b in tv.named_buffers() if "running" in n)
  bn_affine = sum(p.numel() for n, p in tv.named_parameters() if ".bn" in n or n.startswith("bn")
                  or ".downsample.1." in n)
  if norm == "batch":  # torchvision's own split: conv kernels and BN affine are parameters
    assert _count(variables["params"]) == tv_params
    assert _count(variables["batch_stats"]) == tv_stats
  else:  # frozen: only the conv kernels are parameters
    assert _count(variables["params"]) == tv_params - bn_affine
    assert _count(variables["batch_stats"]) == tv_stats + bn_affine
  assert tv_params == {18: 11_176_512, 50: 23_508_032, 101: 42_500_160}[depth]


def test_out_stages_select_and_truncate(photos):
  tv = torch_resnet(18)
  variables = resnet_params(state_dict_numpy(tv))
  model = ResNet(18, out_stages=(2, 3))
  shapes = _shapes(model)
  assert "layer4" not in shapes["params"]  # not built, as IntermediateLayerGetter drops it
  trimmed = {c: {k: v for k, v in t.items() if k != "layer4"} for c, t in variables.items()}
  got = _apply(model)(trimmed, jnp.asarray(photos))
  want = _torch_features(tv, photos, stages=(2, 3))
  assert model.out_channels == (128, 256) and model.out_strides == (8, 16)
  for g, w in zip(got, want, strict=True):
    assert_close(g, w)


def test_group_norm_matches_torch(photos):
  """A torchvision ResNet-50 with ``nn.GroupNorm(32, c)`` in place of BatchNorm."""
  tv = torch_resnet(50, norm_layer=lambda c: torch.nn.GroupNorm(32, c))
  variables = resnet_params(state_dict_numpy(tv), norm="group")
  assert set(variables) == {"params"}
  assert set(variables["params"]["layer2"]["block0"]["bn2"]) == {"scale", "bias"}
  got = _apply(ResNet(50, norm="group"))(variables, jnp.asarray(photos))
  for s, (g, w) in enumerate(zip(got, _torch_features(tv, photos)), 2):
    assert_close(g, w, what=f"GN C{s}")


def test_bfloat16_computes_in_bfloat16_with_float32_variables(photos):
  tv = torch_resnet(18)
  variables = resnet_params(state_dict_numpy(tv))
  model = ResNet(18, dtype=jnp.bfloat16)
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(_shapes(model)))
  got = _apply(model)(variables, jnp.asarray(photos))
  for g, w in zip(got, _torch_features(tv, photos)):
    assert g.dtype == jnp.bfloat16
    assert_close(np.asarray(g, np.float32), w, rel=0.1)


@pytest.mark.parametrize("kwargs", [dict(depth=20), dict(norm="layer"), dict(frozen_stages=5),
                                    dict(out_stages=(3, 2)), dict(out_stages=(0, 1)),
                                    dict(widths=(64, 128, 256))])
def test_bad_arguments_are_refused(kwargs):
  with pytest.raises(ValueError):
    _shapes(ResNet(**kwargs))


# ----------------------------------------------------------------------------
# Trainable BatchNorm: torch's train mode.
# ----------------------------------------------------------------------------


def test_batch_norm_train_mode_matches_torch(photos):
  """``norm="batch"``, nothing frozen: the train-mode forward normalises with the batch's
  statistics as torch's train mode does, and the running mean moves by torch's momentum 0.1.
  The running variance differs by design: Flax averages the biased batch variance, torch the
  unbiased one (``n / (n - 1)`` larger, ``n = B * h * w``)."""
  tv = torch_resnet(18)
  variables = resnet_params(state_dict_numpy(tv), norm="batch")
  model = ResNet(18, norm="batch", frozen_stages=-1)
  fn = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  got, updates = fn(variables, jnp.asarray(photos))
  tv.train()
  want = _torch_features(tv, photos)
  for g, w in zip(got, want):
    assert_close(g, w, rel=2e-4)
  old = variables["batch_stats"]
  new = jax.tree.map(np.asarray, updates["batch_stats"])
  for path, bn, n in [(("bn1",), tv.bn1, 2 * 48 * 64),
                      (("layer3", "block1", "bn2"), tv.layer3[1].bn2, 2 * 6 * 8)]:
    get = lambda tree: functools.reduce(lambda t, k: t[k], path, tree)
    np.testing.assert_allclose(get(new)["mean"], bn.running_mean.numpy(), rtol=1e-4, atol=1e-5)
    torch_batch_var = (bn.running_var.numpy() - 0.9 * get(old)["var"]) / 0.1  # unbiased
    np.testing.assert_allclose(get(new)["var"],
                               0.9 * get(old)["var"] + 0.1 * torch_batch_var * (n - 1) / n,
                               rtol=1e-4, atol=1e-5)
    assert np.abs(get(new)["mean"] - get(old)["mean"]).min() > 0  # every channel moved


def test_batch_norm_in_frozen_stages_keeps_its_statistics(photos):
  tv = torch_resnet(18)
  variables = resnet_params(state_dict_numpy(tv), norm="batch")
  model = ResNet(18, norm="batch", frozen_stages=1)
  _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, jnp.asarray(photos))
  old, new = variables["batch_stats"], updates["batch_stats"]
  for name in ("bn1", "layer1"):
    jax.tree.map(np.testing.assert_array_equal, new[name], old[name])
  for name in ("layer2", "layer4"):
    diffs = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), new[name], old[name])
    assert min(jax.tree.leaves(diffs)) > 0


def test_batch_norm_statistics_are_global_over_a_sharded_batch(photos):
  """Four images split over four simulated devices in one ``jit``: the same features and
  running statistics as on one device, where one image alone would give other statistics."""
  if jax.device_count() < 4:
    pytest.skip("needs 4 (simulated) devices")
  model = ResNet(**TINY, norm="batch", frozen_stages=-1)
  x = np.concatenate([photos, photos[:, ::-1]])[:, :64, :64]  # [4, 64, 64, 3], all different
  variables = _tiny_variables(model, jnp.asarray(x[:1]))
  fn = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
  want_feats, want = jax.jit(fn)(variables, jnp.asarray(x))
  mesh = parallel.make_mesh(jax.devices()[:4])
  sharded = parallel.shard_batch({"image": x}, mesh)["image"]
  feats, got = jax.jit(fn)(parallel.replicate(variables, mesh), sharded)
  assert len(sharded.sharding.device_set) == 4
  for g, w in zip(feats, want_feats):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6), got, want)
  _, alone = jax.jit(fn)(variables, jnp.asarray(x[:1]))
  assert not np.allclose(alone["batch_stats"]["bn1"]["mean"], want["batch_stats"]["bn1"]["mean"],
                         rtol=1e-3)


# ----------------------------------------------------------------------------
# Freezing: gradients, and what one optimiser step may change.
# ----------------------------------------------------------------------------

def _loss(model, params, batch_stats, x):
  feats = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                      mutable=["batch_stats"])[0]
  return sum(jnp.mean(f ** 2) for f in feats)


def _grad_norms(model, variables, x) -> dict[str, float]:
  """Largest |gradient| of the loss per top-level module (conv1, bn1, layer1, ...)."""
  grads = jax.jit(jax.grad(functools.partial(_loss, model)))(
      variables["params"], variables.get("batch_stats", {}), x)
  return {k: max(float(jnp.abs(g).max()) for g in jax.tree.leaves(v)) for k, v in grads.items()}


@pytest.mark.parametrize("frozen_stages, norm", [(-1, "frozen_bn"), (0, "batch"), (1, "frozen_bn"),
                                                 (1, "batch"), (2, "group")])
def test_frozen_stages_have_exactly_zero_gradient(norm, frozen_stages, photos):
  model = ResNet(**TINY, norm=norm, frozen_stages=frozen_stages)
  x = jnp.asarray(photos[:1, :64, :64])
  variables = _tiny_variables(model, x)
  norms = _grad_norms(model, variables, x)
  frozen = set(model.frozen_modules())
  assert frozen == ({"conv1", "bn1"} if frozen_stages >= 0 else set()) | {
      f"layer{s}" for s in range(1, frozen_stages + 1)}
  for name, value in norms.items():
    if name in frozen:
      assert value == 0.0, name
    else:
      assert value > 0.0, name
  # frozen BatchNorm has nothing in params; the other norms have their scale and bias there.
  assert ("bn1" in norms) == (norm != "frozen_bn")


def _sgd(freeze) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="sgd", lr=0.1, schedule="constant", warmup_steps=0, momentum=0.9, nesterov=False,
      weight_decay=0.1, decay_bias_and_norm=True, clip_norm=None, freeze=freeze))


def test_sgd_with_weight_decay_cannot_change_frozen_parts(photos):
  """One ``TrainState`` step of SGD with weight decay on every parameter (norms included):
  frozen BatchNorm (in ``batch_stats``) and the frozen stem + layer1 (``optim.freeze`` from
  :meth:`ResNet.freeze_patterns`) keep every bit; layer2 changes."""
  model = ResNet(**TINY, frozen_stages=1)
  x = jnp.asarray(photos[:1, :64, :64])
  variables = _tiny_variables(model, x)
  assert model.freeze_patterns("backbone/") == ("^backbone/(conv1|bn1|layer1)/",)
  patterns = model.freeze_patterns()
  tx, _ = optim.build_optimizer(_sgd(patterns), total_steps=10)
  state = TrainState.create(params=variables["params"], batch_stats=variables["batch_stats"],
                            tx=tx, rng=jax.random.key(0))

  @jax.jit
  def step(state):
    def loss_fn(params):
      feats, updates = model.apply({**state.variables, "params": params}, x, train=True,
                                   mutable=["batch_stats"])
      return sum(jnp.mean(f ** 2) for f in feats), updates
    grads, updates = jax.grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads, batch_stats=updates["batch_stats"])

  new = step(state)
  jax.tree.map(np.testing.assert_array_equal, new.batch_stats, state.batch_stats)
  for name in ("conv1", "layer1"):
    jax.tree.map(np.testing.assert_array_equal, new.params[name], state.params[name])
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new.params["layer2"],
                         state.params["layer2"])
  assert all(jax.tree.leaves(changed))  # weight decay reaches every trained parameter
