"""``bench/run_all.py``: the GPU command, proved on the CPU by a dry run, and its pieces.

The dry run takes bench/README.md's exact GPU command (``--device cuda --dtype
bfloat16``), adds ``--dry_run`` and runs it in this process: without a GPU its
cases run on the CPU, with the same models, conversions and peers (torchvision,
MMDetection) on tiny inputs, jdet's steps traced and lowered in bfloat16, each
peer called once under bfloat16 autocast. Any argument, import, shape or dtype
error of the GPU command fails here first.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import harness  # noqa: E402  (bench/harness.py)
import run_all  # noqa: E402  (bench/run_all.py)


def _gpu_command() -> list[str]:
  """The arguments of bench/README.md's one-line GPU command."""
  lines = [line.strip() for line in (ROOT / "bench" / "README.md").read_text().splitlines()
           if line.strip().startswith("python bench/run_all.py") and "--device cuda" in line]
  assert len(lines) == 1, f"bench/README.md should give one GPU command, found {lines}"
  words = shlex.split(lines[0])
  assert words[:2] == ["python", "bench/run_all.py"]
  return words[2:]


def test_readme_gpu_command_parses():
  args = run_all.parse_args(_gpu_command())
  assert (args.device, args.dtype) == ("cuda", "bfloat16")
  assert args.budget_s <= 600  # a GPU lease runs one command for at most 10 minutes
  assert args.programs == list(run_all.PROGRAMS)


def test_bad_arguments_are_refused():
  for argv in (["--only", "ssd,yolo"], ["--budget_s", "0"], ["--device", "tpu"]):
    with pytest.raises(SystemExit):
      run_all.parse_args(argv)


def test_peak_table():
  assert harness.table_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
  assert harness.table_peak_tflops("NVIDIA H200") == 989.4
  assert harness.table_peak_tflops("NVIDIA H100 PCIe") == 756.0
  assert harness.table_peak_tflops("cpu") is None
  flops, _ = harness.peak_flops(123.0)
  assert flops == 123e12


def test_text_table_aligns_formats_and_blanks_missing_values():
  rows = [dict(case="train", batch=8, ms=1234.567, ratio=0.5),
          dict(case="inference", batch=16, ms=9.0, ratio=None)]
  table = harness.text_table(rows, [("case", "case", ""), ("batch", "batch", ""),
                                    ("jdet ms", "ms", ".0f"), ("jdet/tv", "ratio", ".2f")])
  # Hand-written: first column left-aligned, the others right-aligned, two spaces apart.
  assert table.splitlines() == ["case       batch  jdet ms  jdet/tv",
                                "train          8     1235     0.50",
                                "inference     16        9"]
  assert harness.parse_ints("1,8,") == [1, 8] and harness.parse_hw("384,640") == (384, 640)


def test_plan_iters_shares_what_is_spare():
  # 100 s left, the later cases need 40 s, 3 cases left (this one included): 20 s each.
  assert run_all.plan_iters(100.0, 40.0, 3, 2.0, max_iters=50) == 10
  assert run_all.plan_iters(100.0, 40.0, 3, 2.0, max_iters=4) == 4
  assert run_all.plan_iters(10.0, 40.0, 3, 2.0, max_iters=50) == 1  # never below one call


def _row(kind, case, **extra):
  row = dict(name=f"X {case}", group="X", case=case, batch=2, input_size="8x8", peer="torch",
             kind=kind, notes="", settings={}, iters=3)
  row.update(extra)
  return row


def test_figures_markdown_and_readme(tmp_path):
  # A 2e12-FLOP step: jdet 1 s, peer 2 s, on a 1e13 FLOP/s device -> 20 % and 10 % MFU.
  timing = lambda median: dict(compile_s=5.0, first_s=1.0, step_s=[median], median_s=median,
                               flops=2e12, memory_bytes=2**30, peak_memory_bytes=None)
  model = _row("model", "train", jdet=timing(1.0), peer_timing=timing(2.0))
  model["figures"] = run_all.figures(model, 1e13)
  f = model["figures"]
  assert f["jdet_img_s"] == 2.0 and f["peer_img_s"] == 1.0 and f["ratio"] == 2.0
  assert f["jdet_mfu"] == pytest.approx(0.2) and f["peer_mfu"] == pytest.approx(0.1)
  assert run_all.summary_line(model) == "X train: 2.00 img/s, 20.0 % MFU, 2.00 x torch"
  op = _row("op", "nms", jdet=timing(0.001), peer_timing=timing(0.002))
  op["figures"] = run_all.figures(op, 1e13)
  failed = _row("model", "inference", error="ValueError: boom")
  skipped = _row("data", "shapes", skipped="skipped: needs about 9 s, 1 s left")
  result = dict(suite=True, machine=dict(jax_device="cpu: cpu", torch_device="cpu", cpu_count=2,
                                         jax="0", torch="0", torchvision="0", mmdet="0",
                                         peak_flops=1e13, peak_source="test"),
                settings=dict(dtype="float32", started="now", wall_s=10.0, budget_s=480.0,
                              load_average_start=[1.0], load_average_end=[1.0]),
                rows=[model, op, failed, skipped])
  run_all.write(tmp_path, "cpu", result)
  assert json.loads((tmp_path / "cpu.json").read_text())["rows"][0]["figures"]["ratio"] == 2.0
  text = (tmp_path / "cpu.md").read_text()
  assert "| X | train | 2 | 8x8 | 2.00 | torch | 1.00 | 2.00 | 20.0 % | 10.0 % | 2000.0 |" in text
  assert "| nms | 1.00 | torch | 2.00 | 2.00 |" in text
  assert "error: ValueError: boom" in text and "skipped: needs about 9 s" in text

  readme = tmp_path / "README.md"
  readme.write_text(f"# t\n\nbefore\n\n{run_all.BEGIN}\nold\n{run_all.END}\n\nafter\n")
  run_all.update_readme(readme, tmp_path)
  new = readme.read_text()
  assert "old" not in new and "before" in new and "after" in new
  assert "| X | train | 2 | 8x8 | 2.00 |" in new and "bench/results/cpu.json" in new
  run_all.update_readme(readme, tmp_path)  # idempotent
  assert readme.read_text() == new


@pytest.mark.slow
def test_dry_run_of_the_gpu_command(tmp_path):
  result = run_all.main(_gpu_command() + ["--dry_run", "--out", str(tmp_path)])
  rows = result["rows"]
  errors = [f"{r['name']}: {r['error']}" for r in rows if "error" in r]
  assert not errors, errors
  assert not [r for r in rows if "skipped" in r]
  assert result["settings"]["dtype"] == "bfloat16" and result["settings"]["dry_run"]
  groups = {r["group"] for r in rows}
  assert groups == {"SSD300", "RefineDet320", "RefineDet512", "Faster R-CNN R50-FPN",
                    "Sparse R-CNN R50-FPN", "ops", "input pipeline"}
  peers = {r["group"]: r["peer"] for r in rows if r["kind"] == "model"}
  assert peers["SSD300"] == "torchvision" and peers["Sparse R-CNN R50-FPN"].startswith("MMDetection")
  for r in rows:  # every case built and lowered jdet's step and called (or lowered) its peer
    assert r["jdet"]["compile_s"] is not None, r["name"]
    peer = r.get("peer_timing")
    if r["peer"] and not r.get("peer_reused"):
      if peer["framework"] == "jax":  # jdet's SSD beside RefineDet: lowered too
        assert peer["compile_s"] is not None, r["name"]
      else:
        assert peer["first_s"] > 0, r["name"]
  assert {r["case"] for r in rows if r["group"] == "Sparse R-CNN R50-FPN"} == {"train", "inference"}
  stem = next(tmp_path.glob("*.json")).stem
  assert (tmp_path / f"{stem}.md").is_file()
  assert not harness.JaxStep.lower_only  # main leaves the process as it was
