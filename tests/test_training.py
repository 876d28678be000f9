"""The training loop on the smoke config: devices, resuming, bad losses, SIGTERM.

Each test runs the real :func:`jdet.engine.training.train_and_evaluate` (or
``train.py``) for a few steps and compares it with an equal run: the same
global batch on 1 and 4 devices, an interrupted and an uninterrupted run, a
run stopped by a signal and its continuation. Evaluation is switched off
(``eval_every=0``) where it is not the point.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time

import jax
import numpy as np
import pytest

from jdet.engine import training

from configs import ssd300 as ssd300_config
from tests.helpers.runs import (checkpoint_steps, jax_compile_cache, program_env, run_program,
                                running)

pytestmark = pytest.mark.slow

# Two steps, not more: at step 3 of the smoke run one pre-activation of fc6 lies
# within 1e-5 of zero, so float rounding that differs between 1 and 4 devices
# flips one ReLU and changes that step's backbone gradients by ~1e-2 (the
# losses still agree to 1e-6). Up to step 2 the runs agree to ~1e-6.
NUM_STEPS = 2


# A persistent compilation cache for this module's runs (and its subprocesses).
compile_cache = pytest.fixture(scope="module", autouse=True)(jax_compile_cache)


def _config(num_steps: int = NUM_STEPS, **train):
  config = ssd300_config.get_config("smoke")
  config.train.num_steps = num_steps
  config.train.eval_every = 0
  for k, v in train.items():
    config.train[k] = v
  return config


def _read_metrics(workdir) -> list[dict]:
  """The training lines (those with a loss) of ``workdir/metrics.jsonl``."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    lines = [json.loads(line) for line in f if line.strip()]
  return [m for m in lines if "loss" in m]


def _host_params(result) -> dict:
  return jax.tree.map(np.asarray, result["state"].params)


def _assert_trees_close(a, b, *, rtol, atol):
  flat_a = jax.tree_util.tree_leaves_with_path(a)
  flat_b = jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def _train(config, workdir, *, num_devices: int, **kwargs):
  return training.train_and_evaluate(config, str(workdir), devices=jax.devices()[:num_devices],
                                     progress=False, **kwargs)


def test_one_and_four_devices_give_the_same_run(tmp_path):
  one_dir, four_dir = tmp_path / "one", tmp_path / "four"
  four = _train(_config(), four_dir, num_devices=4)
  assert len(four["state"].params["head"]["cls_0"]["kernel"].sharding.device_set) == 4
  one = _train(_config(), one_dir, num_devices=1)
  assert one["step"] == four["step"] == NUM_STEPS
  lines_one, lines_four = _read_metrics(one_dir), _read_metrics(four_dir)
  assert [m["step"] for m in lines_one] == [m["step"] for m in lines_four] == [1, 2]
  for a, b in zip(lines_one, lines_four):
    for k in ("loss", "cls_loss", "box_loss", "num_pos", "grad_norm"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-4, err_msg=f"step {a['step']} {k}")
  _assert_trees_close(_host_params(one), _host_params(four), rtol=1e-4, atol=1e-5)
  # BatchNorm statistics are global over the batch (SyncBN), not per device.
  _assert_trees_close(jax.tree.map(np.asarray, one["state"].batch_stats),
                      jax.tree.map(np.asarray, four["state"].batch_stats), rtol=1e-4, atol=1e-5)


def test_resume_matches_an_uninterrupted_run(tmp_path):
  whole_dir, split_dir = tmp_path / "whole", tmp_path / "split"
  whole = _train(_config(), whole_dir, num_devices=1)
  part = _train(_config(), split_dir, num_devices=1, max_steps=1)
  assert part["step"] == 1 and checkpoint_steps(split_dir)[-1] == 1  # saved at the end
  resumed = _train(_config(), split_dir, num_devices=1)  # same workdir: resumes from step 1
  assert resumed["step"] == NUM_STEPS
  _assert_trees_close(_host_params(resumed), _host_params(whole), rtol=1e-5, atol=1e-7)
  _assert_trees_close(jax.tree.map(np.asarray, resumed["state"].opt_state),
                      jax.tree.map(np.asarray, whole["state"].opt_state), rtol=1e-5, atol=1e-7)
  _assert_trees_close(jax.tree.map(np.asarray, resumed["state"].batch_stats),
                      jax.tree.map(np.asarray, whole["state"].batch_stats), rtol=1e-5, atol=1e-7)
  lines = _read_metrics(split_dir)
  assert [m["step"] for m in lines] == [1, 2]  # each step exactly once
  for a, b in zip(lines, _read_metrics(whole_dir)):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
  assert checkpoint_steps(split_dir)[-1] == NUM_STEPS


def _wait_for_pending_saves(workdir, timeout: float = 60.0) -> None:
  """Waits until no temporary orbax folder is left (a save still being written)."""
  directory = os.path.join(workdir, "checkpoints")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if not any("tmp" in name for name in os.listdir(directory)):
      return
    time.sleep(0.2)
  raise AssertionError(f"checkpoint saves still pending: {os.listdir(directory)}")


def test_non_finite_loss_stops_the_run(tmp_path):
  # A learning rate of 1e8 without clipping: step 1 is finite (warm-up starts at
  # 0.001 * lr), its update blows the weights up, and within a few steps the loss
  # is NaN. Checkpoints every step, so that one exists just before the bad step.
  config = _config(num_steps=8, checkpoint_every=1)
  config.optim.lr = 1e8
  config.optim.clip_norm = 0.0
  workdir = str(tmp_path)
  with pytest.raises(training.NonFiniteLossError) as excinfo:
    _train(config, workdir, num_devices=1)
  message = str(excinfo.value)
  match = re.search(r"non-finite loss at step (\d+)", message)
  assert match, message
  bad_step = int(match.group(1))
  assert 2 <= bad_step <= 8
  for term in ("loss", "cls_loss", "box_loss"):
    assert re.search(rf"\b{term}=(nan|-?inf)", message), message
  _wait_for_pending_saves(workdir)
  steps = checkpoint_steps(workdir)
  # Nothing saved at or after the bad step; the one before it is the last good state.
  assert steps and max(steps) == bad_step - 1, steps


def _train_cmd(workdir, *overrides: str) -> list[str]:
  return [sys.executable, "train.py", "--config", "configs/ssd300.py:smoke", "--workdir",
          str(workdir), "--config.train.eval_every=0", *overrides]


def test_sigterm_saves_and_resumes(tmp_path, compile_cache):
  workdir = tmp_path / "run"
  metrics = workdir / "metrics.jsonl"
  cmd = _train_cmd(workdir, "--config.train.num_steps=100000", "--config.train.log_every=1",
                   "--config.train.checkpoint_every=100000")
  env = program_env(compile_cache)
  with running(cmd, env, tmp_path / "train.log") as proc:
    # Wait until some step has been logged (the metrics file is buffered: it shows
    # up after some tens of steps), then ask the program to stop.
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.stat().st_size > 0):
      assert proc.poll() is None, (tmp_path / "train.log").read_text()[-4000:]
      assert time.time() < deadline, "no step logged in time"
      time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    # Saved, then a non-zero status (128 + SIGTERM), so that a scheduler restarts the job.
    assert proc.wait(timeout=120) == 143, (tmp_path / "train.log").read_text()[-4000:]
  lines = _read_metrics(workdir)
  last = lines[-1]["step"]
  assert [m["step"] for m in lines] == list(range(1, last + 1))
  assert last < 100000
  assert checkpoint_steps(workdir) == [last]  # only the checkpoint of the signal

  # Start again with a slightly longer schedule: it continues from the saved step.
  proc = run_program(_train_cmd(workdir, f"--config.train.num_steps={last + 2}"), env, timeout=240)
  assert f"resumed from step {last}" in proc.stderr
  lines = _read_metrics(workdir)
  assert [m["step"] for m in lines] == list(range(1, last + 3))
  assert all(np.isfinite(m["loss"]) for m in lines)
  assert checkpoint_steps(workdir)[-1] == last + 2
