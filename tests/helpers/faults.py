"""Fault injection: damaging files, and a pickle that records being unpickled."""

from __future__ import annotations

import os


def largest_file(folder) -> str:
  """The largest file anywhere under ``folder``."""
  files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
  return max(files, key=os.path.getsize)


def truncate_file(path, keep: float = 0.5) -> None:
  """Cuts ``path`` to the first ``keep`` of its bytes."""
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(int(size * keep))


def flip_bytes(path, count: int = 3) -> None:
  """Inverts ``count`` bytes in the middle of ``path``."""
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    for k in range(count):
      f.seek(size // 2 + 13 * k)
      byte = f.read(1)[0]
      f.seek(size // 2 + 13 * k)
      f.write(bytes([byte ^ 0xFF]))


# A pickle whose loading would call this function: a safe reader (weights_only) must refuse it.
UNPICKLED = []


def _record_unpickling():
  UNPICKLED.append(True)
  return "payload"


class Payload:
  """Pickles to a call of :func:`_record_unpickling`: unpickling it appends to ``UNPICKLED``."""

  def __reduce__(self):
    return (_record_unpickling, ())
