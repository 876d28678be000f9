"""Training curves of one or several runs in one PNG.

::

  python -m jdet.plot runs/ssd_shapes runs/ssd_shapes_lr2 --out curves.png

Reads each run's ``metrics.jsonl`` (``train.py``'s log) and draws, the runs
overlaid in one colour each: the loss against steps and against minutes, the
evaluation AP and AP50 against steps and minutes, and every other loss term
against steps. Minutes count the run's own time from its first logged step
(a resumed run's pause is left out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import numpy as np

from jdet import viz

__all__ = ["read_log", "curves", "plot_runs", "main"]

PANEL = (360, 520)  # (H, W) of one plot


def read_log(workdir: str) -> list[dict]:
  """The records of ``workdir/metrics.jsonl``, in order (a cut last line is left out)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir} has no metrics.jsonl (train.py writes it)")
  out = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except ValueError:
        continue  # the line a killed run was writing
  return out


def curves(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(steps, minutes, values)`` of ``key`` over the records that have it. Minutes are
  the run's own time: the gaps between records longer than 10 times the typical
  step-to-step interval (a stopped and resumed run) are left out."""
  times = np.asarray([r["time"] for r in records], np.float64)
  gaps = np.diff(times, prepend=times[:1])
  typical = np.median(gaps[1:]) if len(gaps) > 1 else 0.0
  gaps = np.where(gaps > 10 * max(typical, 1e-9), typical, gaps)
  minutes = np.cumsum(gaps) / 60.0
  rows = [i for i, r in enumerate(records) if key in r]
  steps = np.asarray([records[i]["step"] for i in rows], np.float64)
  values = np.asarray([records[i][key] for i in rows], np.float64)
  return steps, minutes[rows], values


def _loss_terms(logs: Sequence[Sequence[dict]]) -> list[str]:
  keys = {k for records in logs for r in records for k in r}
  return sorted(k for k in keys if k.endswith("loss") and k != "loss")


def plot_runs(workdirs: Sequence[str], *, names: Sequence[str] | None = None) -> np.ndarray:
  """The panels of the module doc for ``workdirs`` as one ``[H, W, 3]`` uint8 RGB image."""
  logs = [read_log(w) for w in workdirs]
  names = list(names) if names else [os.path.basename(os.path.normpath(w)) or w
                                     for w in workdirs]
  panels = []

  def panel(key: str, axis: str, title: str) -> None:
    series = {}
    for name, records in zip(names, logs):
      steps, minutes, values = curves(records, key)
      if len(values):
        series[name] = (steps if axis == "step" else minutes, values)
    if series:
      panels.append(viz.plot_lines(series, title=title, x_label=axis, y_label=key, size=PANEL))

  for axis in ("step", "minutes"):
    panel("loss", axis, f"loss against {axis}")
  for key in ("eval/AP", "eval/AP50"):
    for axis in ("step", "minutes"):
      panel(key, axis, f"{key[5:]} against {axis}")
  for key in _loss_terms(logs):
    panel(key, "step", key)
  if not panels:
    raise ValueError(f"no loss or AP logged in {list(workdirs)}")
  return viz.image_grid(panels, cols=2, gap=8)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jdet.plot", description=__doc__.split("\n")[0])
  parser.add_argument("workdirs", nargs="+", help="run directories of train.py")
  parser.add_argument("--out", default="curves.png", help="the PNG to write")
  parser.add_argument("--names", default="", help="comma-separated names for the runs "
                      "(default: the folders' names)")
  args = parser.parse_args(argv)
  names = args.names.split(",") if args.names else None
  if names and len(names) != len(args.workdirs):
    parser.error(f"{len(names)} names for {len(args.workdirs)} runs")
  try:
    image = plot_runs(args.workdirs, names=names)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  viz.save_image(args.out, image)
  n = len(args.workdirs)
  print(f"wrote {args.out} ({image.shape[1]}x{image.shape[0]}, {n} run{'s' * (n != 1)})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
