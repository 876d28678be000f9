"""Printing a resolved config: what a run would get, or what a run got.

::

  python -m jdet.config configs/ssd300.py:shapes --config.train.num_steps=100
  python -m jdet.config runs/ssd_shapes          # the config train.py saved in a workdir

A config file spec (``FILE[:variant]``) is loaded as ``train.py``'s ``--config``
loads it, with the same ``--config.a.b=value`` overrides; a folder is a run
directory whose ``config.json`` is printed. The output is YAML-like text, as
``ml_collections`` prints a config.
"""

from __future__ import annotations

import os
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
  """Prints the config that ``argv[1]`` names (see the module doc); returns the exit status."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1].startswith("-"):
    print(__doc__.strip(), file=sys.stderr)
    return 2
  spec, rest = argv[1], argv[2:]
  if os.path.isdir(spec):
    from jdet.engine.workdir import CONFIG_FILE, saved_config
    config = saved_config(spec)
    if config is None:
      print(f"error: {spec} has no {CONFIG_FILE} (train.py saves it)", file=sys.stderr)
      return 1
    if rest:
      print(f"error: overrides apply to a config file, not to a run's saved config: {rest}",
            file=sys.stderr)
      return 2
    print(config)
    return 0
  from absl import app
  from ml_collections import config_flags

  from jdet import cli
  from jdet.data import builder
  builder.put_configs_on_path()
  holder = config_flags.DEFINE_config_file("config", None, "config file[:variant]",
                                           lock_config=True)

  def show(_):
    print(holder.value)

  app.run(show, argv=[argv[0], f"--config={spec}", *rest], flags_parser=cli.parse_flags)
  return 0  # app.run exits itself


if __name__ == "__main__":
  sys.exit(main())
