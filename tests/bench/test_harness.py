"""``bench/harness.py``: the CPU's peak from its flags and clock, MFU as a fraction, cases.

The peaks are worked by hand: cores x clock x float32 lanes x 2 (FMA) x 2 FMA units.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import harness  # noqa: E402  (bench/harness.py)
import run_all  # noqa: E402  (bench/run_all.py)

# Two processors of an AVX-512 server part, as /proc/cpuinfo lists them (shortened).
CPUINFO_AVX512 = """processor\t: 0
model name\t: Intel(R) Xeon(R) Processor @ 2.80GHz
cpu MHz\t\t: 2800.000
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq avx512bw

processor\t: 1
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq avx512bw
"""


def test_cpu_flags_reads_the_flags_line():
  flags = harness.cpu_flags(CPUINFO_AVX512)
  assert {"avx512f", "avx2", "fma", "sse2"} <= flags and "2.80GHz" not in flags
  assert harness.cpu_flags("processor\t: 0\nFeatures\t: fp asimd\n") == set()


@pytest.mark.parametrize("flags, per_cycle", [
    ({"sse", "sse2", "fma", "avx", "avx2", "avx512f"}, 64),  # 16 lanes x 2 (FMA) x 2 units
    ({"sse", "sse2", "fma", "avx", "avx2"}, 32),  # 8 lanes x 2 x 2 (Haswell, Zen)
    ({"sse", "sse2", "avx"}, 16),  # 8 lanes, a multiply and an add unit (Sandy Bridge)
    ({"sse", "sse2"}, 8),  # 4 lanes, a multiply and an add unit
    (set(), 8),  # flags unknown: SSE's
])
def test_flops_per_cycle(flags, per_cycle):
  assert harness.flops_per_cycle(flags)[0] == per_cycle


def test_cpu_peak_flops_by_hand():
  # 2 cores x 2800 MHz x 64 FLOP/cycle = 358.4 GFLOP/s (the old 32 FLOP/cycle: 179.2).
  peak, source = harness.cpu_peak_flops(2, flags=harness.cpu_flags(CPUINFO_AVX512), mhz=2800.0)
  assert peak == pytest.approx(358.4e9)
  assert "64 FLOP/cycle" in source and "AVX-512" in source
  # 1 core x 3000 MHz x 32 = 96 GFLOP/s on AVX2 with FMA.
  assert harness.cpu_peak_flops(1, flags={"avx", "avx2", "fma"}, mhz=3000.0)[0] == pytest.approx(96e9)


def test_cpu_peak_flops_takes_a_faster_measurement():
  # Nominal 1 x 1000 MHz x 8 = 8 GFLOP/s; a matmul reaching 20 GFLOP/s raises the peak to it.
  peak, source = harness.cpu_peak_flops(1, flags={"sse2"}, mhz=1000.0, measured=20e9)
  assert peak == 20e9 and source.startswith("measured")
  peak, source = harness.cpu_peak_flops(1, flags={"sse2"}, mhz=1000.0, measured=5e9)
  assert peak == pytest.approx(8e9) and "5.0 GFLOP/s" in source


def test_cpu_peak_flops_without_a_clock(monkeypatch):
  monkeypatch.setattr(harness, "_cpu_mhz", lambda: None)
  assert harness.cpu_peak_flops(1, flags={"avx2", "fma"}) == (None, "unknown CPU clock")
  assert harness.cpu_peak_flops(1, flags={"avx2", "fma"}, measured=7e9)[0] == 7e9


def test_matmul_flops_is_a_rate():
  flops = harness.matmul_flops(n=128, repeats=2)
  assert math.isfinite(flops) and flops > 0


def test_mfu_is_a_fraction():
  assert harness.mfu(2e12, 1.0, 1e13) == pytest.approx(0.2)
  assert harness.mfu(2e12, 0.1, 1e13) == 1.0  # 20 TFLOP/s on a 10 TFLOP/s peak: capped


def test_figures_cap_mfu_and_keep_the_achieved_rate():
  # A 2e12-FLOP step in 0.1 s (jdet) and 0.4 s (peer) on a 1e13 FLOP/s peak: 200 % and 50 %.
  timing = lambda median: dict(step_s=[median], median_s=median, flops=2e12)
  row = dict(kind="model", batch=1, jdet=timing(0.1), peer_timing=timing(0.4))
  f = run_all.figures(row, 1e13)
  assert f["jdet_mfu"] == 1.0 and f["peer_mfu"] == pytest.approx(0.5)
  assert f["jdet_tflop_s"] == pytest.approx(20.0)


def test_model_cases_keys_and_steps():
  made = []
  cases = harness.model_cases(
      "M", lambda case, b: made.append(("jdet", case, b)),
      lambda case, b: made.append(("peer", case, b)), train_batch=4, infer_batches=(1, 8),
      key=("jdet", "m"), peer_key=("jdet", "ref"), input_size="8x8", peer="ref")
  assert [(c.case, c.batch, c.key, c.peer_key) for c in cases] == [
      ("train", 4, ("jdet", "m", "train", 4), ("jdet", "ref", "train", 4)),
      ("inference", 1, ("jdet", "m", "inference", 1), ("jdet", "ref", "inference", 1)),
      ("inference", 8, ("jdet", "m", "inference", 8), ("jdet", "ref", "inference", 8))]
  for c in cases:
    c.make()
    c.make_peer()
  assert made == [("jdet", "train", 4), ("peer", "train", 4), ("jdet", "inference", 1),
                  ("peer", "inference", 1), ("jdet", "inference", 8), ("peer", "inference", 8)]
  no_training = harness.model_cases("M", made.append, made.append, train_batch=None,
                                    infer_batches=(2,))
  assert [(c.case, c.batch, c.key) for c in no_training] == [("inference", 2, None)]
