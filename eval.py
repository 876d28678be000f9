"""Evaluates a detector: ``python eval.py --config configs/ssd300.py:shapes --workdir runs/ssd``.

Evaluates the latest checkpoint of ``--workdir`` (or ``--step N``; without
any checkpoint, the weights named by ``--config.init.weights``) on the
config's validation split and writes to ``WORKDIR/eval/``:

* ``metrics.json``: AP, AP50, AP75, APs, APm, APl (pycocotools, with the
  dataset's category ids), AR, per-class AP (and VOC07 mAP for VOC configs),
  and under ``data`` the distinct images and boxes skipped or fixed while
  reading, by reason;
* ``detections.json``: the detections in COCO results format;
* ``pr_curves.png``: precision-recall curves per class at IoU 0.5;
* ``detections.png``: a grid of evaluation images with their detections.

A per-class table is printed on the terminal.

``--tta`` evaluates with test-time augmentation (single-stage detectors:
several input sizes and flips, merged by NMS or box voting; see
:mod:`jdet.evaluation.tta`), set by the config's ``tta`` section
(``--config.tta.merge=vote``) or, without one, by the defaults;
``metrics.json`` then records the settings under ``tta``.
"""

from __future__ import annotations

import json
import os
import time

# Keep freed host memory in the process (jdet/hostmem.py: a quarter of a CPU training
# step went to zero-filling fresh pages); set before jdet imports jax. 0 turns it off.
os.environ.setdefault("JDET_KEEP_HOST_MEMORY", "1")

from absl import app, flags  # noqa: E402

from jdet import cli  # noqa: E402
from jdet.data import builder  # noqa: E402

_CONFIG = cli.define_flags("run directory of train.py")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step to evaluate (default: the latest)")
_SPLIT = flags.DEFINE_string("split", "val", "data split to evaluate")
_MAX_IMAGES = flags.DEFINE_integer("max_images", 0, "evaluate only the first N images (0: all)")
_TTA = flags.DEFINE_bool("tta", False, "test-time augmentation: several scales and flips, merged "
                         "(config.tta, or jdet.evaluation.tta's defaults)")


def main(argv) -> None:
  cli.start(argv)
  import jax
  import numpy as np

  from jdet import parallel, training, viz
  from jdet.data import pipeline, records
  from jdet.evaluation import format_per_class_table, json_safe
  from jdet.evaluation import loop as eval_loop
  from jdet.evaluation import tta
  from jdet.metrics import ProgressBar
  from jdet.models import build_model

  config, workdir = _CONFIG.value, flags.FLAGS.workdir
  mesh = parallel.make_mesh()
  model = build_model(config.model_name, **config.model)
  with cli.config_errors_exit():
    source = builder.build_source(config.data, _SPLIT.value)
  sample = next(iter(pipeline.eval_batches(
      source, builder.build_transforms(config.data, train=False), batch_size=1)))
  variables, step = training.restore_for_eval(model, config, workdir, sample, mesh=mesh,
                                              step=_STEP.value)

  eval_cfg = config.get("eval")
  metrics_kinds = tuple(eval_cfg.metrics) if eval_cfg else ("coco",)
  num_draw = int(eval_cfg.num_draw) if eval_cfg else 16
  bars = []

  def progress(i: int, n: int) -> None:
    if not bars:
      bars.append(ProgressBar(n, enabled=jax.process_index() == 0))
    bars[0].update(i)

  data_config, predict_fn, tta_settings = config.data, None, None
  if _TTA.value:
    tta_settings = tta.TTASettings.from_config(config.get("tta")).resolve(model)
    predict_fn = tta.make_tta_predict_fn(model, tta_settings)
    data_config = tta.tta_data_config(config.data, tta_settings)

  t0 = time.time()
  with training.mesh_context(mesh):
    result = eval_loop.evaluate_split(
        model, variables, data_config, mesh=mesh, split=_SPLIT.value, metrics=metrics_kinds,
        max_images=_MAX_IMAGES.value, keep_examples=num_draw, predict_fn=predict_fn,
        progress=progress)
  for bar in bars:
    bar.close()
  if jax.process_index() != 0:
    return
  # Distinct images and boxes skipped or fixed while reading: this process's and
  # those its reading workers sent with the batches (data.num_workers > 0).
  report = records.DataReport()
  report.add(result.data_notes)
  report.add(records.drain_notes())
  metrics = dict(result.metrics, step=step, split=_SPLIT.value,
                 seconds=round(time.time() - t0, 1),
                 tta=tta_settings.to_dict() if tta_settings else None,
                 data=dict(report.totals(), by_reason=report.counts()))
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  summary = metrics.pop("summary", "")
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(json_safe(metrics), f, indent=2, allow_nan=False)
  if result.detections is not None:
    with open(os.path.join(out_dir, "detections.json"), "w") as f:
      json.dump(json_safe(result.detections), f, allow_nan=False)

  names = result.class_names
  for kind, curves in result.pr_curves.items():
    per_class = metrics["per_class_AP50"] if kind == "coco" else metrics["VOC07_per_class"]
    title = (f"{config.model_name} step {step}{' with TTA' if tta_settings else ''}: {kind} "
             f"precision-recall, IoU 0.5")
    plot = viz.plot_pr_curves(curves, title=title, ap=per_class, class_names=names)
    viz.save_png(os.path.join(out_dir, f"pr_curves_{kind}.png"), plot)
  mean, std = builder.normalization(config.data)
  score = float(eval_cfg.draw_score) if eval_cfg else 0.3
  drawn = [viz.draw_boxes(e["image"], e["boxes"], e["labels"], names, scores=e["scores"],
                          valid=e["valid"] & (e["scores"] >= score), mean=mean, std=std)
           for e in result.examples]
  if drawn:
    cols = int(np.ceil(np.sqrt(len(drawn))))
    viz.save_png(os.path.join(out_dir, "detections.png"), viz.image_grid(drawn, cols))

  if report.counts():
    print(f"Input skipped or fixed (distinct images or boxes):\n{report.summary()}")
  if tta_settings:
    print(f"Test-time augmentation: {tta_settings.describe()}")
  print(summary)
  if "per_class" in metrics:
    print(format_per_class_table(metrics["per_class"], value_name="AP"))
  if "VOC07_per_class" in metrics:
    print(format_per_class_table(metrics["VOC07_per_class"], value_name="VOC07 AP"))
    print(f"VOC07 mAP: {metrics['VOC07_mAP']:.4f}")
  keys = [k for k in ("AP", "AP50", "AP75", "APs", "APm", "APl") if k in metrics]
  print("  ".join(f"{k} {metrics[k]:.4f}" for k in keys),
        f"(step {step}{', TTA' if tta_settings else ''}, {out_dir})")


if __name__ == "__main__":
  app.run(main)
