"""The dataset browser and the data-config builder, end to end on generated shapes."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from configs import common
from jdet import viz
from jdet.data import browse, builder, pipeline
from jdet.data import transforms as T
from jdet.data.shapes import CLASS_NAMES, ShapesSource

ROOT = Path(__file__).resolve().parents[2]
SIZE, MAX_BOXES = 64, 10

CONFIG = textwrap.dedent(f'''\
    """A tiny shapes config for the browser test."""
    import ml_collections

    from configs import common


    def get_config(arg=None):
      config = ml_collections.ConfigDict()
      config.data = common.data_config(
          common.shapes_data(image_size={SIZE}, num_train=8, num_val=3, seed=5),
          common.ssd_augment({SIZE}), batch_size=4, max_boxes={MAX_BOXES})
      return config
    ''')


@pytest.fixture
def config_file(tmp_path):
  path = tmp_path / "tiny_shapes.py"
  path.write_text(CONFIG)
  return path


def _load(path):
  spec = importlib.util.spec_from_file_location("tiny_shapes_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _read_png(path):
  return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def test_command_line_draws_the_training_pipeline(config_file, tmp_path):
  out = tmp_path / "grid.png"
  cmd = [sys.executable, "-m", "jdet.data.browse", "--config", str(config_file), "--split",
         "train", "--num", "4", "--out", str(out), "--config.data.seed=3"]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert "4 images" in result.stdout and "boxes drawn" in result.stdout
  grid = _read_png(out)
  assert grid.shape == (2 * SIZE + 2, 2 * SIZE + 2, 3)  # 2 x 2 cells, 2-pixel gaps

  # The same samples, fetched here from the pipeline with the overridden seed.
  data = _load(config_file).data
  source = ShapesSource(8, image_size=SIZE, seed=5, split="train")
  transform = T.ssd_train_transforms(SIZE, max_boxes=MAX_BOXES)
  batch = next(pipeline.train_batches(source, transform, batch_size=4, seed=3))
  assert data.seed == 0  # the file's seed; the command line said 3
  # Box outlines in the class colour along each box's left edge, in its grid cell.
  hits, total = 0, 0
  for k in range(4):
    top, left = (k // 2) * (SIZE + 2), (k % 2) * (SIZE + 2)
    for box, label in zip(batch["boxes"][k], batch["labels"][k]):
      if label < 0:
        continue
      x = left + int(np.floor(box[0]))
      rows = slice(top + int(np.floor(box[1])), top + int(np.ceil(box[3])))
      edge = grid[rows, x]
      total += 1
      hits += np.mean(np.all(edge == viz.class_colour(label), axis=-1)) > 0.5
  assert total > 0 and hits >= 0.8 * total
  # And the whole grid is that batch, un-normalised and drawn.
  expect = [viz.draw_boxes(im, b, l, CLASS_NAMES, mean=T.IMAGENET_MEAN, std=T.IMAGENET_STD)
            for im, b, l in zip(batch["image"], batch["boxes"], batch["labels"])]
  assert np.array_equal(grid, viz.image_grid(expect, cols=2))


def test_val_split_shows_each_image_once(config_file, tmp_path):
  data = _load(config_file).data
  out = tmp_path / "val.png"
  summary = browse.browse(data, split="val", num=5, out=str(out))
  assert summary["images"] == 3  # the val split has 3 images
  assert summary["dropped_boxes"] == 0 and summary["truncated_boxes"] == 0
  source = ShapesSource(3, image_size=SIZE, seed=5, split="val")
  assert summary["boxes"] == sum(len(source[i].labels) for i in range(3))
  assert summary["skips"] is None  # shapes keep no skip log
  assert _read_png(out).shape == (2 * SIZE + 2, 2 * SIZE + 2, 3)
  assert "3 images" in browse.format_summary(summary)


def test_builder_makes_the_configured_source_and_transforms(config_file):
  data = _load(config_file).data
  source = builder.build_source(data, "val")
  assert isinstance(source, ShapesSource) and len(source) == 3 and source.split == "val"
  sample = T.sample_from_example(source[0])
  got = builder.build_transforms(data, train=False)(sample, None)
  want = T.ssd_eval_transforms(SIZE, max_boxes=MAX_BOXES)(sample, None)
  for key in ("image", "boxes", "labels"):
    np.testing.assert_array_equal(got[key], want[key])
  assert builder.normalization(data) == (T.IMAGENET_MEAN, T.IMAGENET_STD)


def test_builder_makes_the_rcnn_recipe():
  data = common.data_config(common.shapes_data(image_size=50, num_train=2, num_val=2),
                            common.rcnn_augment(((32, 48),), (48, 48)), batch_size=2)
  source = builder.build_source(data, "train")
  sample = builder.build_transforms(data, train=False)(T.sample_from_example(source[0]), None)
  assert sample["image"].shape == (48, 48, 3)
  assert tuple(sample["image_size"]) == (32, 32)


def _data():
  return common.data_config(common.shapes_data(image_size=32, num_train=4, num_val=2),
                            common.ssd_augment(32), batch_size=2)


@pytest.mark.parametrize("section, field, value, build", [
    ("train", "kind", "imagenet", lambda data: builder.build_source(data, "train")),
    ("transforms", "recipe", "yolo", lambda data: builder.build_transforms(data, train=True)),
], ids=["unknown_source_kind", "unknown_recipe"])
def test_unknown_choice_names_the_field(section, field, value, build):
  data = _data()
  data[section][field] = value
  with pytest.raises(builder.ConfigError, match=rf"data\.{section}\.{field}.*'{value}'"):
    build(data)


def test_unexpected_source_argument_names_the_field():
  data = _data()
  data.val.colour = "red"
  with pytest.raises(builder.ConfigError, match=r"data\.val.*colour"):
    builder.build_source(data, "val")
  del data.val.colour
  del data.val.kind
  with pytest.raises(builder.ConfigError, match=r"data\.val\.kind is missing"):
    builder.build_source(data, "val")


def test_rcnn_recipe_needs_canvas_or_buckets():
  data = common.data_config(_data(), common.rcnn_augment(canvas=None), batch_size=2)
  with pytest.raises(builder.ConfigError, match=r"data\.transforms.*canvas and buckets"):
    builder.build_transforms(data, train=True)


def test_concat_source_chains_parts_and_checks_ids():
  a = ShapesSource(3, image_size=32, seed=1)
  b = ShapesSource(2, image_size=32, seed=2)
  both = builder.ConcatSource([a, b])
  assert len(both) == 5 and both.class_names == CLASS_NAMES
  np.testing.assert_array_equal(both[3].image, b[0].image)
  np.testing.assert_array_equal(both[-1].boxes, b[1].boxes)
  with pytest.raises(IndexError):
    both[5]
  with pytest.raises(ValueError, match="image id 1"):  # both number their images from 1
    both.coco_ground_truth()


def test_configs_go_on_the_path_from_any_folder(tmp_path, monkeypatch):
  repo = tmp_path / "repo"
  (repo / "configs").mkdir(parents=True)
  (repo / "configs" / "common.py").write_text("")
  monkeypatch.setattr(sys, "path", list(sys.path))
  root = builder.put_configs_on_path(["prog", f"--config={repo}/configs/x.py:smoke"])
  assert root == str(repo.resolve()) and sys.path[0] == root
  # A config elsewhere falls back to the jdet checkout.
  root = builder.put_configs_on_path(["prog", "--config", str(tmp_path / "y.py")])
  assert root == str(ROOT) and sys.path[0] == root
  assert os.path.isfile(os.path.join(root, "configs", "common.py"))
