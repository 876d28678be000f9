"""Operator benchmark: jdet against torchvision / scipy on the same machine and inputs.

  python bench/ops.py            # full sizes (bench/README.md's table)
  python bench/ops.py --small    # a quick run on small inputs
  python bench/ops.py --json out.json

Measures, side by side, with the same random inputs on both sides:

* class-aware NMS: ``jdet.ops.batched_nms`` vs ``torchvision.ops.batched_nms``,
  1k / 5k / 20k boxes over 80 classes at IoU 0.5. jdet is timed twice: asked for
  every kept box (the same work as torchvision) and for the first 100 (what a
  detector's post-processing asks for; the tiled loop stops early).
* multi-level RoIAlign: ``jdet.ops.multilevel_roi_align`` vs
  ``torchvision.ops.MultiScaleRoIAlign``, 1000 RoIs on a P2-P5 FPN of an
  800x1344 input, 256 channels, 7x7, sampling ratio 2.
* Hungarian matching: ``jdet.assign.linear_sum_assignment`` (host and pure-JAX
  solvers) vs a loop of ``scipy.optimize.linear_sum_assignment``, a batch of 8
  cost matrices of 100x50 and 300x50.

jdet runs on JAX's default device (a GPU when there is one), torchvision on CUDA
when torch sees one, else on the CPU. Times are medians of repeated runs after
a warm-up that includes compilation; the ratio column is torchvision (or scipy)
time divided by jdet time, so > 1 means jdet is faster.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import torch
import torchvision

import jdet
from harness import (Case, HostStep, JaxStep, TorchStep, jax_sync, machine_info, median_time,
                     torch_sync)  # bench/harness.py
from jdet.testing import random_boxes


def _row(name: str, ours: float, ref: float, ref_name: str) -> dict:
  return {"case": name, "jdet_ms": ours * 1e3, f"{ref_name}_ms": ref * 1e3, "ratio": ref / ours}


def bench_nms(sizes, repeats: int, tdev: torch.device) -> list[dict]:
  rows = []
  rng = np.random.default_rng(0)
  for n in sizes:
    boxes = random_boxes(rng, n, size=1333.0, min_side=8.0, max_side=300.0)
    scores = rng.uniform(size=n).astype(np.float32)
    labels = rng.integers(0, 80, size=n).astype(np.int32)
    jb, js, jl = map(jnp.asarray, (boxes, scores, labels))
    tb, ts, tl = (torch.from_numpy(x).to(tdev) for x in (boxes, scores, labels))
    ref = median_time(lambda: torchvision.ops.batched_nms(tb, ts, tl, 0.5), repeats=repeats, sync=torch_sync)
    n_kept = int(torchvision.ops.batched_nms(tb, ts, tl, 0.5).numel())
    for k, label in ((n, "all kept"), (100, "first 100")):
      f = jax.jit(lambda b, s, l, k=k: jdet.ops.batched_nms(b, s, l, iou_threshold=0.5, max_output_size=k))
      ours = median_time(lambda: f(jb, js, jl), repeats=repeats, sync=jax_sync)
      rows.append(_row(f"batched_nms N={n} (80 classes, {n_kept} kept), jdet {label}", ours, ref, "torchvision"))
  return rows


def bench_roi_align(num_rois: int, image_hw: tuple[int, int], channels: int, repeats: int,
                    tdev: torch.device) -> list[dict]:
  rng = np.random.default_rng(1)
  strides = (4, 8, 16, 32)
  h, w = image_hw
  feats = [rng.normal(size=(h // s, w // s, channels)).astype(np.float32) for s in strides]
  # RoI sides from 16 to 600 px (log-uniform) so that all four levels are used.
  side = np.exp(rng.uniform(np.log(16), np.log(600), size=(num_rois, 2)))
  xy = rng.uniform(size=(num_rois, 2)) * (np.array([w, h]) - side)
  rois = np.concatenate([xy, xy + side], axis=1).astype(np.float32)

  jfeats = [jnp.asarray(f) for f in feats]
  jrois = jnp.asarray(rois)
  f = jax.jit(lambda fs, r: jdet.ops.multilevel_roi_align(
      fs, r, strides=strides, output_size=7, sampling_ratio=2, aligned=False))
  ours = median_time(lambda: f(jfeats, jrois), repeats=repeats, sync=jax_sync)

  pooler = torchvision.ops.MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], output_size=7, sampling_ratio=2)
  tfeats = {f"p{i + 2}": torch.from_numpy(x.transpose(2, 0, 1)[None]).to(tdev) for i, x in enumerate(feats)}
  trois = [torch.from_numpy(rois).to(tdev)]
  with torch.no_grad():
    ref = median_time(lambda: pooler(tfeats, trois, [(h, w)]), repeats=repeats, sync=torch_sync)
  return [_row(f"multilevel_roi_align {num_rois} RoIs, {h}x{w}, C={channels}", ours, ref, "torchvision")]


def bench_matching(shapes, batch: int, repeats: int) -> list[dict]:
  rows = []
  rng = np.random.default_rng(2)
  for n, m in shapes:
    cost = rng.uniform(size=(batch, n, m)).astype(np.float32)

    def scipy_loop():
      return [scipy.optimize.linear_sum_assignment(c) for c in cost]

    ref = median_time(scipy_loop, repeats=repeats, sync=lambda _: None)
    jc = jnp.asarray(cost)
    for solver in ("host", "jax"):
      f = jax.jit(lambda c, solver=solver: jdet.assign.linear_sum_assignment(c, solver=solver))
      ours = median_time(lambda: f(jc), repeats=repeats, sync=jax_sync)
      rows.append(_row(f"linear_sum_assignment {batch}x{n}x{m}, jdet {solver} solver", ours, ref, "scipy"))
  return rows


# ----------------------------------------------------------------------------
# The suite's cases (bench/run_all.py).
# ----------------------------------------------------------------------------

# Per profile of run_all: NMS sizes, RoIAlign (RoIs, (H, W), C), matching (batch, [(N, M)]).
SUITE_SETTINGS = {
    "gpu": dict(nms=(1000, 5000, 20000), roi=(1000, (800, 1344), 256), match=(8, ((100, 50), (300, 50)))),
    "cpu": dict(nms=(1000, 5000), roi=(1000, (800, 1344), 256), match=(8, ((100, 50), (300, 50)))),
    "dry": dict(nms=(200,), roi=(50, (64, 64), 8), match=(2, ((10, 5),))),
}


def suite(profile: str, dtype: str, tdev: torch.device) -> list[Case]:
  """The operators beside torchvision's and scipy's (float32 whatever ``dtype``)."""
  del dtype
  settings = SUITE_SETTINGS[profile]
  cases = []
  for n in settings["nms"]:
    def inputs(n=n):
      rng = np.random.default_rng(0)
      boxes = random_boxes(rng, n, size=1333.0, min_side=8.0, max_side=300.0)
      scores = rng.uniform(size=n).astype(np.float32)
      labels = rng.integers(0, 80, size=n).astype(np.int32)
      return boxes, scores, labels

    def ours(n=n, k=None):
      jb, js, jl = map(jnp.asarray, inputs(n))
      return JaxStep(lambda b, s, l: jdet.ops.batched_nms(b, s, l, iou_threshold=0.5,
                                                          max_output_size=k or n), jb, js, jl)

    def theirs(n=n):
      tb, ts, tl = (torch.from_numpy(x).to(tdev) for x in inputs(n))
      return TorchStep(lambda: torchvision.ops.batched_nms(tb, ts, tl, 0.5))

    for k, label in ((None, "all kept"), (100, "first 100")):
      cases.append(Case("ops", f"batched_nms {n} boxes, 80 classes, jdet {label}",
                        lambda n=n, k=k: ours(n, k), theirs, input_size=f"{n} boxes",
                        peer="torchvision", kind="op"))

  num_rois, (h, w), channels = settings["roi"]
  strides = (4, 8, 16, 32)

  def roi_inputs():
    rng = np.random.default_rng(1)
    feats = [rng.normal(size=(h // s, w // s, channels)).astype(np.float32) for s in strides]
    side = np.exp(rng.uniform(np.log(16), np.log(min(600, h, w)), size=(num_rois, 2)))
    xy = rng.uniform(size=(num_rois, 2)) * (np.array([w, h]) - side)
    return feats, np.concatenate([xy, xy + side], axis=1).astype(np.float32)

  def roi_ours():
    feats, rois = roi_inputs()
    return JaxStep(lambda fs, r: jdet.ops.multilevel_roi_align(
        fs, r, strides=strides, output_size=7, sampling_ratio=2, aligned=False),
        [jnp.asarray(f) for f in feats], jnp.asarray(rois))

  def roi_theirs():
    feats, rois = roi_inputs()
    pooler = torchvision.ops.MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], output_size=7,
                                                sampling_ratio=2)
    tfeats = {f"p{i + 2}": torch.from_numpy(x.transpose(2, 0, 1)[None]).to(tdev)
              for i, x in enumerate(feats)}
    trois = [torch.from_numpy(rois).to(tdev)]

    def call():
      with torch.no_grad():
        return pooler(tfeats, trois, [(h, w)])
    return TorchStep(call)

  cases.append(Case("ops", f"multilevel_roi_align {num_rois} RoIs, P2-P5 of {h}x{w}, C={channels}",
                    roi_ours, roi_theirs, input_size=f"{h}x{w}", peer="torchvision", kind="op"))

  batch, shapes = settings["match"]
  for n, m in shapes:
    def cost(n=n, m=m):
      return np.random.default_rng(2).uniform(size=(batch, n, m)).astype(np.float32)

    def scipy_loop(n=n, m=m):
      c = cost(n, m)
      return HostStep(lambda: [scipy.optimize.linear_sum_assignment(x) for x in c])

    for solver in ("host", "jax"):
      cases.append(Case(
          "ops", f"linear_sum_assignment {batch}x{n}x{m}, jdet {solver} solver",
          lambda n=n, m=m, solver=solver: JaxStep(
              lambda c: jdet.assign.linear_sum_assignment(c, solver=solver),
              jnp.asarray(cost(n, m))),
          lambda n=n, m=m: scipy_loop(n, m), input_size=f"{batch}x{n}x{m}", peer="scipy",
          kind="op"))
  return cases


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true", help="small inputs, for a quick check")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
  args = parser.parse_args()

  tdev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  machine = machine_info(tdev)
  print("machine:", json.dumps(machine))

  if args.small:
    repeats = args.repeats or 3
    rows = (bench_nms([1000], repeats, tdev)
            + bench_roi_align(200, (256, 384), 64, repeats, tdev)
            + bench_matching([(100, 50)], 8, repeats))
  else:
    repeats = args.repeats or 10
    rows = (bench_nms([1000, 5000, 20000], repeats, tdev)
            + bench_roi_align(1000, (800, 1344), 256, repeats, tdev)
            + bench_matching([(100, 50), (300, 50)], 8, repeats))

  width = max(len(r["case"]) for r in rows)
  print(f"{'case':<{width}}  {'jdet ms':>9}  {'reference ms':>12}  {'ref/jdet':>8}")
  for r in rows:
    ref_ms = r.get("torchvision_ms", r.get("scipy_ms"))
    print(f"{r['case']:<{width}}  {r['jdet_ms']:9.2f}  {ref_ms:12.2f}  {r['ratio']:8.2f}")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump({"machine": machine, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
  main()
