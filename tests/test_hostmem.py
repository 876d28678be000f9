"""jdet.engine.hostmem: with JDET_KEEP_HOST_MEMORY=1 a freed large block is reused, not zero-filled again.

Each case runs in a fresh process (the setting is process-wide and must come
before the first large allocation): it allocates, touches and frees a 64 MiB
block with the C library's own malloc several times and counts the minor page
faults of the last round. With glibc's default a block that large is a fresh
``mmap`` every time (one fault per 4 KiB page); kept, the pages of the
previous round are reused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SIZE = 64 << 20
PAGES = SIZE // 4096

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")

PROBE = f"""
import ctypes, json, resource
import jdet
from jdet.engine import hostmem
libc = ctypes.CDLL("libc.so.6")
libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages whatever the machine's THP mode
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = []
for _ in range(4):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc({SIZE})
  ctypes.memset(block, 1, {SIZE})
  libc.free(block)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(dict(applied=hostmem.is_applied(), faults=faults)))
"""


def _probe(setting: str | None) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "JDET_KEEP_HOST_MEMORY"}
  if setting is not None:
    env["JDET_KEEP_HOST_MEMORY"] = setting
  out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a fresh interpreter that imports jdet and JAX
def test_default_library_import_leaves_the_allocator_alone():
  result = _probe(None)
  assert result["applied"] is False
  # glibc's default: a fresh mapping each round, every page faulted in again.
  assert result["faults"][-1] >= 0.9 * PAGES, result


@pytest.mark.slow  # a fresh interpreter that imports jdet and JAX
def test_kept_memory_is_reused_without_page_faults():
  result = _probe("1")
  assert result["applied"] is True
  assert result["faults"][0] >= 0.9 * PAGES, result  # the first round grows the heap
  assert result["faults"][-1] < 0.01 * PAGES, result


@pytest.mark.slow  # a fresh interpreter that imports jdet and JAX
def test_zero_turns_it_off_for_the_programs():
  # train.py and eval.py only set the variable when it is not set already.
  result = _probe("0")
  assert result["applied"] is False
  assert result["faults"][-1] >= 0.9 * PAGES, result


@pytest.mark.parametrize("program", ["train.py", "eval.py"])
def test_programs_turn_it_on_before_jdet_is_imported(program):
  source = (ROOT / program).read_text()
  setting = source.index('os.environ.setdefault("JDET_KEEP_HOST_MEMORY", "1")')
  assert setting < source.index("from jdet import")


@pytest.mark.slow  # times Sparse R-CNN's smoke steps in two processes
def test_bench_program_runs_each_setting_in_its_own_process(tmp_path):
  out = subprocess.run([sys.executable, "bench/hostmem.py", "--config", "configs/sparse_rcnn.py:smoke",
                        "--warmup", "1", "--iters", "2", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = json.loads((tmp_path / "hostmem_sparse_rcnn_smoke_cpu.json").read_text())["rows"]
  assert [r["keep_host_memory"] for r in rows] == [False, True]
  assert rows[0]["ratio"] == 1.0 and rows[1]["ratio"] > 0
  assert all(r["step_ms"] > 0 and r["batch_size"] == 4 for r in rows)
