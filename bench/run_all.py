"""Every benchmark beside its peer, in one run planned to fit a time budget.

  python bench/run_all.py --device cpu --budget_s 480                  # this 2-core CPU
  python bench/run_all.py --device cuda --dtype bfloat16 --budget_s 480  # a GPU machine
  python bench/run_all.py --dry_run                                    # seconds: every path, tiny
  python bench/run_all.py --readme                                     # bench/README.md's tables

Runs the cases of every benchmark program in ``bench/`` (their ``suite()``
functions), each beside its peer, in this order of priority: SSD300 against
torchvision, RefineDet320/512 beside jdet's SSD300/512, Faster R-CNN R50-FPN
against torchvision, Sparse R-CNN R50-FPN against MMDetection 3.3.0, the
operators (NMS, RoIAlign, matching) against torchvision and scipy, and the
input pipelines (jdet only). The sizes come from the device's profile:

* ``--device cuda``: the realistic ones: SSD300 and RefineDet320/512 train at
  batch 32, Faster R-CNN and Sparse R-CNN at 2 per device on 800x1333 images
  (the 832x1344 aspect bucket), inference latency at batch 1 (Sparse R-CNN
  also 8), post-processing and NMS included;
* ``--device cpu``: small batches and R-CNN images (see each program's
  ``SUITE_*`` table), so that every figure fits 480 s on 2 cores;
* ``--dry_run``: the same models and peers (built, converted, run) on tiny
  inputs, one call each, jdet's steps traced and lowered but not compiled:
  every argument, import, shape and dtype error of the real command shows up in
  seconds instead of minutes (the test suite runs it).

Planning the budget (``--budget_s``, counted from the start of this program):
each case's jdet step is compiled apart from its calls (compile time), called
once (first call) and then timed; the peer's first call is its warm-up. Each
case is given at least one timed call on each side; the time left beyond what
the remaining cases are expected to need (their figures in the last results
file for this device, or defaults) is shared among the cases as extra timed
calls (at most ``--max_iters``). A case expected not to fit in what is left is
skipped and recorded as such; a watchdog ends the run at the budget. Results
are written after every case, so a run cut short keeps every finished figure.

Figures per case: images per second (or milliseconds for an operator), the
ratio jdet / peer speed (above 1: jdet is faster), FLOPs per step from XLA's
cost analysis of the compiled jdet step, MFU (those FLOPs / step time / the
device's peak, :data:`bench.harness.PEAK_TFLOPS` or ``--peak_tflops``; on a CPU
the larger of its nominal float32 peak and what a float32 matmul reaches in this
process, :func:`bench.harness.cpu_peak_flops`; at most 100 %; the peer gets the
same model FLOPs), compile time, memory (XLA's buffer assignment of
the compiled step; on a GPU also the process's peak, and
``torch.cuda.max_memory_allocated`` for the peer).

Results: ``bench/results/<device>.json`` and ``.md`` (the device, driver,
library versions, load average, batch and input sizes, every timing); with
``--update_readme`` (or ``--readme`` alone) the section of ``bench/README.md`` between
``<!-- bench:begin -->`` and ``<!-- bench:end -->`` is rewritten from every
``bench/results/*.json`` this program wrote.
"""

from __future__ import annotations

import time

START = time.monotonic()  # the budget counts from here, imports included

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
  sys.path.insert(0, str(BENCH))

README = BENCH / "README.md"  # the generated section lives in bench/README.md
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
# The programs, in order of priority (a short budget drops the last cases first).
PROGRAMS = ("ssd", "refinedet", "faster_rcnn", "sparse_rcnn", "ops", "data")
RESERVE_S = 3.0  # kept for writing the results at the end

# Expected seconds when no earlier results for this device exist:
# (setup, compile, first call, step) per side, by profile and kind.
DEFAULT_COST = {
    "gpu": {"train": (10, 45, 3, 0.3), "inference": (5, 20, 1, 0.05), "op": (1, 4, 0.1, 0.01),
            "data": (1, 5, 0.5, 0.3)},
    "cpu": {"train": (10, 25, 10, 8), "inference": (5, 10, 3, 2), "op": (1, 3, 0.5, 0.3),
            "data": (1, 3, 0.5, 0.3)},
    "dry": {"train": (5, 5, 3, 0), "inference": (2, 3, 1, 0), "op": (0.5, 1, 0.1, 0),
            "data": (0.5, 1, 0.1, 0)},
}


# ----------------------------------------------------------------------------
# The machine.
# ----------------------------------------------------------------------------


def _driver() -> str | None:
  try:
    import jax.extend
    return jax.extend.backend.get_backend().platform_version
  except Exception:
    return None


def describe_machine(device, peak: tuple) -> dict:
  import jax
  import harness
  info = harness.machine_info(device)
  info.update(device_name=harness.device_name(), platform=jax.default_backend(),
              num_devices=jax.device_count(),
              driver=_driver() if jax.default_backend() != "cpu" else None,
              cpu_count=os.cpu_count(), peak_flops=peak[0], peak_source=peak[1])
  try:
    import mmdet
    info["mmdet"] = mmdet.__version__
  except ImportError:
    info["mmdet"] = None
  import torch
  info["torch_cuda"] = torch.version.cuda
  return info


def _load() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


# ----------------------------------------------------------------------------
# Planning.
# ----------------------------------------------------------------------------


def _case_kind(case) -> str:
  return case.kind if case.kind != "model" else ("train" if case.case == "train" else "inference")


def _side_cost(side: dict | None) -> float:
  if not side:
    return 0.0
  return sum(side.get(k) or 0.0 for k in ("setup_s", "compile_s", "first_s", "median_s"))


def expected_cost(case, profile: str, previous: dict, *, first_of_group: bool = True) -> float:
  """Seconds the case needs at least (one timed call each side), from the last run's
  figures for the same case or the defaults (where the models are built, in the
  first case of a group, counted once)."""
  row = previous.get(case.name)
  if row and row.get("jdet"):
    return _side_cost(row["jdet"]) + _side_cost(row.get("peer_timing"))
  setup, compile_s, first, step = DEFAULT_COST[profile][_case_kind(case)]
  setup = setup if first_of_group else 0.0
  per_side = setup + compile_s + first + step
  return per_side + ((first + step) if case.make_peer else 0.0)


def plan_iters(left_s: float, later_s: float, cases_left: int, per_call_s: float,
               max_iters: int) -> int:
  """Timed calls per side for a case: its equal part (among the ``cases_left``, itself
  included) of the seconds ``left_s`` beyond what the later cases need (``later_s``),
  divided by the seconds of one call of both sides; at least 1, at most ``max_iters``."""
  share = (left_s - later_s) / max(cases_left, 1)
  return int(max(1, min(max_iters, share // max(per_call_s, 1e-3))))


def _previous(path: Path, profile: str, dtype: str) -> dict:
  """``{case name: row}`` of the last results at ``path`` for the same profile and dtype."""
  try:
    data = json.loads(path.read_text())
  except (OSError, ValueError):
    return {}
  settings = data.get("settings", {})
  if settings.get("profile") != profile or settings.get("dtype") != dtype:
    return {}
  return {r["name"]: r for r in data.get("rows", []) if "jdet" in r or "error" in r}


# ----------------------------------------------------------------------------
# Running a case.
# ----------------------------------------------------------------------------


def _side(step, timing, setup_s: float) -> dict:
  d = timing.as_dict()
  d["setup_s"] = setup_s
  d["framework"] = step.framework
  return d


def run_case(case, *, iters_for, measured: dict) -> dict:
  """Builds, compiles and times ``case``; ``iters_for(jdet first s, peer first s)`` gives the
  number of timed calls per side."""
  import harness

  row = dict(name=case.name, group=case.group, case=case.case, batch=case.batch,
             images_per_call=case.images_per_call or case.batch, input_size=case.input_size,
             peer=case.peer, kind=case.kind, notes=case.notes, settings=case.settings,
             load_average=_load())
  t0 = time.monotonic()
  ours = case.make()
  setup = time.monotonic() - t0
  jt = harness.time_step(ours, 0)
  peer_step, pt, peer_setup = None, None, 0.0
  reused = measured.get(case.peer_key) if case.peer_key else None
  if reused is not None:
    row["peer_reused"] = True
  elif case.make_peer is not None:
    t0 = time.monotonic()
    peer_step = case.make_peer()
    peer_setup = time.monotonic() - t0
    pt = harness.time_step(peer_step, 0)
  n = iters_for(jt.first_s, pt.first_s if pt else 0.0)
  harness.time_step(ours, n, jt)
  if peer_step is not None:
    harness.time_step(peer_step, n, pt)
  row["iters"] = n
  row["jdet"] = _side(ours, jt, setup)
  if reused is not None:
    row["peer_timing"] = dict(reused, setup_s=0.0, compile_s=0.0, first_s=0.0)
  elif pt is not None:
    row["peer_timing"] = _side(peer_step, pt, peer_setup)
  if case.key:
    measured[case.key] = row["jdet"]
  del ours, peer_step
  import torch
  if torch.cuda.is_available():
    torch.cuda.empty_cache()  # give the peer's cached blocks back for JAX's next case
  return row


def figures(row: dict, peak: float | None) -> dict:
  """Derived figures of a measured row: img/s, ms, ratio, MFU (:func:`bench.harness.mfu`,
  at most 1; the achieved rate is ``jdet_tflop_s``)."""
  import harness

  j, p = row.get("jdet"), row.get("peer_timing")
  out = {}
  if not j or not j.get("median_s"):
    return out
  js = j["median_s"]
  ps = p.get("median_s") if p else None
  out["jdet_ms"] = js * 1e3
  if ps:
    out["peer_ms"] = ps * 1e3
    out["ratio"] = ps / js
  images = row.get("images_per_call") or row.get("batch")
  if images:
    out["jdet_img_s"] = images / js
    if ps:
      out["peer_img_s"] = images / ps
  flops = j.get("flops")
  if row["kind"] == "model" and flops:
    out["gflop_per_step"] = flops / 1e9
    out["jdet_tflop_s"] = flops / js / 1e12
    if peak:
      out["jdet_mfu"] = harness.mfu(flops, js, peak)
      if ps:
        out["peer_mfu"] = harness.mfu(flops, ps, peak)
  return out


# ----------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------


def _num(x, fmt: str = ".2f", dash: str = "") -> str:
  return dash if x is None else format(x, fmt)


def _mib(x) -> str:
  return "" if not x else f"{x / 2**20:,.0f}"


def _md_row(cells, empty: int = 0) -> str:
  """A Markdown table row of ``cells`` and ``empty`` blank cells after them."""
  return "| " + " | ".join(str(c) for c in cells) + " |" + " |" * empty


def markdown(result: dict) -> str:
  """The results as Markdown tables (bench/README.md's generated section is made of these)."""
  m, s = result["machine"], result["settings"]
  peak = m.get("peak_flops")
  threads = (f", {s['cpu_threads']} thread per side" if s.get("cpu_threads") == 1 else
             f", {s['cpu_threads']} threads per side" if s.get("cpu_threads") else "")
  lines = [f"Device: {m['jax_device']} (torch: {m['torch_device']}), {m.get('cpu_count')} CPU "
           f"cores{threads}; {s['dtype']}; jax {m['jax']}, torch {m['torch']}, torchvision "
           f"{m['torchvision']}, MMDetection {m.get('mmdet')}"
           + (f", driver {m['driver']}" if m.get("driver") else "")
           + f". Peak for MFU: {_num(peak and peak / 1e12, '.3g')} TFLOP/s ({m.get('peak_source')})."
           f" Run of {s['started']}: {s['wall_s']:.0f} s of a {s['budget_s']:.0f} s budget"
           f"{' (dry run)' if s.get('dry_run') else ''}; load average {s['load_average_start']} "
           f"at the start, {s.get('load_average_end')} at the end"
           + (f". {s['note']}" if s.get("note") else "")
           + (f". This run measured {', '.join(s['programs'])} only; the other rows come from the "
              f"run of {s['kept_rows_from']}" if s.get("kept_rows_from") else "") + "."]
  mfu = lambda x: "" if x is None else f"{100 * x:.1f} %"  # noqa: E731

  def model_row(r, f):
    j, p = r["jdet"], r.get("peer_timing") or {}
    jmem = j.get("peak_memory_bytes") or j.get("memory_bytes")
    return [r["group"], r["case"], r["batch"], r["input_size"], _num(f.get("jdet_img_s")),
            f"{r['peer'] or ''}{' (reused)' if r.get('peer_reused') else ''}",
            _num(f.get("peer_img_s")), _num(f.get("ratio")), mfu(f.get("jdet_mfu")),
            mfu(f.get("peer_mfu")), _num(f.get("gflop_per_step"), ".1f"),
            _num(j.get("compile_s"), ".1f"), r["iters"], _mib(jmem),
            _mib(p.get("peak_memory_bytes"))]

  sections = [  # (kind, columns with ":" for right-aligned, cells, cells of a failed row)
      ("model", ["model", "case", "batch:", "input", "jdet img/s:", "peer", "peer img/s:",
                 "jdet / peer:", "jdet MFU:", "peer MFU:", "GFLOP/step:", "jdet compile s:",
                 "timed calls:", "jdet MiB:", "peer MiB:"], model_row,
       lambda r, why: [r["group"], r["case"], r["batch"], r["input_size"], why, r["peer"] or ""]),
      ("op", ["operator", "jdet ms:", "reference", "reference ms:", "reference / jdet:",
              "jdet compile s:", "timed calls:"],
       lambda r, f: [r["case"], _num(f.get("jdet_ms")), r["peer"], _num(f.get("peer_ms")),
                     _num(f.get("ratio")), _num(r["jdet"].get("compile_s"), ".1f"), r["iters"]],
       lambda r, why: [r["case"], why, r["peer"]]),
      ("data", ["input pipeline", "batch:", "output", "img/s:", "start-up s:",
                "timed calls (images each):"],
       lambda r, f: [r["case"], r["batch"], r["input_size"], _num(f.get("jdet_img_s"), ".1f"),
                     _num(r["jdet"].get("compile_s"), ".2f"),
                     f"{r['iters']} ({r.get('images_per_call') or r['batch']})"],
       lambda r, why: [r["case"], r["batch"], r["input_size"], why]),
  ]
  for kind, columns, cells, failed_cells in sections:
    rows = [r for r in result["rows"] if r["kind"] == kind]
    if not rows:
      continue
    lines += ["", _md_row([c.rstrip(":") for c in columns]),
              "|" + "|".join("---:" if c.endswith(":") else "---" for c in columns) + "|"]
    for r in rows:
      if "error" in r or "skipped" in r:
        row = failed_cells(r, r.get("skipped") or f"error: {r['error']}")
        lines.append(_md_row(row, len(columns) - len(row)))
      else:
        lines.append(_md_row(cells(r, r.get("figures", {}))))
  return "\n".join(lines) + "\n"


def summary_line(row: dict) -> str:
  """``SSD300 train bs32: N img/s, M % MFU, K x torchvision``."""
  if "error" in row:
    return f"{row['name']}: error: {row['error']}"
  if "skipped" in row:
    return f"{row['name']}: {row['skipped']}"
  f = row.get("figures") or {}
  if "jdet_ms" not in f:
    return f"{row['name']}: ran (no timed call)"
  if row["kind"] == "op":
    text = f"{row['name']}: {f['jdet_ms']:.2f} ms"
  else:
    text = f"{row['name']}: {f['jdet_img_s']:.2f} img/s"
  if f.get("jdet_mfu") is not None:
    text += f", {100 * f['jdet_mfu']:.1f} % MFU"
  if f.get("ratio") is not None:
    text += f", {f['ratio']:.2f} x {row['peer']}"
  return text


def write(out: Path, stem: str, result: dict) -> None:
  out.mkdir(parents=True, exist_ok=True)
  tmp = out / f".{stem}.json.tmp"
  tmp.write_text(json.dumps(result, indent=1) + "\n")
  tmp.replace(out / f"{stem}.json")
  (out / f"{stem}.md").write_text(markdown(result))


def readme_section(results_dir: Path) -> str:
  """bench/README.md's generated section: one block per results file this program wrote."""
  blocks = []
  for path in sorted(results_dir.glob("*.json")):
    try:
      result = json.loads(path.read_text())
    except ValueError:
      continue
    if not result.get("suite") or result["settings"].get("dry_run"):
      continue
    blocks.append(f"#### `bench/results/{path.name}`\n\n{markdown(result)}")
  body = "\n".join(blocks) or "No results yet.\n"
  return (f"{BEGIN}\n<!-- Generated by `python bench/run_all.py --readme` from "
          f"bench/results/*.json; edits here are overwritten. -->\n\n{body}{END}")


def update_readme(readme: Path, results_dir: Path) -> None:
  text = readme.read_text()
  if BEGIN not in text or END not in text:
    raise SystemExit(f"{readme} has no {BEGIN} ... {END} section to rewrite")
  head, rest = text.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  readme.write_text(head + readme_section(results_dir) + tail)


# ----------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                      help="the device of both sides: JAX's backend must match")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                      help="jdet's model dtype and the peer's autocast (default: bfloat16 on "
                           "cuda, float32 on cpu)")
  parser.add_argument("--budget_s", type=float, default=480.0,
                      help="total seconds for the whole run, start-up included")
  parser.add_argument("--max_iters", type=int, default=20, help="timed calls per side at most")
  parser.add_argument("--only", default="",
                      help=f"comma-separated programs to run, of {', '.join(PROGRAMS)}")
  parser.add_argument("--cpu_threads", type=int, default=None,
                      help="threads per side on a CPU (torch.set_num_threads and XLA's "
                           "intra-op threads); 0: the libraries' defaults. Default 1 on a CPU")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="the device's peak for MFU (default: the table by device name; on a "
                           "CPU its nominal float32 peak or a measured matmul, the larger)")
  parser.add_argument("--dry_run", action="store_true",
                      help="tiny inputs, one call each, jdet's steps lowered but not compiled")
  parser.add_argument("--out", default=None,
                      help="results folder (default bench/results; a temporary one for --dry_run)")
  parser.add_argument("--note", default="", help="a remark stored with the results")
  parser.add_argument("--update_readme", action="store_true",
                      help="rewrite the generated section of bench/README.md after the run")
  parser.add_argument("--readme", action="store_true",
                      help="only rewrite bench/README.md's section from the results, run nothing")
  args = parser.parse_args(argv)
  programs = [p.strip() for p in args.only.split(",") if p.strip()] or list(PROGRAMS)
  unknown = sorted(set(programs) - set(PROGRAMS))
  if unknown:
    parser.error(f"unknown programs {unknown}; choose from {list(PROGRAMS)}")
  args.programs = programs
  if args.dtype is None:
    args.dtype = "bfloat16" if args.device == "cuda" else "float32"
  if args.cpu_threads is None:
    args.cpu_threads = 1 if args.device == "cpu" else 0
  if args.budget_s <= 0 or args.max_iters < 1 or args.cpu_threads < 0:
    parser.error("--budget_s must be positive and --max_iters at least 1")
  return args


def main(argv=None, *, start: float | None = None, watchdog: bool = False) -> dict | None:
  """Runs the suite (``argv`` as on the command line) and returns the results. The budget
  counts from ``start`` (``time.monotonic()``; default now). With ``watchdog`` (the
  command line), the process ends at the budget even inside a case."""
  start = time.monotonic() if start is None else start
  args = parse_args(argv)
  results_dir = BENCH / "results"
  if args.readme:
    update_readme(README, results_dir)
    print(f"rewrote the benchmark section of {README}")
    return None
  deadline = start + args.budget_s
  if args.device == "cuda":
    # JAX would take 75 % of the GPU at start-up, leaving the peers too little; on demand,
    # both share it (and JAX's peak bytes in use mean something).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if args.device == "cpu" and args.cpu_threads:
    # Before JAX starts its CPU client (a no-op when the caller imported JAX already).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen="
                               f"{'false' if args.cpu_threads == 1 else 'true'} "
                               f"intra_op_parallelism_threads={args.cpu_threads}").strip()

  import jax
  import torch
  import harness

  threads = torch.get_num_threads()
  try:
    if args.device == "cpu" and args.cpu_threads:
      torch.set_num_threads(args.cpu_threads)
    elif args.dry_run and not torch.cuda.is_available():
      torch.set_num_threads(1)  # tiny inputs: one thread is faster than two on a busy machine

    if args.device == "cuda" and args.dry_run and not torch.cuda.is_available():
      print("dry run without a GPU: the cuda command's cases run on the CPU", flush=True)
      args.device = "cpu"
    elif args.device == "cuda":
      if jax.default_backend() != "gpu" or not torch.cuda.is_available():
        raise SystemExit(f"--device cuda needs JAX on a GPU (it has {jax.default_backend()!r}) and "
                         f"torch with CUDA (available: {torch.cuda.is_available()})")
    profile = "dry" if args.dry_run else ("gpu" if args.device == "cuda" else "cpu")
    harness.JaxStep.lower_only = args.dry_run
    device = torch.device(args.device)
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="jdet-bench-dry-"))
                                           if args.dry_run else results_dir)
    stem = harness.device_name()
    if args.dtype != ("bfloat16" if args.device == "cuda" else "float32"):
      stem += f"_{args.dtype}"
    previous = _previous(out / f"{stem}.json", profile, args.dtype)
    previous_rows = list(previous.values())
    try:
      earlier = json.loads((out / f"{stem}.json").read_text())["settings"]
      previous_started = (f"{earlier['started']} ({earlier['wall_s']:.0f} s of a "
                          f"{earlier['budget_s']:.0f} s budget; load average "
                          f"{earlier['load_average_start']} at its start)")
    except (OSError, ValueError, KeyError):
      previous_started = None
    peak = harness.peak_flops(args.peak_tflops, cpu_cores=args.cpu_threads or None)
    result = dict(suite=True, machine=describe_machine(device, peak), settings=dict(
        profile=profile, dtype=args.dtype, budget_s=args.budget_s, max_iters=args.max_iters,
        cpu_threads=args.cpu_threads, xla_flags=os.environ.get("XLA_FLAGS", ""),
        dry_run=args.dry_run, programs=args.programs, note=args.note,
        started=datetime.datetime.now().isoformat(timespec="seconds"),
        load_average_start=_load(), command=" ".join(sys.argv)), rows=[])
    print(f"device {result['machine']['jax_device']}, profile {profile}, dtype {args.dtype}, "
          f"budget {args.budget_s:.0f} s, results in {out / stem}.json", flush=True)

    def finish(note: str | None = None):
      result["settings"]["wall_s"] = time.monotonic() - start
      result["settings"]["load_average_end"] = _load()
      if note:
        result["settings"]["stopped"] = note
      order = {p: i for i, p in enumerate(PROGRAMS)}
      result["rows"].sort(key=lambda r: order.get(r.get("program"), len(order)))
      write(out, stem, result)

    lock = threading.Lock()
    current = {"case": None}

    def stop_at_budget():  # ends the process at the budget, keeping every finished figure
      with lock:
        name = current["case"]
        result["rows"].append(dict(name=name or "?", group="", case="", batch=None, input_size="",
                                   peer=None, kind="model", skipped="stopped at the budget"))
        finish(f"stopped at the budget during {name}")
      print(f"budget of {args.budget_s:.0f} s reached during {name}: results written", flush=True)
      os._exit(3)

    timer = threading.Timer(max(deadline - time.monotonic() - 1.0, 0.0), stop_at_budget)
    timer.daemon = True
    if watchdog:
      timer.start()

    cases, program_of = [], {}
    for program in args.programs:
      module = importlib.import_module(program)
      for case in module.suite(profile, args.dtype, device):
        cases.append(case)
        program_of[case.name] = program
    if args.only and previous_rows:  # --only: the other programs' rows of the last run stay
      result["rows"] += [r for r in previous_rows if r.get("program") not in args.programs]
      result["settings"]["kept_rows_from"] = previous_started
    costs = [expected_cost(c, profile, previous,
                         first_of_group=i == 0 or c.group != cases[i - 1].group)
           for i, c in enumerate(cases)]
    print(f"{len(cases)} cases, expected at least {sum(costs):.0f} s", flush=True)

    measured: dict = {}
    for i, case in enumerate(cases):
      left = deadline - time.monotonic() - RESERVE_S
      later = sum(costs[i + 1:])
      row = dict(name=case.name, group=case.group, case=case.case, batch=case.batch,
                 input_size=case.input_size, peer=case.peer, kind=case.kind)
      if costs[i] > left:
        row["skipped"] = f"skipped: needs about {costs[i]:.0f} s, {max(left, 0):.0f} s left"
        print(f"[{i + 1}/{len(cases)}] {case.name}: {row['skipped']}", flush=True)
      else:
        def iters_for(jdet_s, peer_s, i=i, later=later):
          if args.dry_run:
            return 0  # the first calls are enough to prove the path
          return plan_iters(deadline - time.monotonic() - RESERVE_S, later, len(cases) - i,
                            jdet_s + peer_s, args.max_iters)
        with lock:
          current["case"] = case.name
        try:
          row = run_case(case, iters_for=iters_for, measured=measured)
          row["figures"] = figures(row, peak[0])
        except Exception as e:  # a failed case is recorded; the others still run
          row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
          traceback.print_exc()
        print(f"[{i + 1}/{len(cases)}] {summary_line(row)}"
              f" ({time.monotonic() - start:.0f} s)", flush=True)
      row["program"] = program_of[case.name]
      row["run_started"] = result["settings"]["started"]
      with lock:
        result["rows"].append(row)
        finish()
    timer.cancel()
    with lock:
      finish()
    print(markdown(result))
    if args.update_readme and not args.dry_run:
      update_readme(README, results_dir)
    errors = [r for r in result["rows"] if "error" in r]
    if errors:
      print(f"{len(errors)} cases failed", flush=True)
    return result
  finally:  # leave the process as it was (the tests call main in theirs)
    torch.set_num_threads(threads)
    harness.JaxStep.lower_only = False


if __name__ == "__main__":
  result = main(start=START, watchdog=True)
  if result is not None and any("error" in r for r in result["rows"]):
    sys.exit(1)
