"""Fine-tuning loads: a whole-model checkpoint with another class count (or number of
learned proposals) loads everything that fits and keeps the model's initial class layers.

* torchvision's ``fasterrcnn_resnet50_fpn`` with 91 outputs (seeded random weights)
  into a 1-class jdet Faster R-CNN R50-FPN: every other parameter equal to the
  torchvision tensor it comes from (checked against the torch state dict itself for
  the layers whose layout is plain, and against the converter for the rest), the four
  class layers exactly the model's initial values, and the log lists those four with
  both shapes.
* MMDetection's Sparse R-CNN (80 classes, 100 proposals; the oracle of
  ``tests/oracles``) into a 3-class, 300-proposal jdet model: the same, with the
  proposals and the six stages' class logits re-initialised.
* A mismatch anywhere else (an SSD with other default boxes per position changes the
  box convolutions too) is still an error naming the parameter and both shapes.

The model's variables are shapes from ``jax.eval_shape`` filled with seeded random
numbers (what ``model.init`` would give, without seconds of initialising a ResNet-50).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from configs import common, ssd300
from jdet import convert
from jdet.convert.faster_rcnn import fasterrcnn_resnet50_fpn_params
from jdet.convert.mmdet_sparse_rcnn import sparse_rcnn_variables
from jdet.models import build_model

pytestmark = pytest.mark.slow


def _initial_variables(model_name: str, model_config, size: int = 64) -> dict:
  """The model's variables as NumPy arrays: eval_shape's tree, seeded random values."""
  model = build_model(model_name, **model_config)
  shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, size, size, 3))),
                          jax.random.key(0))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)


def _flat(variables) -> dict[str, np.ndarray]:
  return {f"{c}/{k}": np.asarray(v) for c in variables
          for k, v in convert.flatten_params(variables[c]).items()}


def _check_loaded(report, loaded, initial, expected, reinitialised: set[str]) -> None:
  """Every variable of the model is either equal to the converted file's value or, for
  exactly ``reinitialised``, to its initial value; the report says so."""
  got, init, want = _flat(loaded), _flat(initial), _flat(expected)
  assert set(got) == set(init)
  assert set(report.reinitialised) == reinitialised
  assert set(report.loaded) == set(got) - reinitialised
  for name, value in got.items():
    if name in reinitialised:
      np.testing.assert_array_equal(value, init[name], err_msg=name)
      assert want[name].shape != value.shape  # it really did not fit
    else:
      np.testing.assert_array_equal(value, want[name].astype(value.dtype), err_msg=name)


def test_torchvision_faster_rcnn_coco_into_one_class(tmp_path, caplog):
  torch.manual_seed(0)
  tv = torchvision.models.detection.fasterrcnn_resnet50_fpn(
      weights=None, weights_backbone=None, num_classes=91).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():  # frozen BatchNorm numbers that are not 1, 0, 0, 1
    for m in tv.backbone.body.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.3, 0.8, generator=g)
        m.running_mean.normal_(0.0, 0.1, generator=g)
  state = {k: v.numpy() for k, v in tv.state_dict().items()}
  path = tmp_path / "fasterrcnn_coco.pth"
  torch.save(tv.state_dict(), path)

  initial = _initial_variables("faster_rcnn", common.model_section("faster_rcnn", num_classes=1))
  with caplog.at_level(logging.INFO, logger="jdet.convert.load"):
    loaded, report = convert.load_model_variables(path, initial, return_report=True)
  class_layers = {f"params/roi_head/{layer}/{leaf}" for layer in ("cls_score", "bbox_pred")
                  for leaf in ("kernel", "bias")}
  _check_loaded(report, loaded, initial, fasterrcnn_resnet50_fpn_params(state), class_layers)
  assert (report.file_classes, report.model_classes) == (90, 1)

  # Independently of the converter: torch's own tensors where the layout is plain.
  params, stats = loaded["params"], loaded["batch_stats"]
  np.testing.assert_array_equal(params["roi_head"]["fc7"]["kernel"],
                                state["roi_heads.box_head.fc7.weight"].T)
  np.testing.assert_array_equal(params["rpn_head"]["cls_logits"]["bias"],
                                state["rpn.head.cls_logits.bias"])
  np.testing.assert_array_equal(params["backbone"]["conv1"]["kernel"],
                                state["backbone.body.conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(stats["backbone"]["bn1"]["mean"],
                                state["backbone.body.bn1.running_mean"])
  # The log names every re-initialised layer with both shapes.
  text = caplog.text
  assert "loaded 291 variables, re-initialised 4" in text
  assert "params/roi_head/cls_score/kernel: depends on the class count: model (1024, 2), " \
         "file (1024, 91)" in text
  assert "params/roi_head/bbox_pred/kernel: depends on the class count: model (1024, 8), " \
         "file (1024, 364)" in text


def test_mmdet_sparse_rcnn_into_other_classes_and_proposals(tmp_path, caplog):
  from tests.oracles import mmdet_sparse_rcnn as oracle
  if not oracle.available():
    pytest.fail("MMDetection (the Sparse R-CNN oracle) is not installed: "
                "python -m pip install --no-deps -r tests/oracles/requirements.txt")
  mm = oracle.build(num_classes=80, num_proposals=100, seed=0, double=False)
  state = oracle.state_dict_numpy(mm)
  path = tmp_path / "sparse_rcnn_coco.pth"
  torch.save({"meta": {}, "state_dict": mm.state_dict()}, path)  # as the model zoo's

  assert convert.find_architecture(convert.read_state_dict(path)).name == \
      "sparse_rcnn_r50_fpn_mmdet"
  initial = _initial_variables("sparse_rcnn", common.model_section("sparse_rcnn", num_classes=3,
                                                                     num_proposals=300))
  with caplog.at_level(logging.INFO, logger="jdet.convert.load"):
    loaded, report = convert.load_model_variables(path, initial, return_report=True)
  reinit = {f"params/stage{s}/cls_logits/{leaf}" for s in range(6) for leaf in ("kernel", "bias")}
  reinit |= {"params/proposal_boxes", "params/proposal_features"}
  _check_loaded(report, loaded, initial, sparse_rcnn_variables(state), reinit)
  assert (report.file_classes, report.model_classes) == (80, 3)
  np.testing.assert_array_equal(loaded["params"]["stage2"]["box_deltas"]["kernel"],
                                state["roi_head.bbox_head.2.fc_reg.weight"].T)
  assert "params/proposal_boxes: depends on the number of proposals: model (300, 4), " \
         "file (100, 4)" in caplog.text
  assert "params/stage5/cls_logits/kernel: depends on the class count: model (256, 3), " \
         "file (256, 80)" in caplog.text

  # The same file into the model it was made for loads everything.
  same = _initial_variables("sparse_rcnn", common.model_section("sparse_rcnn", num_classes=80))
  _, report = convert.load_model_variables(path, same, return_report=True)
  assert report.reinitialised == {}


def test_other_mismatches_stay_errors(tmp_path):
  """A jdet .npz of an SSD into an SSD with another class count loads (class convolutions
  re-initialised); into one with other default boxes per position it is an error naming
  a box convolution and both shapes."""
  config = ssd300.get_config("smoke").model
  trained = _initial_variables("ssd", config)
  path = tmp_path / "ssd.npz"
  convert.save_params_npz(path, trained["params"])

  other_classes = _initial_variables("ssd", {**config, "num_classes": 2})
  loaded, report = convert.load_model_variables(path, {"params": other_classes["params"]},
                                                return_report=True)
  assert sorted(report.reinitialised) == [f"params/head/cls_{i}/{leaf}" for i in range(4)
                                          for leaf in ("bias", "kernel")]
  np.testing.assert_array_equal(loaded["params"]["head"]["box_1"]["kernel"],
                                trained["params"]["head"]["box_1"]["kernel"])

  other_boxes = _initial_variables(
      "ssd", {**config, "num_classes": 2, "aspect_ratios": ((2,), (2,), (2,), (2,))})
  with pytest.raises(ValueError, match=r"head/box_1/kernel: model \(3, 3, 32, 16\), "
                                       r"file \(3, 3, 32, 24\)"):
    convert.load_model_variables(path, {"params": other_boxes["params"]})
