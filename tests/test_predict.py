"""The predictor (:mod:`jdet.inference`) and ``predict.py``.

* Boxes back in the original image's pixels, for portrait, landscape, tiny and
  greyscale images, with both transform recipes (SSD's squashing resize; the
  R-CNN resize that keeps the aspect ratio and pads, to one canvas or to one of
  two buckets): a stub detector answers, in input pixels, the whole valid input
  and its centre quarter; the predictor must give ``[0, 0, W, H]`` and
  ``[W/4, H/4, 3W/4, 3H/4]`` of each image as given (worked by hand), in input
  order, compiling once per input shape.
* Greyscale, RGBA and float inputs give what their 8-bit RGB form gives, with a
  real detector (SSD smoke, random weights); a greyscale PNG reads as its array.
* ``Predictor.from_weights`` of a saved ``.npz`` gives what a predictor of the
  same variables gives (round trip), and refuses a file of another class count.
* ``predict.py`` on a folder with a corrupt JPEG and a text file processes the
  other images (annotated copies at their own size, COCO results, a summary) and
  names both bad files.

The equality with ``eval.py`` for every detector is in ``tests/test_custom_data.py``
(on the raccoon photos, after ``train.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import common, faster_rcnn_r50_fpn, ssd300
from jdet import convert, parallel
from jdet.class_names import read_class_names, write_class_names
from jdet.inference.predictor import ImageReadError, Predictor, to_rgb8
from jdet.models import build_model
from jdet.models.detector import finalize_detections

REPO = Path(__file__).resolve().parents[1]
# (h, w): portrait, landscape, tiny, square, another portrait.
SIZES = ((120, 45), (30, 200), (3, 2), (64, 64), (77, 50))


def _one_device():
  return parallel.make_mesh(jax.devices()[:1])


traced: list[dict] = []


class _Stub(nn.Module):
  """Answers, in input pixels, the valid input ``[0, 0, w, h]`` and its centre quarter."""

  @nn.compact
  def __call__(self, image):
    return image

  def predict(self, batch):
    traced.append(batch)  # runs once per compilation
    h = batch["image_size"][:, 0].astype(jnp.float32)
    w = batch["image_size"][:, 1].astype(jnp.float32)
    zero = jnp.zeros_like(w)
    boxes = jnp.stack([jnp.stack([zero, zero, w, h], -1),
                       jnp.stack([w / 4, h / 4, 3 * w / 4, 3 * h / 4], -1)], 1)  # [B, 2, 4]
    scores = jnp.broadcast_to(jnp.array([0.9, 0.5]), boxes.shape[:2])
    labels = jnp.zeros(boxes.shape[:2], jnp.int32)
    return finalize_detections(boxes, scores, labels, jnp.ones(boxes.shape[:2], bool), batch,
                               max_detections=2)


def _data(recipe: str):
  if recipe == "ssd":
    return ssd300.get_config("smoke").data
  data = faster_rcnn_r50_fpn.get_config("smoke").data
  if recipe == "rcnn_buckets":  # no canvas: landscape and portrait buckets
    data.transforms = common.rcnn_augment(((64, 96),), canvas=None, buckets=((64, 96), (96, 64)))
  return data


@pytest.mark.parametrize("recipe", ["ssd", "rcnn", "rcnn_buckets"])
def test_boxes_in_original_pixels(recipe, rng):
  data = _data(recipe)
  traced.clear()
  stub = _Stub()
  fresh = jax.jit(lambda v, batch: stub.apply(v, batch, method="predict"))  # its own cache
  predictor = Predictor(stub, {}, data, ("thing",), mesh=_one_device(), batch_size=2,
                        predict_fn=fresh, score_threshold=0.0)
  images = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in SIZES]
  images[3] = images[3][..., 0]  # greyscale [H, W]
  results = predictor(images)
  assert len(results) == len(SIZES)
  for (h, w), r in zip(SIZES, results):
    assert r.image_size == (h, w)
    np.testing.assert_allclose(r.boxes, [[0, 0, w, h], [w / 4, h / 4, 3 * w / 4, 3 * h / 4]],
                               rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(r.scores, [0.9, 0.5])
    assert r.names == ["thing", "thing"] and r.file is None
  # One compiled program per input shape (the buckets: two).
  shapes = {tuple(b["image"].shape) for b in traced}
  assert len(traced) == len(shapes) == (2 if recipe == "rcnn_buckets" else 1)
  # One image alone gives one result; the threshold leaves out the 0.5 box.
  predictor.score_threshold = 0.6
  single = predictor(images[1])
  np.testing.assert_allclose(single.boxes, [[0, 0, SIZES[1][1], SIZES[1][0]]], atol=1e-4)


@pytest.mark.slow
def test_inputs_of_every_kind_give_what_their_rgb_form_gives(tmp_path, rng):
  config = ssd300.get_config("smoke")
  model = build_model("ssd", **config.model)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  predictor = Predictor(model, variables, config.data, ("a", "b", "c", "d", "e"),
                        mesh=_one_device(), score_threshold=0.0)
  grey = rng.integers(0, 256, size=(50, 70), dtype=np.uint8)
  rgb = np.stack([grey] * 3, -1)
  rgba = np.concatenate([rgb, np.full((50, 70, 1), 7, np.uint8)], -1)
  Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
  want = predictor(rgb)
  assert len(want) > 0
  for other in (grey, grey[..., None], rgba, rgb.astype(np.float32),
                rgb.astype(np.float32) / 255.0, str(tmp_path / "grey.png")):
    got = predictor(other)
    np.testing.assert_array_equal(got.boxes, want.boxes)
    np.testing.assert_array_equal(got.scores, want.scores)
    np.testing.assert_array_equal(got.labels, want.labels)
  assert predictor(str(tmp_path / "grey.png")).file == str(tmp_path / "grey.png")
  np.testing.assert_array_equal(predictor.read(tmp_path / "grey.png"), rgb)
  for bad, match in ((np.zeros((4, 4, 2), np.uint8), "expected an"),
                     (np.zeros((0, 5), np.uint8), "empty image"),
                     (np.full((4, 4), np.nan), "NaN")):
    with pytest.raises(ImageReadError, match=match):
      to_rgb8(bad)
  with pytest.raises(ImageReadError, match="no such file"):
    predictor(str(tmp_path / "nope.jpg"))


@pytest.mark.slow
def test_from_weights_round_trip_and_class_count(tmp_path):
  config = ssd300.get_config("smoke")
  model = build_model("ssd", **config.model)
  variables = model.init(jax.random.key(3), jnp.zeros((1, 64, 64, 3)))
  convert.save_params_npz(tmp_path / "ssd.npz", variables)
  image = np.asarray(Image.open(REPO.parent / "shared" / "data" / "raccoon" / "JPEGImages"
                                / "raccoon-1.jpg").convert("RGB"))
  direct = Predictor(model, variables, config.data, ("a",) * 5, mesh=_one_device(),
                     score_threshold=0.0)(image)
  loaded = Predictor.from_weights(config, tmp_path / "ssd.npz", mesh=_one_device(),
                                  score_threshold=0.0)
  assert loaded.class_names == ("ellipse", "rectangle", "triangle", "star", "cross")
  got = loaded(image)
  np.testing.assert_array_equal(got.boxes, direct.boxes)
  np.testing.assert_array_equal(got.scores, direct.scores)
  assert got.names == [loaded.class_names[k] for k in direct.labels]
  config.model.num_classes = 2
  with pytest.raises(ValueError, match=r"(?s)does not fit the model.*head/cls_0/kernel"):
    Predictor.from_weights(config, tmp_path / "ssd.npz", mesh=_one_device())


def test_class_names_file(tmp_path):
  assert read_class_names(tmp_path) is None
  write_class_names(tmp_path, ["raccoon", "tail"])
  assert read_class_names(tmp_path) == ("raccoon", "tail")
  (tmp_path / "class_names.json").write_text('{"class_names": [1]}')
  with pytest.raises(ValueError, match="class_names.json must hold"):
    read_class_names(tmp_path)


@pytest.mark.slow
def test_predict_program_skips_bad_files(tmp_path):
  config = ssd300.get_config("smoke")
  model = build_model("ssd", **config.model)
  convert.save_params_npz(tmp_path / "w.npz",
                          model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  photos = REPO.parent / "shared" / "data" / "raccoon" / "JPEGImages"
  folder = tmp_path / "in"
  folder.mkdir()
  good = ["raccoon-1.jpg", "raccoon-2.jpg"]
  for name in good:
    (folder / name).write_bytes((photos / name).read_bytes())
  Image.open(photos / "raccoon-3.jpg").convert("L").save(folder / "grey.png")
  (folder / "broken.jpg").write_bytes((photos / "raccoon-4.jpg").read_bytes()[:2000])
  # A copy cut short by a few bytes: decoded with its missing end filled, and reported.
  (folder / "cut.jpg").write_bytes((photos / "raccoon-5.jpg").read_bytes()[:-20])
  (folder / "notes.txt").write_text("not an image")
  out = tmp_path / "out"
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
  proc = subprocess.run(
      [sys.executable, "predict.py", "--config", "configs/ssd300.py:smoke",
       "--weights", str(tmp_path / "w.npz"), "--out", str(out), "--score_threshold", "0.05",
       str(folder), str(tmp_path / "missing.jpg")],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  info = json.loads((out / "images.json").read_text())
  processed = sorted(Path(i["file_name"]).name for i in info["images"])
  assert processed == sorted(good + ["grey.png", "cut.jpg"])
  fixed = {Path(f["file"]).name: f["reason"] for f in info["fixed"]}
  assert set(fixed) == {"grey.png", "cut.jpg"}
  assert "truncated JPEG" in fixed["cut.jpg"]
  assert "cut.jpg" in (out / "summary.txt").read_text().split("Read with a repair:")[1]
  assert "2 fixed" in proc.stdout
  skipped = {Path(s["file"]).name: s["reason"] for s in info["skipped"]}
  assert set(skipped) == {"broken.jpg", "notes.txt", "missing.jpg"}
  assert "no such file" in skipped["missing.jpg"]
  for name in ("broken.jpg", "notes.txt", "missing.jpg"):
    assert name in proc.stdout and name in (out / "summary.txt").read_text()
  for image in info["images"]:
    with Image.open(out / image["annotated"]) as drawn:  # the photo's own size
      assert drawn.size == (image["width"], image["height"])
      assert drawn.format == ("PNG" if image["annotated"].endswith(".png") else "JPEG")
    with Image.open(image["file_name"]) as original:
      assert original.size == (image["width"], image["height"])
  detections = json.loads((out / "detections.json").read_text())
  assert detections and all(d["score"] >= 0.05 for d in detections)
  assert {d["image_id"] for d in detections} <= {i["id"] for i in info["images"]}
  for d in detections:
    image = info["images"][d["image_id"]]
    x, y, w, h = d["bbox"]
    assert 0 <= x and 0 <= y and x + w <= image["width"] + 1e-3
    assert y + h <= image["height"] + 1e-3
  assert info["class_names"] == ["ellipse", "rectangle", "triangle", "star", "cross"]


@pytest.mark.slow
def test_tta_gives_what_the_evaluation_loop_gives(tmp_path):
  """``Predictor(..., tta=True)``: the detections of ``eval.py --tta``'s loop (the same
  passes and merge) on the smoke validation images, exactly."""
  from jdet.data import builder
  from jdet.evaluation import loop as eval_loop
  from jdet.evaluation import tta
  config = ssd300.get_config("smoke")
  ssd300.shapes_tta(config)  # three scales with flips, box voting
  model = build_model("ssd", **config.model)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 64, 64, 3))))(jax.random.key(1))
  convert.save_params_npz(tmp_path / "w.npz", variables)
  mesh = _one_device()
  predictor = Predictor.from_weights(config, tmp_path / "w.npz", tta=True, mesh=mesh,
                                     score_threshold=0.0)
  settings = tta.TTASettings.from_config(config.tta).resolve(model)
  result = eval_loop.evaluate_split(
      model, parallel.replicate(variables, mesh), tta.tta_data_config(config.data, settings),
      mesh=mesh, predict_fn=tta.make_tta_predict_fn(model, settings))
  source = builder.build_source(config.data, "val")
  examples = [source[i] for i in range(len(source))]
  ids = [source.category_id(k) for k in range(len(source.class_names))]
  mine = [d for ex, r in zip(examples, predictor([ex.image for ex in examples]))
          for d in r.to_coco(ex.image_id, ids)]
  order = lambda d: (d["image_id"], -d["score"], d["bbox"])
  want = sorted(result.detections, key=order)
  assert len(want) > 0 and len(mine) == len(want)
  for a, b in zip(sorted(mine, key=order), want):
    assert (a["image_id"], a["category_id"], a["score"], a["bbox"]) == \
        (b["image_id"], b["category_id"], b["score"], b["bbox"])


def test_weights_without_their_data_carry_the_data_sets_class_names():
  """COCO or VOC weights used where that data is not (the configs point at data/...):
  the predictor names the classes as the data set does, not "class 0" ..."""
  from jdet.class_names import COCO_CATEGORY_IDS, COCO_CLASS_NAMES
  from jdet.data.voc import VOC_CLASSES
  from jdet.inference.predictor import _config_class_names
  coco = faster_rcnn_r50_fpn.get_config("coco")
  assert not os.path.exists(coco.data.val.annotation_file)
  names = _config_class_names(coco)
  assert names == tuple(COCO_CLASS_NAMES) and len(names) == len(COCO_CATEGORY_IDS) == 80
  assert names[0] == "person" and names[-1] == "toothbrush"
  assert _config_class_names(ssd300.get_config("voc")) == tuple(VOC_CLASSES)
  other = ssd300.get_config("coco")
  other.model.num_classes = 3  # not COCO's classes any more: numbered
  assert _config_class_names(other) == ("class 0", "class 1", "class 2")
