"""Shared pieces of the model configs: the ``model``, ``optim``, ``train`` and ``data`` sections.

The ``model`` section is :func:`model_section`: every field of the registered
detector at its default (the paper's setting), with what the config changes::

  config.model = common.model_section("faster_rcnn", num_classes=80)

so that a config states only what differs from the module, and every field
can be overridden on the command line (``--config.model.norm_eps=0``).
``jdet.build_model`` refuses a key that is none of the model's fields.
:func:`optim_section` is the ``optim`` section, :func:`train` the ``train``
section.

A model config builds its data section from one *source* helper (which data,
for the ``train`` and ``val`` splits) and one *transforms* helper (which
augmentation recipe), joined by :func:`data_config`::

  from configs import common

  def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.data = common.data_config(
        common.shapes_data(image_size=128, num_train=2048, num_val=256),
        common.ssd_augment(128), batch_size=16)
    ...

The resulting section, which :mod:`jdet.data.builder` (the only reader) turns
into sources and transforms::

  data.num_classes      # classes of the dataset (None if unknown), for the model's check
  data.class_names      # (the ``custom`` variant only) the class names read from the data
  data.train, data.val  # one source each: ``kind`` ("shapes", "coco", "voc", "tfds")
                        # plus that kind's arguments
  data.transforms       # ``recipe`` ("ssd" or "rcnn") plus its parameters
  data.max_boxes        # M, boxes per image after padding
  data.batch_size       # global training batch
  data.eval_batch_size  # global evaluation batch
  data.num_workers      # grain worker processes per host (0: in the main process)
  data.seed             # shuffling and augmentation seed
  data.group_by_aspect  # batch landscape and portrait images apart (one canvas each)

Every field can be overridden on the command line, e.g.
``--config.data.seed=3`` or ``--config.data.train.num_images=64``.

Importing this module from a config file
----------------------------------------
Config files in ``configs/`` say ``from configs import common``: ``configs`` is
a package of the repository root, importable when the root is on
``sys.path``. It is when a program runs from the root: ``python train.py``
puts the script's folder (the root) first, ``python -m jdet.data.browse``
puts the working directory first, and pytest puts the root first for the
tests. For a program started from anywhere else, the programs call
:func:`jdet.data.builder.put_configs_on_path` before parsing flags, which puts
the root of the repository that holds the ``--config`` file (or of the jdet
source checkout) first on ``sys.path``. Config files never edit ``sys.path``
themselves.

Paths to datasets are arguments (e.g. a config variant string), never written
into this file.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import dataclasses
import json
import math
import os
from pathlib import Path

import ml_collections

from jdet.data.transforms import CROP_SCALES, CROP_SIZE, IMAGENET_MEAN, IMAGENET_STD
from jdet.models import MODELS
from jdet.models.detector import field_names

__all__ = ["parse_variant", "model_section", "narrow_vgg", "narrow_resnet", "optim_section",
           "epoch_schedule", "data_config", "shapes_data", "coco_data", "voc_data", "raccoon_data",
           "tfds_data", "ssd_augment", "rcnn_augment", "custom_config", "CUSTOM_OPTIONS",
           "COCO_TRAIN_IMAGES", "COCO_CANVAS", "COCO_BUCKETS"]

ConfigDict = ml_collections.ConfigDict

# Number of classes of the datasets the helpers know.
_NUM_CLASSES = {"shapes": 5, "coco": 80, "voc": 20, "raccoon": 1}

# train2017 images with at least one box (MMDetection's filter_empty_gt): 7,330 steps per
# epoch at batch 16.
COCO_TRAIN_IMAGES = 117_266
# The R50-FPN at 800 x 1333: a 1344 x 1344 canvas (a multiple of 64, P6's stride) holds every
# image in either orientation; evaluation, which batches images in order, pads to it.
COCO_CANVAS = (1344, 1344)
# Training batches hold one orientation (data.group_by_aspect) padded to its bucket: 0.62x
# the canvas's pixels. Landscape first: a square image fits both and Pad takes the first.
COCO_BUCKETS = ((832, 1344), (1344, 832))


class Options(dict):
  """A config's options (``key=value`` and flags after the variant), remembering which
  keys the config looked at, so that :func:`check_options` can refuse the others."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.read: set[str] = set()

  def get(self, key, default=None):
    self.read.add(key)
    return super().get(key, default)

  def __getitem__(self, key):
    self.read.add(key)
    return super().__getitem__(key)

  def __contains__(self, key) -> bool:
    self.read.add(key)
    return super().__contains__(key)


def check_options(options: "Options", variant: str) -> None:
  """Refuses the options the variant never looked at (a typo, or another variant's),
  naming the ones it knows."""
  unknown = sorted(set(options) - options.read)
  if unknown:
    raise ValueError(f"unknown option(s) {unknown} for the {variant!r} variant; it takes "
                     f"{sorted(options.read) or 'none'}")


def parse_variant(arg: str | None, variants: Sequence[str], *,
                  default: str) -> tuple[str, dict[str, str]]:
  """Splits a config argument ``"name[,key=value,...]"`` into the variant and its options.

  ``parse_variant("voc,root=data/VOCdevkit", ("coco", "voc"), default="coco")``
  gives ``("voc", {"root": "data/VOCdevkit"})``; a bare word is a flag
  (``"coco,r101"`` gives ``{"r101": "true"}``); an empty argument gives
  ``(default, {})``. An unknown variant or a malformed option raises a
  ValueError that lists the choices.
  """
  parts = [p.strip() for p in (arg or "").split(",")] if arg else []
  name = parts[0] if parts and "=" not in parts[0] else default
  options: dict[str, str] = {}
  for p in parts[1:] if parts and "=" not in parts[0] else parts:
    key, sep, value = p.partition("=")
    if not key or (sep and not key.strip()):
      raise ValueError(f"config option {p!r} is not key=value or a flag (in {arg!r})")
    options[key.strip()] = value.strip() if sep else "true"  # a bare word is a flag
  if name not in variants:
    raise ValueError(f"unknown config variant {name!r}; choose one of {list(variants)}")
  return name, Options(options)


def start_config(model_name: str, arg: str | None, variants: Sequence[str], get_config, *,
                 default: str = "coco",
                 small=None) -> tuple[ConfigDict, str, dict[str, str]]:
  """``(config, variant, options)`` for a model config's ``get_config(arg)``.

  For the ``custom`` variant the config is finished (:func:`custom_config` of
  ``get_config``); otherwise it holds the sections every variant shares
  (``model_name``, ``init``: no weights, ``eval``: COCO AP and 16 drawn images)
  and the variant adds ``model``, ``data``, ``optim`` and ``train``. ``small`` is the
  model's small-data recipe (:func:`custom_config`'s ``recipe=small``).
  """
  variant, options = parse_variant(arg, variants, default=default)
  if variant == "custom":  # your own data
    return custom_config(get_config, options, small=small), variant, options
  config = ConfigDict()
  config.model_name = model_name
  config.init = ConfigDict(dict(backbone="", weights=""))
  # What eval.py reports: "coco" (pycocotools) always; "voc" adds the VOC07 mAP.
  config.eval = ConfigDict(dict(metrics=("coco",), num_draw=16, draw_score=0.3))
  return config, variant, options


# ----------------------------------------------------------------------------
# The model and optimiser sections.
# ----------------------------------------------------------------------------


def _is_config_value(value) -> bool:
  """Whether a ConfigDict holds ``value`` as a plain, overridable setting."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return True
  return isinstance(value, (tuple, list)) and all(_is_config_value(v) for v in value)


def model_section(model_name: str, **settings) -> ConfigDict:
  """The ``model`` section of ``jdet.build_model(model_name, **config.model)``.

  Every field of the registered model at its default (the paper's setting),
  then ``settings`` (``num_classes`` and what the config changes). Fields whose
  default is no plain value (``dtype``) are left to the module. Unknown keys
  are refused by ``jdet.build_model``, which names them.
  """
  model = MODELS[model_name]
  defaults = {f.name: f.default for f in dataclasses.fields(model)
              if f.name in field_names(model) and f.default is not dataclasses.MISSING
              and _is_config_value(f.default)}
  return ConfigDict({**defaults, **settings})


def narrow_vgg(width: int) -> dict:
  """A narrow VGG16 with BatchNorm (trains from scratch) for the small inputs of the
  SSD and RefineDet ``shapes`` and ``smoke`` variants: stages of ``width`` .. 8 x
  ``width`` channels, fc6/fc7 of 8 x ``width``. The configs add their extra levels."""
  w = width
  return dict(widths=(w, 2 * w, 4 * w, 8 * w, 8 * w), fc_width=8 * w, norm="batch")


def narrow_resnet(width: int) -> dict:
  """A narrow ResNet-18 with BatchNorm, nothing frozen (trains from scratch), for the
  small inputs of the R-CNN ``shapes`` and ``smoke`` variants: stages of ``width`` ..
  8 x ``width`` channels, a stem of ``width``."""
  w = width
  return dict(depth=18, widths=(w, 2 * w, 4 * w, 8 * w), stem_width=w, norm="batch",
              frozen_stages=-1)


def optim_section(*, name: str, lr: float, weight_decay: float, milestones=(),
                  warmup_steps: int = 500, warmup_factor: float = 0.001, clip_norm: float = 0.0,
                  freeze=(), **settings) -> ConfigDict:
  """The ``optim`` section (``jdet.engine.optim.build_optimizer`` reads every key).

  ``name`` (``"sgd"`` with momentum 0.9, or ``"adamw"`` with betas 0.9, 0.999 and
  epsilon 1e-8) at ``lr``, weight decay on every parameter (biases and norms too),
  linear warm-up over ``warmup_steps`` from ``warmup_factor`` x ``lr``, steps of
  0.1 at ``milestones``; ``clip_norm`` 0 does not clip. ``settings`` add or
  replace keys (``schedule="cosine"``, ``lr_mult=...``).
  """
  return ConfigDict(dict(
      dict(name=name, lr=lr, momentum=0.9, nesterov=False, weight_decay=weight_decay,
           decay_bias_and_norm=True, clip_norm=clip_norm, b1=0.9, b2=0.999, eps=1e-8,
           schedule="step", warmup_steps=warmup_steps, warmup_factor=warmup_factor,
           milestones=tuple(milestones), gamma=0.1, min_lr_ratio=0.0, freeze=tuple(freeze)),
      **settings))


def epoch_schedule(batch: int, epochs: int, milestones) -> tuple[int, tuple[int, ...]]:
  """``(num_steps, milestone steps)`` of an epoch schedule on COCO train2017 (the images
  with boxes, :data:`COCO_TRAIN_IMAGES`) at ``batch``; ``milestones`` in epochs."""
  per_epoch = math.ceil(COCO_TRAIN_IMAGES / batch)
  return epochs * per_epoch, tuple(m * per_epoch for m in milestones)


def _source(num_classes: int | None, train: dict, val: dict) -> ConfigDict:
  return ConfigDict(dict(num_classes=num_classes, train=train, val=val))


# ----------------------------------------------------------------------------
# Sources: return ConfigDict(num_classes=..., train=..., val=...).
# ----------------------------------------------------------------------------


def shapes_data(*, image_size: int = 128, num_train: int = 2048, num_val: int = 256,
                seed: int = 0, min_objects: int = 1, max_objects: int = 6,
                min_size: float = 0.08, max_size: float = 0.85,
                min_visible: float = 0.5) -> ConfigDict:
  """Generated shapes (:class:`jdet.data.shapes.ShapesSource`): no files, 5 classes.

  Args:
    image_size: side of the square images.
    num_train, num_val: images in each split (the splits never share images).
    seed: the images' seed (not the pipeline's, which is ``data.seed``).
    min_objects, max_objects, min_size, max_size, min_visible: see ``ShapesSource``.
  """
  def split(name: str, n: int) -> dict:
    return dict(kind="shapes", split=name, num_images=n, image_size=image_size, seed=seed,
                min_objects=min_objects, max_objects=max_objects, min_size=min_size,
                max_size=max_size, min_visible=min_visible)

  return _source(_NUM_CLASSES["shapes"], split("train", num_train), split("val", num_val))


# The data of every detector's ``shapes`` variant (the CPU quick start): 128-pixel
# images, objects of 10 .. 110 pixels, each keeping at least three quarters of
# its pixels visible. With half (``min_visible=0.5``, the generator's default)
# a large share of the boxes, which cover the whole shape, are guesses about
# hidden parts; the variants take ``min_visible=`` as an option to train and
# evaluate on that harder split (see docs/results.md for both).
SHAPES_MIN_VISIBLE = 0.75


def shapes_quickstart_data(options: dict[str, str]) -> ConfigDict:
  """The ``shapes`` variants' source section (option ``min_visible=``)."""
  return shapes_data(image_size=128, num_train=50_000, num_val=256,
                     min_visible=float(options.get("min_visible", SHAPES_MIN_VISIBLE)))


def coco_data(root: str, *, year: int = 2017, train_keep_empty: bool = False,
              check_sizes: bool = True) -> ConfigDict:
  """COCO detection (:class:`jdet.data.coco.CocoSource`), 80 classes.

  Args:
    root: the COCO folder with ``annotations/instances_{train,val}<year>.json``
      and the image folders ``train<year>/`` and ``val<year>/``.
    year: 2017 (or 2014).
    train_keep_empty: keep training images without boxes (MMDetection and
      the SSD recipes leave them out); validation always keeps them.
    check_sizes: read every image header at start-up.
  """
  def split(name: str, keep_empty: bool) -> dict:
    return dict(kind="coco", annotation_file=f"{root}/annotations/instances_{name}{year}.json",
                image_root=f"{root}/{name}{year}", keep_empty=keep_empty, check_sizes=check_sizes)

  return _source(_NUM_CLASSES["coco"], split("train", train_keep_empty), split("val", True))


def voc_data(root: str, *, train_splits: Sequence[str] = ("VOC2007/trainval", "VOC2012/trainval"),
             test_split: str = "VOC2007/test", class_names: Sequence[str] | None = None,
             check_sizes: bool = True) -> ConfigDict:
  """Pascal VOC-layout data (:class:`jdet.data.voc.VocSource`).

  Args:
    root: the folder the splits are relative to (``VOCdevkit`` for VOC).
    train_splits: the training data, concatenated: each ``"<folder>/<split>"``
      (``root/<folder>`` is a VOC tree and ``<split>`` names
      ``ImageSets/Main/<split>.txt``) or ``"<split>"`` when ``root`` is the tree.
      The default is the SSD paper's VOC07+12 trainval.
    test_split: the validation data, in the same form (VOC2007 test).
    class_names: the classes in label order; None infers them (the 20 VOC
      classes for a VOC tree).
    check_sizes: read every image header at start-up.
  """
  def split(splits: Sequence[str]) -> dict:
    return dict(kind="voc", root=root, splits=tuple(splits),
                class_names=None if class_names is None else tuple(class_names),
                check_sizes=check_sizes)

  num_classes = _NUM_CLASSES["voc"] if class_names is None else len(class_names)
  return _source(num_classes, split(train_splits), split((test_split,)))


def raccoon_data(root: str) -> ConfigDict:
  """The raccoon photos (one class, VOC layout, splits ``train`` and ``val``).

  Args:
    root: the tree holding ``Annotations/``, ``JPEGImages/``, ``ImageSets/``.
  """
  return voc_data(root, train_splits=("train",), test_split="val", class_names=("raccoon",))


def tfds_data(name: str, *, train_split: str = "train", val_split: str = "validation",
              data_dir: str | None = None, num_classes: int | None = None) -> ConfigDict:
  """A prepared TensorFlow Datasets copy (:class:`jdet.data.tfds.TfdsSource`).

  Args:
    name: ``"coco/2017"``, ``"voc/2007"``, ``"voc/2012"``, ...
    train_split, val_split: tfds split names (VOC's test split is ``"test"``).
    data_dir: where it was prepared (tfds's default if None).
    num_classes: the number of classes; by default known for coco and voc.
  """
  if num_classes is None:
    num_classes = _NUM_CLASSES.get(name.split("/", 1)[0])

  def split(s: str) -> dict:
    return dict(kind="tfds", name=name, split=s, data_dir=data_dir)

  return _source(num_classes, split(train_split), split(val_split))


# ----------------------------------------------------------------------------
# Transforms: return ConfigDict(recipe=..., parameters...).
# ----------------------------------------------------------------------------


def ssd_augment(size: int = 300, *, channel_swap: bool = True,
                mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD, expand_ratio: float = 4.0,
                photometric: bool = True, crop: bool = True) -> ConfigDict:
  """The SSD / RefineDet recipe (``jdet.data.transforms.ssd_train_transforms`` & eval).

  Training: photometric distortion (``photometric``), zoom out up to
  ``expand_ratio`` (1: off), min-IoU crop (``crop``), flip, resize to
  ``size`` x ``size``, normalise. Evaluation: resize, normalise.
  """
  return ConfigDict(dict(recipe="ssd", size=size, channel_swap=channel_swap, mean=tuple(mean),
                         std=tuple(std), expand_ratio=float(expand_ratio),
                         photometric=bool(photometric), crop=bool(crop)))


def rcnn_augment(scales: Sequence[Sequence[int]] = ((800, 1333),),
                 canvas: Sequence[int] | None = (1344, 1344), *, mode: str = "value",
                 test_scale: Sequence[int] | None = None,
                 buckets: Sequence[Sequence[int]] | None = None, flip_prob: float = 0.5,
                 mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, crop: bool = False,
                 crop_scales: Sequence[Sequence[int]] = CROP_SCALES,
                 crop_size: Sequence[int] = CROP_SIZE, crop_prob: float = 0.5) -> ConfigDict:
  """The Faster / Sparse R-CNN recipe (``jdet.data.transforms.rcnn_train_transforms`` & eval).

  Args:
    scales: training ``(short, max_long)`` pairs, picked per ``mode``
      (``"value"``: one of them; ``"range"``: uniform in between).
    canvas: ``(H, W)`` every image is padded to (bottom/right).
    test_scale: the evaluation ``(short, max_long)``; default the largest of ``scales``.
    buckets: ``(H, W)`` sizes to pad to instead of ``canvas`` (the smallest that fits).
    flip_prob: horizontal flip probability in training.
    mean, std: normalisation, per RGB channel in 0..255 units.
    crop, crop_scales, crop_size, crop_prob: the crop branch (off by default;
      Sparse R-CNN's 300-proposal recipe): with probability ``crop_prob`` an
      image is resized to one of ``crop_scales``, cropped to a random size in
      ``crop_size`` pixels a side, then resized as the others. A crop can turn
      an image's orientation: pad to a square ``canvas``, not to ``buckets``.
  """
  scales = tuple((int(s), int(l)) for s, l in scales)
  if test_scale is None:
    test_scale = max(scales)
  return ConfigDict(dict(
      recipe="rcnn", scales=scales, mode=mode, test_scale=tuple(int(v) for v in test_scale),
      canvas=None if canvas is None else tuple(int(v) for v in canvas),
      buckets=None if buckets is None else tuple(tuple(int(v) for v in b) for b in buckets),
      flip_prob=flip_prob, mean=tuple(mean), std=tuple(std), crop=bool(crop),
      crop_scales=tuple(tuple(int(v) for v in s) for s in crop_scales),
      crop_size=tuple(int(v) for v in crop_size), crop_prob=float(crop_prob)))


# ----------------------------------------------------------------------------
# The whole section.
# ----------------------------------------------------------------------------


def data_config(source: ConfigDict, transforms: ConfigDict, *, batch_size: int,
                eval_batch_size: int | None = None, max_boxes: int = 100, num_workers: int = 0,
                seed: int = 0, group_by_aspect: bool = False) -> ConfigDict:
  """The ``data`` section: a source helper's result, a transforms helper's, and the loader.

  Args:
    source: from :func:`shapes_data`, :func:`coco_data`, ... (``num_classes``,
      ``train``, ``val``).
    transforms: from :func:`ssd_augment` or :func:`rcnn_augment`.
    batch_size: global training batch (images over all devices and hosts).
    eval_batch_size: global evaluation batch; default ``batch_size``.
    max_boxes: M, ground-truth boxes per image after padding.
    num_workers: grain worker processes per host (0 reads in the main process).
    seed: shuffling and augmentation seed.
    group_by_aspect: training batches hold only landscape (``w >= h``) or only
      portrait images (``jdet.data.pipeline.train_batches``), so that the R-CNN
      recipe can pad to one bucket per orientation (``rcnn_augment(buckets=...)``).
  """
  return ConfigDict(dict(
      num_classes=source.num_classes, train=source.train, val=source.val,
      transforms=transforms, max_boxes=max_boxes, batch_size=batch_size,
      eval_batch_size=batch_size if eval_batch_size is None else eval_batch_size,
      num_workers=num_workers, seed=seed, group_by_aspect=bool(group_by_aspect)))


def train(*, num_steps: int, log_every: int = 50, eval_every: int = 10_000,
          checkpoint_every: int = 5_000) -> ConfigDict:
  """The ``train`` section: ``num_steps``, logging, periodic evaluation and
  checkpoints (the last 2 and the best by AP kept), seed 0. An interval of 0
  turns that periodic work off (the last step is still logged and saved);
  ``jdet.engine.training.check_config`` checks the section at start-up."""
  return ConfigDict(dict(
      num_steps=num_steps, log_every=log_every, eval_every=eval_every,
      checkpoint_every=checkpoint_every, keep_checkpoints=2, keep_best=1, seed=0,
      eval_max_images=0))


# ----------------------------------------------------------------------------
# Your own data: the ``custom`` variant of every model config.
# ----------------------------------------------------------------------------

# The options of the ``custom`` variant (see :func:`custom_config`).
CUSTOM_OPTIONS = ("format", "root", "train", "val", "images", "train_images", "val_images",
                  "classes", "recipe")


def _split_file(root: str, split: str) -> str:
  return os.path.join(root, "ImageSets", "Main", f"{split}.txt")


def _voc_class_names(root: str) -> tuple[str, ...]:
  """The classes of a VOC-layout tree, as :class:`jdet.data.voc.VocSource` infers them:
  the 20 VOC classes for a VOC tree, else the sorted object names of all annotations."""
  from jdet.data.voc import VocSource  # reads every Annotations/*.xml
  ann_dir = os.path.join(root, "Annotations")
  if not os.path.isdir(ann_dir):
    raise FileNotFoundError(f"custom data: {ann_dir} not found; format=voc needs a VOC-layout "
                            f"tree (Annotations/, JPEGImages/, ImageSets/Main/<split>.txt)")
  names = sorted(p.stem for p in Path(ann_dir).glob("*.xml"))
  if not names:
    raise FileNotFoundError(f"custom data: no .xml files in {ann_dir}")
  found = VocSource._infer_classes(Path(ann_dir), names, {})
  if not found:
    raise ValueError(f"custom data: no <object><name> in the XML files of {ann_dir}")
  return tuple(found)


def _coco_class_names(annotation_file: str) -> tuple[str, ...]:
  """The category names of a COCO JSON file, in the order of their ids (jdet's labels)."""
  if not os.path.isfile(annotation_file):
    raise FileNotFoundError(f"custom data: annotation file {annotation_file} not found")
  with open(annotation_file, encoding="utf-8") as f:
    categories = json.load(f).get("categories")
  if not categories:
    raise ValueError(f"custom data: {annotation_file} has no 'categories' list")
  return tuple(c["name"] for c in sorted(categories, key=lambda c: c["id"]))


def custom_data(options: dict[str, str]) -> tuple[ConfigDict, tuple[str, ...], str]:
  """The source section of the ``custom`` variant, the class names and the format.

  ``format=voc``: ``root=DIR`` (a VOC-layout tree), ``train=`` / ``val=`` the
  split names of ``ImageSets/Main`` (default ``train`` / ``val``, else
  ``trainval`` / ``test``), ``classes=a+b+c`` (default: every object name in
  ``Annotations/``, sorted). ``format=coco``: ``train=A.json``, ``val=B.json``
  and ``images=DIR`` (or ``train_images=`` / ``val_images=``); the classes are
  the training file's categories by id (the validation file's must be the same).
  """
  fmt = options.get("format", "voc" if "root" in options else "coco")
  if fmt == "voc":
    if "root" not in options:
      raise ValueError("custom data, format=voc: give root=DIR (the folder holding "
                       "Annotations/, JPEGImages/ and ImageSets/Main/)")
    root = options["root"]
    train = options.get("train") or next(
        (s for s in ("train", "trainval") if os.path.isfile(_split_file(root, s))), "train")
    val = options.get("val") or next(
        (s for s in ("val", "test") if os.path.isfile(_split_file(root, s))), "val")
    for split in (train, val):
      if not os.path.isfile(_split_file(root, split)):
        raise FileNotFoundError(f"custom data: split file {_split_file(root, split)} not found "
                                f"(train=NAME / val=NAME name files of ImageSets/Main)")
    if options.get("classes"):
      names = tuple(n.strip() for n in options["classes"].split("+") if n.strip())
    else:
      names = _voc_class_names(root)
    return voc_data(root, train_splits=(train,), test_split=val, class_names=names), names, fmt
  if fmt == "coco":
    missing = [k for k in ("train", "val") if not options.get(k)]
    if missing:
      raise ValueError(f"custom data, format=coco: give train=A.json and val=B.json "
                       f"(and images=DIR); missing {missing}")
    if options.get("classes"):
      raise ValueError("custom data, format=coco: the classes are the JSON's categories; "
                       "classes= is for format=voc")
    images = options.get("images")
    train_images = options.get("train_images", images)
    val_images = options.get("val_images", images)
    if not train_images or not val_images:
      raise ValueError("custom data, format=coco: give images=DIR (or train_images= and "
                       "val_images=), the folder the JSON's file_name entries are relative to")
    names = _coco_class_names(options["train"])
    val_names = _coco_class_names(options["val"])
    if val_names != names:
      raise ValueError(f"custom data: the categories of {options['val']} {list(val_names)} "
                       f"differ from those of {options['train']} {list(names)}")
    def split(file: str, image_root: str, keep_empty: bool) -> dict:
      return dict(kind="coco", annotation_file=file, image_root=image_root,
                  keep_empty=keep_empty, check_sizes=True)
    return (_source(len(names), split(options["train"], train_images, False),
                    split(options["val"], val_images, True)), names, fmt)
  raise ValueError(f"custom data: unknown format={fmt!r}; choose voc or coco")


def num_train_images(train: Mapping) -> int:
  """The number of training images of a custom data section (``data.train``): the names
  in the VOC split files, or the images with at least one box in the COCO file."""
  if train["kind"] == "voc":
    return sum(len(Path(_split_file(train["root"], split)).read_text().split())
               for split in train["splits"])
  with open(train["annotation_file"], encoding="utf-8") as f:
    coco = json.load(f)
  with_boxes = {a["image_id"] for a in coco.get("annotations", [])}
  return len(with_boxes) if not train.get("keep_empty") else len(coco.get("images", []))


def scale_schedule(config: ConfigDict, factor: float) -> None:
  """Scales every step count of ``config``'s schedule (steps, warm-up, decay points,
  evaluation and checkpoint intervals) by ``factor``: the same epochs on another number of
  images at the same batch. An interval of 0 stays "off"; a count stays at least 1."""
  def scaled(n: int) -> int:
    return max(1, round(n * factor)) if n else 0

  config.train.num_steps = scaled(int(config.train.num_steps))
  for name in ("eval_every", "checkpoint_every"):
    config.train[name] = min(scaled(int(config.train[name])), config.train.num_steps)
  config.train.log_every = max(1, min(int(config.train.log_every), config.train.num_steps))
  config.optim.warmup_steps = scaled(int(config.optim.warmup_steps))
  config.optim.milestones = tuple(scaled(int(m)) for m in config.optim.milestones)


def small_schedule(config: ConfigDict, num_images: int, *, epochs: int, eval_epochs: int,
                   warmup_epochs: int, batch: int = 8) -> None:
  """A schedule in epochs of ``num_images`` at ``batch`` (the small-data recipes): steps,
  evaluation every ``eval_epochs``, warm-up, no periodic checkpoints but those of the
  evaluations and the last step."""
  per_epoch = max(1, math.ceil(num_images / batch))
  config.data.batch_size = batch
  config.data.num_workers = 0
  config.train.num_steps = epochs * per_epoch
  config.train.eval_every = min(eval_epochs * per_epoch, config.train.num_steps)
  config.train.log_every = min(20, config.train.num_steps)
  config.train.checkpoint_every = 0
  config.optim.warmup_steps = min(warmup_epochs * per_epoch, config.train.num_steps // 4)


def custom_config(get_config, options: dict[str, str], *, small=None) -> ConfigDict:
  """The ``custom`` variant of a model config: its ``recipe`` on your own data.

  Every model config (``configs/<model>.py:custom,...``) calls this with its own
  ``get_config``. The config of variant ``recipe=`` (default ``coco``: the
  paper's COCO setting; ``shapes`` the CPU quick start, ``smoke`` a tiny model
  for tests) is built and its data sources replaced by :func:`custom_data`'s;
  the model's ``num_classes`` and ``data.num_classes`` become the number of
  classes read from the data. With ``recipe=coco`` the schedule keeps the paper's
  epochs on your images (steps, warm-up, decay points and intervals scaled by
  the number of training images over COCO's); ``recipe=small`` is the model's
  small-data recipe (the ``shapes`` model at the input size and augmentation
  that the raccoon photos measured, with a schedule in epochs; ``small``, given
  by the model's config); ``shapes`` and ``smoke`` keep their steps. Override
  anything on the command line, e.g. ``--config.train.num_steps=3000``. ``data.class_names`` records the class
  names; ``train.py`` writes them next to the checkpoints.

    python train.py --config configs/ssd300.py:custom,format=voc,root=data/raccoon ...
    python train.py --config "configs/faster_rcnn_r50_fpn.py:custom,format=coco,\
        train=train.json,val=val.json,images=photos" ...
  """
  unknown = sorted(set(options) - set(CUSTOM_OPTIONS))
  if unknown:
    raise ValueError(f"unknown options {unknown} of the custom variant; it takes "
                     f"{list(CUSTOM_OPTIONS)}")
  recipe = options.get("recipe", "coco")
  if recipe == "custom":
    raise ValueError("recipe=custom: name the variant whose recipe to use (coco, small, "
                     "shapes, smoke)")
  if recipe == "small" and small is None:
    raise ValueError("recipe=small is not defined for this model yet; use recipe=shapes "
                     "with overrides (docs/raccoon.md)")
  config = get_config("shapes" if recipe == "small" else recipe)
  source, names, fmt = custom_data(options)
  config.data.train = source.train
  config.data.val = source.val
  config.data.num_classes = len(names)
  config.data.class_names = names
  config.model.num_classes = len(names)
  if recipe == "coco":  # the paper's epochs on these images, not COCO's steps
    scale_schedule(config, num_train_images(source.train) / COCO_TRAIN_IMAGES)
  elif recipe == "small":
    small(config, num_train_images(source.train))
  if fmt == "voc" and "eval" in config and "voc" not in tuple(config.eval.metrics):
    config.eval.metrics = tuple(config.eval.metrics) + ("voc",)  # VOC07 mAP as well
  return config
