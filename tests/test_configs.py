"""Config variants and their options (``configs/<model>.py:variant,key=value,flag``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from configs import common, faster_rcnn_r50_fpn, refinedet512, sparse_rcnn, ssd300, ssd512


@pytest.mark.parametrize("module, arg, unknown, known", [
    (ssd300, "coco,rot=/x", "['rot']", "['root']"),  # a typo of root
    (ssd512, "voc,root=/x,batch=8", "['batch']", "['root']"),  # another config's option
    (refinedet512, "coco,r101", "['r101']", "['root']"),
    (sparse_rcnn, "coco,r50", "['r50']", "['1x', 'batch', 'matcher', 'r101', 'root']"),
    (faster_rcnn_r50_fpn, "coco,1x", "['1x']", "['batch', 'root']"),
])
def test_a_variant_refuses_options_it_does_not_know(module, arg, unknown, known):
  variant = arg.split(",")[0]
  with pytest.raises(ValueError, match=rf"unknown option\(s\) {unknown!s}".replace("[", r"\[")
                     .replace("]", r"\]") + rf" for the '{variant}' variant; it takes "
                     + known.replace("[", r"\[").replace("]", r"\]")):
    module.get_config(arg)


@pytest.mark.parametrize("module, arg, field, value", [
    (ssd300, "coco,root=/data/x", "data.train.annotation_file", "/data/x/annotations/"),
    (faster_rcnn_r50_fpn, "coco,batch=8", "data.batch_size", 8),
    (sparse_rcnn, "coco,r101,1x", "model.depth", 101),
    (sparse_rcnn, "shapes,steps=100", "train.num_steps", 100),
])
def test_known_options_apply(module, arg, field, value):
  config = module.get_config(arg)
  got = config
  for part in field.split("."):
    got = got[part]
  assert got.startswith(value) if isinstance(value, str) else got == value


def test_options_remember_what_the_config_read():
  options = common.Options(a="1", b="true")
  assert options.get("a") == "1" and "c" not in options
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['b'\] for the 'v' variant; it "
                                       r"takes \['a', 'c'\]"):
    common.check_options(options, "v")
  assert options["b"] == "true"
  common.check_options(options, "v")  # all read now


RACCOON = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raccoon"


def test_the_small_recipe_is_the_measured_raccoon_recipe():
  """docs/raccoon.md's SSD and Faster R-CNN commands (recipe=shapes and overrides, on the
  160 training photos) are what recipe=small resolves to."""
  ssd = ssd300.get_config(f"custom,format=voc,root={RACCOON},recipe=small")
  assert common.num_train_images(ssd.data.train) == 160
  assert (ssd.model.image_size, ssd.data.transforms.size, ssd.model.size_rule) == \
      (192, 192, (0.3, 0.95, 0.15))
  assert (ssd.data.batch_size, ssd.data.num_workers, ssd.train.num_steps, ssd.train.eval_every,
          ssd.train.log_every, ssd.train.checkpoint_every) == (8, 0, 800, 200, 20, 0)
  shapes = ssd300.get_config("shapes")
  assert ssd.optim == shapes.optim and ssd.data.transforms.crop == shapes.data.transforms.crop
  frcnn = faster_rcnn_r50_fpn.get_config(f"custom,format=voc,root={RACCOON},recipe=small")
  t = frcnn.data.transforms
  assert (t.scales, t.mode, t.canvas, t.test_scale) == (((128, 256), (192, 256)), "range",
                                                        (256, 256), (192, 256))
  assert (frcnn.data.batch_size, frcnn.data.eval_batch_size, frcnn.train.num_steps,
          frcnn.train.eval_every, frcnn.optim.warmup_steps) == (8, 8, 1200, 200, 100)
  # Half the photos: half the steps, the same epochs.
  assert common.num_train_images(dict(kind="voc", root=str(RACCOON), splits=("val",))) == 40
  with pytest.raises(ValueError, match="recipe=small is not defined for this model yet"):
    sparse_rcnn.get_config(f"custom,format=voc,root={RACCOON},recipe=small")


def test_custom_data_keeps_the_papers_epochs():
  """recipe=coco on 160 photos: SSD300's 240,000 COCO steps at batch 32 (about 65.5 epochs
  of COCO's 117,266 images with boxes) become 327 steps, decays and intervals likewise."""
  paper = ssd300.get_config("coco")
  mine = ssd300.get_config(f"custom,format=voc,root={RACCOON}")
  f = 160 / common.COCO_TRAIN_IMAGES
  assert mine.train.num_steps == round(240_000 * f) == 327
  assert mine.optim.milestones == tuple(round(m * f) for m in paper.optim.milestones) == (218, 273)
  assert mine.train.eval_every == round(paper.train.eval_every * f)
  assert mine.optim.warmup_steps == max(1, round(paper.optim.warmup_steps * f))
  assert mine.data.batch_size == paper.data.batch_size
