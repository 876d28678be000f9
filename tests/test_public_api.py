"""The names the design notes (docs/design.md) promise under `import jdet` exist and work together."""

import numpy as np
import pytest
import torchvision
import torch

import jdet
from jdet.testing import random_boxes


def test_promised_names_exist():
  for name in ("build_model", "Detections", "boxes", "ops", "assign"):
    assert hasattr(jdet, name), name
  for fn in (jdet.ops.nms, jdet.ops.batched_nms, jdet.ops.roi_align, jdet.assign.linear_sum_assignment,
             jdet.boxes.iou, jdet.boxes.giou):
    assert callable(fn)


def test_predictor_is_public_and_loaded_on_first_use():
  import subprocess
  import sys
  code = ("import sys, jdet; assert 'jdet.inference' not in sys.modules; "
          "from jdet.inference.predictor import Predictor; assert jdet.Predictor is Predictor; "
          "print('ok')")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
  with pytest.raises(AttributeError, match="no attribute 'Predictr'"):
    jdet.Predictr  # noqa: B018


def test_public_nms_matches_torchvision(rng):
  b = random_boxes(rng, 200)
  s = rng.permutation(200).astype(np.float32)
  keep = np.asarray(jdet.ops.nms(b, s, iou_threshold=0.45, max_output_size=200))
  ref = torchvision.ops.nms(torch.from_numpy(b), torch.from_numpy(s), 0.45).numpy()
  np.testing.assert_array_equal(keep[: len(ref)], ref)
  assert np.all(keep[len(ref):] == -1)


def test_build_model_names_the_available_models():
  with pytest.raises(KeyError, match="unknown model 'no_such_model'; available"):
    jdet.build_model("no_such_model")


def test_detections_empty_is_padding():
  d = jdet.Detections.empty(2, 5)
  assert d.boxes.shape == (2, 5, 4) and not np.asarray(d.valid).any()
  assert np.all(np.asarray(d.labels) == -1)
