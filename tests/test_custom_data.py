"""Your own data from the command line: ``configs/<model>.py:custom,...`` for every config.

The raccoon photos of ``../shared/data/raccoon`` (a VOC-layout tree, one class),
cut to 12 training and 6 validation photos by split files the test writes, and
the same photos as COCO JSON files the test writes (category id 7; the config
checks use a second, made-up category too, so that the class count and order
really come from the data). For every config
(SSD300/512, RefineDet320/512, Faster R-CNN, Sparse R-CNN) and both formats,
``train.py`` and ``eval.py`` run as a user runs them, with ``recipe=smoke`` (the
model of the ``smoke`` variant, seconds); the class names are read from the data
(config), written beside the checkpoints (``class_names.json``) and shown by
``eval.py``; its metrics are those of a pycocotools evaluation of its own
``detections.json`` against the ground truth the test wrote. For the VOC runs,
the predictor (:class:`jdet.inference.Predictor`) on the validation files gives
exactly ``eval.py``'s ``detections.json``.

Config parsing (class names, their order, errors) is checked without training.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import common

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RACCOON = REPO.parent / "shared" / "data" / "raccoon"
CONFIGS = ("ssd300", "ssd512", "refinedet320", "refinedet512", "faster_rcnn_r50_fpn",
           "sparse_rcnn")
NUM_TRAIN, NUM_VAL = 12, 6
# Overrides so that 4 steps of training leave detections to compare: a small learning
# rate (the smoke recipes' 0.01 without clipping throws RefineDet's boxes off the image
# on these photos), RefineDet's negative anchor filtering and the score thresholds off.
LR = 1e-4
MODEL_OVERRIDES = {
    "refinedet320": dict(filter_threshold=1.0, score_threshold=0.0),
    "refinedet512": dict(filter_threshold=1.0, score_threshold=0.0),
    "faster_rcnn_r50_fpn": dict(score_threshold=0.0),
}


def _raccoon() -> Path:
  if not RACCOON.is_dir():
    pytest.fail(f"the raccoon data set is not at {RACCOON}")
  return RACCOON


def _split(name: str, n: int) -> list[str]:
  lines = (_raccoon() / "ImageSets" / "Main" / f"{name}.txt").read_text().split()
  return lines[:n]


@pytest.fixture(scope="module")
def voc_tree(tmp_path_factory) -> Path:
  """A VOC tree of the raccoon annotations and photos (links) with small splits."""
  root = tmp_path_factory.mktemp("raccoon_voc")
  for folder in ("Annotations", "JPEGImages"):
    os.symlink(_raccoon() / folder, root / folder)
  (root / "ImageSets" / "Main").mkdir(parents=True)
  for split, n in (("train", NUM_TRAIN), ("val", NUM_VAL)):
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(_split(split, n)) + "\n")
  return root


def _write_coco(out: Path, *, tail: bool) -> dict:
  """The photos of the small splits as COCO JSON files: raccoons are category 7; with
  ``tail``, a made-up category 3 (so it comes first) has one box on the first photo."""
  from jdet.data.voc import VocSource
  files = {}
  categories = [dict(id=7, name="raccoon")] + ([dict(id=3, name="tail")] if tail else [])
  for split, n in (("train", NUM_TRAIN), ("val", NUM_VAL)):
    source = VocSource(_raccoon(), split, class_names=("raccoon",))
    images, annotations = [], []
    for i in range(n):
      ex = source[i]
      h, w = ex.image.shape[:2]
      images.append(dict(id=100 + i, file_name=source.path(i).name, height=h, width=w))
      for box in ex.boxes.tolist():
        annotations.append(dict(id=len(annotations) + 1, image_id=100 + i, category_id=7,
                                bbox=[box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                area=(box[2] - box[0]) * (box[3] - box[1]), iscrowd=0))
      if tail and split == "train" and i == 0:
        annotations.append(dict(id=len(annotations) + 1, image_id=100, category_id=3,
                                bbox=[10.0, 10.0, 30.0, 20.0], area=600.0, iscrowd=0))
    path = out / f"{split}.json"
    path.write_text(json.dumps(dict(images=images, annotations=annotations,
                                    categories=categories)))
    files[split] = path
  return files


@pytest.fixture(scope="module")
def coco_files(tmp_path_factory) -> dict:
  """One category (id 7): the same model shapes as the VOC runs (compiled once)."""
  return _write_coco(tmp_path_factory.mktemp("raccoon_coco"), tail=False)


@pytest.fixture(scope="module")
def coco_files_two(tmp_path_factory) -> dict:
  return _write_coco(tmp_path_factory.mktemp("raccoon_coco2"), tail=True)


def _voc_arg(root: Path) -> str:
  return f"custom,format=voc,root={root},recipe=smoke"


def _coco_arg(files: dict) -> str:
  return (f"custom,format=coco,train={files['train']},val={files['val']},"
          f"images={_raccoon() / 'JPEGImages'},recipe=smoke")


# ----------------------------------------------------------------------------
# The configs alone.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_reads_the_classes_from_the_data(name, voc_tree, coco_files_two):
  module = importlib.import_module(f"configs.{name}")
  smoke = module.get_config("smoke")
  voc = module.get_config(_voc_arg(voc_tree))
  assert voc.model.num_classes == voc.data.num_classes == 1
  assert tuple(voc.data.class_names) == ("raccoon",)
  assert voc.data.val.class_names == ("raccoon",)
  assert "voc" in voc.eval.metrics
  # The recipe stays the smoke variant's: the model (but its class count) and transforms.
  assert {k: v for k, v in voc.model.items() if k != "num_classes"} == \
      {k: v for k, v in smoke.model.items() if k != "num_classes"}
  assert voc.data.transforms == smoke.data.transforms
  assert voc.train == smoke.train and voc.optim == smoke.optim
  coco = module.get_config(_coco_arg(coco_files_two))
  # Categories by id: "tail" (3) is label 0, "raccoon" (7) label 1.
  assert tuple(coco.data.class_names) == ("tail", "raccoon")
  assert coco.model.num_classes == 2
  assert coco.data.train.annotation_file == str(coco_files_two["train"])
  # The paper's recipe by default.
  paper = module.get_config(f"custom,format=voc,root={voc_tree}")
  assert paper.model.num_classes == 1
  assert paper.data.transforms == module.get_config("coco").data.transforms


def test_voc_classes_from_every_annotation_file_and_the_classes_option(tmp_path):
  root = tmp_path / "tree"
  (root / "Annotations").mkdir(parents=True)
  (root / "JPEGImages").mkdir()
  (root / "ImageSets" / "Main").mkdir(parents=True)
  objects = {"a": ["zebra", "cat"], "b": ["cat"], "c": ["ant"]}
  for name, classes in objects.items():
    body = "".join(f"<object><name>{c}</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
                   f"<xmax>5</xmax><ymax>5</ymax></bndbox></object>" for c in classes)
    (root / "Annotations" / f"{name}.xml").write_text(f"<annotation>{body}</annotation>")
  (root / "ImageSets" / "Main" / "trainval.txt").write_text("a\nb\n")
  (root / "ImageSets" / "Main" / "test.txt").write_text("c\n")
  source, names, fmt = common.custom_data({"format": "voc", "root": str(root)})
  # Sorted names of every XML file (the test split's "ant" included); trainval / test
  # found when there is no train / val.
  assert names == ("ant", "cat", "zebra") and fmt == "voc"
  assert source.train.splits == ("trainval",) and source.val.splits == ("test",)
  _, names, _ = common.custom_data({"root": str(root), "classes": "zebra+cat"})
  assert names == ("zebra", "cat")


def test_custom_option_errors(tmp_path, voc_tree):
  from configs import ssd300
  with pytest.raises(ValueError, match=r"unknown options \['fromat'\]"):
    ssd300.get_config(f"custom,fromat=voc,root={voc_tree}")
  with pytest.raises(ValueError, match="format=voc: give root=DIR"):
    ssd300.get_config("custom,format=voc")
  with pytest.raises(FileNotFoundError, match=r"ImageSets/Main/nope\.txt not found"):
    ssd300.get_config(f"custom,format=voc,root={voc_tree},train=nope")
  with pytest.raises(ValueError, match=r"format=coco: give train=A\.json and val=B\.json"):
    ssd300.get_config("custom,format=coco,train=a.json")
  a = tmp_path / "a.json"
  b = tmp_path / "b.json"
  a.write_text(json.dumps(dict(images=[], annotations=[], categories=[dict(id=1, name="x")])))
  b.write_text(json.dumps(dict(images=[], annotations=[], categories=[dict(id=1, name="y")])))
  with pytest.raises(ValueError, match=r"categories of .*b\.json \['y'\] differ"):
    ssd300.get_config(f"custom,format=coco,train={a},val={b},images={tmp_path}")
  with pytest.raises(ValueError, match="unknown format='yolo'"):
    ssd300.get_config(f"custom,format=yolo,root={voc_tree}")


# ----------------------------------------------------------------------------
# train.py and eval.py end to end.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
  """One CPU device and a compilation cache shared by the module's programs."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")))
  return env


def _run(program: str, config: str, workdir: Path, env: dict) -> str:
  proc = subprocess.run([sys.executable, program, "--config", config, "--workdir", str(workdir)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, f"{program} {config} failed:\n{proc.stderr[-6000:]}"
  return proc.stdout


def _coco_eval(gt: dict, detections: list[dict]) -> dict:
  """pycocotools' AP and AP50 of ``detections`` against ``gt`` (independent of jdet)."""
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  ground = COCO()
  ground.dataset = gt
  ground.createIndex()
  if not detections:
    return dict(AP=0.0, AP50=0.0)
  ev = COCOeval(ground, ground.loadRes(detections), "bbox")
  ev.evaluate()
  ev.accumulate()
  ev.summarize()
  return dict(AP=max(float(ev.stats[0]), 0.0), AP50=max(float(ev.stats[1]), 0.0))


def _voc_ground_truth(root: Path) -> dict:
  from jdet.data.voc import VocSource
  return VocSource(root, "val").coco_ground_truth()


@pytest.mark.parametrize("fmt", ["voc", "coco"])
@pytest.mark.parametrize("name", CONFIGS)
def test_train_and_eval_on_custom_data(name, fmt, voc_tree, coco_files, env, tmp_path):
  arg = _voc_arg(voc_tree) if fmt == "voc" else _coco_arg(coco_files)
  # A config file of the user's own around the model's (it adds model fields).
  wrapper = tmp_path / f"my_{name}.py"
  wrapper.write_text(f"from configs import {name}\n\n\ndef get_config(arg=None):\n"
                     f"  config = {name}.get_config(arg)\n"
                     f"  config.model.update({MODEL_OVERRIDES.get(name, {})!r})\n"
                     f"  config.optim.lr = {LR}\n  return config\n")
  config = f"{wrapper}:{arg}"
  workdir = tmp_path / "run"
  _run("train.py", config, workdir, env)
  assert json.loads((workdir / "class_names.json").read_text()) == {"class_names": ["raccoon"]}
  out = _run("eval.py", config, workdir, env)
  assert "| raccoon" in out  # the per-class table shows names
  metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
  detections = json.loads((workdir / "eval" / "detections.json").read_text())
  assert metrics["num_images"] == NUM_VAL
  assert "raccoon" in metrics["per_class"]
  gt = (_voc_ground_truth(voc_tree) if fmt == "voc"
        else json.loads(coco_files["val"].read_text()))
  # Category ids are the data's: VOC label + 1, COCO's own (7).
  assert {d["category_id"] for d in detections} == {1 if fmt == "voc" else 7}
  reference = _coco_eval(gt, detections)
  for key in ("AP", "AP50"):
    assert np.isclose(metrics[key], reference[key], atol=1e-9), key

  if fmt == "voc":  # the predictor gives exactly eval.py's detections
    from jdet.data.voc import VocSource
    from jdet.inference.predictor import Predictor
    import jax
    from jdet import parallel
    # One device, as eval.py ran (the suite simulates four: another split of the batch
    # changes the last bits of the boxes).
    predictor = Predictor.from_workdir(workdir, config=config, score_threshold=0.0,
                                       mesh=parallel.make_mesh(jax.devices()[:1]))
    assert predictor.class_names == ("raccoon",)
    source = VocSource(voc_tree, "val")
    results = predictor([str(source.path(i)) for i in range(len(source))])
    mine = [d for i, r in enumerate(results) for d in r.to_coco(source.image_id(i))]
    order = lambda d: (d["image_id"], -d["score"], d["bbox"])
    assert len(mine) == len(detections)
    for a, b in zip(sorted(mine, key=order), sorted(detections, key=order)):
      assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
      assert a["score"] == b["score"] and a["bbox"] == b["bbox"], (a, b)


def test_a_run_remembers_its_config_after_the_data_moved(voc_tree, env, tmp_path):
  """``predict.py --workdir W`` and ``Predictor.from_workdir(W)``, with no config, from a
  folder outside the repository, after the training data moved away: the run's saved
  config, class names and checkpoint give ``eval.py``'s detections of the validation photos."""
  data = tmp_path / "data"
  data.mkdir()
  for folder in ("Annotations", "JPEGImages", "ImageSets"):
    os.symlink(voc_tree / folder, data / folder)
  config = f"configs/ssd300.py:{_voc_arg(data)}"
  workdir = tmp_path / "run"
  _run("train.py", config, workdir, env)
  _run("eval.py", config, workdir, env)
  detections = json.loads((workdir / "eval" / "detections.json").read_text())
  from jdet.data.voc import VocSource
  source = VocSource(voc_tree, "val")
  photos = tmp_path / "photos"
  photos.mkdir()
  ids = {}
  for i in range(len(source)):  # named by position, so that predict.py's ids are eval's order
    name = f"{i:02d}_{source.path(i).name}"
    (photos / name).write_bytes(source.path(i).read_bytes())
    ids[i] = source.image_id(i)
  os.rename(data, tmp_path / "moved")  # the training data is gone

  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  proc = subprocess.run([sys.executable, str(REPO / "predict.py"), "--workdir", str(workdir),
                         "--out", "out", "--score_threshold", "0", str(photos)],
                        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-6000:]
  got = json.loads((elsewhere / "out" / "detections.json").read_text())
  names = json.loads((elsewhere / "out" / "images.json").read_text())["class_names"]
  assert names == ["raccoon"]
  got = [dict(d, image_id=ids[d["image_id"]]) for d in got]

  import jax
  from jdet import parallel
  from jdet.inference.predictor import Predictor
  predictor = Predictor.from_workdir(workdir, score_threshold=0.0,
                                     mesh=parallel.make_mesh(jax.devices()[:1]))
  results = predictor([str(p) for p in sorted(photos.iterdir())])
  mine = [d for i, r in enumerate(results) for d in r.to_coco(ids[i])]

  def order(d):
    return (d["image_id"], -d["score"], d["bbox"])

  assert detections and len(got) == len(mine) == len(detections)
  for a, b, c in zip(sorted(got, key=order), sorted(mine, key=order), sorted(detections, key=order)):
    assert a["image_id"] == b["image_id"] == c["image_id"]
    np.testing.assert_allclose([a["score"], b["score"]], c["score"], rtol=0, atol=1e-6)
    np.testing.assert_allclose([a["bbox"], b["bbox"]], [c["bbox"]] * 2, rtol=0, atol=1e-3)


def test_fine_tune_from_another_class_count(voc_tree, env, tmp_path):
  """``train.py --config.init.weights=`` with a 5-class SSD (the smoke model on shapes,
  saved as a jdet .npz) on the 1-class raccoon data: runs, and its log lists the eight
  re-initialised class convolutions with both shapes."""
  import jax
  import jax.numpy as jnp

  from configs import ssd300
  from jdet import convert
  from jdet.models import build_model
  smoke = ssd300.get_config("smoke")
  model = build_model("ssd", **smoke.model)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 64, 64, 3))))(jax.random.key(0))
  convert.save_params_npz(tmp_path / "shapes_ssd.npz", variables)
  proc = subprocess.run(
      [sys.executable, "train.py", "--config", f"configs/ssd300.py:{_voc_arg(voc_tree)}",
       "--workdir", str(tmp_path / "run"), f"--config.init.weights={tmp_path / 'shapes_ssd.npz'}",
       "--config.optim.lr=0.0001"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-6000:]
  assert "(jdet): loaded 123 variables, re-initialised 8" in proc.stderr
  assert ("re-initialised params/head/cls_0/kernel: depends on the class count: "
          "model (3, 3, 32, 8), file (3, 3, 32, 24)") in proc.stderr
