"""jdet.convert against torchvision: ResNet-FPN backbones compute what torchvision computes.

* The ``backbone`` of ``fasterrcnn_resnet50_fpn(weights=None)``, saved as a
  ``.pth`` with the whole detector, read back (``weights_only``), converted with
  :func:`resnet_fpn_backbone_params` and run as jdet's ``ResNet(50)`` + ``FPN()``
  on two raccoon photos at an odd size (75x100): the same P2..P6.
* A RetinaNet-style ``resnet_fpn_backbone("resnet18", returned_layers=[2, 3, 4],
  extra_blocks=LastLevelP6P7)`` with ``FrozenBatchNorm2d``: the same P3..P7.
* torchvision's ``trainable_layers`` and jdet's ``frozen_stages`` freeze the
  same modules.
* The command line and :func:`load_backbone_variables` put an ImageNet
  ResNet's numbers in the right collection for each norm.
* Wrong state dicts are refused with every missing and unexpected name.

All torchvision weights are random (seeded), BatchNorm statistics and affine
included (see ``tests/models/test_resnet.py``).
"""

from __future__ import annotations

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from jdet import convert
from jdet.convert.__main__ import main as convert_main
from jdet.models.backbones.resnet import ResNet
from jdet.models.necks.fpn import FPN
from tests.helpers.faults import UNPICKLED, Payload
from tests.helpers.images import photo_batch
from tests.helpers.references import assert_close
from tests.helpers.torch_models import (randomize_norms, state_dict_numpy, to_nchw, to_nhwc,
                                        torch_resnet)


def _random_biases(model: torch.nn.Module) -> None:
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
        m.bias.uniform_(-0.5, 0.5)


def _backbone_apply(body: ResNet, fpn: FPN):
  return jax.jit(lambda v, f, x: fpn.apply({"params": f}, body.apply(v, x)))


def _shapes(module, *args):
  return jax.eval_shape(lambda k: module.init(k, *args), jax.random.key(0))


def _assert_same_tree(tree, shapes) -> None:
  assert jax.tree.structure(tree) == jax.tree.structure(shapes)
  assert jax.tree.map(np.shape, tree) == jax.tree.map(lambda s: s.shape, shapes)


# ----------------------------------------------------------------------------
# End to end.
# ----------------------------------------------------------------------------


def test_fasterrcnn_resnet50_fpn_backbone_end_to_end(tmp_path):
  torch.manual_seed(0)
  tv = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                             num_classes=3).eval()
  randomize_norms(tv.backbone)
  _random_biases(tv.backbone.fpn)
  path = tmp_path / "fasterrcnn.pth"
  torch.save(tv.state_dict(), path)
  state = convert.read_state_dict(path)
  assert any(k.startswith("roi_heads.") for k in state)  # other parts are left alone

  converted = convert.resnet_fpn_backbone_params(state)
  assert set(converted) == {"body", "fpn"}
  body, fpn = ResNet(50), FPN()
  image = photo_batch((75, 100))
  body_shapes = _shapes(body, jnp.asarray(image))
  assert set(converted["body"]) == set(body_shapes) == {"params", "batch_stats"}
  for c in body_shapes:
    _assert_same_tree(converted["body"][c], body_shapes[c])
  features = jax.eval_shape(body.apply, converted["body"], image)
  _assert_same_tree(converted["fpn"],
                    _shapes(fpn, [jnp.zeros(f.shape) for f in features])["params"])

  got = _backbone_apply(body, fpn)(converted["body"], converted["fpn"], jnp.asarray(image))
  with torch.no_grad():
    want = tv.backbone(to_nchw(image))
  assert list(want) == ["0", "1", "2", "3", "pool"]
  for level, (g, w) in enumerate(zip(got, want.values(), strict=True), 2):
    assert_close(g, to_nhwc(w), what=f"P{level}")
  assert [g.shape[1:3] for g in got] == [(19, 25), (10, 13), (5, 7), (3, 4), (2, 2)]


def test_retinanet_style_resnet18_fpn_backbone():
  """``FrozenBatchNorm2d`` body returning C3..C5, P6/P7 from P5, converted with ``prefix=""``."""
  torch.manual_seed(1)
  tv = resnet_fpn_backbone(backbone_name="resnet18", weights=None, returned_layers=[2, 3, 4],
                           extra_blocks=LastLevelP6P7(256, 256)).eval()
  randomize_norms(tv, seed=1)
  _random_biases(tv.fpn)
  state = state_dict_numpy(tv)
  assert "body.bn1.running_var" in state and "body.fc.weight" not in state
  converted = convert.resnet_fpn_backbone_params(state, prefix="")
  body = ResNet(18, out_stages=(2, 3, 4))
  fpn = FPN(extra="p6p7", num_extra=2, extra_input="p5")
  image = photo_batch((96, 128))
  got = _backbone_apply(body, fpn)(converted["body"], converted["fpn"], jnp.asarray(image))
  with torch.no_grad():
    want = tv(to_nchw(image))
  assert list(want) == ["0", "1", "2", "p6", "p7"]
  for level, (g, w) in enumerate(zip(got, want.values(), strict=True), 3):
    assert_close(g, to_nhwc(w), what=f"P{level}")


@pytest.mark.parametrize("trainable_layers", [0, 1, 2, 3, 4, 5])
def test_frozen_stages_freeze_what_torchvision_trainable_layers_freezes(trainable_layers):
  """``frozen_stages = 4 - trainable_layers`` (BatchNorm2d, so that bn1 has parameters)."""
  tv = resnet_fpn_backbone(backbone_name="resnet18", weights=None,
                           norm_layer=torch.nn.BatchNorm2d, trainable_layers=trainable_layers)
  frozen_tv = {n.split(".")[0] for n, p in tv.body.named_parameters() if not p.requires_grad}
  frozen_jdet = set(ResNet(18, frozen_stages=4 - trainable_layers).frozen_modules())
  assert frozen_tv == frozen_jdet
  assert len(frozen_tv) == (0 if trainable_layers == 5 else 2 + 4 - trainable_layers)


# ----------------------------------------------------------------------------
# ImageNet checkpoints: the command line and loading into a model's variables.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory):
  """``(torchvision resnet18, its .pth, the .npz that `python -m jdet.convert` wrote)``."""
  tv = torch_resnet(18, seed=2)
  folder = tmp_path_factory.mktemp("resnet18")
  torch.save(tv.state_dict(), folder / "resnet18.pth")
  convert_main(["resnet18", str(folder / "resnet18.pth"), str(folder / "resnet18.npz")])
  return tv, folder / "resnet18.pth", folder / "resnet18.npz"


def _model_variables(norm: str) -> dict:
  """A detector-like tree: the ResNet under ``backbone`` (zeros) next to a ``head``."""
  shapes = _shapes(ResNet(18, norm=norm), jnp.zeros((1, 64, 64, 3)))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  return {"params": {"backbone": zeros["params"], "head": {"kernel": np.ones((3, 2), np.float32)}},
          "batch_stats": {"backbone": zeros["batch_stats"]}}


@pytest.mark.parametrize("norm", ["frozen_bn", "batch"])
def test_load_backbone_variables_from_pth_and_cli_npz(resnet18_files, norm):
  tv, pth, npz = resnet18_files
  want = convert.resnet_params(state_dict_numpy(tv), norm=norm)
  variables = _model_variables(norm)
  for path in (pth, npz):
    loaded = convert.load_backbone_variables(path, variables)
    for c in ("params", "batch_stats"):
      jax.tree.map(np.testing.assert_array_equal, loaded[c]["backbone"], want[c])
    np.testing.assert_array_equal(loaded["params"]["head"]["kernel"], 1.0)
  np.testing.assert_array_equal(
      loaded["params" if norm == "batch" else "batch_stats"]["backbone"]["bn1"]["scale"],
      tv.bn1.weight.detach().numpy())
  flat = convert.read_state_dict(npz)
  assert "params/backbone/conv1/kernel" in flat and "batch_stats/backbone/bn1/mean" in flat


def test_loading_resnets_into_params_alone_or_a_wrong_model_is_refused(resnet18_files, tmp_path):
  tv, pth, npz = resnet18_files
  variables = _model_variables("frozen_bn")
  with pytest.raises(ValueError, match=r"backbone/bn1/mean"):
    convert.load_backbone_variables(pth, {"params": variables["params"]})
  group = _model_variables("frozen_bn")
  group["batch_stats"] = {}  # GroupNorm: no statistics anywhere
  with pytest.raises(ValueError, match=r"backbone/bn1/mean"):
    convert.load_backbone_variables(pth, group)
  r50 = _shapes(ResNet(50), jnp.zeros((1, 64, 64, 3)))
  with pytest.raises(ValueError, match=r"shape mismatch:\n  params/backbone/layer1/block0/conv1"
                                       r"/kernel: model \(1, 1, 64, 64\), file \(3, 3, 64, 64\)"):
    convert.load_backbone_variables(pth, {c: {"backbone": t} for c, t in r50.items()})
  with pytest.raises(ValueError, match="not a torchvision ResNet-34 state dict"):
    convert_main(["resnet34", str(pth), str(tmp_path / "out.npz")])


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_with_objects_is_refused(tmp_path):
  path = tmp_path / "evil.pth"
  with open(path, "wb") as fh:
    pickle.dump({"conv1.weight": Payload(), "layer1.0.conv1.weight": Payload()}, fh)
  with pytest.raises(ValueError, match="weights_only"):
    convert.load_backbone_variables(path, _model_variables("frozen_bn"))
  assert not UNPICKLED


# ----------------------------------------------------------------------------
# Wrong state dicts: every missing and unexpected name.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def r18_state():
  torch.manual_seed(0)
  return state_dict_numpy(torchvision.models.resnet18(weights=None))


def test_a_wrong_resnet_state_dict_names_missing_and_unexpected_keys(r18_state):
  state = dict(r18_state)
  del state["layer2.1.bn2.running_var"], state["layer4.0.downsample.0.weight"]
  state["layer2.1.bn2.running_std"] = state["layer2.1.bn2.running_mean"]
  with pytest.raises(ValueError) as err:
    convert.resnet_params(state)
  msg = str(err.value)
  assert "missing (2): layer2.1.bn2.running_var, layer4.0.downsample.0.weight" in msg
  assert "unexpected (1): layer2.1.bn2.running_std" in msg
  # fc.* and num_batches_tracked are known and not used; they raise nothing.
  assert "fc.weight" in r18_state and "bn1.num_batches_tracked" in r18_state
  convert.resnet_params(r18_state)


def test_depth_norm_and_layout_mismatches_are_named(r18_state):
  with pytest.raises(ValueError, match=r"missing \(\d+\): layer1.2.conv1.weight"):
    convert.resnet_params(r18_state, depth=34)
  with pytest.raises(ValueError, match="has BasicBlock blocks, not the Bottleneck blocks of a "
                                       "ResNet-50"):
    convert.resnet_params(r18_state, depth=50)
  with pytest.raises(ValueError, match=r"unexpected \(\d+\): bn1.running_mean, bn1.running_var, "):
    convert.resnet_params(r18_state, norm="group")
  vgg = state_dict_numpy(torchvision.models.vgg11(weights=None).features)
  with pytest.raises(ValueError, match="not a torchvision ResNet"):
    convert.resnet_params(vgg)
  assert convert.resnet_depth(r18_state) == 18


def test_wrong_fpn_and_backbone_names_are_named():
  tv = resnet_fpn_backbone(backbone_name="resnet18", weights=None)
  state = {f"backbone.{k}": v for k, v in state_dict_numpy(tv).items()}
  converted = convert.resnet_fpn_backbone_params(state)
  assert set(converted["fpn"]) == {f"{kind}_block{i}" for kind in ("inner", "layer")
                                   for i in range(4)}
  broken = dict(state)
  del broken["backbone.fpn.layer_blocks.1.0.bias"]
  broken["backbone.fpn.extra_blocks.p6.bias"] = np.zeros(256, np.float32)
  with pytest.raises(ValueError) as err:
    convert.resnet_fpn_backbone_params(broken)
  assert "missing (1): backbone.fpn.layer_blocks.1.0.bias" in str(err.value)
  assert "unexpected (1): backbone.fpn.extra_blocks.p6.bias" in str(err.value)
  stray = dict(state, **{"backbone.neck.conv.weight": np.zeros((1, 1, 1, 1), np.float32)})
  with pytest.raises(ValueError, match="neither body nor fpn: backbone.neck.conv.weight"):
    convert.resnet_fpn_backbone_params(stray)
