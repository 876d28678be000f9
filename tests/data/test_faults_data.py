"""Bad input injected into real runs: nothing dropped silently, every skip totalled once.

Each test feeds a fault a user's data has (a box beyond ``data.max_boxes``,
an image that cannot be decoded, a greyscale image, a file read again every
epoch, a worker process that notes it) and asserts that it is counted and
reported: in ``metrics.jsonl``, in the end-of-run summary, once per file.
"""

from __future__ import annotations

import io
import json
import logging
import os

import jax
import numpy as np
import pytest
from PIL import Image

import jdet
from jdet.data import builder, images, pipeline, records
from jdet.data.coco import CocoSource
from jdet.data.records import DataReport, SkipLog
from jdet.engine import training

from configs import ssd300 as ssd300_config

NUM_IMAGES = 12  # of the small COCO set; the last one cannot be decoded, the first is grey


def _coco_set(root) -> tuple[str, str]:
  """A COCO-format set of 64 x 64 images with two boxes each (five categories); image 11 is
  truncated to 40 bytes (undecodable), image 0 is greyscale (converted, a counted fix)."""
  rng = np.random.default_rng(0)
  image_dir = os.path.join(root, "images")
  os.makedirs(image_dir, exist_ok=True)
  images, annotations = [], []
  for i in range(NUM_IMAGES):
    name = f"{i:04d}.png"
    pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert("L") if i == 0 else Image.fromarray(pixels)
    image.save(os.path.join(image_dir, name))
    images.append(dict(id=i + 1, file_name=name, height=64, width=64))
    for k in range(2):
      annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, category_id=1 + (i + k) % 5,
                              bbox=[4.0 + 24 * k, 6.0, 20.0, 30.0], area=600.0, iscrowd=0))
  bad = os.path.join(image_dir, f"{NUM_IMAGES - 1:04d}.png")
  with open(bad, "r+b") as f:
    f.truncate(40)
  ann_file = os.path.join(root, "instances.json")
  with open(ann_file, "w") as f:
    json.dump(dict(images=images, annotations=annotations,
                   categories=[dict(id=c, name=f"class{c}") for c in range(1, 6)]), f)
  return ann_file, image_dir


def _coco_split(ann_file: str, image_dir: str) -> dict:
  # check_sizes=False: the bad image is only found when it is read, in the pipeline.
  return dict(kind="coco", annotation_file=ann_file, image_root=image_dir, check_sizes=False)


def test_a_bad_file_read_every_epoch_is_warned_about_once(tmp_path, caplog):
  log = SkipLog("epochs")
  records.drain_notes()
  with caplog.at_level(logging.WARNING, logger="jdet.data"):
    for _ in range(3):  # three epochs
      log.skip("unreadable image", file=str(tmp_path / "a.jpg"), record=7)
      log.fix("L (greyscale) image converted to RGB", file=str(tmp_path / "b.jpg"), record=8)
  assert caplog.text.count("a.jpg") == 1 and caplog.text.count("b.jpg") == 1
  assert log.counts() == {"skipped: unreadable image": 3,  # every occurrence, as before
                          "fixed: L (greyscale) image converted to RGB": 3}
  report = DataReport()
  assert report.add(records.drain_notes()) == 2  # distinct items
  assert report.totals() == {"skipped": 1, "fixed": 1}
  assert report.counts() == {"epochs: fixed: L (greyscale) image converted to RGB": 1,
                             "epochs: skipped: unreadable image": 1}
  assert records.drain_notes() == []  # collected once


@pytest.mark.parametrize("group_by_aspect", [False, True])
def test_a_worker_processs_skips_reach_the_training_process(tmp_path, group_by_aspect):
  ann_file, image_dir = _coco_set(tmp_path)
  source = CocoSource(ann_file, image_dir, check_sizes=False)
  transform = builder.build_transforms(ssd300_config.get_config("smoke").data, train=True)
  records.drain_notes()
  it = pipeline.train_batches(source, transform, batch_size=4, seed=0, num_workers=1,
                              group_by_aspect=group_by_aspect, data_notes=True)
  from_worker = DataReport()
  for _ in range(2 * NUM_IMAGES // 4):  # two epochs
    batch = next(it)
    assert set(batch) == set(pipeline.BATCH_KEYS) | {pipeline.NOTES_KEY}
    from_worker.add(records.decode_notes(str(batch[pipeline.NOTES_KEY])))
  # Decoding happens in the worker only: what it noted came back inside the batches.
  decoded = {(os.path.basename(n[3]), f"{n[1]}: {n[2]}") for n in from_worker.items()}
  assert decoded == {("0011.png", "skipped: unreadable image"),
                     ("0000.png", "fixed: L (greyscale) image converted to RGB")}, decoded
  assert from_worker.counts() == {"coco instances.json: skipped: unreadable image": 1,
                                  "coco instances.json: fixed: L (greyscale) image converted to "
                                  "RGB": 1}
  # Grouping reads the image sizes (and one sample) in this process: noted here, once.
  here = records.drain_notes()
  assert bool(here) == group_by_aspect
  assert all(os.path.basename(n[3]) in ("0000.png", "0011.png") for n in here)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_evaluation_returns_the_skips_of_its_reading_workers(tmp_path, num_workers):
  from jdet import parallel
  from jdet.evaluation import loop
  ann_file, image_dir = _coco_set(tmp_path)
  config = ssd300_config.get_config("smoke")
  config.data.val = _coco_split(ann_file, image_dir)
  config.data.update(num_workers=num_workers, eval_batch_size=4)
  model = jdet.build_model(config.model_name, **config.model)
  size = int(config.model.image_size)
  variables = model.init(jax.random.key(0), np.zeros((1, size, size, 3), np.float32))
  records.drain_notes()
  result = loop.evaluate_split(model, variables, config.data,
                               mesh=parallel.make_mesh(jax.devices()[:1]))
  report = DataReport()
  report.add(result.data_notes)
  report.add(records.drain_notes())  # what this process noted outside the batches
  decoded = {(os.path.basename(n[3]), f"{n[1]}: {n[2]}") for n in report.items()}
  assert decoded == {("0011.png", "skipped: unreadable image"),
                     ("0000.png", "fixed: L (greyscale) image converted to RGB")}, decoded
  if num_workers:  # decoding happened in the worker: the notes came inside the batches
    assert len(result.data_notes) == 2
  assert "AP" in result.metrics


def test_training_logs_cut_boxes_and_totals_skips_from_workers(tmp_path, caplog):
  ann_file, image_dir = _coco_set(tmp_path / "data")
  config = ssd300_config.get_config("smoke")
  config.data.train = _coco_split(ann_file, image_dir)
  config.data.num_workers = 1
  config.data.max_boxes = 1  # every image has two boxes: one is cut from each
  config.train.update(num_steps=4, eval_every=0, log_every=2, checkpoint_every=0)
  workdir = tmp_path / "run"
  with caplog.at_level(logging.INFO, logger="jdet.engine.training"):
    training.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1], progress=False)

  # What the pipeline itself says it cut in the same batches (same seed, same order).
  reference = pipeline.train_batches(
      CocoSource(ann_file, image_dir, check_sizes=False),
      builder.build_transforms(config.data, train=True), batch_size=4, seed=int(config.data.seed))
  batches = [next(reference) for _ in range(4)]
  cut = [int((b["truncated_boxes"] * b["valid"]).sum()) for b in batches]
  assert sum(cut) > 0

  with open(workdir / "metrics.jsonl") as f:
    lines = [json.loads(line) for line in f if "loss" in line]
  assert [m["step"] for m in lines] == [2, 4]
  assert [m["data/truncated_boxes"] for m in lines] == [sum(cut[:2]), sum(cut[2:])]
  assert lines[-1]["data/truncated_boxes_total"] == sum(cut)
  assert lines[-1]["data/skipped"] == 1 and lines[-1]["data/fixed"] == 1  # from the worker
  assert "raise data.max_boxes" in caplog.text
  summary = [r.getMessage() for r in caplog.records if "input summary" in r.getMessage()]
  assert len(summary) == 1, summary
  assert f"{sum(cut)} boxes beyond data.max_boxes=1" in summary[0]
  assert "1 x coco instances.json: skipped: unreadable image" in summary[0]
  assert "1 x coco instances.json: fixed: L (greyscale) image converted to RGB" in summary[0]


def _voc_tree(root, images: dict[str, tuple[tuple[int, int], tuple[int, int], list]]) -> str:
  """A VOC-layout tree: ``{name: ((h, w) of the image, (h, w) in <size>, [(xmin, ymin, xmax,
  ymax), ...])}``, every object a "raccoon"."""
  for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
    os.makedirs(os.path.join(root, folder), exist_ok=True)
  for name, ((h, w), (sh, sw), boxes) in images.items():
    Image.new("RGB", (w, h), (90, 120, 30)).save(os.path.join(root, "JPEGImages", f"{name}.jpg"))
    objects = "".join(
        f"<object><name>raccoon</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for b in boxes)
    with open(os.path.join(root, "Annotations", f"{name}.xml"), "w") as f:
      f.write(f"<annotation><filename>{name}.jpg</filename><size><width>{sw}</width>"
              f"<height>{sh}</height><depth>3</depth></size>{objects}</annotation>")
  with open(os.path.join(root, "ImageSets", "Main", "train.txt"), "w") as f:
    f.write("\n".join(images) + "\n")
  return root


def test_voc_size_that_is_no_uniform_scale_keeps_the_boxes(tmp_path):
  from jdet.data.voc import VocSource
  root = _voc_tree(str(tmp_path), {
      # A wrong <width> alone: the boxes fit the real 64-pixel-wide image as annotated.
      "wrong_width": ((48, 64), (48, 128), [(11, 5, 50, 40), (41, 9, 100, 30)]),
      # Resized after annotation (2x smaller on both sides): rescaled, as before.
      "resized": ((24, 32), (48, 64), [(11, 5, 50, 40)]),
  })
  for check_sizes in (True, False):  # checked at start-up, or found when the image is read
    src = VocSource(root, "train", class_names=("raccoon",), check_sizes=check_sizes)
    examples = [src[i] for i in range(len(src))]  # each image read once
    by_name = {os.path.basename(e.file): e for e in examples}
    np.testing.assert_allclose(by_name["wrong_width.jpg"].boxes,
                               [[10, 4, 50, 40], [40, 8, 64, 30]])  # the second one clipped
    np.testing.assert_allclose(by_name["resized.jpg"].boxes, [[5, 2, 25, 20]])
    counts = src.skip_log.counts()
    assert any("no uniform scale of it, boxes kept" in k for k in counts), counts
    assert counts.get("fixed: box clipped to image") == 1, counts
  gt = VocSource(root, "train", class_names=("raccoon",)).coco_ground_truth()
  assert sorted(a["bbox"] for a in gt["annotations"])[0] == [5.0, 2.0, 20.0, 18.0]


def test_coco_file_without_annotations_is_a_start_up_error_naming_file_and_key(tmp_path):
  ann_file, image_dir = _coco_set(tmp_path)
  with open(ann_file) as f:
    data = json.load(f)
  del data["annotations"]  # what an image-info (test-dev) file looks like
  with open(ann_file, "w") as f:
    json.dump(data, f)
  with pytest.raises(records.AnnotationError) as excinfo:
    CocoSource(ann_file, image_dir)
  assert excinfo.value.file == ann_file and excinfo.value.field == "annotations"
  assert "missing" in str(excinfo.value) and "instances.json" in str(excinfo.value)
  # An empty list is a file of images without objects, and fine.
  data["annotations"] = []
  with open(ann_file, "w") as f:
    json.dump(data, f)
  assert len(CocoSource(ann_file, image_dir)) == NUM_IMAGES - 1  # the undecodable one counted


def _jpeg(h: int = 120, w: int = 160) -> tuple[bytes, np.ndarray]:
  """A JPEG of random pixels and its full decode."""
  pixels = np.random.default_rng(3).integers(0, 255, (h, w, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, "JPEG", quality=90)
  data = buf.getvalue()
  return data, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_jpeg_missing_its_last_bytes_is_used_with_a_counted_fix(tmp_path):
  data, full = _jpeg()
  path = tmp_path / "cut.jpg"
  path.write_bytes(data[:-20])  # what a copy cut short leaves; Pillow alone refuses it
  with pytest.raises(OSError, match="truncated"):
    Image.open(path).load()
  log = SkipLog("cut")
  out = images.decode_image(path, file=str(path), record=1, skip_log=log)
  assert out is not None and out.shape == full.shape
  rows_equal = np.all(out == full, axis=(1, 2))
  assert rows_equal[:96].all()  # all but the last row of 16-pixel blocks as stored
  assert log.counts() == {"fixed: truncated JPEG decoded, its missing end filled": 1}


def test_jpeg_missing_half_its_data_is_skipped(tmp_path):
  data, _ = _jpeg()
  log = SkipLog("half")
  assert images.decode_image(data[:len(data) // 2], file="half.jpg", record=2, skip_log=log) is None
  assert log.counts() == {"skipped: unreadable image": 1}


def test_voc_box_with_xmin_equal_to_xmax_is_counted(tmp_path, caplog):
  from jdet.data.voc import VocSource
  root = _voc_tree(str(tmp_path), {"slip": ((48, 64), (48, 64), [(20, 5, 20, 40), (3, 4, 30, 40)])})
  with caplog.at_level(logging.WARNING, logger="jdet.data"):
    src = VocSource(root, "train", class_names=("raccoon",))
  np.testing.assert_allclose(src[0].boxes, [[19, 4, 20, 40], [2, 3, 30, 40]])  # 1-based inclusive
  assert src.skip_log.counts() == {
      "fixed: box of one pixel row or column (xmin == xmax or ymin == ymax), kept": 1}
  assert "slip.xml" in caplog.text and "object 0" in caplog.text
