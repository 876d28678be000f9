"""FPN against torchvision's ``FeaturePyramidNetwork``: the same P2..P6 (or P3..P7).

Seeded torchvision FPNs (with random biases: torchvision starts them at zero)
are converted and run on random C2..C5 maps of the sizes a ResNet gives for
96x128, 100x75 and 75x100 inputs, where the odd sizes make the top-down
nearest upsampling pick pixels by PyTorch's rule (4 -> 7, 7 -> 13, 13 -> 25).
"""

from __future__ import annotations

from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from jdet.convert import fpn_params
from jdet.models.necks.fpn import FPN, resize_nearest
from tests.helpers.references import assert_close
from tests.helpers.torch_models import state_dict_numpy, to_nchw, to_nhwc

IN_CHANNELS = (16, 32, 48, 64)


def _resnet_sizes(h: int, w: int) -> list[tuple[int, int]]:
  """The C2..C5 sizes torchvision's ResNet gives for an ``h x w`` input (as in
  ``tests/models/test_resnet.py``: conv 7x7/2 pad 3, max pool 3x3/2 pad 1, 3x3/2 pad 1 convs)."""
  down = lambda n, k, p: (n + 2 * p - k) // 2 + 1
  h, w = down(down(h, 7, 3), 3, 1), down(down(w, 7, 3), 3, 1)
  sizes = [(h, w)]
  for _ in range(3):
    h, w = down(h, 3, 1), down(w, 3, 1)
    sizes.append((h, w))
  return sizes


def _features(sizes, channels=IN_CHANNELS, seed=0) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(2, h, w, c)).astype(np.float32) for (h, w), c in zip(sizes, channels)]


def _torch_fpn(in_channels, out_channels, extra_blocks, seed=0) -> FeaturePyramidNetwork:
  torch.manual_seed(seed)
  fpn = FeaturePyramidNetwork(list(in_channels), out_channels, extra_blocks=extra_blocks).eval()
  with torch.no_grad():
    for m in fpn.modules():
      if isinstance(m, torch.nn.Conv2d):
        m.bias.uniform_(-0.5, 0.5)
  return fpn


def _run_torch(fpn, features) -> list[np.ndarray]:
  with torch.no_grad():
    out = fpn(OrderedDict((str(i), to_nchw(f)) for i, f in enumerate(features)))
  return [to_nhwc(v) for v in out.values()]


@pytest.mark.parametrize("n", [2, 4, 7, 13])
@pytest.mark.parametrize("m", [1, 3, 7, 8, 13, 25, 26])
def test_resize_nearest_is_torch_interpolate(n, m):
  x = np.arange(n * 3 * 2, dtype=np.float32).reshape(1, n, 3, 2) * 0.5
  want = to_nhwc(F.interpolate(to_nchw(x), size=(m, 5), mode="nearest"))
  np.testing.assert_array_equal(resize_nearest(jnp.asarray(x), (m, 5)), want)


@pytest.mark.parametrize("image", [(96, 128), (100, 75), (75, 100)])
def test_maxpool_fpn_matches_torchvision(image):
  sizes = _resnet_sizes(*image)
  features = _features(sizes)
  tv = _torch_fpn(IN_CHANNELS, 32, LastLevelMaxPool())
  params = fpn_params(state_dict_numpy(tv), prefix="")
  model = FPN(out_channels=32)
  apply = jax.jit(lambda p, f: model.apply({"params": p}, f))
  got = apply(params, [jnp.asarray(f) for f in features])
  want = _run_torch(tv, features)
  assert len(got) == len(want) == 5
  for level, (g, w) in enumerate(zip(got, want), 2):
    assert_close(g, w, what=f"P{level}")
  # P2..P5 keep their input sizes; P6 is ceil(P5 / 2).
  assert [g.shape[1:3] for g in got] == sizes + [(-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2))]


@pytest.mark.parametrize("extra_input", ["p5", "c5"])
def test_p6p7_fpn_matches_torchvision(extra_input):
  """RetinaNet's levels from C3..C5: P6 from P5 when torchvision's ``use_P5`` holds
  (in channels == out channels), else from C5; P7 from ReLU(P6)."""
  sizes = _resnet_sizes(100, 75)[1:]
  channels = IN_CHANNELS[1:]
  features = _features(sizes, channels)
  extra_in = 24 if extra_input == "p5" else channels[-1]
  tv = _torch_fpn(channels, 24, LastLevelP6P7(extra_in, 24))
  assert tv.extra_blocks.use_P5 == (extra_input == "p5")
  params = fpn_params(state_dict_numpy(tv), prefix="")
  assert set(params) == {"inner_block0", "inner_block1", "inner_block2", "layer_block0",
                         "layer_block1", "layer_block2", "p6", "p7"}
  model = FPN(out_channels=24, extra="p6p7", num_extra=2, extra_input=extra_input)
  got = model.apply({"params": params}, [jnp.asarray(f) for f in features])
  want = _run_torch(tv, features)
  assert len(got) == len(want) == 5
  for level, (g, w) in enumerate(zip(got, want), 3):
    assert_close(g, w, what=f"P{level}")


def test_param_names_shapes_and_extra_levels():
  sizes = _resnet_sizes(96, 128)
  features = [jnp.zeros(f.shape) for f in _features(sizes)]
  shapes = jax.eval_shape(lambda k: FPN(out_channels=32).init(k, features), jax.random.key(0))
  tv = fpn_params(state_dict_numpy(_torch_fpn(IN_CHANNELS, 32, LastLevelMaxPool())), prefix="")
  assert jax.tree.map(lambda s: s.shape, shapes["params"]) == jax.tree.map(np.shape, tv)
  assert shapes["params"]["inner_block0"]["kernel"].shape == (1, 1, 16, 32)
  assert shapes["params"]["layer_block3"]["kernel"].shape == (3, 3, 32, 32)
  outs = jax.eval_shape(lambda: FPN(out_channels=8, num_extra=2).init_with_output(
      jax.random.key(0), features)[0])
  assert [o.shape[1:3] for o in outs] == sizes + [(2, 2), (1, 1)]
  outs = jax.eval_shape(lambda: FPN(out_channels=8, extra="none").init_with_output(
      jax.random.key(0), features)[0])
  assert len(outs) == 4
  with pytest.raises(ValueError, match="extra"):
    FPN(extra="pool").init(jax.random.key(0), features)
