"""torchvision state dicts -> jdet variables: ResNet and ResNet-FPN backbones.

Pure functions of a ``{name: np.ndarray}`` state dict (as
:func:`jdet.convert.read_state_dict` returns it); nothing here imports torch.

* :func:`resnet_params`: an ImageNet ``torchvision.models.resnet18/34/50/101/152``
  -> the variables of :class:`jdet.models.backbones.resnet.ResNet`
  (``fc.*`` is not used).
* :func:`fpn_params`: a ``torchvision.ops.FeaturePyramidNetwork`` -> the params
  of :class:`jdet.models.necks.fpn.FPN`.
* :func:`resnet_fpn_backbone_params`: the ``backbone.body.*`` / ``backbone.fpn.*``
  part of torchvision's ``fasterrcnn_resnet50_fpn`` (or a ``resnet_fpn_backbone``
  with the prefix ``""``) -> both of them.

Name map (see the module docstrings of ``resnet.py`` and ``fpn.py``)::

  torchvision                              jdet
  conv1.weight                             params/conv1/kernel
  bn1.{weight,bias}                        bn1/{scale,bias}  (collection: see below)
  bn1.{running_mean,running_var}           batch_stats/bn1/{mean,var}
  layer{s}.{i}.conv{k}.weight              params/layer{s}/block{i}/conv{k}/kernel
  layer{s}.{i}.bn{k}.*                     layer{s}/block{i}/bn{k}/*
  layer{s}.0.downsample.0.weight           params/layer{s}/block0/downsample_conv/kernel
  layer{s}.0.downsample.1.*                layer{s}/block0/downsample_bn/*
  fc.*, *.num_batches_tracked              not used
  fpn.inner_blocks.{i}.0.{weight,bias}     inner_block{i}/{kernel,bias}
  fpn.layer_blocks.{i}.0.{weight,bias}     layer_block{i}/{kernel,bias}
  fpn.extra_blocks.p{6,7}.{weight,bias}    p{6,7}/{kernel,bias}

Where a BatchNorm's affine goes depends on the model's ``norm``: with
``"frozen_bn"`` (torchvision's ``FrozenBatchNorm2d``, the default of its
detection backbones) all four arrays go to ``batch_stats``; with ``"batch"``
``scale``/``bias`` go to ``params`` and ``mean``/``var`` to ``batch_stats``; with
``"group"`` (a torchvision ResNet built with ``norm_layer=GroupNorm``) there are
no statistics and ``scale``/``bias`` go to ``params``. Either BatchNorm kind
(``BatchNorm2d`` or ``FrozenBatchNorm2d``) converts to either BatchNorm norm.
Convolution weights ``[O, I, kh, kw]`` become kernels ``[kh, kw, I, O]``.

Every conversion reports all missing and all unknown names at once, in a
``ValueError``.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from jdet.convert.files import listing

__all__ = ["resnet_params", "resnet_depth", "fpn_params", "resnet_fpn_backbone_params",
           "is_resnet_state_dict"]

_NORMS = ("frozen_bn", "batch", "group")
# torchvision's ResNet layouts: depth -> (bottleneck?, blocks per stage).
_LAYOUTS = {18: (False, (2, 2, 2, 2)), 34: (False, (3, 4, 6, 3)), 50: (True, (3, 4, 6, 3)),
            101: (True, (3, 4, 23, 3)), 152: (True, (3, 8, 36, 3))}
_IGNORED = ("num_batches_tracked",)


class _Reader:
  """Takes entries under ``prefix`` out of a state dict; reports every missing and every
  unused one at the end (:meth:`finish`)."""

  def __init__(self, state_dict: Mapping[str, np.ndarray], prefix: str, what: str):
    self.state_dict = state_dict
    self.prefix = prefix
    self.what = what
    self.used: set[str] = set()
    self.missing: list[str] = []

  def take(self, name: str) -> np.ndarray | None:
    key = self.prefix + name
    if key not in self.state_dict:
      self.missing.append(key)
      return None
    self.used.add(key)
    return np.asarray(self.state_dict[key])

  def kernel(self, name: str) -> dict[str, np.ndarray | None]:
    weight = self.take(f"{name}.weight")
    if weight is not None and weight.ndim != 4:
      raise ValueError(f"{self.prefix}{name}.weight has shape {weight.shape}, not a Conv2d weight")
    if weight is None:
      return {"kernel": None}
    return {"kernel": np.ascontiguousarray(weight.transpose(2, 3, 1, 0))}  # OIHW -> HWIO

  def conv_with_bias(self, name: str) -> dict[str, np.ndarray | None]:
    return {**self.kernel(name), "bias": self.take(f"{name}.bias")}

  def finish(self, ignore: tuple[str, ...] = ()) -> None:
    """Raises if a name was missing or one under the prefix was not used (except
    ``num_batches_tracked`` and names starting with ``prefix + ignore``)."""
    ignore = tuple(self.prefix + i for i in ignore)
    unused = sorted(k for k in self.state_dict
                    if k.startswith(self.prefix) and k not in self.used
                    and not k.startswith(ignore) and k.rsplit(".", 1)[-1] not in _IGNORED)
    if self.missing or unused:
      raise ValueError(
          f"not a torchvision {self.what} state dict (prefix {self.prefix!r}):\n"
          + (f"  missing ({len(self.missing)}): {listing(self.missing)}\n" if self.missing else "")
          + (f"  unexpected ({len(unused)}): {listing(unused)}\n" if unused else "")
          + f"  its keys begin {sorted(self.state_dict)[:4]}")


def is_resnet_state_dict(state_dict: Mapping[str, np.ndarray], prefix: str = "") -> bool:
  """Whether the names look like a torchvision ResNet's (``conv1.weight``,
  ``layer1.0.conv1.weight``)."""
  return f"{prefix}conv1.weight" in state_dict and f"{prefix}layer1.0.conv1.weight" in state_dict


def _block_counts(state_dict: Mapping[str, np.ndarray], prefix: str) -> tuple[int, ...]:
  """Blocks of layer1, layer2, ... up to the first stage that is absent."""
  counts = []
  for s in range(1, 5):
    n = 0
    while f"{prefix}layer{s}.{n}.conv1.weight" in state_dict:
      n += 1
    if n == 0:
      break
    counts.append(n)
  return tuple(counts)


def _num_stages(state_dict: Mapping[str, np.ndarray], prefix: str) -> int:
  return len(_block_counts(state_dict, prefix))


def resnet_depth(state_dict: Mapping[str, np.ndarray], prefix: str = "") -> int:
  """The depth (18, 34, 50, 101, 152) of a torchvision ResNet state dict, from its block
  counts and block kind. Stages that torchvision's ``IntermediateLayerGetter`` dropped
  (e.g. no ``layer4``) are allowed when the remaining ones still decide the depth."""
  bottleneck = f"{prefix}layer1.0.conv3.weight" in state_dict
  if not is_resnet_state_dict(state_dict, prefix):
    raise ValueError(f"not a torchvision ResNet state dict: no {prefix}conv1.weight or "
                     f"{prefix}layer1.0.conv1.weight (its keys begin {sorted(state_dict)[:4]})")
  counts = _block_counts(state_dict, prefix)
  matches = [d for d, (b, blocks) in _LAYOUTS.items()
             if b == bottleneck and counts and counts == blocks[:len(counts)]]
  if len(matches) != 1:
    kind = "Bottleneck" if bottleneck else "BasicBlock"
    raise ValueError(f"cannot tell the ResNet depth of {kind} blocks per stage {tuple(counts)} "
                     f"(prefix {prefix!r}); torchvision's are "
                     f"{ {d: blocks for d, (_, blocks) in _LAYOUTS.items()} }")
  return matches[0]


def resnet_params(state_dict: Mapping[str, np.ndarray], *, depth: int | None = None,
                  norm: str = "frozen_bn", prefix: str = "") -> dict:
  """A torchvision ResNet state dict -> ``ResNet(depth=..., norm=norm)`` variables.

  Args:
    state_dict: ``{torchvision name: array}``; names outside ``prefix``, ``fc.*``
      and ``num_batches_tracked`` are not used.
    depth: the model's depth; by default the one the state dict's block counts
      give (:func:`resnet_depth`). Given, it decides which names are expected
      and any difference is reported as missing and unexpected names.
    norm: the jdet model's ``norm``: ``"frozen_bn"``, ``"batch"`` or ``"group"``
      (decides the collections, see the module docstring).
    prefix: the names' prefix, e.g. ``"backbone.body."`` inside a detector.
  Returns:
    ``{"params": {"conv1": {"kernel"}, "layer1": {"block0": {...}}, ...},
    "batch_stats": {"bn1": {...}, "layer1": {...}, ...}}`` (no ``batch_stats``
    for ``"group"``), NumPy arrays, ready for ``ResNet.apply``.
  Raises:
    ValueError: naming every missing and unexpected entry, or a depth mismatch.
  """
  if norm not in _NORMS:
    raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
  if depth is None:
    depth = resnet_depth(state_dict, prefix)
  elif depth not in _LAYOUTS:
    raise ValueError(f"depth must be one of {sorted(_LAYOUTS)}, got {depth}")
  elif (f"{prefix}layer1.0.conv3.weight" in state_dict) != _LAYOUTS[depth][0]:
    kinds = ("BasicBlock", "Bottleneck")
    has, wants = kinds if _LAYOUTS[depth][0] else kinds[::-1]
    raise ValueError(f"the state dict (prefix {prefix!r}) has {has} blocks, not the {wants} "
                     f"blocks of a ResNet-{depth}")
  bottleneck, blocks = _LAYOUTS[depth]
  r = _Reader(state_dict, prefix, f"ResNet-{depth}")
  params: dict = {}
  stats: dict = {}

  def put(tree: dict, path: tuple[str, ...], leaf: dict) -> None:
    for p in path[:-1]:
      tree = tree.setdefault(p, {})
    tree.setdefault(path[-1], {}).update(leaf)

  def conv(torch_name: str, path: tuple[str, ...]) -> None:
    put(params, path, r.kernel(torch_name))

  def bn(torch_name: str, path: tuple[str, ...]) -> None:
    affine = {"scale": r.take(f"{torch_name}.weight"), "bias": r.take(f"{torch_name}.bias")}
    put(stats if norm == "frozen_bn" else params, path, affine)
    if norm != "group":
      put(stats, path, {"mean": r.take(f"{torch_name}.running_mean"),
                        "var": r.take(f"{torch_name}.running_var")})

  conv("conv1", ("conv1",))
  bn("bn1", ("bn1",))
  convs = 3 if bottleneck else 2
  # A body cut after its last returned stage (IntermediateLayerGetter) lacks the later ones.
  for s in range(1, _num_stages(state_dict, prefix) + 1):
    for i in range(blocks[s - 1]):
      block = (f"layer{s}", f"block{i}")
      for k in range(1, convs + 1):
        conv(f"layer{s}.{i}.conv{k}", block + (f"conv{k}",))
        bn(f"layer{s}.{i}.bn{k}", block + (f"bn{k}",))
      # torchvision projects where the stride or the width changes: every first block
      # but ResNet-18/34's layer1 (64 -> 64).
      if i == 0 and (s > 1 or bottleneck or f"{prefix}layer1.0.downsample.0.weight" in state_dict):
        conv(f"layer{s}.{i}.downsample.0", block + ("downsample_conv",))
        bn(f"layer{s}.{i}.downsample.1", block + ("downsample_bn",))
  r.finish(ignore=("fc.",))
  return {"params": params, "batch_stats": stats} if stats else {"params": params}


def fpn_params(state_dict: Mapping[str, np.ndarray], *, prefix: str = "fpn.") -> dict:
  """A torchvision ``FeaturePyramidNetwork`` (without norm layers) -> ``FPN`` params.

  The number of levels is read from ``inner_blocks.{i}``; ``extra_blocks.p6`` /
  ``p7`` (``LastLevelP6P7``) become ``p6`` / ``p7`` (load into
  ``FPN(extra="p6p7", num_extra=2)``, with ``extra_input="p5"`` when their input
  channels equal ``out_channels``, as torchvision decides).

  Returns:
    ``{"inner_block0": {"kernel", "bias"}, ..., "layer_block0": ..., ["p6", "p7"]}``.
  """
  r = _Reader(state_dict, prefix, "FeaturePyramidNetwork")
  params = {}
  n = 0
  while f"{prefix}inner_blocks.{n}.0.weight" in state_dict:
    n += 1
  if n == 0:
    r.take("inner_blocks.0.0.weight")  # reported as missing
  for i in range(n):
    params[f"inner_block{i}"] = r.conv_with_bias(f"inner_blocks.{i}.0")
    params[f"layer_block{i}"] = r.conv_with_bias(f"layer_blocks.{i}.0")
  k = 6
  while f"{prefix}extra_blocks.p{k}.weight" in state_dict:
    params[f"p{k}"] = r.conv_with_bias(f"extra_blocks.p{k}")
    k += 1
  r.finish()
  return params


def resnet_fpn_backbone_params(state_dict: Mapping[str, np.ndarray], prefix: str = "backbone.",
                               *, norm: str = "frozen_bn", depth: int | None = None) -> dict:
  """torchvision's ResNet-FPN backbone (``BackboneWithFPN``) -> jdet ``ResNet`` + ``FPN``.

  Args:
    state_dict: e.g. ``fasterrcnn_resnet50_fpn().state_dict()``: the names
      ``{prefix}body.*`` and ``{prefix}fpn.*`` are converted, names outside
      ``prefix`` (``rpn.*``, ``roi_heads.*``) are left alone; every name under
      ``prefix`` must be used. ``prefix=""`` for a bare ``resnet_fpn_backbone``.
    norm: the jdet ResNet's ``norm`` (``"frozen_bn"`` for torchvision's
      detection models, whose body uses ``FrozenBatchNorm2d``).
    depth: the expected ResNet depth (default: read from the state dict).
  Returns:
    ``{"body": {"params": ..., "batch_stats": ...}, "fpn": {"inner_block0": ..., ...}}``:
    ``body`` is :func:`resnet_params`'s variables of ``ResNet(depth, norm=norm)``,
    ``fpn`` the params of ``FPN()`` (it has no other collection). torchvision's
    ``LastLevelMaxPool`` has no parameters: ``FPN(extra="maxpool")``.
  """
  body = resnet_params(state_dict, depth=depth, norm=norm, prefix=f"{prefix}body.")
  fpn = fpn_params(state_dict, prefix=f"{prefix}fpn.")
  left = sorted(k for k in state_dict if k.startswith(prefix) and not k.startswith(
      (f"{prefix}body.", f"{prefix}fpn.")))
  if left:
    raise ValueError(f"names under {prefix!r} that are neither body nor fpn: {listing(left)}")
  return {"body": body, "fpn": fpn}
