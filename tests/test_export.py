"""Exporting a predictor (:mod:`jdet.inference.export`) and running it without jdet (:mod:`jdet.inference.exported`).

* For SSD, RefineDet, Faster R-CNN (smoke configs, seeded weights) and Sparse
  R-CNN (smoke config padded to two size buckets: one exported function per
  bucket): the exported file, loaded in a fresh process that imports a copy of
  ``jdet/inference/exported.py`` by its path (never the ``jdet`` package, never Flax),
  gives on portrait, landscape, greyscale, larger and tiny images, and on
  8-bit greyscale and 16-bit PNG files, the
  :class:`~jdet.inference.Predictor`'s detections: the same classes and names
  in the same order, boxes within 1e-4 pixels, scores within 1e-6 (the same
  batch size on both sides, so XLA runs programs of the same shapes).
* ``python -m jdet.inference.export --weights`` writes a file that gives the same
  detections as the in-process export of the same weights.
* The loader's own imports and its image reader's (read from their syntax
  trees) are NumPy, JAX, OpenCV, Pillow, the standard library and, of jdet,
  the image reader only; the fresh process above runs them copied into a
  folder, with every import of ``jdet`` failing.
* Missing, truncated, corrupt, foreign and wrong-platform files are refused
  with an error naming the file; TTA predictors and unknown evaluation steps
  are refused at export.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import common, faster_rcnn_r50_fpn, refinedet320, sparse_rcnn, ssd300
from jdet import convert, parallel
from jdet.data import transforms as T
from jdet.inference.export import export_predictor, preprocess_spec
from jdet.inference.exported import ExportedDetector, ExportedFileError
from jdet.inference.predictor import Predictor, _config_class_names
from jdet.models import build_model
from tests.helpers.faults import flip_bytes, truncate_file
from tests.helpers.weights import numpy_variables

REPO = Path(__file__).resolve().parents[1]
# The standalone loader: these two files, copied beside the exported models.
LOADER_FILES = (REPO / "jdet" / "inference" / "exported.py", REPO / "jdet" / "inference" / "images.py")
BATCH = 2  # predictor and export alike; 5 images: two full batches and one with a filler
# (h, w) and channels: portrait, landscape, greyscale, larger landscape, tiny.
IMAGES = (((120, 45), 3), ((30, 200), 3), ((77, 50), 0), ((240, 320), 3), ((5, 4), 3))


def _config(name: str):
  if name == "ssd":
    return ssd300.get_config("smoke")
  if name == "refinedet":
    return refinedet320.get_config("smoke")
  if name == "faster_rcnn":
    return faster_rcnn_r50_fpn.get_config("smoke")
  config = sparse_rcnn.get_config("smoke")  # landscape and portrait buckets, no canvas
  config.data.transforms = common.rcnn_augment(((64, 96),), canvas=None,
                                               buckets=((64, 96), (96, 64)))
  return config


MODELS = ("ssd", "refinedet", "faster_rcnn", "sparse_rcnn")


def _variables(model, seed: int):
  """Seeded NumPy weights (no compiled initialiser: seconds instead of half a minute)."""
  shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 64, 64, 3))), jax.random.key(0))
  # Faster R-CNN's heads as their own initialisers (small logits: every class scores).
  head_std = 0.01 if type(model).__name__ == "FasterRCNN" else None
  variables = numpy_variables(shapes, seed, random_norms=True, head_std=head_std)
  params = variables["params"]
  if "proposal_boxes" in params:  # Sparse R-CNN: boxes (cx, cy, w, h) inside the image
    n = params["proposal_boxes"].shape[0]
    r = np.random.default_rng(seed)
    params["proposal_boxes"] = jnp.asarray(np.concatenate(
        [r.uniform(0.3, 0.7, (n, 2)), r.uniform(0.2, 0.6, (n, 2))], 1), jnp.float32)
  return variables


def _images():
  rng = np.random.default_rng(7)
  out = []
  for (h, w), c in IMAGES:
    # Smooth content plus noise, so that the resize's interpolation matters.
    y, x = np.mgrid[0:h, 0:w]
    base = 127 + 100 * np.sin(x / 7.0)[..., None] * np.cos(y / 5.0)[..., None]
    pixels = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    out.append(pixels[..., 0] if c == 0 else pixels)
  return out


_RUN = r"""
import importlib.util, json, sys
sys.modules["jdet"] = None  # as where jdet is not installed: any import of it fails
import numpy as np
spec = importlib.util.spec_from_file_location("standalone_exported", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
images = np.load(sys.argv[2])
images = [images[f"i{k}"] for k in range(len(images.files))] + json.loads(sys.argv[4])
out, info = {}, {}
for name, path in zip(sys.argv[5::2], sys.argv[6::2]):
  detector = module.ExportedDetector.load(path)
  detector.score_threshold = 0.0
  results = detector(images)
  info[name] = dict(canvases=[list(c) for c in detector.canvases],
                    names=[r["class_names"] for r in results])
  for k, r in enumerate(results):
    for key in ("boxes", "scores", "classes"):
      out[f"{name}/{k}/{key}"] = r[key]
np.savez(sys.argv[3], **out)
info["_modules"] = sorted(m for m, mod in sys.modules.items() if mod is not None
                          and m.split(".")[0] in ("flax", "jdet", "optax", "orbax", "grain"))
print(json.dumps(info))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """Every model exported in this process and run by the loader in a fresh one."""
  folder = tmp_path_factory.mktemp("export")
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
  arrays = _images()
  np.savez(folder / "images.npz", **{f"i{k}": a for k, a in enumerate(arrays)})
  # Files too: an 8-bit greyscale PNG and a 16-bit one (scaled to 8 bits on reading).
  Image.fromarray(arrays[2]).save(folder / "grey.png")
  deep = np.random.default_rng(3).integers(0, 65536, (60, 90), np.uint16)
  Image.fromarray(deep).save(folder / "deep.png")
  paths = [str(folder / "grey.png"), str(folder / "deep.png")]
  images = arrays + paths
  # The command-line export of SSD's weights, running while this process works.
  ssd_config = _config("ssd")
  ssd_model = build_model("ssd", **ssd_config.model)
  convert.save_params_npz(folder / "ssd.npz", _variables(ssd_model, 0))
  cli = subprocess.Popen(
      [sys.executable, "-m", "jdet.inference.export", "--config", "configs/ssd300.py:smoke",
       "--weights", str(folder / "ssd.npz"), "--out", str(folder / "cli.jdet"),
       "--batch_size", str(BATCH), "--score_threshold", "0", "--platforms", "cpu"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  mesh = parallel.make_mesh(jax.devices()[:1])
  want, metas, files = {}, {}, []
  for seed, name in enumerate(MODELS):
    config = _config(name)
    model = build_model(config.model_name, **config.model)
    names = _config_class_names(config)
    predictor = Predictor(model, parallel.replicate(_variables(model, seed), mesh), config.data,
                          names, mesh=mesh, batch_size=BATCH, score_threshold=0.0)
    want[name] = predictor(images)
    path = folder / f"{name}.jdet"
    metas[name] = export_predictor(predictor, path, batch_size=BATCH)
    files += [name, str(path)]
  stdout, stderr = cli.communicate(timeout=600)
  assert cli.returncode == 0, stderr[-4000:]
  assert "cli.jdet" in stdout
  files += ["cli", str(folder / "cli.jdet")]
  loader = folder / "standalone"
  loader.mkdir()
  for file in LOADER_FILES:
    shutil.copy(file, loader / file.name)
  proc = subprocess.run([sys.executable, "-c", _RUN, str(loader / "exported.py"),
                         str(folder / "images.npz"),
                         str(folder / "got.npz"), json.dumps(paths), *files],
                        cwd=folder, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  info = json.loads(proc.stdout.strip().splitlines()[-1])
  got = dict(np.load(folder / "got.npz"))
  return dict(want=want, got=got, info=info, metas=metas, folder=folder, images=images)


def _assert_same(want, got, info, name: str):
  for k, w in enumerate(want):
    boxes, scores, classes = (got[f"{name}/{k}/{key}"] for key in ("boxes", "scores", "classes"))
    assert len(w) > 0, f"image {k}: no detections to compare"
    assert len(scores) == len(w), f"image {k}: {len(scores)} detections, not {len(w)}"
    np.testing.assert_array_equal(classes, w.labels)
    np.testing.assert_allclose(boxes, w.boxes, rtol=0, atol=1e-4)
    np.testing.assert_allclose(scores, w.scores, rtol=0, atol=1e-6)
    assert info[name]["names"][k] == w.names


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_exported_file_gives_the_predictors_detections(exported, name):
  _assert_same(exported["want"][name], exported["got"], exported["info"], name)
  meta = exported["metas"][name]
  expected_canvases = [[64, 96], [96, 64]] if name == "sparse_rcnn" else [[64, 64]]
  assert exported["info"][name]["canvases"] == sorted(expected_canvases)
  assert [m["canvas"] for m in meta["modules"]] == expected_canvases
  assert meta["platforms"] == ["cpu", "cuda"]
  # The fresh process ran without Flax, jdet's package or its training libraries.
  assert exported["info"]["_modules"] == []


@pytest.mark.slow
def test_command_line_export(exported):
  """``python -m jdet.inference.export --weights`` gives what the in-process export of the same
  weights gives, with the config's class names."""
  _assert_same(exported["want"]["ssd"], exported["got"], exported["info"], "cli")
  with zipfile.ZipFile(exported["folder"] / "cli.jdet") as zf:
    meta = json.loads(zf.read("meta.json"))
  assert meta["class_names"] == exported["metas"]["ssd"]["class_names"]
  assert meta["platforms"] == ["cpu"] and meta["batch_size"] == BATCH
  assert meta["preprocess"] == exported["metas"]["ssd"]["preprocess"]


def test_loader_imports_no_model_code():
  allowed = {"numpy", "jax", "cv2", "PIL", "__future__"} | set(sys.stdlib_module_names)
  roots, jdet_modules = set(), set()
  for file in LOADER_FILES:
    for node in ast.walk(ast.parse(file.read_text())):
      if isinstance(node, ast.Import):
        modules = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        assert node.level == 0, "relative import"
        modules = [node.module]
      else:
        continue
      jdet_modules |= {m for m in modules if m.split(".")[0] == "jdet"}
      roots |= {m.split(".")[0] for m in modules if m.split(".")[0] != "jdet"}
  assert roots <= allowed, roots - allowed
  assert {"jax", "numpy", "cv2", "PIL"} <= roots
  # Of jdet, only the image reader beside it (which the copy carries).
  assert jdet_modules == {"jdet.inference.images"}


@pytest.mark.slow
def test_bad_files_are_refused_naming_the_file(exported, tmp_path):
  source = exported["folder"] / "ssd.jdet"
  ExportedDetector.load(source)  # the intact file loads
  truncated = tmp_path / "truncated.jdet"
  truncated.write_bytes(source.read_bytes())
  truncate_file(truncated, 0.6)
  corrupt = tmp_path / "corrupt.jdet"
  corrupt.write_bytes(source.read_bytes())
  flip_bytes(corrupt)
  text = tmp_path / "notes.jdet"
  text.write_text("not a model")
  foreign = tmp_path / "foreign.jdet"
  with zipfile.ZipFile(foreign, "w") as zf:
    zf.writestr("meta.json", json.dumps({"format": "something else"}))
  newer = tmp_path / "newer.jdet"
  with zipfile.ZipFile(source) as src, zipfile.ZipFile(newer, "w") as dst:
    for item in src.infolist():
      data = src.read(item)
      if item.filename == "meta.json":
        meta = json.loads(data)
        meta["format_version"] += 1
        data = json.dumps(meta).encode()
      dst.writestr(item, data)
  cases = ((truncated, "truncated or corrupt"), (corrupt, r"(?i)crc|corrupt|deserialized"),
           (text, "truncated or corrupt"), (foreign, "not an exported jdet detector"),
           (newer, "format version"), (tmp_path / "missing.jdet", "no such file"))
  for path, match in cases:
    with pytest.raises(ExportedFileError, match=match) as info:
      ExportedDetector.load(path)
    assert str(path) in str(info.value) and info.value.file == str(path)


def test_refused_at_export(tmp_path):
  with pytest.raises(ValueError, match="RandomHFlip"):
    preprocess_spec(T.Compose([T.RandomHFlip(), T.Resize(64), T.Normalize()]))
  with pytest.raises(ValueError, match="multi-scale"):
    preprocess_spec(T.Compose([T.KeepRatioResize(((64, 96), (80, 120))), T.Normalize(),
                               T.Pad((128, 128))]))
  config = ssd300.get_config("smoke")
  stub = Predictor(None, {}, config.data, ("a",), mesh=parallel.make_mesh(jax.devices()[:1]),
                   batch_size=1, predict_fn=lambda v, b: None)
  with pytest.raises(ValueError, match="model's own predict"):
    export_predictor(stub, tmp_path / "x.jdet")
  assert not (tmp_path / "x.jdet").exists()


@pytest.mark.slow
def test_wrong_platform_is_refused(tmp_path):
  config = ssd300.get_config("smoke")
  model = build_model("ssd", **config.model)
  mesh = parallel.make_mesh(jax.devices()[:1])
  predictor = Predictor(model, _variables(model, 0), config.data, ("a",) * 5, mesh=mesh,
                        batch_size=1, score_threshold=0.0)
  export_predictor(predictor, tmp_path / "gpu.jdet", platforms=("cuda",))
  with pytest.raises(ExportedFileError, match=r"gpu\.jdet: exported for \['cuda'\], not for "
                                              r"this machine's 'cpu'"):
    ExportedDetector.load(tmp_path / "gpu.jdet")
