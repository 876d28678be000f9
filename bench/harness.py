"""What every benchmark program shares: timed steps, FLOPs, memory, peaks, the machine, result files.

A benchmark case times two :class:`Step` objects side by side, jdet's and its
peer's, with the same protocol (:mod:`bench.run_all` plans how many calls):

1. ``prepare()``: for a :class:`JaxStep`, ``jax.jit(fn).lower(...).compile()``,
   timed apart (``compile_s``), with XLA's cost analysis of the compiled step
   (``flops``) and its buffer assignment (``memory_bytes``: arguments + outputs
   + temporaries - donated aliases); for a :class:`TorchStep` nothing.
2. ``run()`` once, untimed for the figures but recorded (``first_s``): the
   first call of a compiled step, or the peer's first call (lazy
   initialisation, cuDNN autotuning, the allocator).
3. ``run()`` as many times as planned: ``step_s``, each waited for
   (``block_until_ready`` / CUDA synchronisation); the figure is the median.

MFU = FLOPs of the compiled jdet step / step time / the device's peak. The peer
gets the same model FLOPs (it does the same arithmetic, give or take its own
implementation's extras), so its MFU is comparable. Peaks (:data:`PEAK_TFLOPS`)
are dense bfloat16 tensor-core figures per device name; a CPU gets a float32
peak from its core count, clock and vector width, or what a float32 matmul
reaches where that is more (:func:`cpu_peak_flops`); MFU is at most 1 (:func:`mfu`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

# configs/ lives at the repository root, next to bench/.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

# Dense bfloat16 tensor-core peak in TFLOP/s by a substring of the device name (first match).
# H100 SXM and H200: 989.4 (NVIDIA's datasheets; the sparse figure is twice that).
PEAK_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("V100", 125.0),  # float16 tensor cores (no bfloat16)
)


# ----------------------------------------------------------------------------
# Synchronisation and simple timing (also used by the single programs).
# ----------------------------------------------------------------------------


def jax_sync(x) -> None:
  """Waits until JAX has computed ``x`` (its calls return before the work is done)."""
  jax.block_until_ready(x)


def torch_sync(_) -> None:
  """Waits until CUDA has run the work queued so far (nothing to wait for on a CPU)."""
  import torch
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def median_time(fn: Callable[[], object], *, repeats: int, sync: Callable[[object], None]) -> float:
  """Median wall time in seconds of ``fn()`` over ``repeats`` runs, after one warm-up call;
  ``sync(fn())`` waits for each call's work (:func:`jax_sync`, :func:`torch_sync`)."""
  sync(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


# ----------------------------------------------------------------------------
# Steps.
# ----------------------------------------------------------------------------


def _flops(compiled) -> float | None:
  """FLOPs of one call of a compiled XLA computation (its cost analysis), or None."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends have none
    return None
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def _memory(compiled) -> int | None:
  """Bytes XLA's buffer assignment holds for one call: arguments, outputs and temporaries,
  less what donated arguments give to outputs."""
  try:
    m = compiled.memory_analysis()
  except Exception:
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


class Step:
  """A thing to time: ``prepare()`` (compile or nothing) then ``run()`` calls."""

  framework = ""
  compile_s: float | None = None
  flops: float | None = None
  memory_bytes: int | None = None

  def prepare(self) -> float | None:
    return None

  def run(self) -> float:  # seconds of one call, waited for
    raise NotImplementedError

  def peak_memory(self) -> int | None:
    return None


class JaxStep(Step):
  """``fn`` jitted, compiled apart from its calls.

  With ``carry=True``, ``fn(state, *args) -> (state, out)`` and the state is
  donated and threaded from call to call (a training step); otherwise
  ``fn(*args) -> out``.

  ``JaxStep.lower_only = True`` (``run_all --dry_run``) makes ``prepare`` trace and
  lower the step without compiling it and ``run`` a no-op: every argument, shape
  and dtype error still surfaces, in seconds instead of minutes of compiling.
  """

  framework = "jax"
  lower_only = False

  def __init__(self, fn: Callable, *args, carry: bool = False):
    self.fn, self.args, self.carry = fn, args, carry
    self.compiled = None

  def prepare(self) -> float:
    if self.carry:
      state, *rest = self.args
      # A copy: the donated buffers are consumed, and the caller may share the originals.
      self.args = (jax.tree.map(jnp.copy, state), *rest)
      jitted = jax.jit(self.fn, donate_argnums=0)
    else:
      jitted = jax.jit(self.fn)
    t0 = time.perf_counter()
    lowered = jitted.lower(*self.args)
    if self.lower_only:
      self.compile_s = time.perf_counter() - t0
      return self.compile_s
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - t0
    self.flops = _flops(self.compiled)
    self.memory_bytes = _memory(self.compiled)
    return self.compile_s

  def run(self) -> float:
    if self.lower_only:
      return 0.0
    t0 = time.perf_counter()
    if self.carry:
      state, out = self.compiled(*self.args)
      self.args = (state, *self.args[1:])
      jax.block_until_ready((state, out))
    else:
      jax.block_until_ready(self.compiled(*self.args))
    return time.perf_counter() - t0

  def peak_memory(self) -> int | None:
    """The device's peak bytes in use so far in this process (GPUs; None on a CPU)."""
    stats = jax.devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


class TorchStep(Step):
  """A torch callable (the peer); peak memory from ``torch.cuda.max_memory_allocated``,
  reset before its first call."""

  framework = "torch"

  def __init__(self, fn: Callable[[], Any]):
    self.fn = fn

  def prepare(self) -> None:
    import torch
    if torch.cuda.is_available():
      torch.cuda.reset_peak_memory_stats()
    return None

  def run(self) -> float:
    t0 = time.perf_counter()
    torch_sync(self.fn())
    return time.perf_counter() - t0

  def peak_memory(self) -> int | None:
    import torch
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


class HostStep(Step):
  """A plain Python callable (scipy, an input pipeline)."""

  framework = "host"

  def __init__(self, fn: Callable[[], Any], prepare: Callable[[], Any] | None = None):
    self.fn, self._prepare = fn, prepare

  def prepare(self) -> float | None:
    if self._prepare is None:
      return None
    t0 = time.perf_counter()
    self._prepare()
    self.compile_s = time.perf_counter() - t0
    return self.compile_s

  def run(self) -> float:
    t0 = time.perf_counter()
    self.fn()
    return time.perf_counter() - t0


@dataclass
class Timing:
  """What one side of a case measured (seconds)."""

  compile_s: float | None = None
  first_s: float | None = None
  step_s: list[float] = field(default_factory=list)
  flops: float | None = None
  memory_bytes: int | None = None
  peak_memory_bytes: int | None = None

  @property
  def median_s(self) -> float | None:
    return statistics.median(self.step_s) if self.step_s else None

  def as_dict(self) -> dict:
    return dict(compile_s=self.compile_s, first_s=self.first_s, step_s=self.step_s,
                median_s=self.median_s, flops=self.flops, memory_bytes=self.memory_bytes,
                peak_memory_bytes=self.peak_memory_bytes)


def time_step(step: Step, iters: int, timing: Timing | None = None) -> Timing:
  """``prepare``, one first call, then ``iters`` timed calls of ``step``."""
  timing = timing or Timing()
  if timing.first_s is None:
    timing.compile_s = step.prepare()
    timing.flops, timing.memory_bytes = step.flops, step.memory_bytes
    timing.first_s = step.run()
  timing.step_s.extend(step.run() for _ in range(iters))
  timing.peak_memory_bytes = step.peak_memory()
  return timing


def time_warm(step: Step, *, warmup: int, iters: int) -> Timing:
  """A single program's protocol: ``prepare``, ``warmup`` (>= 1) untimed calls (the first
  recorded as ``first_s``), then ``iters`` timed calls of ``step``."""
  timing = time_step(step, 0)
  for _ in range(warmup - 1):
    step.run()
  return time_step(step, iters, timing)


# ----------------------------------------------------------------------------
# Random weights without compiling an initialiser.
# ----------------------------------------------------------------------------


def random_variables(model, *init_args, seed: int = 0, **init_kwargs) -> dict:
  """Variables of ``model`` for timing, drawn in NumPy from ``jax.eval_shape(model.init, ...)``
  (compiling the model's own initialisers costs as much as a step on a CPU): kernels
  He-normal, biases and means 0, norm scales and variances 1 (an L2Norm's scale 20)."""
  shapes = jax.eval_shape(lambda k: model.init(k, *init_args, **init_kwargs), jax.random.key(seed))
  rng = np.random.default_rng(seed)

  def make(path, leaf):
    names = [str(getattr(p, "key", p)) for p in path]
    name, parent = names[-1], names[-2] if len(names) > 1 else ""
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      value = rng.normal(0.0, np.sqrt(2.0 / max(fan_in, 1)), leaf.shape)
    elif name == "scale":
      value = np.full(leaf.shape, 20.0 if parent.endswith("_norm") else 1.0)
    elif name == "var":
      value = np.ones(leaf.shape)
    elif name in ("bias", "mean"):
      value = np.zeros(leaf.shape)
    else:
      value = rng.normal(0.0, 0.02, leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(make, shapes)


# ----------------------------------------------------------------------------
# The machine, peaks, result files.
# ----------------------------------------------------------------------------


def jax_device_kind() -> str:
  d = jax.devices()[0]
  return f"{d.platform}: {d.device_kind}"


def device_name(torch_device=None) -> str:
  """A file-name slug for the accelerator: ``cpu``, ``nvidia-h100-80gb-hbm3``, ..."""
  d = jax.devices()[0]
  if d.platform == "cpu":
    return "cpu"
  return re.sub(r"[^a-z0-9]+", "-", d.device_kind.lower()).strip("-")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
  """The CPU's feature flags: the ``flags`` line of ``cpuinfo`` (the text of
  ``/proc/cpuinfo``; default: this machine's), or an empty set where there is none."""
  if cpuinfo is None:
    try:
      cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
      return set()
  line = next((l for l in cpuinfo.splitlines() if l.startswith("flags")), "")
  return set(line.split(":", 1)[-1].split())


def _cpu_mhz() -> float | None:
  """The highest clock the kernel reports for CPU 0 (cpufreq's maximum), else its
  ``/proc/cpuinfo`` clock, in MHz; None where neither is readable."""
  for path in ("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq",):
    try:
      return float(Path(path).read_text()) / 1e3
    except (OSError, ValueError):
      pass
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("cpu MHz"):
        return float(line.split(":")[1])
  except (OSError, ValueError):
    pass
  return None


# Float32 arithmetic units a core is assumed to have: two FMA units on AVX-512 and AVX2
# server parts (Intel Skylake-SP and later Xeons, AMD Zen); on a CPU without FMA, one
# add and one multiply unit. Some parts have fewer (one 512-bit FMA unit on low-end
# Xeons): the peak is then too high and MFU too low, never above 100 %.
FMA_UNITS = 2


def flops_per_cycle(flags: set[str]) -> tuple[int, str]:
  """Float32 FLOPs one core can do a cycle, from its feature flags (:func:`cpu_flags`):
  vector lanes (16 with ``avx512f``, 8 with ``avx``/``avx2``/``fma``, else SSE's 4)
  x 2 with FMA (a multiply and an add per lane) x :data:`FMA_UNITS`. AVX-512: 16 x 2 x 2
  = 64; AVX2 with FMA: 8 x 2 x 2 = 32; AVX without FMA: 8 x 1 x 2 = 16; SSE: 4 x 1 x 2
  = 8. Returns ``(FLOPs, how)``."""
  if "avx512f" in flags:
    lanes, isa = 16, "AVX-512"
  elif flags & {"avx", "avx2", "fma"}:
    lanes, isa = 8, "AVX2" if "avx2" in flags else "AVX"
  else:
    lanes, isa = 4, "SSE"
  fma = 2 if flags & {"fma", "avx512f"} else 1
  how = f"{isa}: {lanes} lanes x {fma} ({'FMA' if fma == 2 else 'no FMA'}) x {FMA_UNITS} units"
  return lanes * fma * FMA_UNITS, how


def matmul_flops(n: int = 2048, repeats: int = 3) -> float:
  """Float32 FLOP/s of an ``n x n`` matmul on JAX's first device (jitted, the best of
  ``repeats`` calls after one untimed call): what this process's XLA, with its thread
  settings, actually reaches, a lower bound on the peak."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
  f = jax.jit(lambda x, y: x @ y)
  jax_sync(f(a, a))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax_sync(f(a, a))
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def cpu_peak_flops(cores: int | None = None, *, flags: set[str] | None = None,
                   mhz: float | None = None,
                   measured: float | None = None) -> tuple[float | None, str]:
  """``(peak float32 FLOP/s, where it comes from)`` of ``cores`` CPU cores (default: this
  process's): the larger of the nominal ``cores x clock x`` :func:`flops_per_cycle` (flags
  and clock default to this machine's) and ``measured`` (e.g. :func:`matmul_flops`), so that
  a step's FLOP/s over the peak stays a fraction where the nominal figure is too low
  (turbo above the reported clock, more threads than ``cores``)."""
  if not cores:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  mhz = mhz or _cpu_mhz()
  nominal, source = None, "unknown CPU clock"
  if cores and mhz:
    per_cycle, how = flops_per_cycle(cpu_flags() if flags is None else flags)
    nominal = cores * mhz * 1e6 * per_cycle
    source = (f"nominal float32: {cores} cores x {mhz:.0f} MHz x {per_cycle} FLOP/cycle "
              f"({how})")
  if measured is None:
    return nominal, source
  if nominal is None or measured > nominal:
    return measured, f"measured float32 matmul, {measured / 1e9:.1f} GFLOP/s (above the {source})"
  return nominal, f"{source}; a float32 matmul measured {measured / 1e9:.1f} GFLOP/s"


def peak_flops(override_tflops: float | None = None, *, cpu_cores: int | None = None,
               measure: bool = True) -> tuple[float | None, str]:
  """``(peak FLOP/s, where it comes from)`` for JAX's first device (on a CPU, of
  ``cpu_cores`` cores, the threads each side runs with, and at least what a float32
  matmul reaches in this process when ``measure``: :func:`cpu_peak_flops`)."""
  if override_tflops:
    return override_tflops * 1e12, "given (--peak_tflops)"
  d = jax.devices()[0]
  if d.platform == "cpu":
    return cpu_peak_flops(cpu_cores, measured=matmul_flops() if measure else None)
  tflops = table_peak_tflops(d.device_kind)
  if tflops is None:
    return None, f"no peak known for {d.device_kind!r} (give --peak_tflops)"
  return tflops * 1e12, f"dense bfloat16 of {d.device_kind} (bench/harness.py PEAK_TFLOPS)"


def mfu(flops: float, seconds: float, peak: float) -> float:
  """Model FLOPs utilisation: ``flops / seconds / peak``, at most 1. A figure above 1 would
  mean the peak is too low for what the machine did (its clock above the nominal one);
  the uncapped rate is ``flops / seconds``."""
  return min(flops / seconds / peak, 1.0)


def table_peak_tflops(device_kind: str) -> float | None:
  """:data:`PEAK_TFLOPS` for a device name (``"NVIDIA H100 80GB HBM3"`` -> 989.4), or None."""
  for key, tflops in PEAK_TFLOPS:
    if key.lower() in device_kind.lower():
      return tflops
  return None


def machine_info(torch_device) -> dict:
  """The machine and library versions, recorded with every result."""
  import torch
  import torchvision
  jdev = jax.devices()[0]
  info = {
      "jax_device": f"{jdev.platform}: {jdev.device_kind}",
      "torch_device": torch.cuda.get_device_name() if torch_device.type == "cuda" else "cpu",
      "cpu": platform.processor() or platform.machine(),
      "cpu_threads": torch.get_num_threads(),
      "jax": jax.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
  }
  return info


def parse_ints(text: str) -> list[int]:
  """``"1,8"`` -> ``[1, 8]`` (an argparse ``type``)."""
  return [int(x) for x in text.split(",") if x]


def parse_hw(text: str) -> tuple[int, int]:
  """``"384,640"`` -> ``(384, 640)``, H then W (an argparse ``type``)."""
  h, w = parse_ints(text)
  return h, w


def side_by_side_parser(doc: str, *, iters: int = 3, warmup: int = 1,
                        torch_device: bool = True) -> argparse.ArgumentParser:
  """The flags every jdet-against-a-reference program takes: ``--device`` (torch's;
  not for a jdet-only program), ``--dtype``, ``--iters``, ``--warmup`` and ``--out``;
  add the program's own to it."""
  parser = argparse.ArgumentParser(description=doc.split("\n")[0])
  if torch_device:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="torch's device (JAX uses its default backend)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--iters", type=int, default=iters, help="timed calls per case (median)")
  parser.add_argument("--warmup", type=int, default=warmup, help="untimed calls first (>= 1)")
  parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                      help="folder for the <program>_<device>[_bfloat16].json and .txt results")
  return parser


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
  """``parser.parse_args()``, refusing ``--warmup 0`` (jdet's first call compiles)."""
  args = parser.parse_args()
  if getattr(args, "warmup", 1) < 1:
    parser.error("--warmup must be at least 1 (jdet's first call compiles)")
  return args


def text_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
  """A plain-text table: ``columns`` are ``(header, key, format spec)``; the first
  column is left-aligned, the others right-aligned; a missing value is blank."""
  cells = [[header for header, _, _ in columns]]
  for r in rows:
    cells.append(["" if r.get(key) is None else format(r[key], spec)
                  for _, key, spec in columns])
  widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
  return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths))).rstrip()
                   for row in cells)


def report(args: argparse.Namespace, program: str, *, machine: dict, settings: dict,
           rows: list[dict], columns: list[tuple[str, str, str]],
           device: str | None = None) -> None:
  """Prints the rows as a :func:`text_table` and writes them with :func:`write_results`
  as ``<program>_<device>[_bfloat16]`` under ``args.out`` (device: ``args.device``)."""
  table = text_table(rows, columns)
  print(table)
  device = device or args.device
  stem = f"{program}_{device}" + ("_bfloat16" if args.dtype == "bfloat16" else "")
  write_results(args.out, stem, machine=machine, settings=settings, rows=rows, table=table)


def run_side_by_side(args: argparse.Namespace, program: str, runs, make: Callable[[str, int], Step],
                     make_peer: Callable[[str, int], Step], *, peer: str, label: str,
                     machine: dict, settings: dict) -> list[dict]:
  """A single program's measurement. For each ``(case, batch)`` of ``runs``, jdet's step
  ``make(case, batch)`` and then the peer's ``make_peer(case, batch)`` are timed with
  :func:`time_warm` (``args.warmup``, ``args.iters``) and a line is printed. The rows
  (``jdet_ms``, ``<peer>_ms``, ``jdet_img_s``, ``<peer>_img_s``, ``ratio`` = the peer's time
  / jdet's, above 1 when jdet is faster, ``jdet_compile_s``, ``jdet_gflops``) are
  :func:`report`ed as ``<program>_<device>`` under the headers ``<label> ms`` and so on,
  and returned."""
  rows = []
  for case, b in runs:
    ours, ref = (time_warm(m(case, b), warmup=args.warmup, iters=args.iters)
                 for m in (make, make_peer))
    row = {"case": case, "batch": b, "jdet_ms": ours.median_s * 1e3,
           f"{peer}_ms": ref.median_s * 1e3, "jdet_img_s": b / ours.median_s,
           f"{peer}_img_s": b / ref.median_s, "ratio": ref.median_s / ours.median_s,
           "jdet_compile_s": ours.compile_s, "jdet_gflops": (ours.flops or 0) / 1e9}
    rows.append(row)
    print(f"{case} batch {b}: jdet {row['jdet_ms']:.0f} ms (compiled in {ours.compile_s:.1f} s), "
          f"{label} {row[f'{peer}_ms']:.0f} ms", flush=True)
  report(args, program, machine=machine, settings=settings, rows=rows, columns=[
      ("case", "case", ""), ("batch", "batch", ""), ("jdet ms", "jdet_ms", ".0f"),
      (f"{label} ms", f"{peer}_ms", ".0f"), ("jdet img/s", "jdet_img_s", ".2f"),
      (f"{label} img/s", f"{peer}_img_s", ".2f"), (f"jdet/{label} speed", "ratio", ".2f")])
  return rows


def write_results(folder, stem: str, *, machine: dict, settings: dict, rows: list[dict],
                  table: str) -> None:
  """``<folder>/<stem>.json`` (machine, settings, rows) and ``.txt`` (the printed table)."""
  out = Path(folder)
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{stem}.json").write_text(json.dumps(
      {"machine": machine, "settings": settings, "rows": rows}, indent=1) + "\n")
  (out / f"{stem}.txt").write_text(f"machine: {json.dumps(machine)}\nsettings: "
                                   f"{json.dumps(settings)}\n{table}\n")


# ----------------------------------------------------------------------------
# Cases for bench/run_all.py.
# ----------------------------------------------------------------------------


@dataclass
class Case:
  """One row of the suite: jdet's step beside its peer's.

  ``make()`` builds jdet's step, ``make_peer()`` the peer's (models shared between
  a group's cases are cached by the program that defines them). ``peer_key``: when
  the peer is a jdet model measured elsewhere in the suite (RefineDet beside SSD),
  the key of that measurement; ``run_all`` reuses it when it is there instead of
  measuring it twice. ``key`` is this case's own such key.
  """

  group: str  # "SSD300", "Sparse R-CNN R50-FPN", "ops", "input pipeline"
  case: str  # "train", "inference", "batched_nms 1k boxes, first 100", ...
  make: Callable[[], Step]
  make_peer: Callable[[], Step] | None = None
  batch: int | None = None
  input_size: str = ""  # "300x300", "800x1333 in 832x1344", "1000 boxes"
  peer: str | None = None  # "torchvision", "MMDetection 3.3.0", "scipy", "jdet SSD300"
  kind: str = "model"  # "model" (img/s, MFU), "op" (ms), "data" (img/s, no peer)
  images_per_call: int | None = None  # default: batch (an input pipeline takes several)
  key: tuple | None = None
  peer_key: tuple | None = None
  notes: str = ""
  settings: dict = field(default_factory=dict)

  @property
  def name(self) -> str:
    b = f" bs{self.batch}" if self.batch else ""
    return f"{self.group} {self.case}{b}"


# ----------------------------------------------------------------------------
# jdet's steps: the training step train.py runs, and predict.
# ----------------------------------------------------------------------------


def jdet_train_step(model, variables: dict, batch: dict, optim_config, *,
                    total_steps: int = 100_000, seed: int = 0) -> JaxStep:
  """The training step ``train.py`` runs (:func:`jdet.engine.training.make_train_step`: loss,
  gradients, the config's optimiser with the model's frozen parameters, the
  non-finite guard), on ``variables`` (``params`` and optional ``batch_stats``)."""
  from jdet.engine import optim, training
  from jdet.engine.train_state import TrainState

  tx, schedule = optim.build_optimizer(optim_config, total_steps=total_steps,
                                       frozen=model.frozen_parameters())
  state = TrainState.create(params=variables["params"], batch_stats=variables.get("batch_stats", {}),
                            tx=tx, rng=jax.random.key(seed))
  return JaxStep(training.make_train_step(model, schedule), state, batch, carry=True)


def jdet_predict_step(model, variables: dict, batch: dict) -> JaxStep:
  """``model.apply(variables, batch, method="predict")``, post-processing included."""
  return JaxStep(lambda v, b: model.apply(v, b, method="predict"), variables, batch)


def jdet_step(case: str, model, variables: dict, batch: dict, optim_config) -> JaxStep:
  """jdet's step for a case: :func:`jdet_train_step` with ``optim_config`` for ``"train"``,
  :func:`jdet_predict_step` for ``"inference"``."""
  if case == "train":
    return jdet_train_step(model, variables, batch, optim_config)
  return jdet_predict_step(model, variables, batch)


def side_by_side_steps(models: Callable[[], tuple], inputs_of: Callable[[int], dict],
                       jdet_batch: Callable[[dict], dict], optim_config,
                       peer_step: Callable[[str, Any, dict], Step]):
  """``(jdet(case, b), peer(case, b))``: each makes its side's :class:`Step` for ``case``
  (``"train"`` or ``"inference"``) at batch ``b``, both on ``inputs_of(b)``. ``models()``
  gives ``(peer model, jdet model, jdet variables)`` (built once, by the caller's cache);
  jdet's side is :func:`jdet_step` with ``optim_config`` on ``jdet_batch(inputs)``, the
  peer's ``peer_step(case, peer model, inputs)``."""

  def jdet(case, b):
    _, model, variables = models()
    return jdet_step(case, model, variables, jdet_batch(inputs_of(b)), optim_config)

  def peer(case, b):
    return peer_step(case, models()[0], inputs_of(b))

  return jdet, peer


def model_cases(group: str, make: Callable[[str, int], Step],
                make_peer: Callable[[str, int], Step], *, train_batch: int | None,
                infer_batches, key: tuple | None = None, peer_key: tuple | None = None,
                **fields) -> list[Case]:
  """A model's :class:`Case` list: ``"train"`` at ``train_batch`` (none when it is None),
  then ``"inference"`` at each of ``infer_batches``; ``make(case, batch)`` and
  ``make_peer(case, batch)`` build jdet's and the peer's steps. ``key`` / ``peer_key``
  (e.g. ``("jdet", "ssd300")``) become the cases' ``key`` / ``peer_key`` with the case and
  batch appended; ``fields`` are :class:`Case`'s others (``input_size``, ``peer``,
  ``settings``)."""
  runs = ([("train", train_batch)] if train_batch else []) + [("inference", b)
                                                              for b in infer_batches]
  return [Case(group, case, functools.partial(make, case, b), functools.partial(make_peer, case, b),
               batch=b, key=key and (*key, case, b), peer_key=peer_key and (*peer_key, case, b),
               **fields)
          for case, b in runs]


# ----------------------------------------------------------------------------
# The peers' steps: torch detectors.
# ----------------------------------------------------------------------------


def autocast(device, dtype: str):
  """``torch.autocast`` to bfloat16 on ``device`` (a ``torch.device``) when ``dtype`` is
  ``"bfloat16"``, else a context that changes nothing."""
  import torch
  return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def torchvision_batch(inputs: dict[str, np.ndarray], device):
  """``(images, targets)`` as torchvision's detectors take them from ``inputs``: ``images
  [B, H, W, 3]`` float32 in ``[0, 1]`` become B tensors ``[3, H, W]``; ``boxes [B, M, 4]``
  ``[x1, y1, x2, y2]`` and ``labels [B, M]`` (``0 .. C-1``) become B targets with labels
  ``1 .. C`` (torchvision's 0 is the background)."""
  import torch
  images = [torch.from_numpy(x).permute(2, 0, 1).contiguous().to(device) for x in inputs["images"]]
  targets = [{"boxes": torch.from_numpy(b).to(device),
              "labels": torch.from_numpy(l + 1).long().to(device)}
             for b, l in zip(inputs["boxes"], inputs["labels"])]
  return images, targets


# The SGD torchvision's detectors train with beside jdet: a tiny learning rate, so that
# random weights stay finite over the timed steps.
SGD_LR, SGD_MOMENTUM = 1e-5, 0.9


def torchvision_step(case: str, tv, inputs: dict[str, np.ndarray], *, device, dtype: str,
                     weight_decay: float, after_train_mode: Callable | None = None) -> TorchStep:
  """A torchvision detector's step on :func:`torchvision_batch` of ``inputs``, under
  :func:`autocast`. ``"train"``: ``tv`` in train mode, its summed losses, backward and
  ``torch.optim.SGD`` (:data:`SGD_LR`, :data:`SGD_MOMENTUM`, ``weight_decay``) over the
  parameters that require gradients; ``after_train_mode(tv)`` runs after ``tv.train()``
  (e.g. to keep frozen BatchNorm in eval). ``"inference"``: eval mode under
  ``torch.inference_mode()``, post-processing (NMS) included."""
  import torch
  images, targets = torchvision_batch(inputs, device)
  if case != "train":
    tv.eval()

    def infer():
      with torch.inference_mode(), autocast(device, dtype):
        return tv(images)

    return TorchStep(infer)

  tv.train()
  if after_train_mode is not None:
    after_train_mode(tv)
  opt = torch.optim.SGD([p for p in tv.parameters() if p.requires_grad], lr=SGD_LR,
                        momentum=SGD_MOMENTUM, weight_decay=weight_decay)

  def train():
    with autocast(device, dtype):
      losses = tv(images, targets)
    loss = sum(losses.values())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  return TorchStep(train)
