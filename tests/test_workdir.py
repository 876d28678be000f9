"""One run per workdir (:mod:`jdet.engine.workdir`): the lock, the saved config and what a
resume changed, a full disk.

The lock and the config comparison are checked directly (a second lock from
another open file of the same process conflicts exactly as another process
would: ``flock`` locks belong to open files); the training loop's use of them
in-process, on the smoke config; ``train.py`` itself, killed, run twice at once
and run on a full file system, in ``tests/test_faults.py``.
"""

from __future__ import annotations

import errno
import json
import logging
import os

import jax
import pytest

from jdet.engine import checkpoint, training
from jdet.engine import workdir as wd

from configs import ssd300 as ssd300_config
from tests.helpers.runs import checkpoint_steps, jax_compile_cache

compile_cache = pytest.fixture(scope="module")(jax_compile_cache)


# ----------------------------------------------------------------------------
# The lock.
# ----------------------------------------------------------------------------


def test_a_held_lock_refuses_a_second_holder_naming_the_first(tmp_path):
  with wd.RunLock(tmp_path / "run"):
    holder = json.loads((tmp_path / "run" / wd.LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"]
    with pytest.raises(wd.WorkdirBusyError, match=f"in use by process {os.getpid()} on "
                                                  f"{holder['host']}"):
      wd.RunLock(tmp_path / "run").acquire()
    # Only the primary process of a multi-process run takes it.
    wd.RunLock(tmp_path / "run", primary=False).acquire()
  assert not (tmp_path / "run" / wd.LOCK_FILE).exists()  # a clean end leaves nothing
  with wd.RunLock(tmp_path / "run"):  # and the next run takes it without a word
    pass


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
  run = tmp_path / "run"
  run.mkdir()
  # What a killed run leaves: the file, with no OS lock on it.
  (run / wd.LOCK_FILE).write_text(json.dumps(dict(host="elsewhere", pid=4242, started="x",
                                                  command="train.py")))
  with caplog.at_level(logging.WARNING, logger="jdet.engine.workdir"):
    with wd.RunLock(run):
      assert json.loads((run / wd.LOCK_FILE).read_text())["pid"] == os.getpid()
  assert "taking over the lock of process 4242 on elsewhere" in caplog.text


# ----------------------------------------------------------------------------
# The saved config.
# ----------------------------------------------------------------------------


def _smoke(**train):
  config = ssd300_config.get_config("smoke")
  config.train.update(dict(num_steps=2, eval_every=0, log_every=1, checkpoint_every=1, **train))
  return config


def test_config_changes_lists_every_changed_leaf():
  a, b = _smoke(), _smoke()
  b.data.batch_size = 2 * a.data.batch_size
  b.data.train.seed = 9
  changes = wd.config_changes(a, b)
  assert changes == {"data.batch_size": (a.data.batch_size, b.data.batch_size),
                     "data.train.seed": (a.data.train.seed, 9)}
  assert wd.config_changes(a, json.loads(a.to_json_best_effort())) == {}  # as saved: equal


def test_check_resume_warns_refuses_and_allows(tmp_path, caplog):
  saved = _smoke()
  wd.record_start(str(tmp_path), saved)
  batch = _smoke()
  batch.data.batch_size = 2 * saved.data.batch_size
  with caplog.at_level(logging.WARNING, logger="jdet.engine.workdir"):
    assert set(wd.check_resume(str(tmp_path), batch)) == {"data.batch_size"}
  assert f"data.batch_size: {saved.data.batch_size} -> {batch.data.batch_size}" in caplog.text
  data = _smoke()
  data.data.train.num_images += 1
  with pytest.raises(wd.ConfigChangedError, match="would change data.train.num_images"):
    wd.check_resume(str(tmp_path), data)
  assert set(wd.check_resume(str(tmp_path), data, allow_changes=True)) == {
      "data.train.num_images"}
  starts = (tmp_path / wd.STARTS_FILE).read_text().splitlines()
  assert len(starts) == 1 and json.loads(starts[0])["resumed_from"] is None


# ----------------------------------------------------------------------------
# A full disk.
# ----------------------------------------------------------------------------


def test_a_full_disk_is_recognised_through_the_wrappers_around_it(tmp_path):
  full = OSError(errno.ENOSPC, "No space left on device")
  wrapped = ValueError("RESOURCE_EXHAUSTED: Error writing local file: Failed to write 29796 "
                       "bytes to file 13: No space left on device [os_error_code='28']")
  chained = RuntimeError("save failed")
  chained.__cause__ = full
  assert all(wd.is_disk_full(e) for e in (full, wrapped, chained))
  assert not wd.is_disk_full(OSError(errno.EACCES, "Permission denied"))
  with pytest.raises(wd.DiskFullError, match=f"no space left on the device of {tmp_path} while "
                                             f"writing the metrics log \\([0-9.]+ MiB free\\)"):
    with wd.disk_full_guard(str(tmp_path), "the metrics log"):
      raise chained
  with pytest.raises(OSError, match="Permission denied"):  # other errors pass unchanged
    with wd.disk_full_guard(str(tmp_path), "the metrics log"):
      raise OSError(errno.EACCES, "Permission denied")


@pytest.mark.slow
def test_training_refuses_a_busy_workdir_and_resumes_with_its_config_checked(
    tmp_path, caplog, compile_cache, monkeypatch):
  run = str(tmp_path / "run")
  devices = jax.devices()[:1]
  with wd.RunLock(run):  # another run holds it: nothing is read or written
    with pytest.raises(wd.WorkdirBusyError, match=f"process {os.getpid()}"):
      training.train_and_evaluate(_smoke(), run, devices=devices, progress=False)
  assert sorted(os.listdir(run)) == []

  training.train_and_evaluate(_smoke(), run, devices=devices, max_steps=1, progress=False)
  assert checkpoint_steps(run) == [1]
  saved = json.loads((tmp_path / "run" / wd.CONFIG_FILE).read_text())
  assert saved["data"]["batch_size"] == _smoke().data.batch_size

  moved = _smoke()
  moved.data.train.num_images += 1
  with pytest.raises(wd.ConfigChangedError, match="data.train.num_images"):
    training.train_and_evaluate(moved, run, devices=devices, progress=False)
  assert checkpoint_steps(run) == [1]  # nothing trained or saved

  # A full disk at the next save: one error naming it; the previous checkpoint stays.
  batch = _smoke()
  batch.data.batch_size = 2 * _smoke().data.batch_size

  def no_space(self, step, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  with monkeypatch.context() as m:
    m.setattr(checkpoint.Checkpointer, "save", no_space)
    with caplog.at_level(logging.WARNING, logger="jdet.engine.workdir"):
      with pytest.raises(wd.DiskFullError, match=r"while writing checkpoint 2 to "
                                                 r".*checkpoints .*kept \[1\]"):
        training.train_and_evaluate(batch, run, devices=devices, progress=False)
  assert f"data.batch_size: {_smoke().data.batch_size} -> {batch.data.batch_size}" in caplog.text
  assert checkpoint_steps(run) == [1]
  assert not (tmp_path / "run" / wd.LOCK_FILE).exists()  # released on the error too

  result = training.train_and_evaluate(batch, run, devices=devices, progress=False)
  assert result["step"] == 2 and checkpoint_steps(run) == [1, 2]
  starts = [json.loads(line) for line in (tmp_path / "run" / wd.STARTS_FILE).read_text().splitlines()]
  # The refused start left no trace; the others are recorded with what they changed.
  assert [s["resumed_from"] for s in starts] == [None, 1, 1]
  assert [set(s["changes"]) for s in starts] == [set(), {"data.batch_size"}, set()]
