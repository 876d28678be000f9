"""Runs of jdet's programs and training loop: subprocesses of ``train.py`` and
``eval.py``, a JAX compilation cache for one test module's runs, the checkpoint
steps of a workdir."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Iterator, Sequence

import jax

# The checkout's root: the programs run from there.
REPO = Path(__file__).resolve().parents[2]


def program_env(cache_dir: str | None, num_devices: int = 1) -> dict:
  """The environment of a program run on ``num_devices`` simulated CPU devices, with
  ``cache_dir`` as its JAX compilation cache (none if ``None``)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(num_devices))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  if cache_dir:
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  return env


def run_program(cmd: Sequence[str], env: dict, *, timeout: float = 300,
                expect: int | None = 0) -> subprocess.CompletedProcess:
  """Runs ``cmd`` in :data:`REPO` to its end, capturing its output; asserts that its exit
  status is ``expect`` (unless ``None``), showing the end of its stderr if not."""
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  if expect is not None:
    assert proc.returncode == expect, (
        f"{' '.join(map(str, cmd[1:]))} exited {proc.returncode}:\n{proc.stderr[-6000:]}")
  return proc


@contextlib.contextmanager
def running(cmd: Sequence[str], env: dict, log_path, *,
            mode: str = "w") -> Iterator[subprocess.Popen]:
  """Starts ``cmd`` in :data:`REPO` with its stdout and stderr in ``log_path`` (opened with
  ``mode``); on leaving, kills it if it still runs and closes the log."""
  log = open(log_path, mode)
  try:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
      yield proc
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  finally:
    log.close()


def jax_compile_cache(tmp_path_factory):
  """A persistent JAX compilation cache for one test module's runs, as a fixture body:
  ``compile_cache = pytest.fixture(scope="module")(jax_compile_cache)``.

  Every ``train_and_evaluate`` call jits new functions; most of a smoke run is
  compiling them (model init alone takes ~15 s on a 2-core CPU). The cache is
  exact (keyed by the compiled program), so it changes the speed of the runs
  and nothing else. Yields its folder (for subprocesses'
  ``JAX_COMPILATION_CACHE_DIR``) and is switched off again afterwards.
  """
  from jax.experimental.compilation_cache import compilation_cache

  path = str(tmp_path_factory.mktemp("jax_cache"))
  previous = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", path)
  compilation_cache.reset_cache()
  yield path
  jax.config.update("jax_compilation_cache_dir", previous)
  compilation_cache.reset_cache()


def checkpoint_steps(workdir) -> list[int]:
  """The committed checkpoint steps of a workdir (orbax writes ``<step>`` only once a save
  is complete); ``[]`` before the first."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())
