"""torchvision state dicts -> jdet parameter trees (SSD300 VGG16 and ImageNet VGG16).

Pure functions of a ``{name: np.ndarray}`` state dict (as
:func:`jdet.convert.read_state_dict` returns it); nothing here imports torch.

Two conversions:

* :func:`ssd300_vgg16_params`: the whole ``torchvision.models.detection.ssd300_vgg16``
  -> ``{"backbone": ..., "head": ...}`` of :class:`jdet.models.ssd.SSD` (with
  ``clamp_default_boxes=True, size_rule=(0.15, 0.9, 0.07)`` the two models
  compute the same function).
* :func:`vgg16_backbone_params`: a plain ImageNet ``torchvision.models.vgg16``
  -> the VGG16 part of jdet's backbone (``conv1_1`` .. ``conv5_3``).

The name map (torchvision's ``nn.Sequential`` indices count the ReLUs and
pools between the convolutions)::

  torchvision ssd300_vgg16                      jdet (under params)
  backbone.features.{0,2}                       backbone/conv1_{1,2}
  backbone.features.{5,7}                       backbone/conv2_{1,2}
  backbone.features.{10,12,14}                  backbone/conv3_{1,2,3}
  backbone.features.{17,19,21}                  backbone/conv4_{1,2,3}
  backbone.scale_weight                         backbone/conv4_3_norm/scale
  backbone.extra.0.{1,3,5}                      backbone/conv5_{1,2,3}   (extra.0.0 is pool4)
  backbone.extra.0.7.{1,3}                      backbone/fc6, fc7        (extra.0.7.0 is pool5)
  backbone.extra.{n}.{0,2}   n = 1, 2, ...      backbone/conv{n+7}_{1,2} (conv8_1 .. conv11_2)
  head.classification_head.module_list.{k}      head/cls_{k}
  head.regression_head.module_list.{k}          head/box_{k}

  torchvision vgg16                             jdet
  features.{0,2,5,7,10,12,14,17,19,21}          backbone/conv1_1 .. conv4_3 (as above)
  features.{24,26,28}                           backbone/conv5_{1,2,3}
  classifier.*                                  not used

Every convolution's ``weight [O, I, kh, kw]`` (OIHW) becomes ``kernel
[kh, kw, I, O]`` (HWIO, Flax's layout) and its ``bias [O]`` stays ``bias``.
The head needs no reordering: torchvision's ``SSDScoringHead`` reads a level's
``P * K`` channels as ``(box, column)`` at each location and flattens to
``(row, column of the map, box)``, which is how :class:`~jdet.models.heads.ssd_head.SSDHead`
flattens its NHWC output.

fc6 and fc7 of an ImageNet VGG16 are fully connected layers; the SSD paper
subsamples them into the dilated convolutions, torchvision does not (its
``ssd300_vgg16`` initialises fc6/fc7 at random, Xavier), and neither does
:func:`vgg16_backbone_params`: those layers, the L2Norm scale and the extra
layers keep the model's own initialisation.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from jdet.class_names import coco91_columns

__all__ = ["coco91_to_coco80", "ssd300_vgg16_params", "ssd300_vgg16_num_classes", "vgg16_backbone_params",
           "conv_params", "Reader", "VGG16_FEATURE_INDICES"]

# torchvision VGG16 ``features`` index of each jdet convolution (ReLUs and pools between).
VGG16_FEATURE_INDICES = {
    "conv1_1": 0, "conv1_2": 2,
    "conv2_1": 5, "conv2_2": 7,
    "conv3_1": 10, "conv3_2": 12, "conv3_3": 14,
    "conv4_1": 17, "conv4_2": 19, "conv4_3": 21,
    "conv5_1": 24, "conv5_2": 26, "conv5_3": 28,
}

# In ssd300_vgg16 the features stop after conv4_3; conv5 lives in ``extra.0`` behind pool4.
_SSD_FEATURE_LAYERS = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2",
                       "conv3_3", "conv4_1", "conv4_2", "conv4_3")
_SSD_EXTRA0 = {"conv5_1": "1", "conv5_2": "3", "conv5_3": "5", "fc6": "7.1", "fc7": "7.3"}

_CLS = "head.classification_head.module_list"
_BOX = "head.regression_head.module_list"


class Reader:
  """Takes entries out of a torchvision state dict, converting layers on the way, and remembers
  which were used (every torchvision converter reads through one)."""

  def __init__(self, state_dict: Mapping[str, np.ndarray], what: str):
    self.state_dict = state_dict
    self.what = what
    self.used: set[str] = set()

  def take(self, key: str) -> np.ndarray:
    if key not in self.state_dict:
      raise KeyError(f"{key!r} is missing: not a torchvision {self.what} state dict "
                     f"(its keys begin {sorted(self.state_dict)[:4]})")
    self.used.add(key)
    return np.asarray(self.state_dict[key])

  def conv(self, prefix: str) -> dict[str, np.ndarray]:
    """``{prefix}.weight``, ``{prefix}.bias`` of a ``Conv2d`` -> ``{"kernel", "bias"}``."""
    return conv_params(self.take(f"{prefix}.weight"), self.take(f"{prefix}.bias"))

  def linear(self, prefix: str) -> dict[str, np.ndarray]:
    """A ``Linear``: ``weight [out, in]`` -> ``kernel [in, out]``, ``bias [out]``."""
    weight, bias = self.take(f"{prefix}.weight"), self.take(f"{prefix}.bias")
    if weight.ndim != 2 or bias.shape != weight.shape[:1]:
      raise ValueError(f"{prefix}: not a Linear weight/bias pair: shapes {weight.shape} and "
                       f"{bias.shape}")
    return {"kernel": np.ascontiguousarray(weight.T), "bias": bias}

  def check_all_used(self, ignore: tuple[str, ...] = ()) -> None:
    left = sorted(k for k in self.state_dict if k not in self.used and not k.startswith(ignore))
    if left:
      raise ValueError(f"the {self.what} state dict has entries this conversion does not know: "
                       f"{left[:10]}{' ...' if len(left) > 10 else ''}")


def conv_params(weight: np.ndarray, bias: np.ndarray) -> dict[str, np.ndarray]:
  """A torch ``Conv2d``: ``weight [O, I, kh, kw]``, ``bias [O]`` -> Flax ``nn.Conv``
  ``{"kernel": [kh, kw, I, O], "bias": [O]}``."""
  weight, bias = np.asarray(weight), np.asarray(bias)
  if weight.ndim != 4 or bias.shape != weight.shape[:1]:
    raise ValueError(f"not a Conv2d weight/bias pair: shapes {weight.shape} and {bias.shape}")
  return {"kernel": np.ascontiguousarray(weight.transpose(2, 3, 1, 0)), "bias": bias}


def _num_extra_levels(state_dict: Mapping[str, np.ndarray]) -> int:
  n = 1
  while f"backbone.extra.{n}.0.weight" in state_dict:
    n += 1
  return n - 1


def _num_head_levels(state_dict: Mapping[str, np.ndarray]) -> int:
  k = 0
  while f"{_CLS}.{k}.weight" in state_dict:
    k += 1
  return k


def ssd300_vgg16_num_classes(state_dict: Mapping[str, np.ndarray]) -> int:
  """jdet's ``num_classes`` (foreground only) of a torchvision ``ssd300_vgg16`` state dict.

  torchvision counts the background: its ``num_classes=91`` (COCO) is jdet's 90.
  """
  reader = Reader(state_dict, "ssd300_vgg16")
  boxes = reader.take(f"{_BOX}.0.weight").shape[0] // 4  # default boxes per location
  classes = reader.take(f"{_CLS}.0.weight").shape[0]
  if classes % boxes:
    raise ValueError(f"{_CLS}.0 has {classes} outputs, not a multiple of its {boxes} boxes")
  return classes // boxes - 1


def ssd300_vgg16_params(state_dict: Mapping[str, np.ndarray]) -> dict:
  """A torchvision ``ssd300_vgg16`` state dict -> jdet SSD params ``{"backbone", "head"}``.

  Any number of extra levels and head levels is converted (SSD512 has one
  more of each). The model to load into is ``SSD(num_classes=``
  :func:`ssd300_vgg16_num_classes` ``(state_dict), clamp_default_boxes=True,
  size_rule=(0.15, 0.9, 0.07))``.

  Args:
    state_dict: ``{torchvision name: array}``, every array as torch stores it.
  Returns:
    the nested params dict of float arrays, kernels HWIO.
  Raises:
    KeyError: a torchvision name is missing; ValueError: the state dict holds
    names this conversion does not know.
  """
  r = Reader(state_dict, "ssd300_vgg16")
  backbone = {}
  for name in _SSD_FEATURE_LAYERS:
    backbone[name] = r.conv(f"backbone.features.{VGG16_FEATURE_INDICES[name]}")
  backbone["conv4_3_norm"] = {"scale": r.take("backbone.scale_weight")}
  for name, index in _SSD_EXTRA0.items():
    backbone[name] = r.conv(f"backbone.extra.0.{index}")
  for n in range(1, _num_extra_levels(state_dict) + 1):
    backbone[f"conv{n + 7}_1"] = r.conv(f"backbone.extra.{n}.0")
    backbone[f"conv{n + 7}_2"] = r.conv(f"backbone.extra.{n}.2")
  head = {}
  for k in range(_num_head_levels(state_dict)):
    head[f"cls_{k}"] = r.conv(f"{_CLS}.{k}")
    head[f"box_{k}"] = r.conv(f"{_BOX}.{k}")
  r.check_all_used()
  return {"backbone": backbone, "head": head}


def vgg16_backbone_params(state_dict: Mapping[str, np.ndarray]) -> dict:
  """An ImageNet ``torchvision.models.vgg16`` state dict -> the backbone subtree
  ``{"conv1_1": {"kernel", "bias"}, ..., "conv5_3": ...}``.

  The classifier (``classifier.*``, the fully connected fc6/fc7/fc8) is not
  used: jdet's dilated fc6 and fc7, the L2Norm scale and the extra layers keep
  their initialisation, as in torchvision's ``ssd300_vgg16``. ``vgg16_bn``
  (BatchNorm between the convolutions) is a different layout and is refused.
  """
  if any(".running_mean" in k for k in state_dict):
    raise ValueError("this is a VGG16 with BatchNorm (vgg16_bn); only the plain vgg16 converts")
  r = Reader(state_dict, "vgg16")
  backbone = {name: r.conv(f"features.{i}") for name, i in VGG16_FEATURE_INDICES.items()}
  r.check_all_used(ignore=("classifier.",))
  return backbone


def coco91_to_coco80(params: Mapping, model_params: Mapping | None = None) -> dict:
  """torchvision's 91-way COCO class heads -> jdet's 81-way ones (background + 80).

  torchvision's COCO detectors predict a score for each COCO *category id*
  (0 = background, 1 .. 90 with 10 unused ids); jdet's COCO source has 80
  contiguous labels, label ``l`` being category ``COCO_CATEGORY_IDS[l]``
  (:mod:`jdet.class_names`). This
  keeps, per default box, the background column and the columns of the 80
  category ids, in label order, in every ``head/cls_k`` whose width is
  ``P * 91`` (and, given ``model_params``, where the model's is ``P * 81``).
  Other parameters are returned unchanged.
  """
  if "head" not in params:
    return dict(params)
  keep = coco91_columns()  # [81]
  head = dict(params["head"])
  for name, layer in head.items():
    kernel = np.asarray(layer["kernel"])
    if not name.startswith("cls_") or kernel.shape[-1] % 91:
      continue
    if model_params is not None:
      target = model_params.get("head", {}).get(name, {}).get("kernel")
      if target is None or target.shape[-1] != kernel.shape[-1] // 91 * 81:
        continue
    p = kernel.shape[-1] // 91
    cols = (np.arange(p)[:, None] * 91 + keep[None, :]).reshape(-1)  # [P * 81]
    head[name] = dict(layer, kernel=kernel[..., cols], bias=np.asarray(layer["bias"])[cols])
  return dict(params, head=head)
