"""Training logs: a JSON-lines file, TensorBoard event files and a progress line.

:class:`MetricWriter` appends every logged dict of scalars to
``WORKDIR/metrics.jsonl`` (one JSON object per line, the format scripts and
plots read) and to a TensorBoard event file under ``WORKDIR/tensorboard/``.
The event file is written without TensorFlow: an ``Event`` protocol buffer is
a handful of fields, encoded here by hand::

  Event   { double wall_time = 1; int64 step = 2;
            oneof { string file_version = 3; Summary summary = 5; SessionLog session_log = 7; } }
  Summary { repeated Value value = 1; }
  Value   { string tag = 1; float simple_value = 2; }

and framed as TFRecords: ``uint64 length``, ``uint32 masked_crc32c(length)``,
``data``, ``uint32 masked_crc32c(data)``, all little-endian.

On resume, :meth:`MetricWriter.truncate_after` drops the lines logged after
the restored step and starts the new event file with a ``SessionLog START``
at the next step, TensorFlow's restart marker: TensorBoard's event
accumulator discards the old run's points from there on (its optional fast
Rust loader may not). The JSON lines never show the replayed steps twice.

:class:`ProgressBar` prints ``step/total``, percentage, the latest values,
elapsed time and ETA on one refreshed line (a terminal) or as a plain line
every ``min_interval`` seconds (a log file).

Only process 0 writes: other processes pass ``enabled=False``.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from typing import Any, Mapping, TextIO

import numpy as np

__all__ = ["MetricWriter", "ProgressBar", "crc32c", "masked_crc32c", "encode_event"]

# --------------------------------------------------------------------------
# CRC-32C (Castagnoli), reflected polynomial 0x82F63B78, as TFRecord uses.
# --------------------------------------------------------------------------


def _crc_table() -> tuple[int, ...]:
  table = np.arange(256, dtype=np.uint32)
  for _ in range(8):
    table = np.where(table & 1, (table >> 1) ^ np.uint32(0x82F63B78), table >> 1)
  return tuple(int(v) for v in table)


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
  """CRC-32C of ``data`` (``crc32c(b"123456789") == 0xE3069283``)."""
  crc = 0xFFFFFFFF
  table = _CRC_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The masked CRC of TFRecord framing: rotate right by 15, add a constant."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --------------------------------------------------------------------------
# Protocol buffer encoding of tensorboard Event messages.
# --------------------------------------------------------------------------


def _varint(value: int) -> bytes:
  if value < 0:
    value += 1 << 64  # int64: two's complement, ten bytes
  out = bytearray()
  while True:
    bits = value & 0x7F
    value >>= 7
    if value:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _tag(field: int, wire_type: int) -> bytes:
  return _varint((field << 3) | wire_type)


def _length_delimited(field: int, payload: bytes) -> bytes:
  return _tag(field, 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int, *, scalars: Mapping[str, float] | None = None,
                 file_version: str | None = None, session_start: bool = False) -> bytes:
  """One serialized ``Event``: scalars, a file version, or a ``SessionLog START``."""
  out = _tag(1, 1) + struct.pack("<d", wall_time) + _tag(2, 0) + _varint(int(step))
  if file_version is not None:
    out += _length_delimited(3, file_version.encode())
  if scalars:
    summary = b"".join(
        _length_delimited(1, _length_delimited(1, tag.encode()) + _tag(2, 5)
                          + struct.pack("<f", value))
        for tag, value in scalars.items())
    out += _length_delimited(5, summary)
  if session_start:
    out += _length_delimited(7, _tag(1, 0) + _varint(1))  # SessionLog{status: START}
  return out


def _record(data: bytes) -> bytes:
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc32c(length)) + data
          + struct.pack("<I", masked_crc32c(data)))


# --------------------------------------------------------------------------
# Writers.
# --------------------------------------------------------------------------


def _scalar(name: str, value: Any) -> float:
  try:
    return float(np.asarray(value).item())
  except (TypeError, ValueError):
    raise ValueError(f"metric {name!r} is not a scalar: {value!r}") from None


def _logged_step(line: str) -> float:
  """The step of a metrics.jsonl line; +inf for a line cut short by a crash."""
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    return math.inf


class MetricWriter:
  """Appends scalars to ``workdir/metrics.jsonl`` and a TensorBoard event file.

  Args:
    workdir: the run directory.
    enabled: False on processes other than 0: nothing is created or written.

  Each :meth:`write` adds one line ``{"step": ..., "time": ..., **scalars}``
  and one event with a scalar summary per key. Keys are TensorBoard tags
  (``"train/loss"``, ``"val/AP"``).
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
    self.enabled = enabled
    self.jsonl_path = os.path.join(os.fspath(workdir), "metrics.jsonl")
    self.events_dir = os.path.join(os.fspath(workdir), "tensorboard")
    self.events_path = None
    self._jsonl = self._events = None
    if not enabled:
      return
    os.makedirs(self.events_dir, exist_ok=True)
    now = time.time()
    name = f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}"
    path = os.path.join(self.events_dir, name)
    n = 0
    while os.path.exists(path):  # two writers in one second
      n += 1
      path = os.path.join(self.events_dir, f"{name}.{n}")
    self.events_path = path
    self._events = open(path, "wb")
    self._events.write(_record(encode_event(now, 0, file_version="brain.Event:2")))
    self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs ``scalars`` (numbers, NumPy or JAX scalars) at ``step``."""
    if not self.enabled:
      return
    values = {k: _scalar(k, v) for k, v in scalars.items()}
    now = time.time()
    self._jsonl.write(json.dumps({"step": int(step), "time": now, **values}) + "\n")
    self._events.write(_record(encode_event(now, int(step), scalars=values)))
    # Flushed every call: a live monitor sees each line, and a killed run loses none.
    self._jsonl.flush()
    self._events.flush()

  def truncate_after(self, step: int) -> None:
    """Forgets what was logged after ``step`` (call it when resuming from ``step``).

    Rewrites ``metrics.jsonl`` without the lines whose step is larger, and
    marks a restart at ``step + 1`` in the event file (TensorBoard then drops
    the older events from that step on).
    """
    if not self.enabled:
      return
    self._jsonl.close()
    with open(self.jsonl_path, encoding="utf-8") as f:
      kept = [line for line in f if _logged_step(line) <= step]
    tmp = self.jsonl_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(tmp, self.jsonl_path)
    self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
    self._events.write(_record(encode_event(time.time(), int(step) + 1, session_start=True)))

  def flush(self) -> None:
    """Pushes buffered lines and events to the files."""
    if self.enabled:
      self._jsonl.flush()
      self._events.flush()

  def close(self) -> None:
    """Flushes and closes the files; later writes are errors."""
    if self.enabled and self._jsonl is not None:
      self._jsonl.close()
      self._events.close()
      self._jsonl = self._events = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}:{m:02d}:{s:02d}"


def _value(v: Any) -> str:
  try:
    return f"{float(v):.4g}"
  except (TypeError, ValueError):
    return str(v)


class ProgressBar:
  """A progress line: ``step 120/1000 (12.0%) | loss 0.5321 images/s 45.1 | 0:01:02 < ETA 0:07:34``.

  Args:
    total_steps: the last step.
    initial_step: the step the run starts (or resumes) from; the rate, hence
      the ETA, counts the steps since then.
    stream: where to print; ``None`` is the current ``sys.stderr``.
    enabled: False on processes other than 0.
    min_interval: seconds between printed lines when ``stream`` is not a
      terminal (a log file); a terminal's line is refreshed on every update.
  """

  def __init__(self, total_steps: int, *, initial_step: int = 0, stream: TextIO | None = None,
               enabled: bool = True, min_interval: float = 10.0):
    self.total_steps = total_steps
    self.initial_step = initial_step
    self.stream = sys.stderr if stream is None else stream
    self.enabled = enabled
    self.min_interval = min_interval
    self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
    self._start = time.monotonic()
    self._last_print = -math.inf
    self._width = 0
    self._pending: str | None = None  # the latest line not yet printed (non-terminal)

  def format(self, step: int, **values: Any) -> str:
    """The line for ``step`` and ``values`` at the current time."""
    elapsed = time.monotonic() - self._start
    done = step - self.initial_step
    rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
    eta = (self.total_steps - step) / rate if rate > 0 else math.inf
    pct = 100.0 * step / self.total_steps if self.total_steps else 100.0
    parts = [f"step {step}/{self.total_steps} ({pct:.1f}%)"]
    if values:
      parts.append(" ".join(f"{k} {_value(v)}" for k, v in values.items()))
    parts.append(f"{_duration(elapsed)} elapsed, ETA {_duration(eta)}")
    return " | ".join(parts)

  def update(self, step: int, **values: Any) -> None:
    """Shows ``step`` and ``values`` (e.g. ``loss=0.53``, ``**{"images/s": 45.1}``)."""
    if not self.enabled:
      return
    line = self.format(step, **values)
    if self.tty:
      pad = max(0, self._width - len(line))
      self.stream.write("\r" + line + " " * pad)
      self._width = len(line)
      self.stream.flush()
      return
    now = time.monotonic()
    if now - self._last_print >= self.min_interval or step >= self.total_steps:
      self.stream.write(line + "\n")
      self.stream.flush()
      self._last_print, self._pending = now, None
    else:
      self._pending = line

  def close(self) -> None:
    """Ends the line (terminal) or prints the last update not yet shown (log file)."""
    if not self.enabled:
      return
    if self.tty and self._width:
      self.stream.write("\n")
      self._width = 0
    elif self._pending is not None:
      self.stream.write(self._pending + "\n")
      self._pending = None
    self.stream.flush()

  def __enter__(self) -> ProgressBar:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
