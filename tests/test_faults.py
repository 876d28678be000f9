"""Fault injection: ``train.py`` and ``eval.py`` killed, fed damaged checkpoints and bad configs.

Every fault is injected the way it happens to a user: ``kill -9`` of the
training process at random steps and in the middle of checkpoint writes;
truncated, bit-flipped or removed checkpoint files; another model's
checkpoint in the workdir; config mistakes. Each test asserts the promised
behaviour: an exact resume (parameters, optimiser state, BatchNorm statistics,
RNG and input position bitwise equal to an uninterrupted run), a damaged step
named and moved aside, errors that name what is wrong and are the last thing
printed.

The programs run as subprocesses on the smoke config with a shared
persistent compilation cache (exact: it only skips compiling what was
compiled before).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from jdet.data.builder import ConfigError
from jdet.engine import restore, training

from configs import ssd300 as ssd300_config
from tests.helpers.faults import flip_bytes, largest_file, truncate_file
from tests.helpers.runs import (checkpoint_steps, jax_compile_cache, program_env, run_program,
                                running)

pytestmark = pytest.mark.slow

NUM_STEPS = 12  # of the kill -9 runs, a checkpoint at every step
NOISE = "Event loop is closed"


# A persistent compilation cache for this module's in-process runs and subprocesses.
compile_cache = pytest.fixture(scope="module")(jax_compile_cache)


def _cmd(program: str, workdir, *overrides: str) -> list[str]:
  extra = ["--config.train.eval_every=0"] if program == "train.py" else []
  return [sys.executable, program, "--config", "configs/ssd300.py:smoke", "--workdir",
          str(workdir), *extra, *overrides]


def _kill_run_flags(num_steps: int = NUM_STEPS) -> list[str]:
  return [f"--config.train.num_steps={num_steps}", "--config.train.checkpoint_every=1",
          "--config.train.log_every=1", "--config.train.keep_checkpoints=2"]


def _last_line(text: str) -> str:
  return [line for line in text.splitlines() if line.strip()][-1]


def _pending_writes(workdir) -> list[str]:
  folder = os.path.join(workdir, "checkpoints")
  try:
    return [n for n in os.listdir(folder) if "orbax-checkpoint-tmp" in n]
  except FileNotFoundError:
    return []


def _logged(workdir) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    lines = [json.loads(line) for line in f if line.strip().endswith("}")]
  return [m for m in lines if "loss" in m]


def _saved_state(workdir, step: int) -> dict:
  """Every array of checkpoint ``step`` as NumPy (read by orbax alone, no jdet code)."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  meta = ocp.StandardCheckpointHandler().metadata(epath.Path(path))
  template = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), meta.tree)
  return ocp.StandardCheckpointer().restore(path, template)


def _saved_position(workdir, step: int) -> dict:
  path = os.path.join(workdir, "checkpoints", str(step), "data", "process_0-of-1.json")
  with open(path) as f:
    return json.load(f)


def _assert_same_checkpoint(workdir, reference, step: int) -> None:
  """Bitwise: parameters, BatchNorm statistics, optimiser state, RNG, step, input position."""
  got, want = _saved_state(workdir, step), _saved_state(reference, step)
  flat_got = jax.tree_util.tree_leaves_with_path(got)
  flat_want = jax.tree_util.tree_leaves_with_path(want)
  assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
  assert {str(p[0]) for p, _ in flat_got} >= {"['params']", "['opt_state']", "['batch_stats']",
                                              "['rng']", "['step']"}
  for (path, a), (_, b) in zip(flat_got, flat_want):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  assert _saved_position(workdir, step) == _saved_position(reference, step)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, compile_cache):
  """An uninterrupted run of NUM_STEPS steps with a checkpoint at every step."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  run_program(_cmd("train.py", workdir, *_kill_run_flags()), program_env(compile_cache))
  assert checkpoint_steps(workdir) == [NUM_STEPS - 1, NUM_STEPS]
  return workdir


# ----------------------------------------------------------------------------
# kill -9
# ----------------------------------------------------------------------------


def _kill_when(proc, ready, *, timeout: float = 240.0) -> bool:
  """SIGKILLs ``proc`` as soon as ``ready()`` holds; False if it finished first."""
  deadline = time.time() + timeout
  while not ready():
    if proc.poll() is not None:
      return False
    assert time.time() < deadline, "the run made no progress in time"
    time.sleep(0.002)
  proc.kill()
  proc.wait()
  return True


def test_kill_9_at_random_steps_and_during_checkpoint_writes_resumes_bitwise(
    tmp_path, compile_cache, reference_run):
  env = program_env(compile_cache)
  workdir = tmp_path / "run"
  log_path = tmp_path / "train.log"
  rng = np.random.default_rng(17)
  kills, mid_write = [], 0
  for attempt in range(12):
    if len(kills) >= 5 and mid_write >= 2:
      break
    done = max([m["step"] for m in _logged(workdir)], default=0)
    if done >= NUM_STEPS - 1:
      break
    with running(_cmd("train.py", workdir, *_kill_run_flags()), env, log_path, mode="a") as proc:
      if attempt % 2 == 0:  # during a checkpoint write: a save has started and not committed
        before = set(_pending_writes(workdir))
        killed = _kill_when(proc, lambda: bool(set(_pending_writes(workdir)) - before))
        cut = bool(killed and _pending_writes(workdir))
        where = "during a checkpoint write" if cut else "just after a checkpoint write"
      else:  # at a random step past the resumed one
        target = done + 1 + int(rng.integers(0, 2))  # one or two steps on
        killed = _kill_when(
            proc, lambda: max([m["step"] for m in _logged(workdir)], default=0) >= target)
        cut, where = False, f"after step {target} was logged"
    if killed:
      kills.append(where)
      mid_write += cut
  assert len(kills) >= 5 and mid_write >= 2, (kills, log_path.read_text()[-4000:])
  # Each killed run left its lock file; the next run took it over, saying so.
  assert log_path.read_text().count("which ended without releasing it") >= len(kills) - 1

  run_program(_cmd("train.py", workdir, *_kill_run_flags()), env)  # to the end, after the last kill
  assert checkpoint_steps(workdir)[-1] == NUM_STEPS
  assert not _pending_writes(workdir)  # cut writes were cleaned up
  _assert_same_checkpoint(workdir, reference_run, NUM_STEPS)
  lines, reference = _logged(workdir), _logged(reference_run)
  assert [m["step"] for m in lines] == list(range(1, NUM_STEPS + 1))  # each step once
  assert [m["loss"] for m in lines] == [m["loss"] for m in reference]


# ----------------------------------------------------------------------------
# One run per workdir; a full disk.
# ----------------------------------------------------------------------------


def test_a_second_run_on_a_workdir_in_use_stops_naming_the_first(tmp_path, compile_cache,
                                                                  reference_run):
  env = program_env(compile_cache)
  workdir = tmp_path / "run"
  lock = workdir / "run.lock"
  with running(_cmd("train.py", workdir, *_kill_run_flags()), env, tmp_path / "first.log") as first:
    deadline = time.time() + 240
    while not (lock.exists() and f'"pid": {first.pid}' in lock.read_text()):
      assert first.poll() is None and time.time() < deadline, "the first run took no lock"
      time.sleep(0.01)
    second = run_program(_cmd("train.py", workdir, *_kill_run_flags()), env, expect=1)
    assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-4000:]
  assert _last_line(second.stderr).startswith(f"error: {workdir} is in use by process {first.pid}")
  assert "Traceback" not in second.stderr
  # The first run was left alone: it finished exactly as an uninterrupted run, and let go.
  assert checkpoint_steps(workdir) == [NUM_STEPS - 1, NUM_STEPS]
  _assert_same_checkpoint(workdir, reference_run, NUM_STEPS)
  assert [m["step"] for m in _logged(workdir)] == list(range(1, NUM_STEPS + 1))
  assert not lock.exists()


@pytest.fixture
def small_disk(tmp_path):
  """A 2.5 MiB file system (tmpfs): room for one smoke checkpoint, not two."""
  mount = tmp_path / "small_disk"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2560k", "tmpfs", str(mount)],
                    capture_output=True).returncode != 0:
    pytest.skip("mounting a tmpfs needs root (the injected ENOSPC of tests/test_workdir.py "
                "covers the same path)")
  yield mount
  subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_stops_with_one_line_and_the_workdir_resumes(tmp_path, compile_cache,
                                                                 reference_run, small_disk):
  env = program_env(compile_cache)
  workdir = small_disk / "run"
  proc = run_program(_cmd("train.py", workdir, *_kill_run_flags()), env, expect=28)
  last = _last_line(proc.stderr)
  assert last.startswith(f"error: no space left on the device of {workdir} while writing "
                         f"checkpoint "), last
  assert " MiB free" in last and "run the same command to resume" in last
  assert "Traceback" not in proc.stderr and "No space left" not in proc.stderr.replace(last, "")
  kept = checkpoint_steps(workdir)
  assert kept and not _pending_writes(workdir)  # the cut step removed, the earlier one kept
  assert not (workdir / "run.lock").exists()
  # Space freed (the run moved to a roomier disk): it resumes and ends as if never stopped.
  roomy = tmp_path / "run"
  shutil.copytree(workdir, roomy)
  resumed = run_program(_cmd("train.py", roomy, *_kill_run_flags()), env)
  assert f"resumed from step {kept[-1]}" in resumed.stderr
  _assert_same_checkpoint(roomy, reference_run, NUM_STEPS)


# ----------------------------------------------------------------------------
# Damaged and foreign checkpoints.
# ----------------------------------------------------------------------------


def test_train_resumes_from_the_previous_step_when_the_latest_is_truncated(
    tmp_path, compile_cache, reference_run):
  workdir = tmp_path / "run"
  shutil.copytree(reference_run, workdir)
  latest = workdir / "checkpoints" / str(NUM_STEPS)
  truncate_file(largest_file(latest / "state" / "ocdbt.process_0"))
  proc = run_program(_cmd("train.py", workdir, *_kill_run_flags()), program_env(compile_cache))
  assert f"checkpoint {NUM_STEPS} is damaged: {latest / 'state'}: arrays unreadable" in proc.stderr
  assert f"resuming from checkpoint {NUM_STEPS - 1}, the newest intact one" in proc.stderr
  assert f"resumed from step {NUM_STEPS - 1}" in proc.stderr
  assert NOISE not in proc.stderr
  assert "[process=0]" not in proc.stderr  # the warnings show; orbax's INFO lines do not
  assert (workdir / "checkpoints" / "damaged" / str(NUM_STEPS) / "state").is_dir()  # kept
  _assert_same_checkpoint(workdir, reference_run, NUM_STEPS)  # the step done again, exactly


def test_eval_refuses_a_checkpoint_with_flipped_bytes(tmp_path, compile_cache, reference_run):
  workdir = tmp_path / "run"
  shutil.copytree(reference_run, workdir)
  flip_bytes(largest_file(workdir / "checkpoints" / str(NUM_STEPS) / "state" / "ocdbt.process_0"))
  proc = run_program(_cmd("eval.py", workdir), program_env(compile_cache), expect=None)
  assert proc.returncode != 0
  last = _last_line(proc.stderr)
  assert f"CheckpointDamagedError: checkpoint {NUM_STEPS} is damaged" in last, last
  assert "do not match their checksum" in last and f"other steps: [{NUM_STEPS - 1}]" in last
  assert not (workdir / "eval" / "metrics.json").exists()  # nothing reported from bad weights
  assert NOISE not in proc.stderr


def test_another_models_checkpoint_is_a_clear_last_error(tmp_path, compile_cache, reference_run):
  workdir = tmp_path / "run"
  shutil.copytree(reference_run, workdir)
  proc = run_program(_cmd("train.py", workdir, *_kill_run_flags(NUM_STEPS + 2),
                          "--config.model.fc_width=64"), program_env(compile_cache), expect=1)
  last = _last_line(proc.stderr)
  assert last.startswith(f"jdet.engine.checkpoint.CheckpointMismatchError: checkpoint {NUM_STEPS}"), last
  assert "params/backbone/fc6/kernel" in last and "in the checkpoint" in last, last
  assert NOISE not in proc.stderr
  assert checkpoint_steps(workdir) == [NUM_STEPS - 1, NUM_STEPS]  # nothing moved aside
  assert not (workdir / "checkpoints" / "damaged").exists()


# ----------------------------------------------------------------------------
# Signals, config mistakes, non-finite losses.
# ----------------------------------------------------------------------------


def _config(**train):
  config = ssd300_config.get_config("smoke")
  config.train.eval_every = 0
  for k, v in train.items():
    config.train[k] = v
  return config


@pytest.mark.parametrize("field, value, message", [
    ("train.checkpoint_every", -1, r"train\.checkpoint_every must be an integer >= 0 \(0: off\)"),
    ("train.log_every", -5, r"train\.log_every must be an integer >= 0"),
    ("train.num_steps", 0, r"train\.num_steps must be an integer >= 1"),
    ("train.keep_checkpoints", 0, r"train\.keep_checkpoints must be an integer >= 1"),
    ("data.batch_size", 6, r"data\.batch_size=6 does not divide over 4 devices"),
    ("data.max_boxes", 0, r"data\.max_boxes must be an integer >= 1"),
    ("data.num_workers", -1, r"data\.num_workers must be an integer >= 0"),
])
def test_config_mistakes_are_named_at_start_up(tmp_path, field, value, message):
  config = _config()
  section, name = field.split(".")
  config[section][name] = value
  t0 = time.time()
  with pytest.raises(ConfigError, match=message):
    training.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:4], progress=False)
  assert time.time() - t0 < 5  # before the data, the model or a compile
  assert not os.listdir(tmp_path)


def test_zero_intervals_mean_off(tmp_path, compile_cache):
  config = _config(num_steps=3, checkpoint_every=0, log_every=0)
  result = training.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1],
                                       progress=False)
  assert result["step"] == 3
  assert checkpoint_steps(tmp_path) == [3]  # only the final checkpoint
  assert [m["step"] for m in _logged(tmp_path)] == [3]  # only the final log line


def test_non_finite_loss_before_any_checkpoint_says_so(tmp_path, compile_cache):
  config = _config(num_steps=8, checkpoint_every=0, log_every=1)
  config.optim.lr = 1e8
  config.optim.clip_norm = 0.0
  with pytest.raises(training.NonFiniteLossError) as excinfo:
    training.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1], progress=False)
  message = str(excinfo.value)
  assert "no checkpoint was saved before it, so starting again begins at step 0" in message
  assert "holds the last good state" not in message
  assert checkpoint_steps(tmp_path) == []


def test_sigterm_saves_and_exits_143(tmp_path, compile_cache):
  """A preempted run is not a finished one: a scheduler that restarts failed jobs restarts it."""
  workdir = tmp_path / "run"
  cmd = _cmd("train.py", workdir, "--config.train.num_steps=100000", "--config.train.log_every=1",
             "--config.train.checkpoint_every=100000")
  with running(cmd, program_env(compile_cache), tmp_path / "train.log") as proc:
    deadline = time.time() + 240
    while not _logged(workdir):
      assert proc.poll() is None and time.time() < deadline, (tmp_path / "train.log").read_text()
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
  text = (tmp_path / "train.log").read_text()
  assert code == 128 + signal.SIGTERM == 143, text[-4000:]
  assert "stopped by SIGTERM" in text and "exiting with status 143" in text
  last = max(m["step"] for m in _logged(workdir))
  assert checkpoint_steps(workdir) == [last]  # the checkpoint of the signal


def test_eval_without_a_checkpoint_says_so_before_building_anything(tmp_path):
  config = _config()
  t0 = time.time()
  with pytest.raises(FileNotFoundError, match="no checkpoint in .* and no config.init.weights"):
    restore.restore_for_eval(None, config, str(tmp_path), None, mesh=None)  # nothing built
  with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 7 .*available steps: \[\]"):
    restore.restore_for_eval(None, config, str(tmp_path), None, mesh=None, step=7)
  assert time.time() - t0 < 5
