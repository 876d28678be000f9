"""Training curves (``python -m jdet.plot``): runs' logs, hand-written, drawn overlaid."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from jdet import plot, viz


def _log(folder, records) -> str:
  folder.mkdir()
  (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records)
                                        + '{"step": 99, "ti')  # a line cut by a kill
  return str(folder)


def _run(folder, *, start: float, loss0: float, pause_after: int | None = None):
  records, t = [], start
  for step in range(1, 21):
    t += 2.0 + (600.0 if step - 1 == pause_after else 0.0)  # 2 s a step, a 10 min pause
    records.append(dict(step=step, time=t, loss=loss0 / step, cls_loss=loss0 / step / 2))
    if step % 10 == 0:
      records.append(dict(step=step, time=t + 1.0, **{"eval/AP": step / 40, "eval/AP50": step / 30}))
  return _log(folder, records)


def test_minutes_leave_out_a_resumed_runs_pause(tmp_path):
  records = plot.read_log(_run(tmp_path / "a", start=100.0, loss0=8.0, pause_after=5))
  assert records[-1]["step"] == 20  # the cut line is left out
  steps, minutes, loss = plot.curves(records, "loss")
  np.testing.assert_array_equal(steps, np.arange(1, 21))
  np.testing.assert_allclose(loss, 8.0 / np.arange(1, 21))
  # 2 s a step: the 10-minute pause counts as one typical interval, not 10 minutes.
  assert minutes[-1] < 2.0 and np.allclose(np.diff(minutes), np.diff(minutes)[0], atol=0.02)
  steps, _, ap = plot.curves(records, "eval/AP")
  np.testing.assert_array_equal(steps, [10, 20])
  np.testing.assert_allclose(ap, [0.25, 0.5])


def test_two_runs_overlaid_in_one_png(tmp_path):
  a = _run(tmp_path / "a", start=0.0, loss0=8.0)
  b = _run(tmp_path / "b", start=50.0, loss0=4.0)
  out = tmp_path / "curves.png"
  assert plot.main([a, b, "--out", str(out), "--names", "base,small"]) == 0
  image = cv2.cvtColor(cv2.imread(str(out), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
  h, w = plot.PANEL
  # loss, AP and AP50 against steps and minutes, and cls_loss: 7 panels, 2 a row.
  assert image.shape == (4 * h + 3 * 8, 2 * w + 8, 3)
  first = image[:h, :w]
  for k in (0, 1):  # each run's colour is drawn in the loss panel
    colour = np.asarray(viz.class_colour(k))
    assert (np.abs(first.astype(int) - colour).sum(-1) < 30).sum() > 50, k
  assert plot.main([a, str(tmp_path / "nothing"), "--out", str(out)]) == 1


def test_wrong_number_of_names_is_refused(tmp_path):
  a = _run(tmp_path / "a", start=0.0, loss0=8.0)
  with pytest.raises(SystemExit):
    plot.main([a, "--names", "x,y"])
