"""``train.py`` and ``eval.py`` as a user runs them, on the smoke config.

Every program runs as a subprocess from the repository root on the CPU. The
single-process runs share a persistent compilation cache (exact: it only
skips compiling a program compiled before), which makes the second and later
programs several times faster.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from jdet.data import builder

from configs import ssd300 as ssd300_config
from tests.helpers.runs import checkpoint_steps, program_env, run_program, running

pytestmark = pytest.mark.slow

SMOKE = "configs/ssd300.py:smoke"


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("jax_cache"))


def _run(program: str, *args: str, env: dict, timeout: float = 300,
         config: str = SMOKE) -> subprocess.CompletedProcess:
  return run_program([sys.executable, program, "--config", config, *args], env, timeout=timeout)


def _jsonl(path) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _assert_png(path) -> None:
  with Image.open(path) as image:
    assert image.format == "PNG"
    image.verify()  # checks the chunks and their CRCs
  with Image.open(path) as image:
    image.load()
    assert image.width > 0 and image.height > 0


def test_smoke_train_then_eval(tmp_path, compile_cache):
  config = ssd300_config.get_config("smoke")
  env = program_env(compile_cache)
  workdir = tmp_path / "run"
  train = _run("train.py", "--workdir", str(workdir), env=env)
  # Quiet by default: jdet's progress and evaluations, no library INFO lines (orbax).
  assert "final evaluation" in train.stderr
  assert not [line for line in train.stderr.splitlines()
              if "[process=0]" in line or "checkpoint_manager" in line], train.stderr[-3000:]

  num_steps, every = int(config.train.num_steps), int(config.train.checkpoint_every)
  assert every < num_steps
  assert checkpoint_steps(workdir) == list(range(every, num_steps + 1, every))
  logged = _jsonl(workdir / "metrics.jsonl")
  assert [m["step"] for m in logged if "loss" in m] == list(range(1, num_steps + 1))
  train_eval = [m for m in logged if "eval/AP" in m]
  assert [m["step"] for m in train_eval] == [num_steps]  # eval_every == num_steps

  proc = _run("eval.py", "--workdir", str(workdir), env=env)
  out = workdir / "eval"
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["step"] == num_steps  # the latest checkpoint
  for key in ("AP", "AP50", "AP75", "APs", "APm"):
    assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
  # 64 x 64 images hold no "large" object (area > 96^2 = 9216 > 64^2): APl is undefined.
  assert metrics["APl"] is None
  val = builder.build_source(config.data, "val")
  assert len(val.class_names) == 5
  assert set(metrics["per_class"]) == set(val.class_names)
  assert metrics["num_images"] == len(val)
  # The evaluation inside training saw the same checkpoint and images.
  np.testing.assert_allclose(metrics["AP"], train_eval[0]["eval/AP"], rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(metrics["AP50"], train_eval[0]["eval/AP50"], rtol=1e-9, atol=1e-12)
  assert "AP" in proc.stdout and "ellipse" in proc.stdout  # the summary and the per-class table

  _assert_png(out / "pr_curves_coco.png")
  _assert_png(out / "detections.png")

  detections = json.loads((out / "detections.json").read_text())
  assert detections and len(detections) == metrics["num_detections"]
  val_ids = {int(val[i].image_id) for i in range(len(val))}
  category_ids = {val.category_id(k) for k in range(len(val.class_names))}
  assert {d["image_id"] for d in detections} == val_ids  # every val image, no other
  assert {d["category_id"] for d in detections} <= category_ids
  for d in detections:
    x, y, w, h = d["bbox"]  # COCO format, original pixels of a 64 x 64 image
    assert 0 <= x and 0 <= y and w >= 0 and h >= 0
    assert x + w <= 64 + 1e-3 and y + h <= 64 + 1e-3
    assert 0.0 < d["score"] <= 1.0

  # --step picks an older checkpoint.
  shutil.move(out, tmp_path / f"eval_{num_steps}")
  _run("eval.py", "--workdir", str(workdir), f"--step={every}", env=env)
  older = json.loads((out / "metrics.json").read_text())
  assert older["step"] == every  # read from the restored state, not from the flag
  assert json.loads((out / "detections.json").read_text()) != detections


@pytest.mark.parametrize("name", ["refinedet320", "faster_rcnn_r50_fpn"])
def test_other_detectors_smoke_train_then_eval(tmp_path, compile_cache, name):
  """RefineDet and Faster R-CNN go through the same programs: checkpoints, the
  periodic evaluation, and eval.py agreeing with it."""
  config = importlib.import_module(f"configs.{name}").get_config("smoke")
  env = program_env(compile_cache)
  workdir = tmp_path / "run"
  spec = f"configs/{name}.py:smoke"
  _run("train.py", "--workdir", str(workdir), env=env, config=spec, timeout=600)
  num_steps = int(config.train.num_steps)
  assert checkpoint_steps(workdir)[-1] == num_steps
  logged = _jsonl(workdir / "metrics.jsonl")
  losses = [m for m in logged if "loss" in m]
  assert [m["step"] for m in losses] == list(range(1, num_steps + 1))
  assert all(np.isfinite(m["loss"]) for m in losses)
  train_eval = [m for m in logged if "eval/AP" in m]

  _run("eval.py", "--workdir", str(workdir), env=env, config=spec, timeout=600)
  metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
  assert metrics["step"] == num_steps
  np.testing.assert_allclose(metrics["AP"], train_eval[-1]["eval/AP"], rtol=1e-9, atol=1e-12)
  size = int(config.data.val.image_size)
  for d in json.loads((workdir / "eval" / "detections.json").read_text()):
    x, y, w, h = d["bbox"]
    assert 0 <= x and 0 <= y and w >= 0 and h >= 0
    assert x + w <= size + 1e-3 and y + h <= size + 1e-3
  _assert_png(workdir / "eval" / "detections.png")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_on_localhost(tmp_path, compile_cache):
  """Two ``train.py`` processes of 2 CPU devices each train one model with batch 4.

  The losses are not compared with a one-process run: each process reads its
  own shard of the images (``shard_index::num_shards``) shuffled on its own,
  so the batches differ from those of one process reading all images. Instead:
  every step is logged once, finite; the evaluation inside training (which
  gathers detections across the processes) matches ``eval.py`` run on one
  process on the checkpoint the two processes saved.
  """
  config = ssd300_config.get_config("smoke")
  num_steps = int(config.train.num_steps)
  workdir = tmp_path / "run"
  port = _free_port()
  with contextlib.ExitStack() as stack:
    procs = []
    for i in range(2):
      cmd = [sys.executable, "train.py", "--config", SMOKE, "--workdir", str(workdir),
             "--distributed", f"--coordinator_address=localhost:{port}", "--num_processes=2",
             f"--process_id={i}"]
      procs.append(stack.enter_context(
          running(cmd, program_env(None, num_devices=2), tmp_path / f"process_{i}.log")))
    deadline = time.time() + 240
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.time()))
  for i, p in enumerate(procs):
    assert p.returncode == 0, (tmp_path / f"process_{i}.log").read_text()[-6000:]

  logged = _jsonl(workdir / "metrics.jsonl")  # written by process 0 only
  train_lines = [m for m in logged if "loss" in m]
  assert [m["step"] for m in train_lines] == list(range(1, num_steps + 1))
  assert all(np.isfinite(m["loss"]) and m["num_pos"] > 0 for m in train_lines)
  train_eval = [m for m in logged if "eval/AP" in m]
  assert [m["step"] for m in train_eval] == [num_steps]
  assert checkpoint_steps(workdir)[-1] == num_steps

  # One process, one device, restores what two processes saved and evaluates it alike.
  _run("eval.py", "--workdir", str(workdir), env=program_env(compile_cache))
  metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
  assert metrics["step"] == num_steps
  np.testing.assert_allclose(metrics["AP"], train_eval[0]["eval/AP"], rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(metrics["AP50"], train_eval[0]["eval/AP50"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("program, wanted", [
    (["train.py"], ["--config", "--workdir", "--allow_changes", "--distributed", "--verbosity"]),
    (["eval.py"], ["--config", "--workdir", "--step", "--tta", "--split", "--verbosity"]),
    (["predict.py"], ["--config", "--workdir", "--weights", "--step", "--out", "--score_threshold"]),
    (["-m", "jdet.inference.export"], ["--config", "--workdir", "--weights", "--step", "--out"]),
])
def test_help_lists_the_programs_own_flags(program, wanted):
  proc = run_program([sys.executable, *program, "--help"], program_env(None), expect=None)
  assert proc.stdout.count("--config") >= 1, proc.stderr[-3000:]  # absl exits 1 after --help
  missing = [w for w in wanted
             if not re.search(rf"(^|\s|,)--(\[no\])?{w[2:]}:", proc.stdout, re.M)]
  assert not missing, (missing, proc.stdout)


def test_a_missing_run_or_weights_file_is_one_line_and_creates_nothing(tmp_path):
  env = program_env(None)
  workdir = tmp_path / "no_run"
  for cmd in (["eval.py", "--config", SMOKE, "--workdir", str(workdir)],
              ["predict.py", "--config", SMOKE, "--workdir", str(workdir), str(tmp_path)],
              ["predict.py", "--config", SMOKE, "--weights", str(tmp_path / "w.npz"),
               str(tmp_path)]):
    proc = run_program([sys.executable, *cmd], env, expect=1)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and str(tmp_path) in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr
  assert not workdir.exists()
  # Without --config, eval.py needs a run that saved its config.
  workdir.mkdir()
  proc = run_program([sys.executable, "eval.py", "--workdir", str(workdir)], env, expect=1)
  assert f"{workdir} has no config.json" in proc.stderr


def test_config_printer_and_unknown_overrides(tmp_path):
  env = program_env(None)
  proc = run_program([sys.executable, "-m", "jdet.config", SMOKE, "--config.train.num_steps=7"],
                     env)
  want = ssd300_config.get_config("smoke")
  want.train.num_steps = 7
  assert proc.stdout.strip() == str(want).strip()
  # A run's saved config prints the same.
  from jdet.engine.workdir import record_start
  record_start(str(tmp_path), want)
  saved = run_program([sys.executable, "-m", "jdet.config", str(tmp_path)], env)
  assert saved.stdout.splitlines()[:3] == str(want).splitlines()[:3]
  assert "num_steps: 7" in saved.stdout
  # An override that names no field: one line naming it, for the printer and the programs.
  for cmd in (["-m", "jdet.config", SMOKE], ["train.py", "--config", SMOKE, "--workdir",
                                            str(tmp_path / "w")]):
    bad = run_program([sys.executable, *cmd, "--config.model.norm_epsx=0"], env, expect=1)
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: --config.model.norm_epsx=0: the config has no field 'norm_epsx' "
        "(python -m jdet.config SPEC prints its fields)"), bad.stderr
    assert "Traceback" not in bad.stderr
  assert not (tmp_path / "w").exists()
