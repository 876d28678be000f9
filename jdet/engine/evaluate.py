"""Evaluating a run directory: what ``eval.py`` does, as one function.

:func:`evaluate_workdir` restores a checkpoint of ``train.py``'s run directory
(the latest, or a given step; with none, the weights of ``config.init``),
evaluates it on a split of the config's data (optionally with test-time
augmentation) and writes the report to ``WORKDIR/eval/``
(:func:`jdet.evaluation.report.write_report`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax

from jdet import parallel
from jdet.data import builder, pipeline, records
from jdet.engine.metrics import ProgressBar
from jdet.engine.restore import restore_for_eval
from jdet.evaluation import loop as eval_loop
from jdet.evaluation import report, tta
from jdet.models import build_model

__all__ = ["Evaluation", "evaluate_workdir"]


@dataclasses.dataclass
class Evaluation:
  """What :func:`evaluate_workdir` did: ``metrics`` (as in ``metrics.json``), ``text``
  (the report for people), ``out_dir``; on processes other than 0 both are empty."""

  metrics: dict[str, Any]
  text: str
  out_dir: str


def evaluate_workdir(config, workdir: str, *, step: int | None = None, split: str = "val",
                     max_images: int = 0, use_tta: bool = False,
                     progress: bool = True) -> Evaluation:
  """Evaluates checkpoint ``step`` (default the latest) of ``workdir`` on ``split``.

  Args:
    config: the run's config (its ``model``, ``data``, ``eval`` and ``tta`` sections).
    workdir: the run directory of ``train.py``; the report goes to ``workdir/eval``.
    step: the checkpoint step; None for the latest.
    split: the data split.
    max_images: only the first images of the split (0: all).
    use_tta: test-time augmentation (:mod:`jdet.evaluation.tta`).
    progress: a progress bar on the terminal (process 0).
  """
  mesh = parallel.make_mesh()
  model = build_model(config.model_name, **config.model)
  source = builder.build_source(config.data, split)
  sample = pipeline.first_sample(source, builder.build_transforms(config.data, train=False))
  variables, step = restore_for_eval(model, config, workdir, sample, mesh=mesh, step=step)

  eval_cfg = config.get("eval")
  data_config, predict_fn, settings = config.data, None, None
  if use_tta:
    data_config, predict_fn, settings = tta.tta_setup(model, config)
  bar = None

  def show(done: int, total: int) -> None:
    nonlocal bar
    bar = bar or ProgressBar(total, enabled=progress and jax.process_index() == 0)
    bar.update(done)

  t0 = time.time()
  with parallel.mesh_context(mesh):
    result = eval_loop.evaluate_split(
        model, variables, data_config, mesh=mesh, split=split,
        metrics=tuple(eval_cfg.metrics) if eval_cfg else ("coco",), max_images=max_images,
        keep_examples=int(eval_cfg.num_draw) if eval_cfg else 16, predict_fn=predict_fn,
        progress=show)
  if bar is not None:
    bar.close()
  out_dir = os.path.join(workdir, "eval")
  if jax.process_index() != 0:
    return Evaluation(metrics={}, text="", out_dir=out_dir)
  # Distinct images and boxes skipped or fixed while reading: this process's and
  # those its reading workers sent with the batches (data.num_workers > 0).
  data_report = records.DataReport()
  data_report.add(result.data_notes)
  data_report.add(records.drain_notes())
  mean, std = builder.normalization(config.data)
  with_tta = " with TTA" if settings else ""
  metrics = report.write_report(
      out_dir, result, title=f"{config.model_name} step {step}{with_tta}", step=step,
      split=split, seconds=time.time() - t0, tta=settings.to_dict() if settings else None,
      data=dict(data_report.totals(), by_reason=data_report.counts()),
      draw_score=float(eval_cfg.draw_score) if eval_cfg else 0.3, mean=mean, std=std)
  text = report.report_text(
      metrics, summary=result.metrics.get("summary", ""),
      data_summary=data_report.summary() if data_report.counts() else "",
      tta=settings.describe() if settings else "",
      where=f"step {step}{', TTA' if settings else ''}, {out_dir}")
  return Evaluation(metrics=metrics, text=text, out_dir=out_dir)
