"""One run per run directory: a lock, the run's saved config, a clear stop on a full disk.

* :class:`RunLock`: ``train.py`` holds ``WORKDIR/run.lock`` for its lifetime. The
  file names the holder (host, process id, start time); an OS lock on it
  (``fcntl.flock``) is what counts, so a killed process releases it with its
  last breath. A second ``train.py`` on the same workdir stops at start-up with
  :class:`WorkdirBusyError` naming the holder, before it reads or writes
  anything else there. A lock file left by a process that died (the OS lock is
  free, the file still there) is taken over with a warning. With several
  processes (``jax.distributed``) only process 0 takes the lock and every
  process learns whether it got it; ``eval.py`` and ``predict.py`` never take
  it, so they can read a workdir in use. On file systems without working
  ``flock`` across hosts (some NFS set-ups) the lock protects only against
  runs on the same host.
* :func:`check_resume`, :func:`record_start` and :func:`saved_config`: the
  resolved config of a run is saved as ``WORKDIR/config.json`` (which
  ``eval.py``, ``predict.py`` and the predictor read when no config is given) (and every start, with its command line and
  what changed, appended to ``WORKDIR/starts.jsonl``). A resume compares the
  new config with the saved one: every difference is listed in one warning;
  a change of :data:`FIXED_FIELDS` (the model, the training data) would make
  the resumed run a different run, and stops it with :class:`ConfigChangedError`
  naming the fields, unless the user allows changes (``train.py
  --allow_changes``).
* :func:`disk_full_guard`: an ``OSError`` of errno ``ENOSPC`` while the run
  writes becomes :class:`DiskFullError`: one line naming the workdir, what was
  being written and the free space; ``train.py`` exits with status
  :data:`DISK_FULL_STATUS` (28, the errno).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
from typing import Any, Iterator, Mapping

from jdet.errors import exception_chain

__all__ = ["RunLock", "WorkdirBusyError", "ConfigChangedError", "DiskFullError",
           "DISK_FULL_STATUS", "FIXED_FIELDS", "LOCK_FILE", "CONFIG_FILE", "STARTS_FILE",
           "check_resume", "record_start", "saved_config", "config_changes", "disk_full_guard",
           "is_disk_full"]

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
CONFIG_FILE = "config.json"
STARTS_FILE = "starts.jsonl"
DISK_FULL_STATUS = errno.ENOSPC  # 28
# Config fields whose change makes a resumed run another run (the model's shapes are
# also checked against the checkpoint, leaf by leaf).
FIXED_FIELDS = ("model_name", "model.num_classes", "data.train", "data.num_classes")


class WorkdirBusyError(RuntimeError):
  """Another run holds the workdir; the message names it."""


class ConfigChangedError(ValueError):
  """A resume would change fields that make it another run; the message names them."""


class DiskFullError(OSError):
  """No space left while the run was writing; the message names the workdir, what was
  being written and the free space."""

  def __init__(self, workdir: str, what: str, free_bytes: int | None, *, after: str = ""):
    free = "unknown" if free_bytes is None else f"{free_bytes / 2**20:.1f} MiB"
    super().__init__(errno.ENOSPC,
                     f"no space left on the device of {workdir} while writing {what} "
                     f"({free} free){'; ' + after if after else ''}; free some space and run "
                     f"the same command to resume")
    self.workdir, self.what, self.free_bytes = workdir, what, free_bytes

  def __str__(self) -> str:
    return self.strerror


# ----------------------------------------------------------------------------
# The lock.
# ----------------------------------------------------------------------------


class RunLock:
  """``WORKDIR/run.lock``, held while a run lives (see the module doc).

  Usage::

    with RunLock(workdir):
      ...   # the run

  Args:
    workdir: the run directory (created if missing).
    primary: whether this process takes the lock (process 0 of a multi-process run).
  """

  def __init__(self, workdir: str, *, primary: bool = True):
    self.workdir = os.fspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self.primary = primary
    self._fd: int | None = None

  def acquire(self) -> "RunLock":
    """Takes the lock or raises :class:`WorkdirBusyError` naming the holder."""
    if not self.primary:
      return self
    os.makedirs(self.workdir, exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES):
          raise
        raise WorkdirBusyError(f"{self.workdir} is in use by {_describe(_read_holder(self.path))}"
                               f" (it holds {self.path}); wait for that run to end, stop it, "
                               f"or use another --workdir") from None
      # The file may have been removed (a run ending) between open and flock: then
      # this lock is on a file nobody else sees; start again on the path's file.
      try:
        same = os.path.samestat(os.fstat(fd), os.stat(self.path))
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    previous = _read_holder(self.path, fd=fd)
    if previous:
      log.warning("taking over the lock of %s, which ended without releasing it (%s)",
                  _describe(previous), self.path)
    holder = dict(host=socket.gethostname(), pid=os.getpid(),
                  started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  command=" ".join(sys.argv))
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    """Removes the lock file and releases the lock (a clean end: nothing to take over)."""
    if self._fd is None:
      return
    with contextlib.suppress(FileNotFoundError):
      os.remove(self.path)
    os.close(self._fd)  # releases the flock
    self._fd = None

  def __enter__(self) -> "RunLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _read_holder(path: str, *, fd: int | None = None) -> dict:
  try:
    if fd is not None:
      text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
    else:
      with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read(4096)
    return json.loads(text) if text.strip() else {}
  except (OSError, ValueError):
    return {}


def _describe(holder: Mapping[str, Any]) -> str:
  if not holder:
    return "another run (its lock file names no holder)"
  return (f"process {holder.get('pid', '?')} on {holder.get('host', '?')} (started "
          f"{holder.get('started', '?')}: {holder.get('command', '?')})")


# ----------------------------------------------------------------------------
# The saved config.
# ----------------------------------------------------------------------------


def _plain(config: Any) -> dict:
  """The config as plain JSON values (tuples as lists; other objects as their repr)."""
  to_json = getattr(config, "to_json_best_effort", None)
  text = to_json() if to_json is not None else json.dumps(config, default=repr)
  return json.loads(text)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out if out or not prefix else {prefix[:-1]: {}}
  return {prefix[:-1]: tree}


def config_changes(saved: Mapping, new: Mapping) -> dict[str, tuple[Any, Any]]:
  """``{field: (saved value, new value)}`` for every leaf that differs (a missing one is
  ``"<absent>"``), both as plain JSON values."""
  a, b = _flatten(_plain(saved)), _flatten(_plain(new))
  absent = "<absent>"
  return {k: (a.get(k, absent), b.get(k, absent)) for k in sorted(set(a) | set(b))
          if a.get(k, absent) != b.get(k, absent)}


def _is_fixed(field: str) -> bool:
  return any(field == f or field.startswith(f + ".") for f in FIXED_FIELDS)


def check_resume(workdir: str, config: Any, *, allow_changes: bool = False) -> dict:
  """Compares ``config`` with the config saved in ``workdir`` by the run being resumed.

  Every difference is logged in one warning. Raises :class:`ConfigChangedError`
  for changes of :data:`FIXED_FIELDS` unless ``allow_changes``. Returns the
  changes (empty without a saved config, e.g. a new run)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    log.warning("the saved config %s cannot be read (%s); not comparing it", path, e)
    return {}
  changes = config_changes(saved, config)
  if not changes:
    return {}
  lines = [f"  {k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()]
  fixed = [k for k in changes if _is_fixed(k)]
  if fixed and not allow_changes:
    raise ConfigChangedError(
        f"resuming {workdir} would change {', '.join(fixed)}, which makes it another run; use "
        f"another --workdir, or --allow_changes to go on anyway. The fields that differ from "
        f"{path}:\n" + "\n".join(lines))
  log.warning("resuming %s with %d config field(s) changed from %s%s:\n%s", workdir,
              len(changes), path, " (allowed)" if fixed else "", "\n".join(lines))
  return changes


def saved_config(workdir: str):
  """The config that ``train.py`` saved in ``workdir`` (``config.json``) as a
  ``ConfigDict`` (lists as tuples, as the configs write them), or None if there is none."""
  path = os.path.join(os.fspath(workdir), CONFIG_FILE)
  if not os.path.isfile(path):
    return None
  import ml_collections
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))


def _tuples(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {k: _tuples(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return tuple(_tuples(v) for v in tree)
  return tree


def record_start(workdir: str, config: Any, *, changes: Mapping | None = None,
                 resumed_from: int | None = None) -> None:
  """Writes ``config.json`` (the resolved config) and appends this start to
  ``starts.jsonl`` (time, host, process, command line, resumed step, changes)."""
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(_plain(config), f, indent=1, sort_keys=True)
  os.replace(tmp, path)
  entry = dict(time=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               host=socket.gethostname(), pid=os.getpid(), argv=list(sys.argv),
               resumed_from=resumed_from,
               changes={k: list(v) for k, v in (changes or {}).items()})
  with open(os.path.join(workdir, STARTS_FILE), "a", encoding="utf-8") as f:
    f.write(json.dumps(entry, default=repr) + "\n")


# ----------------------------------------------------------------------------
# A full disk.
# ----------------------------------------------------------------------------


def is_disk_full(error: BaseException | None) -> bool:
  """Whether ``error`` or one of its causes is an ``OSError`` of errno ``ENOSPC``
  (orbax and tensorstore wrap it; their message may only say "No space left")."""
  return any((isinstance(e, OSError) and e.errno == errno.ENOSPC)
             or "No space left on device" in str(e) for e in exception_chain(error))


def free_bytes(path: str) -> int | None:
  try:
    return shutil.disk_usage(path).free
  except OSError:
    return None


@contextlib.contextmanager
def disk_full_guard(workdir: str, what: str) -> Iterator[None]:
  """Turns a full disk inside the block into :class:`DiskFullError` naming ``what``."""
  try:
    yield
  except DiskFullError:
    raise
  except Exception as e:
    if not is_disk_full(e):
      raise
    raise DiskFullError(workdir, what, free_bytes(workdir)) from e
