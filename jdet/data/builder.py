"""The config's ``data`` section -> sources and transforms.

This is the only module that reads the data config (the layout is documented
in ``configs/common.py``)::

  source = builder.build_source(config.data, "train")          # a DetectionSource
  transform = builder.build_transforms(config.data, train=True)
  batches = pipeline.train_batches(source, transform, batch_size=..., seed=config.data.seed)

A mistake in the config (an unknown source ``kind`` or ``recipe``, a missing or
unexpected argument) raises :class:`ConfigError` naming the config field, e.g.
``data.train.kind``.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from jdet.data import transforms as T
from jdet.data.coco import CocoSource
from jdet.data.records import DetectionSource, Example, SkipLog, image_sizes
from jdet.data.shapes import ShapesSource
from jdet.data.tfds import TfdsSource
from jdet.data.voc import VocSource

__all__ = ["ConfigError", "SOURCE_KINDS", "RECIPES", "build_source", "build_transforms",
           "normalization", "ConcatSource", "put_configs_on_path"]

SPLITS = ("train", "val")


class ConfigError(ValueError):
  """A data config that cannot be built; the message names the field."""


class DataNotFoundError(ConfigError, FileNotFoundError):
  """A source's files are not on disk; the message says where they should be."""


# Where each file-backed source kind expects its data, for the start-up check.
_EXPECTED_PATHS = {
    "coco": ("annotation_file", "image_root"),
    "voc": ("root",),
}
_LAYOUTS = {
    "coco": "A COCO folder holds annotations/instances_{train,val}2017.json and the image "
            "folders train2017/ and val2017/; give it with the variant option root=DIR "
            "(e.g. configs/sparse_rcnn.py:coco,root=/data/coco)",
    "voc": "A VOC tree holds Annotations/, JPEGImages/ and ImageSets/Main/<split>.txt; give "
           "the folder above it with root=DIR (e.g. configs/ssd300.py:voc,root=/data/VOCdevkit)",
}


def check_data_present(kind: str, kwargs: Mapping[str, Any], where: str) -> None:
  """Raises :class:`DataNotFoundError` when a file-backed source's paths are missing.

  The message names the config field and the missing path, says what the folder
  must hold and points to the ``shapes`` variants, which need no download.
  """
  for field in _EXPECTED_PATHS.get(kind, ()):
    path = kwargs.get(field)
    if path is None or os.path.exists(path):
      continue
    if kind == "voc":  # root may hold several trees named by the splits
      splits = kwargs.get("splits") or ()
      if all(os.path.exists(os.path.join(path, s.split("/")[0])) for s in splits if "/" in s):
        continue
    raise DataNotFoundError(
        f"config field {where}.{field}: {path} does not exist. {_LAYOUTS[kind]}. To try jdet "
        f"without downloading a dataset, use a config's :shapes variant (generated images), "
        f"e.g. python train.py --config configs/sparse_rcnn.py:shapes --workdir runs/shapes")


# ----------------------------------------------------------------------------
# Sources.
# ----------------------------------------------------------------------------


class ConcatSource:
  """Several sources with the same classes, one after the other (e.g. VOC07+12 trainval).

  Attributes:
    parts: the sources, in order.
    class_names: their common class names.
    skip_log: the parts' shared skip log (the first part's), if they have one.
  """

  def __init__(self, parts: Sequence[DetectionSource]):
    if not parts:
      raise ValueError("ConcatSource needs at least one source")
    self.parts = list(parts)
    self.class_names = tuple(parts[0].class_names)
    for p in self.parts[1:]:
      if tuple(p.class_names) != self.class_names:
        raise ValueError(f"cannot concatenate sources with different classes: "
                         f"{list(self.class_names)} and {list(p.class_names)}")
    log = getattr(parts[0], "skip_log", None)
    if log is not None:
      self.skip_log = log
    self._offsets = np.cumsum([0] + [len(p) for p in self.parts])

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def __getitem__(self, index: int) -> Example | None:
    index = int(index)
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} images")
    part = int(np.searchsorted(self._offsets, index, side="right")) - 1
    return self.parts[part][index - int(self._offsets[part])]

  def category_id(self, label: int) -> int:
    return self.parts[0].category_id(label)

  def image_sizes(self, indices: Sequence[int] | None = None) -> np.ndarray:
    """``[n, 2]`` upright ``(h, w)`` at ``indices`` (default all), from each part
    (:func:`jdet.data.records.image_sizes`: undecoded where the part can)."""
    idx = np.arange(len(self)) if indices is None else np.asarray(indices, np.int64).reshape(-1)
    if len(idx) and not (0 <= idx.min() and idx.max() < len(self)):
      raise IndexError(f"indices out of range for {len(self)} images")
    part_of = np.searchsorted(self._offsets, idx, side="right") - 1
    out = np.zeros((len(idx), 2), np.int64)
    for p in np.unique(part_of).tolist():
      sel = part_of == p
      out[sel] = image_sizes(self.parts[p], idx[sel] - int(self._offsets[p]))
    return out

  def coco_ground_truth(self) -> dict:
    """The parts' ground truth merged; annotation ids renumbered; image ids must differ."""
    images, annotations, seen = [], [], set()
    for p in self.parts:
      gt = p.coco_ground_truth()
      for im in gt["images"]:
        if im["id"] in seen:
          raise ValueError(f"image id {im['id']} occurs in two concatenated sources")
        seen.add(im["id"])
        images.append(im)
      for a in gt["annotations"]:
        annotations.append({**a, "id": len(annotations) + 1})
    return dict(images=images, annotations=annotations,
                categories=self.parts[0].coco_ground_truth()["categories"])

  def __repr__(self) -> str:
    return f"ConcatSource({self.parts!r})"


def _voc(root: str, splits: Sequence[str], class_names: Sequence[str] | None = None,
         keep_difficult: bool = True, check_sizes: bool = True):
  """``splits``: ``"<folder>/<split>"`` under ``root``, or ``"<split>"`` of the tree ``root``."""
  if isinstance(splits, str):
    splits = (splits,)
  if not splits:
    raise ValueError("no VOC splits given")
  log = SkipLog(f"voc {'+'.join(splits)}")
  parts = []
  for spec in splits:
    folder, _, name = str(spec).rpartition("/")
    parts.append(VocSource(Path(root) / folder, name, class_names=class_names,
                           keep_difficult=keep_difficult, skip_log=log, check_sizes=check_sizes))
  return parts[0] if len(parts) == 1 else ConcatSource(parts)


# kind -> constructor taking the split config's other fields as keyword arguments.
SOURCE_KINDS: dict[str, Callable[..., DetectionSource]] = {
    "shapes": ShapesSource, "coco": CocoSource, "voc": _voc, "tfds": TfdsSource}


def _section(data_config: Any, name: str, where: str) -> Any:
  if name not in data_config:
    raise ConfigError(f"config field {where}.{name} is missing")
  return data_config[name]


def _plain(value: Any) -> Any:
  """ConfigDict values -> plain Python (ConfigDicts become dicts)."""
  if hasattr(value, "to_dict"):
    return value.to_dict()
  return value


def _call(fn: Callable, kwargs: Mapping[str, Any], where: str, what: str) -> Any:
  """``fn(**kwargs)``, after checking the arguments against ``fn``'s signature."""
  try:
    inspect.signature(fn).bind(**kwargs)
  except TypeError as e:
    raise ConfigError(f"config field {where}: bad arguments for {what}: {e}") from None
  return fn(**kwargs)



def _pop_choice(kwargs: dict, key: str, choices: Mapping, where: str, what: str) -> str:
  """Pops ``kwargs[key]`` and checks it names one of ``choices``; errors name the field."""
  if key not in kwargs:
    raise ConfigError(f"config field {where}.{key} is missing (one of {sorted(choices)})")
  value = kwargs.pop(key)
  if value not in choices:
    raise ConfigError(f"config field {where}.{key}: unknown {what} {value!r}; "
                      f"expected one of {sorted(choices)}")
  return value

def build_source(data_config: Any, split: str) -> DetectionSource:
  """The source of ``split`` described by ``data_config[split]``.

  Args:
    data_config: the config's ``data`` section (a ``ConfigDict`` or mapping).
      ``data_config[split].kind`` picks the source (:data:`SOURCE_KINDS`); the
      other fields of ``data_config[split]`` are its keyword arguments.
    split: ``"train"`` or ``"val"``.
  Returns:
    A :class:`~jdet.data.records.DetectionSource`.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
  where = f"data.{split}"
  section = _plain(_section(data_config, split, "data"))
  if not isinstance(section, Mapping):
    raise ConfigError(f"config field {where} must be a dict with a 'kind', got {section!r}")
  kwargs = dict(section)
  kind = _pop_choice(kwargs, "kind", SOURCE_KINDS, where, "source kind")
  check_data_present(kind, kwargs, where)
  return _call(SOURCE_KINDS[kind], kwargs, where, f"a {kind!r} source")


# ----------------------------------------------------------------------------
# Transforms.
# ----------------------------------------------------------------------------


def _ssd(*, train: bool, max_boxes: int, size: int, channel_swap: bool = True,
         mean: Sequence[float] = T.IMAGENET_MEAN, std: Sequence[float] = T.IMAGENET_STD,
         expand_ratio: float = 4.0, photometric: bool = True, crop: bool = True):
  if train:
    return T.ssd_train_transforms(size, max_boxes=max_boxes, mean=mean, std=std,
                                  channel_swap=channel_swap, expand_ratio=expand_ratio,
                                  photometric=photometric, crop=crop)
  return T.ssd_eval_transforms(size, max_boxes=max_boxes, mean=mean, std=std)


def _rcnn(*, train: bool, max_boxes: int, scales: Sequence[Sequence[int]],
          test_scale: Sequence[int], canvas: Sequence[int] | None = None,
          buckets: Sequence[Sequence[int]] | None = None, mode: str = "value",
          flip_prob: float = 0.5, mean: Sequence[float] = T.IMAGENET_MEAN,
          std: Sequence[float] = T.IMAGENET_STD, crop: bool = False,
          crop_scales: Sequence[Sequence[int]] = T.CROP_SCALES,
          crop_size: Sequence[int] = T.CROP_SIZE, crop_prob: float = 0.5):
  if canvas is None and buckets is None:
    raise ValueError("give canvas, buckets, or canvas and buckets (buckets in training, "
                     "canvas in evaluation)")
  if train:
    return T.rcnn_train_transforms(scales, mode=mode, canvas=canvas, buckets=buckets,
                                   max_boxes=max_boxes, mean=mean, std=std, flip_prob=flip_prob,
                                   crop=bool(crop), crop_scales=crop_scales, crop_size=crop_size,
                                   crop_prob=float(crop_prob))
  # Evaluation batches images in order, so with both given it pads to the one canvas.
  return T.rcnn_eval_transforms(test_scale, canvas=canvas,
                                buckets=buckets if canvas is None else None,
                                max_boxes=max_boxes, mean=mean, std=std)


# recipe -> builder taking train, max_boxes and the transforms config's other fields.
RECIPES: dict[str, Callable[..., T.Compose]] = {"ssd": _ssd, "rcnn": _rcnn}


def _transforms_section(data_config: Any) -> dict:
  section = _plain(_section(data_config, "transforms", "data"))
  if not isinstance(section, Mapping):
    raise ConfigError(f"config field data.transforms must be a dict with a 'recipe', "
                      f"got {section!r}")
  return dict(section)


def build_transforms(data_config: Any, *, train: bool) -> T.Compose:
  """The training or evaluation transforms of ``data_config.transforms``.

  Args:
    data_config: the config's ``data`` section. ``transforms.recipe`` picks the
      recipe (:data:`RECIPES`): ``"ssd"`` (``size``, ``channel_swap``, ``mean``,
      ``std``) or ``"rcnn"`` (``scales``, ``mode``, ``test_scale``, ``canvas``
      and/or ``buckets``, ``flip_prob``, ``mean``, ``std``, and for Sparse
      R-CNN's crop branch ``crop``, ``crop_scales``, ``crop_size``,
      ``crop_prob``: ``jdet.data.transforms.rcnn_resize``); ``max_boxes`` is M.
      With both ``canvas`` and ``buckets``, training pads to the buckets (use
      ``data.group_by_aspect`` so that a batch holds one of them) and
      evaluation, which batches images in order, to the canvas.
    train: the augmented training transforms, else the evaluation ones.
  Returns:
    A :class:`jdet.data.transforms.Compose` ending with ``PadBoxes(max_boxes)``.
  """
  kwargs = _transforms_section(data_config)
  recipe = _pop_choice(kwargs, "recipe", RECIPES, "data.transforms", "recipe")
  kwargs.update(train=train, max_boxes=int(_section(data_config, "max_boxes", "data")))
  try:
    return _call(RECIPES[recipe], kwargs, "data.transforms", f"the {recipe!r} recipe")
  except ValueError as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"config field data.transforms ({recipe!r} recipe): {e}") from e


def normalization(data_config: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """``(mean, std)`` that the transforms normalise with (to undo it for drawing)."""
  kwargs = _transforms_section(data_config)
  mean = kwargs.get("mean", T.IMAGENET_MEAN)
  std = kwargs.get("std", T.IMAGENET_STD)
  return tuple(float(v) for v in mean), tuple(float(v) for v in std)


# ----------------------------------------------------------------------------
# Finding the configs package.
# ----------------------------------------------------------------------------


def _repo_root_of(path: Path) -> Path | None:
  """The nearest folder at or above ``path`` that holds ``configs/common.py``."""
  for folder in (path, *path.parents):
    if (folder / "configs" / "common.py").is_file():
      return folder
  return None


def _config_flag_value(argv: Sequence[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def put_configs_on_path(argv: Sequence[str] | None = None, flag: str = "config") -> str | None:
  """Makes ``from configs import common`` work in config files, from any working directory.

  Call it before flags are parsed (config files are imported while parsing).
  It puts first on ``sys.path`` the repository root that holds the ``--config``
  file (the nearest folder above it with ``configs/common.py``), or else the
  root of the jdet source checkout, if it has ``configs/common.py``.

  Args:
    argv: the command line (default ``sys.argv``).
    flag: the name of the config flag.
  Returns:
    The folder put on the path, or None if none was found.
  """
  argv = sys.argv if argv is None else argv
  root = None
  value = _config_flag_value(argv[1:], flag)
  if value:
    root = _repo_root_of(Path(value.split(":", 1)[0]).resolve().parent)
  if root is None:
    checkout = Path(__file__).resolve().parents[2]  # jdet/data/builder.py -> the checkout
    if not (checkout / "configs" / "common.py").is_file():
      return None
    root = checkout
  root_str = str(root)
  if not sys.path or os.path.abspath(sys.path[0] or os.curdir) != root_str:
    if root_str in sys.path:
      sys.path.remove(root_str)
    sys.path.insert(0, root_str)
  return root_str
