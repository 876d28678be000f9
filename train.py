"""Trains a detector: ``python train.py --config configs/ssd300.py:shapes --workdir runs/ssd``.

Options of the config are overridden on the command line
(``--config.optim.lr=0.01 --config.train.num_steps=1000``). A workdir that
holds a checkpoint resumes from it. Several hosts: start the same command on
each with ``--distributed`` (and ``--coordinator_address``, ``--num_processes``,
``--process_id`` where the cluster does not provide them).

One run at a time per workdir: a second ``train.py`` on a workdir in use stops
at once naming the run that holds it. The resolved config is saved as
``WORKDIR/config.json``; a resume lists every changed field in a warning and
refuses a change of the model or the training data (``--allow_changes`` goes
on anyway). Library logs (orbax, jax) show with ``--verbosity=0``.

Exit status: 0 when the run reached ``train.num_steps``; after SIGTERM (or a
first Ctrl-C) the program saves a checkpoint and exits with ``128 + signal``
(143 for SIGTERM, 130 for SIGINT), as a shell reports a job killed by that
signal, so that a scheduler restarts the preempted job; 28 when the disk is
full (the incomplete checkpoint removed, the earlier ones intact: free space
and run the same command); 1 on another error.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

# Keep freed host memory in the process (jdet/engine/hostmem.py: a quarter of a CPU training
# step went to zero-filling fresh pages); set before jdet imports jax. 0 turns it off.
os.environ.setdefault("JDET_KEEP_HOST_MEMORY", "1")

from absl import app, flags  # noqa: E402

from jdet import cli  # noqa: E402

log = logging.getLogger("jdet.train")
_CONFIG = cli.define_flags("run directory (checkpoints, metrics, eval)")
_ALLOW_CHANGES = flags.DEFINE_bool(
    "allow_changes", False, "resume even where the config changes the model or the training "
    "data (every change is listed in a warning either way)")


def main(argv) -> None:
  cli.start(argv)
  from jdet.engine import training
  with cli.exit_on_errors():
    result = training.train_and_evaluate(_CONFIG.value, flags.FLAGS.workdir,
                                         allow_changes=_ALLOW_CHANGES.value)
  if result["stopped"]:
    # A process stopped because another one got the signal exits as if it got SIGTERM.
    sig = signal.Signals(result["signal"] or signal.SIGTERM)
    code = 128 + int(sig)
    log.warning("stopped by %s at step %d (checkpoint saved); exiting with status %d",
                    sig.name, result["step"], code)
    sys.exit(code)
  if result["eval"]:
    log.info("final evaluation: %s", {k: round(float(result["eval"][k]), 4)
                                          for k in ("AP", "AP50", "AP75") if k in result["eval"]})


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
