"""The state a run starts from, and the weights an evaluation reads.

* :func:`init_state`: the :class:`~jdet.engine.train_state.TrainState` at step 0
  (initial variables, the weights of ``config.init``, the optimiser);
* :func:`load_initial_weights`: ``config.init``'s files into a model's variables;
* :func:`restore_for_eval`: a checkpoint of a run directory (or, with none,
  ``config.init``'s weights), for ``eval.py`` and the predictor.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdet import parallel
from jdet.engine import optim
from jdet.engine.checkpoint import CheckpointDamagedError, Checkpointer
from jdet.engine.train_state import TrainState

__all__ = ["NoCheckpointError", "model_variables", "init_state", "load_initial_weights",
           "restore_for_eval"]

log = logging.getLogger(__name__)


def model_variables(model, batch: dict[str, np.ndarray], seed: int) -> dict[str, Any]:
  """``model.init`` on one image of ``batch`` (shapes only matter)."""
  image = jnp.asarray(batch["image"][:1])
  return jax.jit(lambda key: model.init(key, image))(jax.random.key(seed))


def load_initial_weights(variables: dict[str, Any], init_config: Any) -> dict[str, Any]:
  """Applies ``config.init`` to the model's ``variables`` (``params`` and
  ``batch_stats``): ``weights`` (a whole converted model) and then ``backbone``
  (ImageNet weights for the backbone), each a path to a torch state dict
  (``.pth``, read with ``weights_only=True``), ``.safetensors`` or ``.npz``.
  Returns the new variables."""
  backbone = getattr(init_config, "backbone", "") if init_config is not None else ""
  weights = getattr(init_config, "weights", "") if init_config is not None else ""
  if not backbone and not weights:
    return variables
  for name, path in (("weights", weights), ("backbone", backbone)):
    if path and not os.path.isfile(path):
      raise NoCheckpointError(f"config.init.{name}: weights file {path} not found")
  from jdet import convert  # torch is only needed for .pth files
  if weights:
    variables = convert.load_model_variables(weights, variables)
  if backbone:
    variables = convert.load_backbone_variables(backbone, variables)
  return variables


class NoCheckpointError(FileNotFoundError):
  """Nothing to evaluate: no run directory, no checkpoint (of that step), no weights file;
  the message names the path."""


def init_state(model, config, sample_batch: dict[str, np.ndarray], *, total_steps: int,
               load_weights: bool = True):
  """``(TrainState, schedule)`` at step 0: initial variables, weights from
  ``config.init`` (if ``load_weights``), the optimiser of ``config.optim``."""
  variables = model_variables(model, sample_batch, int(config.train.seed))
  if load_weights:
    variables = load_initial_weights(variables, config.get("init"))
  # The model's frozen parameters (e.g. frozen ResNet stages) follow its fields.
  tx, schedule = optim.build_optimizer(config.optim, total_steps=total_steps,
                                       frozen=model.frozen_parameters())
  state = TrainState.create(params=variables["params"], batch_stats=variables.get("batch_stats", {}), tx=tx,
                            rng=jax.random.key(int(config.train.seed) + 1))
  return state, schedule


def restore_for_eval(model, config, workdir: str, sample_batch: dict[str, np.ndarray], *,
                     mesh, step: int | None = None) -> tuple[dict[str, Any], int | None]:
  """The variables to evaluate: checkpoint ``step`` (default the latest) of
  ``workdir``; with no checkpoint at all, the weights of ``config.init``
  (e.g. converted torchvision weights). Returns ``(variables, step or None)``."""
  directory = os.path.join(workdir, "checkpoints")
  init = config.get("init")
  has_init = bool(init and (init.get("weights") or init.get("backbone")))
  # Checked before anything is created or the model initialised (minutes of compiling).
  if not os.path.isdir(directory) and (step is not None or not has_init):
    where = (f"no run directory {workdir}" if not os.path.isdir(workdir)
             else f"no checkpoint in {directory}")
    if step is not None:
      raise NoCheckpointError(f"no checkpoint for step {step} in {directory} ({where}); "
                              f"available steps: []")
    raise NoCheckpointError(f"{where} and no config.init.weights to evaluate; train first or "
                            f"pass --config.init.weights=FILE")
  ckpt = Checkpointer(directory)
  try:
    if step is not None and step not in ckpt.all_steps():
      raise NoCheckpointError(f"no checkpoint for step {step} in {ckpt.directory}; "
                              f"available steps: {ckpt.all_steps()}")
    if step is None and ckpt.latest_step() is None and not has_init:
      raise NoCheckpointError(f"no checkpoint in {ckpt.directory} and no config.init.weights "
                              f"to evaluate; train first or pass --config.init.weights=FILE")
    state, _ = init_state(model, config, sample_batch,
                          total_steps=int(config.train.num_steps), load_weights=False)
    if step is None and ckpt.latest_step() is None:
      log.info("no checkpoint in %s: evaluating the weights of config.init", ckpt.directory)
      variables = load_initial_weights(state.variables, init)
      state = state.replace(params=variables["params"],
                            batch_stats=variables.get("batch_stats", state.batch_stats))
      return parallel.replicate(state.variables, mesh), None
    try:
      state = ckpt.restore(parallel.replicate(state, mesh), step=step)
    except CheckpointDamagedError as e:
      others = [s for s in ckpt.all_steps() if s != e.step]
      raise CheckpointDamagedError(
          e.step, e.path, f"{e.problem}. Not evaluated; other steps: {others or 'none'} "
          f"(--step N); train.py moves a damaged step aside when it resumes") from None
    return state.variables, int(state.step)
  finally:
    ckpt.close()
