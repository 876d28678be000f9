"""Config variants and their options (``configs/<model>.py:variant,key=value,flag``)."""

from __future__ import annotations

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
