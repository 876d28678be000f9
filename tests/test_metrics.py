"""jdet.engine.metrics: CRC-32C, JSON lines, event files read back by TensorBoard, the progress line."""

import io
import json
import os
import re
import time

import numpy as np
import pytest

from jdet.engine import metrics

event_file_loader = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def test_crc32c_check_values():
  assert metrics.crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
  assert metrics.crc32c(b"") == 0
  assert metrics.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
  assert metrics.crc32c(b"\xff" * 32) == 0x62A8AB43  # RFC 3720 B.4: 32 bytes of ones


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_jsonl_round_trip_and_truncate(tmp_path):
  with metrics.MetricWriter(tmp_path) as w:
    for step in (10, 20, 30):
      w.write(step, {"train/loss": np.float32(step / 10), "lr": 0.01})
    w.flush()
    rows = _read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert rows[1]["train/loss"] == pytest.approx(2.0) and rows[1]["lr"] == 0.01
    assert all(isinstance(r["time"], float) for r in rows)
    w.flush()
    with open(tmp_path / "metrics.jsonl", "a") as f:
      f.write('{"step": 40, "train/lo')  # a line cut short by a crash
    w.truncate_after(20)  # resumed from step 20
    w.write(30, {"train/loss": 9.0})
  rows = _read_jsonl(tmp_path / "metrics.jsonl")
  assert [(r["step"], r["train/loss"]) for r in rows] == [(10, 1.0), (20, 2.0), (30, 9.0)]
  # A second writer (a resumed run) appends to the same file.
  with metrics.MetricWriter(tmp_path) as w:
    w.write(40, {"train/loss": 4.0})
  assert [r["step"] for r in _read_jsonl(tmp_path / "metrics.jsonl")] == [10, 20, 30, 40]
  with metrics.MetricWriter(tmp_path / "other") as w:
    with pytest.raises(ValueError, match="not a scalar"):
      w.write(1, {"x": np.ones(3)})


def test_event_file_read_by_tensorboard(tmp_path):
  values = {1: {"train/loss": 2.5, "lr": 1e-3}, 7: {"train/loss": 0.75, "lr": 2e-2}}
  with metrics.MetricWriter(tmp_path) as w:
    for step, scalars in values.items():
      w.write(step, scalars)
    path = w.events_path
  assert os.path.dirname(path) == str(tmp_path / "tensorboard")
  assert re.fullmatch(r"events\.out\.tfevents\.\d{10}\..+", os.path.basename(path))
  # TensorBoard's own reader checks both CRCs of every record; the raw events
  # carry simple_value, the migrated ones (what TensorBoard shows) a scalar tensor.
  raw = list(event_file_loader.LegacyEventFileLoader(path).Load())
  migrated = list(event_file_loader.EventFileLoader(path).Load())
  assert raw[0].file_version == "brain.Event:2" and len(raw) == len(migrated) == 3
  got, shown = {}, {}
  for event, event2 in zip(raw[1:], migrated[1:]):
    assert event.wall_time == pytest.approx(time.time(), abs=60)
    for value, value2 in zip(event.summary.value, event2.summary.value):
      got.setdefault(event.step, {})[value.tag] = value.simple_value
      assert value2.metadata.plugin_data.plugin_name == "scalars"
      shown.setdefault(event2.step, {})[value2.tag] = value2.tensor.float_val[0]
  assert got.keys() == shown.keys() == values.keys()
  for step in values:
    assert got[step] == pytest.approx(values[step], rel=1e-6)  # float32 on disk
    assert shown[step] == got[step]


def test_resumed_run_replaces_orphaned_events(tmp_path):
  with metrics.MetricWriter(tmp_path) as w:
    for step in (1, 2, 3):
      w.write(step, {"loss": float(step)})
  with metrics.MetricWriter(tmp_path) as w:  # resumed from a checkpoint at step 1
    w.truncate_after(1)
    for step in (2, 3):
      w.write(step, {"loss": 10.0 * step})
  assert len(os.listdir(tmp_path / "tensorboard")) == 2
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 20.0), (3, 30.0)]
  assert [r["step"] for r in _read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_disabled_writer_writes_nothing(tmp_path):
  with metrics.MetricWriter(tmp_path / "run", enabled=False) as w:
    w.write(1, {"loss": 1.0})
    w.truncate_after(0)
    w.flush()
  assert not (tmp_path / "run").exists()


def test_progress_bar_log_file(monkeypatch):
  clock = [100.0]
  monkeypatch.setattr(metrics.time, "monotonic", lambda: clock[0])
  out = io.StringIO()
  bar = metrics.ProgressBar(1000, initial_step=100, stream=out, min_interval=10.0)
  clock[0] = 110.0
  bar.update(200, loss=0.53219, **{"images/s": 45.1})  # 100 steps in 10 s -> 80 s left
  clock[0] = 112.0
  bar.update(220, loss=0.5)  # within min_interval: held back
  lines = out.getvalue().splitlines()
  assert lines == ["step 200/1000 (20.0%) | loss 0.5322 images/s 45.1 | "
                   "0:00:10 elapsed, ETA 0:01:20"]
  bar.close()  # prints the held-back line
  assert out.getvalue().splitlines()[-1].startswith("step 220/1000 (22.0%) | loss 0.5 |")
  assert "ETA 0:01:18" in out.getvalue().splitlines()[-1]  # 120 steps in 12 s, 780 left


def test_progress_bar_terminal_refreshes_one_line(monkeypatch):
  clock = [0.0]
  monkeypatch.setattr(metrics.time, "monotonic", lambda: clock[0])

  class Tty(io.StringIO):

    def isatty(self):
      return True

  out = Tty()
  with metrics.ProgressBar(50, stream=out) as bar:
    for step in (10, 20):
      clock[0] = step * 0.5
      bar.update(step, loss=1.0 / step)
  text = out.getvalue()
  assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1
  assert "step 20/50 (40.0%)" in text and "loss 0.05" in text and "ETA 0:00:15" in text
