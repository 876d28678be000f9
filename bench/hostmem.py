"""Host memory: a CPU training step with glibc's default allocator and with jdet's setting.

  python bench/hostmem.py                                   # Sparse R-CNN's shapes quick start
  python bench/hostmem.py --config configs/ssd300.py:shapes

XLA's CPU runtime allocates a step's large buffers afresh at every call; by
default glibc serves each one with a fresh ``mmap`` that is unmapped when freed,
so every step zero-fills its pages again in the kernel. ``train.py`` and
``eval.py`` set ``JDET_KEEP_HOST_MEMORY=1`` (:mod:`jdet.engine.hostmem`: every size
from glibc's heap, never trimmed). This program runs the same training step
in two fresh processes, one with each setting (the setting acts on a whole
process, before jax is imported), and prints side by side: the median step
time, the minor page faults and the kernel (system) CPU time per step, and the
ratio (default time / jdet's time, above 1 means the setting is faster).

The step is ``train.py``'s (:func:`jdet.engine.training.make_train_step`, the
config's optimiser, compiled once) on one batch of the config's training data
at its batch size (``--batch`` to change it), with ``--warmup`` untimed calls
and ``--iters`` timed ones. Results go with the machine to
``bench/results/hostmem_<config>_<variant>_cpu.json`` and ``.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(config_spec: str, batch_size: int | None, warmup: int, iters: int) -> dict:
  """Times the step in this process (its allocator setting comes from the environment and
  was applied when ``__main__`` imported jdet, before anything imported jax)."""
  import resource
  import statistics
  import time

  import jax

  from jdet.engine import hostmem, restore, training
  from jdet.data import builder, pipeline
  from jdet.inference.predictor import load_config
  from jdet.models import build_model

  config = load_config(config_spec)
  batch_size = batch_size or int(config.data.batch_size)
  source = builder.build_source(config.data, "train")
  batches = pipeline.train_batches(source, builder.build_transforms(config.data, train=True),
                                   batch_size=batch_size, seed=0)
  batch = {k: v for k, v in next(iter(batches)).items() if k != pipeline.NOTES_KEY}
  model = build_model(config.model_name, **config.model)
  state, schedule = restore.init_state(model, config, batch, total_steps=100_000,
                                        load_weights=False)
  step = jax.jit(training.make_train_step(model, schedule), donate_argnums=0)
  batch = jax.device_put(batch)
  for _ in range(warmup):
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  times = []
  usage0 = resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(iters):
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  usage1 = resource.getrusage(resource.RUSAGE_SELF)
  return dict(keep_host_memory=hostmem.is_applied(),
              batch_size=batch_size, step_ms=1e3 * statistics.median(times),
              faults_per_step=(usage1.ru_minflt - usage0.ru_minflt) / iters,
              system_s_per_step=(usage1.ru_stime - usage0.ru_stime) / iters,
              user_s_per_step=(usage1.ru_utime - usage0.ru_utime) / iters,
              jax=jax.__version__, device=f"{jax.devices()[0].platform}: "
                                          f"{jax.devices()[0].device_kind}")


def main() -> None:
  sys.path.insert(0, str(Path(__file__).resolve().parent))
  from harness import side_by_side_parser, parse_args, text_table, write_results
  parser = side_by_side_parser(__doc__, iters=20, warmup=3, torch_device=False)
  parser.add_argument("--config", default="configs/sparse_rcnn.py:shapes")
  parser.add_argument("--batch", type=int, default=None, help="images per step (default: the config's)")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parse_args(parser)
  if args.dtype != "float32":  # the shared parser's flag; the config's model sets the dtype here
    parser.error("--dtype: this program times the config's step as train.py runs it (float32)")
  if args.child:
    print(json.dumps(child(args.config, args.batch, args.warmup, args.iters)))
    return
  rows = []
  for setting, value in (("glibc default", "0"), ("jdet (kept)", "1")):
    cmd = [sys.executable, __file__, "--child", "--config", args.config,
           "--warmup", str(args.warmup), "--iters", str(args.iters)]
    if args.batch:
      cmd += ["--batch", str(args.batch)]
    env = {**os.environ, "JDET_KEEP_HOST_MEMORY": value}
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
      sys.exit(f"the {setting} run failed:\n{out.stderr[-4000:]}")
    rows.append(dict(setting=setting, **json.loads(out.stdout.strip().splitlines()[-1])))
  base = rows[0]["step_ms"]
  for r in rows:
    r["ratio"] = base / r["step_ms"]
  columns = [("allocator", "setting", ""), ("step ms", "step_ms", ".1f"),
             ("page faults/step", "faults_per_step", ".0f"),
             ("kernel CPU s/step", "system_s_per_step", ".3f"),
             ("user CPU s/step", "user_s_per_step", ".3f"), ("ratio", "ratio", ".2f")]
  table = text_table(rows, columns)
  print(f"{args.config}, batch {rows[0]['batch_size']}, {rows[0]['device']}, "
        f"{os.cpu_count()} CPU threads\n{table}")
  machine = dict(device=rows[0]["device"], cpu_threads=os.cpu_count(), jax=rows[0]["jax"])
  path, _, variant = args.config.partition(":")
  stem = "_".join(["hostmem", Path(path).stem] + ([variant.split(",")[0]] if variant else []) + ["cpu"])
  write_results(args.out, stem, machine=machine,
                settings=dict(config=args.config, batch_size=rows[0]["batch_size"],
                              warmup=args.warmup, iters=args.iters),
                rows=rows, table=table)


if __name__ == "__main__":
  if "--child" in sys.argv:  # jdet before harness's jax: the setting must come first
    sys.path.insert(0, str(ROOT))
    import jdet  # noqa: F401
  main()
