"""Trains a detector: ``python train.py --config configs/ssd300.py:shapes --workdir runs/ssd``.

Options of the config are overridden on the command line
(``--config.optim.lr=0.01 --config.train.num_steps=1000``). A workdir that
holds a checkpoint resumes from it. Several hosts: start the same command on
each with ``--distributed`` (and ``--coordinator_address``, ``--num_processes``,
``--process_id`` where the cluster does not provide them).
"""

from __future__ import annotations

import logging

from absl import app, flags
from ml_collections import config_flags

from jdet.data import builder

builder.put_configs_on_path()

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file[:variant]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, eval)")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "join other processes (jax.distributed)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "index of this process")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  from jdet import parallel, training
  if _DISTRIBUTED.value:
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  result = training.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if result["eval"]:
    logging.info("final evaluation: %s", {k: round(float(result["eval"][k]), 4)
                                          for k in ("AP", "AP50", "AP75") if k in result["eval"]})


if __name__ == "__main__":
  app.run(main)
