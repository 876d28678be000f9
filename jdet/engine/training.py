"""The training loop behind ``train.py``: one function, in sections.

:func:`train_and_evaluate` reads a config (see ``configs/``) and runs:

1. **Devices**: one mesh over all devices (``data`` axis); each process
   reads ``batch_size / process_count`` images per step; parameters are
   replicated, batches sharded.
2. **Data**: the grain training iterator of ``config.data`` (its position is
   checkpointed).
3. **Model and optimiser**: ``jdet.build_model(config.model_name,
   **config.model)``, initial weights from ``config.init``, the optax
   optimiser of ``config.optim``.
4. **Resume**: the newest intact checkpoint in ``workdir/checkpoints``, if any
   (state, RNG, data position), verified against its checksums; a damaged
   newer one is moved to ``checkpoints/damaged/`` (see :mod:`jdet.engine.checkpoint`).
   The metrics log is cut back to that step.
5. **Loop**: one jitted update that donates its state. Every ``log_every``
   steps the metrics go to ``workdir/metrics.jsonl`` and TensorBoard; every
   ``eval_every`` steps the model is evaluated (COCO AP) and every
   ``checkpoint_every`` steps a checkpoint is saved asynchronously (with the
   AP, so the best one is kept). An interval of 0 is "off"; the last step is
   always logged and saved. SIGTERM / SIGINT save a checkpoint and stop
   cleanly (:class:`TrainResult` ``stopped`` and ``signal``; ``train.py`` then
   exits with ``128 + signal``). A non-finite loss stops the run with
   :class:`NonFiniteLossError` naming the step, the loss terms and the
   checkpoint that holds the last good state (or that none was saved yet);
   the update of that step is skipped on the device, and no checkpoint is
   written after it.

The config is checked first (:func:`check_config`), before anything is built;
then the run takes the workdir (:mod:`jdet.engine.workdir`: its lock, the saved
config compared with this one on a resume, ``config.json`` and ``starts.jsonl``
written). A full disk while writing stops the run with
:class:`~jdet.engine.workdir.DiskFullError`, the incomplete checkpoint removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdet import parallel
from jdet.class_names import write_class_names
from jdet.data import builder, pipeline, records
from jdet.engine import logs
from jdet.engine import workdir as workdir_lib
from jdet.engine.checkpoint import Checkpointer
from jdet.engine.metrics import MetricWriter, ProgressBar
from jdet.engine.restore import init_state
from jdet.engine.signals import StopRequest
from jdet.engine.train_state import TrainState
from jdet.evaluation import loop as eval_loop
from jdet.models import build_model

__all__ = ["NonFiniteLossError", "train_and_evaluate", "make_train_step", "TrainResult",
           "check_config"]

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the message names the step and the terms."""


class TrainResult(dict):
  """What :func:`train_and_evaluate` returns: ``step``, ``state``, ``eval`` (last
  evaluation metrics), ``stopped`` (True if a signal ended the run early) and
  ``signal`` (the number of that signal, else None)."""


# ----------------------------------------------------------------------------
# Pieces, usable on their own (tests, notebooks).
# ----------------------------------------------------------------------------


def make_train_step(model, schedule: Callable) -> Callable:
  """``(state, batch) -> (state, metrics)``: one update, skipped if not finite.

  ``metrics`` holds the model's loss terms, ``loss``, ``grad_norm``, ``lr``
  and ``finite`` (1.0, or 0.0 when the loss or a gradient was not finite:
  then the returned state is the input state, unchanged).
  """

  def train_step(state: TrainState, batch):
    state, key = state.next_rng()
    dropout_key, sampling_key = jax.random.split(key)
    mutable = ["batch_stats"] if state.batch_stats else False

    def loss_fn(params):
      variables = {"params": params}
      if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
      out = model.apply(variables, batch, method="loss", train=True, rngs={"dropout": dropout_key, "sampling": sampling_key},
                        mutable=mutable)
      (loss, metrics), updates = out if mutable else (out, {})
      return loss, (metrics, updates)

    (loss, (metrics, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = state.apply_gradients(grads, batch_stats=updates.get("batch_stats"))
    # A non-finite step changes nothing but the RNG; the host stops the run when it sees it.
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                             state.replace(step=state.step))
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=schedule(state.step),
                   finite=finite.astype(jnp.float32))
    return new_state, metrics

  return train_step


def _check_finite(history: list[tuple[int, dict[str, float]]], *, last_saved: int | None,
                  directory: str) -> None:
  """Raises :class:`NonFiniteLossError` at the first step of ``history`` whose update was
  skipped; ``last_saved`` is the newest checkpoint step of the run (None: none yet)."""
  for step, m in history:
    if not m.get("finite", 1.0):
      terms = ", ".join(f"{k}={v:.6g}" for k, v in sorted(m.items()) if k not in ("finite",))
      if last_saved is None:
        saved = ("no checkpoint was saved before it, so starting again begins at step 0 "
                 "(train.checkpoint_every sets how often one is saved)")
      else:
        saved = f"checkpoint {last_saved} in {directory} holds the last good state"
      raise NonFiniteLossError(
          f"non-finite loss at step {step}: {terms}. The update was skipped and nothing was saved "
          f"after it; {saved}. Lower optim.lr, set optim.clip_norm, or check the input batch.")


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_config(config, *, num_devices: int) -> None:
  """Checks the ``train`` section and the sizes of the ``data`` section at start-up.

  Intervals (``train.log_every``, ``checkpoint_every``, ``eval_every``) are
  integers ``>= 0``, where 0 is "off" (the last step is still logged and
  saved); counts that must be positive are. Raises
  :class:`jdet.data.builder.ConfigError` naming the field.
  """
  def field(section: str, name: str, minimum: int, meaning: str = "") -> int:
    where = f"config field {section}.{name}"
    if name not in config[section]:
      raise builder.ConfigError(f"{where} is missing")
    value = config[section][name]
    if not _is_int(value) or value < minimum:
      raise builder.ConfigError(f"{where} must be an integer >= {minimum}{meaning}, "
                                f"got {value!r}")
    return int(value)

  for section in ("train", "data"):
    if section not in config:
      raise builder.ConfigError(f"config section {section} is missing")
  field("train", "num_steps", 1)
  for name in ("log_every", "checkpoint_every", "eval_every"):
    field("train", name, 0, " (0: off)")
  field("train", "keep_checkpoints", 1, " (the latest checkpoint is needed to resume)")
  field("train", "keep_best", 0, " (0: none)")
  if "eval_max_images" in config.train:
    field("train", "eval_max_images", 0, " (0: all)")
  batch = field("data", "batch_size", 1)
  if batch % num_devices:
    raise builder.ConfigError(f"config field data.batch_size={batch} does not divide over "
                              f"{num_devices} devices")
  if batch % jax.process_count():
    raise builder.ConfigError(f"config field data.batch_size={batch} does not divide over "
                              f"{jax.process_count()} processes")
  field("data", "max_boxes", 1)
  if "eval_batch_size" in config.data:
    field("data", "eval_batch_size", 1)
  if "num_workers" in config.data:
    field("data", "num_workers", 0, " (0: read in the training process)")


def _mean_metrics(history: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
  keys = [k for k in history[-1][1] if k not in ("finite", "lr")]
  out = {k: float(np.mean([m[k] for _, m in history])) for k in keys}
  out["lr"] = float(history[-1][1]["lr"])
  return out


def _eval_scalars(metrics: dict[str, Any]) -> dict[str, float]:
  keys = ("AP", "AP50", "AP75", "APs", "APm", "APl", "VOC07_mAP")
  return {f"eval/{k}": float(metrics[k]) for k in keys
          if k in metrics and np.isfinite(float(metrics[k]))}


# ----------------------------------------------------------------------------
# The program.
# ----------------------------------------------------------------------------


def train_and_evaluate(config, workdir: str, *, devices: Sequence[jax.Device] | None = None,
                       max_steps: int | None = None, progress: bool = True,
                       allow_changes: bool = False) -> TrainResult:
  """Trains ``config`` in ``workdir`` (resuming from its last checkpoint).

  The run holds the workdir's lock (:class:`jdet.engine.workdir.RunLock`) from
  the start to the end; a resume compares ``config`` with the one the run was
  started with (:func:`jdet.engine.workdir.check_resume`).

  Args:
    config: a config from ``configs/`` (``model_name``, ``model``, ``data``,
      ``optim``, ``train``, ``init``, ``eval``).
    workdir: where checkpoints, ``metrics.jsonl``, TensorBoard events go.
    devices: the devices of the mesh (default: all).
    max_steps: stop after this many steps of *this* call (the schedule still
      spans ``config.train.num_steps``); for tests of stopping and resuming.
    progress: show a progress bar on process 0.
    allow_changes: resume even where the config changed the model or the
      training data (listed in a warning).
  Returns:
    A :class:`TrainResult`.
  Raises:
    jdet.engine.workdir.WorkdirBusyError: another run holds ``workdir``.
    jdet.engine.workdir.ConfigChangedError: a resume changed the model or the data.
    jdet.engine.workdir.DiskFullError: no space left while writing (the incomplete
      checkpoint removed; the previous ones intact).
  """
  # --- Devices -----------------------------------------------------------------
  mesh = parallel.make_mesh(devices)
  check_config(config, num_devices=mesh.size)  # before anything is built or compiled
  is_main = jax.process_index() == 0
  # --- The workdir: one run at a time, its config recorded -----------------------
  lock, busy = workdir_lib.RunLock(workdir, primary=is_main), None
  try:
    lock.acquire()  # before anything else in the workdir is read or written
  except workdir_lib.WorkdirBusyError as e:
    busy = e
  if not parallel.all_processes_agree(busy is None):
    lock.release()
    raise busy or workdir_lib.WorkdirBusyError(f"{workdir} is in use by another run (process 0 "
                                               f"could not take its lock)")
  try:
    resumed_from = _saved_step(workdir)
    changes = {}
    if resumed_from is not None:
      changes = workdir_lib.check_resume(workdir, config, allow_changes=allow_changes)
    if is_main:
      with workdir_lib.disk_full_guard(workdir, "the run's config"):
        workdir_lib.record_start(workdir, config, changes=changes, resumed_from=resumed_from)
    return _train(config, workdir, mesh, max_steps=max_steps, progress=progress)
  finally:
    lock.release()


def _unfinished_steps(paths: Sequence[str]) -> list[int]:
  """The steps of ``<step>.orbax-checkpoint-tmp`` folders."""
  return sorted({int(m) for p in paths for m in re.findall(r"(\d+)\.orbax-checkpoint-tmp", p)})


def _saved_step(workdir: str) -> int | None:
  """The newest step folder under ``workdir/checkpoints`` (None: a new run)."""
  try:
    steps = [int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()]
  except FileNotFoundError:
    return None
  return max(steps, default=None)


def _train(config, workdir: str, mesh, *, max_steps: int | None,
           progress: bool) -> TrainResult:
  """The run itself, once the workdir is held."""
  tc = config.train
  num_steps = int(tc.num_steps)
  log_every, eval_every = int(tc.log_every), int(tc.eval_every)
  checkpoint_every = int(tc.checkpoint_every)
  is_main = jax.process_index() == 0
  global_batch = int(config.data.batch_size)
  local_batch = parallel.local_batch_size(global_batch)

  # --- Data --------------------------------------------------------------------
  source = builder.build_source(config.data, "train")
  pipeline.check_num_classes(source, int(config.model.num_classes))
  if is_main:  # beside the checkpoints, for the predictor (jdet.class_names)
    with workdir_lib.disk_full_guard(workdir, "the class names"):
      write_class_names(workdir, source.class_names)
  transform = builder.build_transforms(config.data, train=True)
  data_iter = pipeline.train_batches(
      source, transform, batch_size=local_batch, seed=int(config.data.seed),
      shard_index=jax.process_index(), num_shards=jax.process_count(),
      num_workers=int(config.data.num_workers),
      group_by_aspect=bool(config.data.get("group_by_aspect", False)), data_notes=True)
  accounting = _DataAccounting(int(config.data.max_boxes))

  # --- Model and optimiser -----------------------------------------------------
  model = build_model(config.model_name, **config.model)
  # Shapes for init: one evaluation-transformed image (same input size as training).
  sample = pipeline.first_sample(source, builder.build_transforms(config.data, train=False))
  state, schedule = init_state(model, config, sample, total_steps=num_steps)
  state = parallel.replicate(state, mesh)

  # --- Resume --------------------------------------------------------------------
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep_last=int(tc.keep_checkpoints),
                      keep_best=int(tc.keep_best), best_metric="AP", remove_unfinished=True)
  writer = MetricWriter(workdir, enabled=is_main)
  if ckpt.latest_step() is not None:
    # Verified: a damaged newest step is moved aside and the previous one used; a
    # checkpoint of another model or optimiser is a CheckpointMismatchError.
    state = ckpt.restore_latest_intact(state, data_iterator=data_iter)
    log.info("resumed from step %d in %s", int(state.step), ckpt.directory)
  start = int(state.step)
  writer.truncate_after(start)

  train_step = jax.jit(make_train_step(model, schedule), donate_argnums=0)
  predict_fn = eval_loop.make_predict_fn(model)
  eval_metrics_cfg = tuple(config.eval.metrics) if "eval" in config else ("coco",)

  def evaluate(state) -> dict[str, Any]:
    result = eval_loop.evaluate_split(
        model, state.variables, config.data, mesh=mesh, metrics=eval_metrics_cfg,
        max_images=int(tc.get("eval_max_images", 0)), predict_fn=predict_fn)
    accounting.report.add(result.data_notes)  # the evaluation's reading workers' skips
    return result.metrics

  # --- Loop ----------------------------------------------------------------------
  end = num_steps if max_steps is None else min(num_steps, start + int(max_steps))
  bar = ProgressBar(num_steps, initial_step=start, enabled=is_main and progress)
  history: list[tuple[int, dict]] = []  # per-step device metrics since the last log
  last_eval: dict[str, Any] = {}
  stopped = False
  last_saved = start if start > 0 else None  # the newest checkpoint of the run
  t_log, n_log = time.time(), 0

  def saving(step: int | None = None) -> str:
    """What a save writes: checkpoint ``step`` (default the newest one started)."""
    step = step or last_saved
    return f"checkpoint {step} to {ckpt.directory}" if step else "a checkpoint"

  disk_full: workdir_lib.DiskFullError | None = None
  try:
    with parallel.mesh_context(mesh), StopRequest() as stop:
      step = start
      while step < end:
        batch = parallel.shard_batch(accounting.take(next(data_iter), step + 1), mesh)
        state, metrics = train_step(state, batch)
        step += 1
        history.append((step, metrics))
        n_log += 1

        is_last = step == end
        # An interval of 0 is "off"; the last step is always logged and saved.
        do_eval = eval_every > 0 and (step % eval_every == 0 or step == num_steps)
        do_ckpt = (checkpoint_every > 0 and step % checkpoint_every == 0) or is_last or do_eval
        do_log = (log_every > 0 and step % log_every == 0) or is_last or do_ckpt
        stop_now = stop.requested_on_any_process()
        if do_log or stop_now:
          host = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in history]
          history.clear()
          _check_finite(host, last_saved=last_saved, directory=str(ckpt.directory))
          dt = time.time() - t_log
          scalars = _mean_metrics(host)
          scalars.update(images_per_s=n_log * global_batch / dt, step_time_s=dt / n_log)
          scalars.update(accounting.scalars())
          with workdir_lib.disk_full_guard(workdir, "the metrics log"):
            writer.write(step, scalars)
          bar.update(step, loss=scalars["loss"], img_s=scalars["images_per_s"])
          t_log, n_log = time.time(), 0
        if do_eval:
          last_eval = evaluate(state)
          if is_main:
            with workdir_lib.disk_full_guard(workdir, "the metrics log"):
              writer.write(step, _eval_scalars(last_eval))
            log.info("step %d: AP %.4f AP50 %.4f", step, last_eval.get("AP", float("nan")),
                     last_eval.get("AP50", float("nan")))
          t_log = time.time()
        if do_ckpt or stop_now:
          # A save is asynchronous: a full disk may show here or at the next wait.
          with workdir_lib.disk_full_guard(workdir, saving(step)):
            ckpt.save(step, state, data_iterator=data_iter,
                      metrics=_eval_scalars_plain(last_eval) if do_eval else None, force=True)
          last_saved = step
        if stop_now:
          log.warning("stopping at step %d after a signal; checkpoint saved", step)
          stopped = True
          break
  except workdir_lib.DiskFullError as e:
    disk_full = e  # raised below, once the pending saves are done and the cut one removed
  finally:
    # Also on errors (a non-finite loss): finish pending saves, flush the logs.
    bar.close()
    if is_main:
      accounting.log_summary()
    try:
      with workdir_lib.disk_full_guard(workdir, saving()):
        ckpt.wait()
    except workdir_lib.DiskFullError as e:
      disk_full = e
    writer.close()
    if not disk_full:
      ckpt.close()
  if disk_full:  # the cut checkpoint goes; the previous ones stay, to resume from
    logs.quiet_abandoned_futures()  # the failed writes' futures, reported below in one line
    cut = _unfinished_steps(ckpt.remove_unfinished())
    with contextlib.suppress(Exception):
      ckpt.close()
    what = f"checkpoint {', '.join(map(str, cut))} to {ckpt.directory}" if cut else disk_full.what
    raise workdir_lib.DiskFullError(
        workdir, what, disk_full.free_bytes,
        after=("removed the incomplete step; " if cut else "")
        + f"kept {ckpt.all_steps() or 'no checkpoint'}"
    ) from disk_full.__cause__
  return TrainResult(step=int(state.step), state=state, eval=last_eval, stopped=stopped,
                     signal=stop.signal if stopped else None)


class _DataAccounting:
  """What the input left out or changed: boxes cut by ``data.max_boxes``, skipped and
  fixed images and boxes (distinct, from every reading process), since the program started.

  :meth:`take` reads each host batch (its ``truncated_boxes`` and the notes the
  pipeline attached), :meth:`scalars` gives the log line's ``data/...`` values,
  :meth:`log_summary` the end-of-run summary.
  """

  def __init__(self, max_boxes: int):
    self.max_boxes = max_boxes
    self.report = records.DataReport()
    self.truncated = 0  # boxes cut since the last log line (this process)
    self.truncated_total = 0  # since the start (all processes, as of the last log line)
    self.truncated_images = 0
    self.warned = False

  def take(self, batch: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    """Counts a host batch; returns it without the notes (ready for the devices)."""
    batch = dict(batch)
    notes = batch.pop(pipeline.NOTES_KEY, None)
    if notes is not None:
      self.report.add(records.decode_notes(str(notes)))
    cut = np.asarray(batch["truncated_boxes"]) * np.asarray(batch["valid"])
    self.truncated += int(cut.sum())
    self.truncated_images += int((cut > 0).sum())
    if cut.any() and not self.warned:
      self.warned = True
      log.warning("step %d: %d boxes beyond data.max_boxes=%d left out of the training "
                  "targets (counted as data/truncated_boxes in metrics.jsonl; raise "
                  "data.max_boxes to keep them)", step, int(cut.sum()), self.max_boxes)
    return batch

  def scalars(self) -> dict[str, float]:
    """``data/truncated_boxes`` (since the last line), ``data/truncated_boxes_total``,
    ``data/skipped`` and ``data/fixed`` (distinct items so far). A collective with
    several processes: call it on every one."""
    self.report.add(records.drain_notes())  # this process's own (start-up checks, eval)
    cut = self.truncated
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      cut = int(np.sum(multihost_utils.process_allgather(np.asarray(cut, np.int64))))
    self.truncated = 0
    self.truncated_total += cut
    totals = self.report.totals()
    return {"data/truncated_boxes": float(cut),
            "data/truncated_boxes_total": float(self.truncated_total),
            "data/skipped": float(totals["skipped"]), "data/fixed": float(totals["fixed"])}

  def log_summary(self) -> None:
    """Logs what the input left out or changed in this run (a warning if anything)."""
    self.report.add(records.drain_notes())
    lines = []
    total = self.truncated_total + self.truncated  # with those since the last log line
    if total:
      lines.append(f"  {total} boxes beyond data.max_boxes={self.max_boxes} left "
                   f"out of the training targets (in {self.truncated_images} images of this "
                   f"process); raise data.max_boxes to keep them")
    if self.report.counts():
      totals = self.report.totals()
      lines.append(f"  {totals['skipped']} distinct images or boxes skipped and "
                   f"{totals['fixed']} fixed, by reason:")
      lines.append(self.report.summary())
    if lines:
      log.warning("input summary of this run:\n%s", "\n".join(lines))
    else:
      log.info("input summary of this run: nothing skipped, fixed or cut by data.max_boxes")


def _eval_scalars_plain(metrics: dict[str, Any]) -> dict[str, float]:
  return {k: float(metrics[k]) for k in ("AP", "AP50") if k in metrics}
