"""The class names of a run, kept beside its checkpoints.

``train.py`` writes ``WORKDIR/class_names.json`` (``{"class_names": [...]}``,
label ``i`` is ``class_names[i]``) when it starts, from the training data, so
that whatever later reads the checkpoints (:class:`jdet.predict.Predictor`,
``predict.py``) shows names rather than label ids even without the data.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

__all__ = ["CLASS_NAMES_FILE", "write_class_names", "read_class_names"]

CLASS_NAMES_FILE = "class_names.json"


def write_class_names(workdir: str | os.PathLike, names: Sequence[str]) -> str:
  """Writes ``names`` (in label order) to ``workdir/class_names.json``, atomically.

  Returns the path written."""
  path = os.path.join(os.fspath(workdir), CLASS_NAMES_FILE)
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump({"class_names": [str(n) for n in names]}, f, indent=1)
  os.replace(tmp, path)
  return path


def read_class_names(workdir: str | os.PathLike) -> tuple[str, ...] | None:
  """The names of ``workdir/class_names.json``, or None if the run has none.

  Raises:
    ValueError: the file is not ``{"class_names": [str, ...]}`` (the message names it).
  """
  path = os.path.join(os.fspath(workdir), CLASS_NAMES_FILE)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not JSON: {e}") from None
  names = data.get("class_names") if isinstance(data, dict) else None
  if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
    raise ValueError(f"{path} must hold {{\"class_names\": [\"name\", ...]}}")
  return tuple(names)
