"""Checkpoints of the training state and the input position, and clean stops.

:class:`Checkpointer` wraps an orbax ``CheckpointManager`` over
``WORKDIR/checkpoints``. Each step directory holds::

  checkpoints/<step>/state       # the TrainState leaves (StandardSave)
  checkpoints/<step>/data        # the grain iterator position, one JSON per process
  checkpoints/<step>/checksums   # SHA-256 of every state leaf and of each iterator position
  checkpoints/<step>/metrics     # the evaluation metrics given to ``save``, if any

so that a resumed run continues with the exact next batch. Saves are
asynchronous: ``save`` returns once the arrays are copied off the devices
(the state can then be donated to the next step) and the files are written in
a background thread; ``wait()`` (or ``close()``) blocks until they are
committed. The checksums are computed from the arrays in ``save`` and written
in the same commit, so a step either has all of them or does not exist.

Retention: the last ``keep_last`` checkpoints and the ``keep_best`` best ones
by ``metrics[best_metric]`` (higher is better) are kept, with orbax's
preservation policies ``AnyPreservationPolicy([LatestN, BestN])``. A step
saved without that metric is never "best".

Restoring needs a template: a concrete state of the same structure (a freshly
created ``TrainState``). Its shapes, dtypes and shardings say how the arrays
are read back, and its static fields (the optimiser ``tx``) are kept.

Every restore is verified, and two kinds of failure are told apart:

* :class:`CheckpointMismatchError`: the step is intact but was saved by
  another model or optimiser (a leaf missing, extra, or of another shape or
  dtype; or an iterator position the pipeline cannot take). The message names
  the leaf and both shapes. Nothing is moved.
* :class:`CheckpointDamagedError`: a file is missing, truncated or unreadable,
  or a leaf's bytes do not match their checksum (flipped bits). The message
  names the step, the file or leaf, and what is wrong.
  :meth:`Checkpointer.restore_latest_intact` (what training uses) then moves
  the step aside to ``checkpoints/damaged/<step>`` (never deletes it) and
  falls back to the next older step.

A failed orbax restore leaves tensorstore callbacks to a closed event loop
behind ("RuntimeError: Event loop is closed", once per pending read); those
and the asyncio "exception was never retrieved" reports of the abandoned
reads are suppressed, so that the error jdet raises is the last thing printed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from typing import Any, Mapping

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jdet import parallel
from jdet.engine import logs

__all__ = ["Checkpointer", "CheckpointDamagedError", "CheckpointMismatchError",
           "state_digests"]

log = logging.getLogger("jdet.engine.checkpoint")

_policies = ocp.checkpoint_managers


class CheckpointDamagedError(RuntimeError):
  """A saved step that cannot be read back as it was written.

  Attributes:
    step: the step.
    path: the file or folder that is wrong (``.../<step>/state (leaf params/...)``
      for values that do not match their checksum).
    problem: what is wrong with it.
  """

  def __init__(self, step: int, path: str, problem: str):
    self.step, self.path, self.problem = int(step), str(path), problem
    super().__init__(f"checkpoint {step} is damaged: {path}: {problem}")


class CheckpointMismatchError(ValueError):
  """An intact step that does not fit this run (another model, optimiser or pipeline)."""


def _flat(tree: Any) -> dict[str, Any]:
  """``{"params/head/kernel": leaf, ...}``: the leaf names orbax stores a tree under."""
  flat = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(tree, keep_empty_nodes=True), sep="/")
  return {k: v for k, v in flat.items() if hasattr(v, "dtype")}  # not the empty nodes


def state_digests(state: Any) -> dict[str, list]:
  """``{leaf name: [sha256 hex, shape, dtype]}`` of every leaf of ``state``.

  A leaf replicated over several hosts is read from this process's copy; one
  that this process cannot read whole (sharded over hosts) gets the digest
  ``None`` and is not verified.
  """
  out = {}
  for name, leaf in _flat(state).items():
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      if not leaf.is_fully_replicated:
        out[name] = [None, list(leaf.shape), str(np.dtype(leaf.dtype))]
        continue
      leaf = leaf.addressable_data(0)
    a = np.asarray(leaf)
    data = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    out[name] = [hashlib.sha256(data).hexdigest(), list(a.shape), str(a.dtype)]
  return out


def _json_digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _describe(e: BaseException, limit: int = 300) -> str:
  """A one-line summary of an error (without TensorStore's spec dump)."""
  text = " ".join(str(e).split()).split(" See full TensorStore details")[0]
  text = text if len(text) <= limit else text[:limit] + " ..."
  return f"{type(e).__name__}: {text}"


def _params_first(name: str) -> tuple[bool, str]:
  """Sort key of leaf names: the parameters before optimiser state and statistics."""
  return not name.startswith("params/"), name


def _shape_text(shape: tuple, dtype: str) -> str:
  return f"{list(shape)} {dtype}"


class Checkpointer:
  """Saves and restores ``(state, data iterator)`` pairs under ``directory``.

  Args:
    directory: the checkpoint directory, normally ``WORKDIR/checkpoints``.
    keep_last: how many of the most recent checkpoints to keep (>= 1).
    keep_best: how many of the best checkpoints by ``best_metric`` to keep, on
      top of the last ones (0: none).
    best_metric: the key of ``metrics`` that ranks checkpoints, higher is better.
    async_save: write in a background thread.
    remove_unfinished: delete the folders of saves cut short (a killed
      process) at start-up. Only for the program that writes: a reader (eval)
      would delete a save that a running training is writing.

  Usage::

    with Checkpointer(workdir / "checkpoints") as ckpt:
      if ckpt.latest_step() is not None:
        state = ckpt.restore(state, data_iterator=train_iter)
      ...
      ckpt.save(step, state, data_iterator=train_iter, metrics={"AP": ap})
  """

  def __init__(self, directory: str | epath.PathLike, *, keep_last: int = 2, keep_best: int = 1,
               best_metric: str = "AP", async_save: bool = True, remove_unfinished: bool = False):
    if keep_last < 1:
      raise ValueError(f"keep_last must be >= 1 (the latest checkpoint is needed to resume), "
                       f"got {keep_last}")
    if keep_best < 0:
      raise ValueError(f"keep_best must be >= 0, got {keep_best}")
    path = epath.Path(directory)
    if "://" not in str(directory):
      path = epath.Path(path.expanduser().absolute())  # orbax wants absolute paths
    self.directory = path
    self.best_metric = best_metric
    policies = [_policies.LatestN(n=keep_last)]
    if keep_best:
      policies.append(_policies.BestN(get_metric_fn=self._metric, reverse=False, n=keep_best,
                                      keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=_policies.AnyPreservationPolicy(policies),
        # best_fn makes orbax write the metrics with each step and rank them
        # in best_step(); retention is left to the policy above.
        best_fn=self._metric, best_mode="max",
        cleanup_tmp_directories=remove_unfinished,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(path, options=options)
    logs.quiet_orbax()

  def _metric(self, metrics: Mapping[str, Any]) -> float:
    return float(metrics.get(self.best_metric, -math.inf))

  def _orbax_metrics(self, metrics: Mapping[str, Any] | None) -> dict[str, float] | None:
    """The metrics to record, or None unless they rank the step (``best_metric`` is a number)."""
    if not metrics or self.best_metric not in metrics:
      return None
    if math.isnan(float(metrics[self.best_metric])):
      return None
    return {k: float(v) for k, v in metrics.items()}

  def save(self, step: int, state: Any, *, data_iterator: grain.DatasetIterator | None = None,
           metrics: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Starts saving ``state`` (and the iterator's position) as ``step``.

    Args:
      step: the training step, normally ``int(state.step)``.
      state: a pytree of arrays (a ``TrainState``); static fields are not saved.
      data_iterator: a grain ``DatasetIterator`` whose position to save.
      metrics: scalars such as ``{"AP": 0.31}``. Recorded with the step and
        used for ``keep_best`` only if they contain ``best_metric``.
      force: save even if orbax's save-decision policy would skip this step.

    Returns:
      Whether a save was started (False when ``step`` already exists, e.g. a
      final save right after resuming).
    """
    step = int(step)
    if step in self._manager.all_steps():
      log.info("checkpoint %d already exists in %s; not saving it again", step, self.directory)
      return False
    checksums = {"state": state_digests(state)}
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
      checksums["data"] = self._data_digests(data_iterator)
    items["checksums"] = ocp.args.JsonSave(checksums)
    return self._manager.save(step, args=ocp.args.Composite(**items),
                              metrics=self._orbax_metrics(metrics), force=force)

  @staticmethod
  def _data_digests(data_iterator: grain.DatasetIterator) -> list[str]:
    """The digest of each process's iterator position, in process order."""
    digest = _json_digest(data_iterator.get_state())
    if jax.process_count() == 1:
      return [digest]
    from jax.experimental import multihost_utils
    codes = np.frombuffer(bytes.fromhex(digest), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(codes)).reshape(jax.process_count(), -1)
    return [bytes(row.astype(np.uint8)).hex() for row in every]

  def _step_dir(self, step: int) -> epath.Path:
    return self.directory / str(int(step))

  def _read_checksums(self, step: int) -> dict | None:
    """The step's checksums, or None for a step saved without them (older jdet)."""
    path = self._step_dir(step) / "checksums"
    if not path.exists():
      log.warning("checkpoint %d has no checksums (saved by an older jdet): restored "
                  "without verifying its bytes", step)
      return None
    try:
      with logs.quiet_failure():
        got = self._manager.restore(step, args=ocp.args.Composite(
            checksums=ocp.args.JsonRestore()))["checksums"]
    except Exception as e:
      raise CheckpointDamagedError(step, path, f"unreadable checksums ({_describe(e)})") from None
    if not isinstance(got, dict) or not isinstance(got.get("state"), dict):
      raise CheckpointDamagedError(step, path, "checksums of an unexpected form")
    return got

  def _check_fits(self, step: int, template: Any, checksums: dict | None) -> None:
    """Compares the saved leaves (names, shapes, dtypes) with ``template``'s before reading.

    Raises :class:`CheckpointDamagedError` if the saved metadata cannot be read
    (or disagrees with the checksums written with it), and
    :class:`CheckpointMismatchError` if the step holds another state.
    """
    state_dir = self._step_dir(step) / "state"
    if not state_dir.exists():
      raise CheckpointDamagedError(step, state_dir, "folder missing")
    try:
      with logs.quiet_failure():
        metadata = ocp.StandardCheckpointHandler().metadata(state_dir)
      saved = {k: (tuple(v.shape), str(np.dtype(v.dtype)))
               for k, v in _flat(getattr(metadata, "tree", metadata)).items()}
    except Exception as e:
      raise CheckpointDamagedError(step, state_dir / "_METADATA",
                                   f"unreadable metadata ({_describe(e)})") from None
    if checksums is not None:
      recorded = {k: (tuple(v[1]), v[2]) for k, v in checksums["state"].items()}
      if recorded != saved:
        wrong = sorted(set(recorded.items()) ^ set(saved.items()))[:3]
        raise CheckpointDamagedError(step, state_dir / "_METADATA",
                                     f"metadata disagrees with the checksums saved with it "
                                     f"(first differences: {wrong})")
    wanted = {k: (tuple(np.shape(v)), str(np.dtype(v.dtype))) for k, v in _flat(template).items()}
    if saved == wanted:
      return
    missing = sorted(set(wanted) - set(saved), key=_params_first)
    extra = sorted(set(saved) - set(wanted), key=_params_first)
    differ = [f"{k}: {_shape_text(*saved[k])} in the checkpoint, {_shape_text(*wanted[k])} "
              f"in this run" for k in sorted(set(saved) & set(wanted), key=_params_first)
              if saved[k] != wanted[k]]
    parts = []
    if differ:
      parts.append(f"{len(differ)} leaves differ, first {differ[0]}"
                   + (f"; then {'; '.join(differ[1:3])}" if len(differ) > 1 else ""))
    if missing:
      parts.append(f"{len(missing)} leaves of this run are not in the checkpoint "
                   f"(first {missing[:3]})")
    if extra:
      parts.append(f"{len(extra)} saved leaves are not in this run (first {extra[:3]})")
    raise CheckpointMismatchError(
        f"checkpoint {step} in {self.directory} was saved by another model or optimiser: "
        f"{'. '.join(parts)}. The model and optimiser config must match the run that saved "
        f"it (to start another model from its weights use --config.init.weights, or a new "
        f"--workdir)")

  def _check_data_file(self, step: int, checksums: dict | None) -> None:
    """Reads this process's iterator position file and compares it with its checksum."""
    index, count = jax.process_index(), jax.process_count()
    path = self._step_dir(step) / "data" / f"process_{index}-of-{count}.json"
    if not path.exists():
      raise CheckpointDamagedError(step, path, "file missing (saved by another number of "
                                   "processes, or removed)")
    try:
      position = json.loads(path.read_text())
    except (OSError, ValueError) as e:
      raise CheckpointDamagedError(step, path, f"not a readable iterator position "
                                   f"({_describe(e)})") from None
    digests = (checksums or {}).get("data")
    if digests and index < len(digests) and _json_digest(position) != digests[index]:
      raise CheckpointDamagedError(step, path, "contents do not match their checksum")

  def restore(self, state_template: Any, *, step: int | None = None,
              data_iterator: grain.DatasetIterator | None = None) -> Any:
    """The state saved at ``step`` (default: the latest), verified.

    Args:
      state_template: a concrete state with the saved structure; its shapes,
        dtypes and shardings are used, its values ignored, its static fields kept.
      step: which checkpoint; ``None`` for the latest.
      data_iterator: if given and the step saved one, its position is restored
        in place (only once the state is verified).

    Raises:
      FileNotFoundError: no checkpoint at ``step`` (or none at all).
      CheckpointMismatchError: the step holds another model's or optimiser's
        state, or a position this pipeline cannot take.
      CheckpointDamagedError: a file of the step is missing, unreadable, or
        does not match its checksum.
    """
    self._manager.wait_until_finished()
    steps = list(self._manager.all_steps())
    if step is None:
      step = self._manager.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
    step = int(step)
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                              f"available steps: {sorted(steps)}")
    checksums = self._read_checksums(step)
    self._check_fits(step, state_template, checksums)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)
    try:
      with logs.quiet_failure():
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:
      raise CheckpointDamagedError(step, self._step_dir(step) / "state",
                                   f"arrays unreadable ({_describe(e)})") from None
    if checksums is not None:
      got = state_digests(restored)
      for name, (digest, *_) in checksums["state"].items():
        if digest is not None and got[name][0] is not None and got[name][0] != digest:
          raise CheckpointDamagedError(step, f"{self._step_dir(step) / 'state'} (leaf {name})",
                                       "values do not match their checksum (flipped bytes)")
    if data_iterator is not None:
      if (self._step_dir(step) / "data").exists():
        self._check_data_file(step, checksums)
        try:
          self._manager.restore(step, args=ocp.args.Composite(
              data=grain.checkpoint.CheckpointRestore(data_iterator)))
        except Exception as e:
          raise CheckpointMismatchError(
              f"checkpoint {step} in {self.directory}: the saved input position is intact but "
              f"does not fit this input pipeline ({_describe(e)}); data.num_workers, the data "
              f"source and data.group_by_aspect must stay the same across a resume") from e
      else:
        log.warning("checkpoint %d has no data iterator state; the input starts afresh", step)
    return restored

  def restore_latest_intact(self, state_template: Any, *,
                            data_iterator: grain.DatasetIterator | None = None) -> Any:
    """The newest step that restores and verifies; damaged newer steps are moved aside.

    Each damaged step (:class:`CheckpointDamagedError`) is logged with its
    problem and moved to ``checkpoints/damaged/<step>``; the next older one is
    tried. A mismatch (:class:`CheckpointMismatchError`) is raised at once: it
    is the run's config, not the files, and older steps would not fit either.

    Raises:
      FileNotFoundError: no checkpoint at all.
      CheckpointDamagedError: every step is damaged (all moved aside: starting
        again starts from step 0).
    """
    self._manager.wait_until_finished()
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    damaged = []
    for step in reversed(steps):
      error = None
      try:
        state = self.restore(state_template, step=step, data_iterator=data_iterator)
      except CheckpointDamagedError as e:
        error = e
      if not parallel.all_processes_agree(error is None):  # a step damaged for one is for all
        error = error or CheckpointDamagedError(step, self._step_dir(step),
                                                "damaged as read by another process")
      if error is not None:
        moved = self.move_aside(step)
        log.error("%s; moved to %s, trying the previous step", error, moved)
        damaged.append(error)
        continue
      if damaged:
        log.warning("resuming from checkpoint %d, the newest intact one (damaged and moved "
                    "aside: %s)", step, ", ".join(str(e.step) for e in damaged))
      return state
    raise CheckpointDamagedError(
        damaged[0].step, self.directory,
        f"every checkpoint is damaged ({'; '.join(str(e) for e in damaged)}); all were moved "
        f"to {self.directory / 'damaged'}, so the next start begins at step 0")

  def move_aside(self, step: int) -> epath.Path:
    """Moves step ``step``'s folder to ``checkpoints/damaged/<step>[.n]`` (never deletes it).

    Only process 0 moves; every process then forgets the step. Returns the new path.
    """
    target_dir = self.directory / "damaged"
    target = target_dir / str(step)
    n = 0
    while target.exists():
      n += 1
      target = target_dir / f"{step}.{n}"
    if jax.process_index() == 0:
      target_dir.mkdir(parents=True, exist_ok=True)
      self._step_dir(step).rename(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"jdet_move_aside_{step}")
    self._manager.reload()
    return target

  def latest_step(self) -> int | None:
    """The most recent saved step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """All kept steps, increasing."""
    return sorted(self._manager.all_steps())

  def best_step(self) -> int | None:
    """The kept step with the highest ``best_metric``, or None if no step has it."""
    return self._manager.best_step()

  def metrics(self, step: int) -> dict[str, float] | None:
    """The metrics recorded with ``step``, or None."""
    return self._manager.metrics(step)

  def remove_unfinished(self) -> list[str]:
    """Deletes the folders of saves that did not finish (``<step>.orbax-checkpoint-tmp``,
    e.g. after the disk filled up); returns their paths. Process 0 deletes."""
    found = sorted(str(p) for p in self.directory.glob("*.orbax-checkpoint-tmp*"))
    if jax.process_index() == 0:
      for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return found

  def wait(self) -> None:
    """Blocks until every started save is committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
