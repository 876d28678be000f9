"""bfloat16 training and inference of every detector, as the GPU benchmark runs them.

``bench/run_all.py --device cuda --dtype bfloat16`` builds each detector with
``dtype=bfloat16``: convolutions and dense layers compute in bfloat16 while the
parameters stay float32, and box maths, losses, matching and NMS stay float32.
On each detector's ``smoke`` variant, from the same weights (the model's own
initialisation, as ``train.py`` starts) and the same training batch, one
training step (:func:`jdet.engine.training.make_train_step`, the step ``train.py``
runs) in bfloat16 must give finite losses close to float32's: the total within
2 % and each term within 10 %. Terms move more than the total because targets
are discrete functions of the network's outputs: RefineDet's ODM positives and
negative filtering follow the ARM's refined anchors, Sparse R-CNN's Hungarian
matching follows the predicted boxes, and one flipped assignment moves a term by
a few percent. Measured (largest relative difference of a term / of the total):
SSD300 5e-4 / 1e-4, RefineDet320 2e-2 / 7e-3, Faster R-CNN 5e-4 / 3e-4, Sparse
R-CNN 5e-2 / 7e-3. Also:

* the bfloat16 step's terms differ from float32's (the comparison is not vacuous)
  and come out float32;
* the network really computes in bfloat16 (some convolution or matrix product of
  the bfloat16 step takes bfloat16 operands: the test is not vacuous);
* nothing bfloat16 enters a loop or a host callback, in training or in
  ``predict``: NMS (a ``while`` loop over sorted boxes), the RPN's proposal NMS
  and the Hungarian matching (a host callback) all see float32;
* ``predict`` gives finite float32 boxes and scores.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdet.data import builder, pipeline
from jdet.engine import optim, training
from jdet.engine.train_state import TrainState
from jdet.models import build_model

pytestmark = pytest.mark.slow

CONFIGS = ("ssd300", "refinedet320", "faster_rcnn_r50_fpn", "sparse_rcnn")
TERM_RTOL = 0.1  # each loss term, relative to max(|float32 term|, 1e-2)
TOTAL_RTOL = 0.02  # the total loss
HEAVY = {"conv_general_dilated", "dot_general"}
GUARDED = {"while", "pure_callback", "io_callback"}


def _smoke_batch(config) -> dict:
  data = config.data
  source = builder.build_source(data, "train")
  transform = builder.build_transforms(data, train=True)
  it = pipeline.train_batches(source, transform, batch_size=int(data.batch_size),
                              seed=int(data.seed))
  batch = next(it)
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _eqns(jaxpr):
  """Every equation of a (closed) jaxpr, sub-jaxprs included."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
          yield from _eqns(sub)


def _dtypes(eqn) -> set:
  return {str(v.aval.dtype) for v in eqn.invars if hasattr(v, "aval") and hasattr(v.aval, "dtype")}


def _check_structure(jaxpr, what: str, *, expect_bf16: bool) -> None:
  eqns = list(_eqns(jaxpr))
  if expect_bf16:
    assert any(e.primitive.name in HEAVY and "bfloat16" in _dtypes(e) for e in eqns), (
        f"{what}: no convolution or matrix product computes in bfloat16")
  for e in eqns:
    if e.primitive.name in GUARDED:
      assert "bfloat16" not in _dtypes(e), f"{what}: bfloat16 enters {e.primitive.name}"


@pytest.mark.parametrize("name", CONFIGS)
def test_bfloat16_training_step_is_close_to_float32(name):
  config = importlib.import_module(f"configs.{name}").get_config("smoke")
  batch = _smoke_batch(config)
  metrics, detections = {}, {}
  variables = None
  for dtype in (jnp.float32, jnp.bfloat16):
    model = build_model(config.model_name, **dict(config.model, dtype=dtype))
    if variables is None:  # the same float32 weights for both (parameters stay float32)
      variables = jax.jit(model.init)(jax.random.key(0), batch["image"][:1])
    tx, schedule = optim.build_optimizer(config.optim, total_steps=int(config.train.num_steps),
                                         frozen=model.frozen_parameters())
    state = TrainState.create(params=variables["params"],
                              batch_stats=variables.get("batch_stats", {}), tx=tx,
                              rng=jax.random.key(1))
    step = training.make_train_step(model, schedule)
    _check_structure(jax.make_jaxpr(step)(state, batch), f"{name} {dtype.__name__} training",
                     expect_bf16=dtype == jnp.bfloat16)
    _, m = jax.jit(step)(state, batch)
    metrics[dtype] = jax.device_get(m)

    predict = lambda v, b: model.apply(v, b, method="predict")
    _check_structure(jax.make_jaxpr(predict)(variables, batch), f"{name} {dtype.__name__} predict",
                     expect_bf16=dtype == jnp.bfloat16)
    det = jax.device_get(jax.jit(predict)(variables, batch))
    assert det.boxes.dtype == np.float32 and det.scores.dtype == np.float32
    assert np.isfinite(det.boxes).all() and np.isfinite(det.scores).all()
    detections[dtype] = det

  f32, bf16 = metrics[jnp.float32], metrics[jnp.bfloat16]
  assert bf16["finite"] == 1.0
  terms = [k for k in f32 if "loss" in k]
  assert "loss" in terms and len(terms) > 1
  for k in terms:
    assert bf16[k].dtype == np.float32, k
    assert np.isfinite(bf16[k]), k
    np.testing.assert_allclose(bf16[k], f32[k], rtol=0,
                               atol=TERM_RTOL * max(abs(float(f32[k])), 1e-2), err_msg=f"{name}: {k}")
  np.testing.assert_allclose(bf16["loss"], f32["loss"], rtol=TOTAL_RTOL, err_msg=name)
  worst = max(abs(float(bf16[k]) - float(f32[k])) / max(abs(float(f32[k])), 1e-2) for k in terms)
  total = abs(float(bf16["loss"]) - float(f32["loss"])) / abs(float(f32["loss"]))
  assert worst > 0, f"{name}: bfloat16 gave exactly float32's losses; is the dtype used?"
  print(f"{name}: bfloat16 vs float32, largest relative difference of a loss term {worst:.1e}, "
        f"of the total {total:.1e}")
