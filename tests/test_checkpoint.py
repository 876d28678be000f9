"""jdet.engine.checkpoint: state + grain iterator round trips, retention, stop signals, damaged and
mismatched checkpoints."""

import logging
import os
import shutil
import signal

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jdet.engine import optim
from jdet.engine.checkpoint import CheckpointDamagedError, Checkpointer, CheckpointMismatchError
from jdet.engine.signals import StopRequest
from jdet.engine.train_state import TrainState
from tests.helpers.faults import flip_bytes, largest_file, truncate_file


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


# ----------------------------------------------------------------------------
# Damaged and mismatched checkpoints.
# ----------------------------------------------------------------------------


def _big_state(seed: int) -> dict:
  """A state with one array large enough to be stored compressed in its own data file."""
  rng = np.random.default_rng(seed)
  return {"params": {"w": jnp.asarray(rng.normal(size=(128, 128)).astype(np.float32)),
                     "b": jnp.asarray(rng.normal(size=(7,)).astype(np.float32))},
          "step": jnp.asarray(seed, jnp.int32)}


def _damage(step_dir, kind: str) -> str:
  """Damages the checkpoint folder ``step_dir`` as ``kind``; returns what the error must name."""
  state_dir = os.path.join(step_dir, "state")
  if kind == "truncated array file":
    truncate_file(largest_file(os.path.join(state_dir, "ocdbt.process_0")))
    return "state"
  if kind == "flipped bytes":
    flip_bytes(largest_file(os.path.join(state_dir, "ocdbt.process_0")))
    return "leaf params/w"
  if kind == "truncated _METADATA":
    truncate_file(os.path.join(state_dir, "_METADATA"))
    return "_METADATA"
  if kind == "truncated iterator JSON":
    truncate_file(os.path.join(step_dir, "data", "process_0-of-1.json"))
    return "process_0-of-1.json"
  if kind == "flipped iterator JSON digit":
    path = os.path.join(step_dir, "data", "process_0-of-1.json")
    with open(path) as f:
      text = f.read()
    i = max(k for k, c in enumerate(text) if c.isdigit())
    with open(path, "w") as f:
      f.write(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:])
    return "process_0-of-1.json"
  if kind == "removed state folder":
    shutil.rmtree(state_dir)
    return "state"
  raise ValueError(kind)


DAMAGE = ("truncated array file", "flipped bytes", "truncated _METADATA",
          "truncated iterator JSON", "flipped iterator JSON digit", "removed state folder")


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_latest_step_is_moved_aside_and_the_previous_one_restored(tmp_path, kind,
                                                                          caplog):
  it = iter(_dataset())
  for _ in range(3):
    next(it)
  with Checkpointer(tmp_path, keep_last=3) as ckpt:
    ckpt.save(1, _big_state(1), data_iterator=it)
    after_1 = next(it)  # the batch a resume from step 1 must give first
    ckpt.save(2, _big_state(2), data_iterator=it)
  named = _damage(str(tmp_path / "2"), kind)

  with Checkpointer(tmp_path, keep_last=3) as ckpt:
    with pytest.raises(CheckpointDamagedError) as excinfo:  # what eval.py does: refuse
      ckpt.restore(_big_state(0), step=2, data_iterator=iter(_dataset()))
    assert excinfo.value.step == 2 and named in str(excinfo.value), str(excinfo.value)
    assert ckpt.all_steps() == [1, 2]  # a plain restore moves nothing

    fresh = iter(_dataset())
    with caplog.at_level(logging.WARNING, logger="jdet.engine.checkpoint"):
      restored = ckpt.restore_latest_intact(_big_state(0), data_iterator=fresh)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "checkpoint 2 is damaged" in errors[0] and named in errors[0]
    assert f"moved to {tmp_path / 'damaged' / '2'}" in errors[0]
    assert "resuming from checkpoint 1, the newest intact one" in caplog.text
    _assert_same(restored, _big_state(1))
    np.testing.assert_array_equal(next(fresh), after_1)
    assert ckpt.all_steps() == [1]
    assert ckpt.latest_step() == 1
  # Moved, not deleted: the damaged step's files are kept for inspection.
  assert not (tmp_path / "2").exists()
  assert (tmp_path / "damaged" / "2" / "data").is_dir()


def test_flipped_bytes_would_load_silently_without_checksums(tmp_path):
  """The reason for the checksums: orbax itself reads flipped bytes without an error."""
  state = _big_state(1)
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state)
  _damage(str(tmp_path / "1"), "flipped bytes")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  raw = ocp.StandardCheckpointer().restore(tmp_path / "1" / "state", abstract)
  assert np.any(np.asarray(raw["params"]["w"]) != np.asarray(state["params"]["w"]))
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointDamagedError, match="do not match their checksum"):
      ckpt.restore(_big_state(0))


def test_every_step_damaged_is_an_error_that_says_so(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, _big_state(1))
  _damage(str(tmp_path / "1"), "removed state folder")
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointDamagedError, match="every checkpoint is damaged.*step 0"):
      ckpt.restore_latest_intact(_big_state(0))
    assert ckpt.all_steps() == []
  assert (tmp_path / "damaged" / "1").is_dir()


def test_another_model_is_a_mismatch_not_damage(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, _big_state(1))
  other = _big_state(0)
  other["params"]["w"] = jnp.zeros((64, 128), jnp.float32)  # e.g. another class count
  other["params"]["extra"] = jnp.zeros((3,), jnp.float32)
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointMismatchError) as excinfo:
      ckpt.restore_latest_intact(other)
    message = str(excinfo.value)
    assert ("params/w: [128, 128] float32 in the checkpoint, [64, 128] float32 in this run"
            in message)
    assert "params/extra" in message
    assert ckpt.all_steps() == [1]  # nothing moved
  assert not (tmp_path / "damaged").exists()


def test_only_the_writer_removes_unfinished_saves(tmp_path):
  """A save cut short by a killed trainer is removed when training starts again, never by a
  reader (eval.py would otherwise delete a save that a running training is writing)."""
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, _big_state(1))
  unfinished = tmp_path / "2.orbax-checkpoint-tmp-1700000000"
  (unfinished / "state").mkdir(parents=True)
  with Checkpointer(tmp_path) as reader:
    assert reader.all_steps() == [1]
  assert unfinished.is_dir()
  with Checkpointer(tmp_path, remove_unfinished=True) as writer:
    assert writer.all_steps() == [1]
    writer.save(3, _big_state(3))  # orbax finishes its clean-up before the first save
  assert not unfinished.exists()
