"""Host memory: keep freed memory in the process instead of giving it back at every step.

XLA's CPU runtime allocates a step's large buffers afresh at every call. With
glibc's default settings each allocation of more than a few megabytes is a new
``mmap`` that is unmapped when freed, so the next step touches fresh pages and
the kernel zero-fills every one of them: about 54,000 page faults, a quarter of
the 2-core CPU's time, in a training step of the Sparse R-CNN quick start.
:func:`keep_freed_memory` switches glibc's allocator to its heap for every size
and stops it trimming that heap, so a step reuses the pages of the one before
(``bench/hostmem.py`` measures both).

``train.py`` and ``eval.py`` turn it on; in your own program set
``JDET_KEEP_HOST_MEMORY=1`` in the environment before ``import jdet`` (the
package applies it first, before it imports jax), or call
:func:`keep_freed_memory` before the first large allocation. ``0`` turns it off
for the programs. The cost: memory freed by the process stays with it (its
resident size is about its peak), which is what a training job wants.

This module imports nothing heavy: ``jdet/__init__.py`` runs it before jax.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

ENV = "JDET_KEEP_HOST_MEMORY"

# glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# mallopt takes an int: the largest top of the heap kept untrimmed.
_NEVER_TRIM = 2**31 - 1

_applied: bool | None = None


def keep_freed_memory() -> bool:
  """Sets glibc's allocator to serve every size from its heap and never trim it.

  Returns whether it was applied: False where the C library is not glibc
  (macOS, musl), where the call failed, or when ``JDET_KEEP_HOST_MEMORY=0``.
  Idempotent; applies to this process only (forked children inherit it).
  """
  global _applied
  if _applied is not None:
    return _applied
  _applied = False
  if os.environ.get(ENV, "").strip() == "0" or not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # mallopt returns 1 on success.
  _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
  if not _applied:
    logging.warning("glibc's mallopt refused the settings; host memory is handled by default")
  return _applied


def is_applied() -> bool:
  """Whether :func:`keep_freed_memory` has been applied in this process."""
  return bool(_applied)


def apply_from_environment() -> bool:
  """:func:`keep_freed_memory` when ``JDET_KEEP_HOST_MEMORY=1`` (``import jdet`` calls this)."""
  if os.environ.get(ENV, "").strip() == "1":
    return keep_freed_memory()
  return False
