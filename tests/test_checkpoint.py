"""jdet.checkpoint: state + grain iterator round trips, retention, stop signals."""

import os
import signal

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jdet import optim
from jdet.checkpoint import Checkpointer, StopRequest
from jdet.train_state import TrainState


def _state(seed: int) -> TrainState:
  """A TrainState whose optimiser state has masked (frozen) and empty sub-states."""
  cfg = ml_collections.ConfigDict(dict(
      name="sgd", lr=0.1, schedule="constant", warmup_steps=0, momentum=0.9, nesterov=False,
      weight_decay=1e-4, decay_bias_and_norm=False, clip_norm=1.0, freeze=("^backbone/",)))
  tx, _ = optim.build_optimizer(cfg, total_steps=10)
  rng = np.random.default_rng(seed)
  params = {"backbone": {"kernel": rng.normal(size=(3, 4)).astype(np.float32)},
            "head": {"kernel": rng.normal(size=(4, 2)).astype(np.float32),
                     "bias": np.zeros(2, np.float32)}}
  stats = {"bn": {"mean": rng.normal(size=4).astype(np.float32)}}
  return TrainState.create(params=jax.tree.map(jnp.asarray, params), batch_stats=stats, tx=tx,
                           rng=jax.random.key(seed))


def _dataset():
  return grain.MapDataset.range(100).shuffle(seed=7).batch(4).to_iter_dataset()


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_with_iterator(tmp_path):
  state = _state(0)
  state = state.apply_gradients(jax.tree.map(jnp.ones_like, state.params))
  state, _ = state.next_rng()
  it = iter(_dataset())
  for _ in range(3):
    next(it)
  with Checkpointer(tmp_path / "checkpoints") as ckpt:
    assert ckpt.save(int(state.step), state, data_iterator=it)
    expected = next(it)  # the batch right after the save
    next(it)
  with Checkpointer(tmp_path / "checkpoints") as ckpt:
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
    fresh = iter(_dataset())
    template = _state(5)
    restored = ckpt.restore(template, data_iterator=fresh)
  assert isinstance(restored, TrainState) and restored.tx is template.tx
  assert jax.tree.structure(restored) == jax.tree.structure(template)
  _assert_same(restored, state)
  assert int(restored.step) == 1
  np.testing.assert_array_equal(next(fresh), expected)
  # The restored state trains on with the template's optimiser.
  stepped = restored.apply_gradients(jax.tree.map(jnp.ones_like, restored.params))
  assert int(stepped.step) == 2
  _assert_same(stepped.params["backbone"], state.params["backbone"])  # frozen


def test_iterator_optional(tmp_path):
  state = _state(1)
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(3, state)
    it = iter(_dataset())
    first = next(iter(_dataset()))
    restored = ckpt.restore(_state(2), step=3, data_iterator=it)
    _assert_same(restored, state)
    np.testing.assert_array_equal(next(it), first)  # not saved: the iterator is untouched
    assert not ckpt.save(3, state)  # the step exists already: nothing to do


def test_retention_keeps_last_and_best(tmp_path):
  state = _state(0)
  aps = {1: 0.10, 2: 0.50, 3: 0.20, 4: 0.30, 5: 0.25, 6: 0.40}
  with Checkpointer(tmp_path, keep_last=2, keep_best=1) as ckpt:
    for step, ap in aps.items():
      ckpt.save(step, state, metrics={"AP": ap, "AP50": 0.9})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 5, 6]
    assert ckpt.best_step() == 2
    assert ckpt.metrics(2)["AP"] == pytest.approx(0.5)
  assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 5, 6]
  # A new manager over the same directory reads the metrics back from disk.
  with Checkpointer(tmp_path, keep_last=2, keep_best=1) as ckpt:
    assert ckpt.best_step() == 2
    ckpt.save(7, state)  # no metric: step 5 goes, the best one stays
    ckpt.wait()
    assert ckpt.all_steps() == [2, 6, 7]


def test_steps_without_metric_are_never_best(tmp_path):
  state = _state(0)
  with Checkpointer(tmp_path, keep_last=1, keep_best=1, async_save=False) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, state, metrics={"loss": 1.0} if step == 2 else None)
    assert ckpt.all_steps() == [3]
    assert ckpt.best_step() is None


def test_missing_step_raises(tmp_path):
  with Checkpointer(tmp_path / "empty") as ckpt:
    with pytest.raises(FileNotFoundError, match="empty"):
      ckpt.restore(_state(0))
    ckpt.save(4, _state(0))
    with pytest.raises(FileNotFoundError, match=r"step 9 .*available steps: \[4\]"):
      ckpt.restore(_state(0), step=9)


def test_stop_request_on_sigterm_and_second_sigint():
  before_term = signal.getsignal(signal.SIGTERM)
  before_int = signal.getsignal(signal.SIGINT)
  with StopRequest() as stop:
    assert not stop.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested and stop.signal == signal.SIGTERM
    assert stop.requested_on_any_process()
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before_int  # handlers were put back
  assert signal.getsignal(signal.SIGTERM) is before_term

  with StopRequest() as stop:
    os.kill(os.getpid(), signal.SIGINT)  # a first Ctrl-C only sets the flag
    assert stop.requested and stop.signal == signal.SIGINT
  assert signal.getsignal(signal.SIGINT) is before_int
