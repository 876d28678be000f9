"""ResNet (He et al., CVPR 2016) as detection backbones use it: C2..C5 feature maps.

The layout of torchvision's ``resnet18/34/50/101/152`` (ResNet v1.5: a
Bottleneck strides in its 3x3 convolution), so that its weights convert one to
one (:mod:`jdet.convert.resnet`):

=======  ==========================================  ======  ================
stage    layers                                      stride  R50 channels
=======  ==========================================  ======  ================
stem     conv1 7x7/2 (pad 3), bn1, ReLU, max pool         4  64
         3x3/2 (pad 1)
layer1   blocks at width ``widths[0]``                    4  256 (C2)
layer2   first block strides 2                            8  512 (C3)
layer3   first block strides 2                           16  1024 (C4)
layer4   first block strides 2                           32  2048 (C5)
=======  ==========================================  ======  ================

Blocks: :class:`BasicBlock` (two 3x3 convolutions; ResNet-18/34) or
:class:`Bottleneck` (1x1, 3x3, 1x1 with 4x expansion; ResNet-50/101/152). A
block whose stride or channel count changes has a projection shortcut
(``downsample_conv`` 1x1 + ``downsample_bn``). Convolutions have no bias.

Variables (``"/"`` joins module names; the torchvision name on the right)::

  conv1/kernel                      conv1.weight
  bn1/{scale,bias,mean,var}         bn1.{weight,bias,running_mean,running_var}
  layer{s}/block{i}/conv{k}/kernel  layer{s}.{i}.conv{k}.weight
  layer{s}/block{i}/bn{k}/...       layer{s}.{i}.bn{k}.*
  layer{s}/block0/downsample_conv   layer{s}.0.downsample.0
  layer{s}/block0/downsample_bn     layer{s}.0.downsample.1

The normalisation (``norm``) decides which collection holds a norm layer's
numbers. Every norm module keeps its torchvision name (``bn1``, ...), also
for GroupNorm:

* ``"frozen_bn"`` (default; torchvision's ``FrozenBatchNorm2d``): ``scale``,
  ``bias``, ``mean`` and ``var`` all live in the ``batch_stats`` collection
  and are never written, so neither gradients nor an optimiser's weight
  decay can reach them (torch keeps them as buffers for the same reason).
  The training step's ``mutable=["batch_stats"]`` returns them unchanged.
  ``params`` holds the convolution kernels only.
* ``"batch"``: Flax ``BatchNorm`` (``scale``, ``bias`` in ``params``;
  ``mean``, ``var`` in ``batch_stats``), batch statistics in training. Under
  one ``jit`` over a batch sharded on the mesh the statistics are global
  (SyncBN) with no ``axis_name``. Flax's running variance averages the
  biased batch variance (torch's the unbiased one); the momentum is torch's
  0.1 (Flax ``momentum=0.9``).
* ``"group"``: GroupNorm with ``norm_groups`` groups (``scale``, ``bias`` in
  ``params``), as in the GN paper's detection setting.

Frozen stages follow MMDetection's ``frozen_stages`` (and torchvision's
``trainable_layers``, ``frozen_stages = 4 - trainable_layers``): ``-1``
freezes nothing, ``0`` the stem (conv1, bn1), ``k >= 1`` the stem and
``layer1`` .. ``layer{k}``. The default 1 is torchvision's Faster R-CNN
(``trainable_backbone_layers=3``). A frozen part's output passes through
``jax.lax.stop_gradient``, so the loss's gradient with respect to every
parameter in it is exactly zero, and its BatchNorm (``norm="batch"``) uses
the running statistics even in training (MMDetection puts frozen stages in
eval mode). A zero gradient does not stop weight decay: give the optimiser
:meth:`ResNet.freeze_patterns` in ``optim.freeze`` so that frozen kernels get
no update at all, as torch skips parameters without ``requires_grad``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "FrozenBatchNorm", "RESNET_LAYOUTS", "NORMS",
           "resnet_conv_init"]

# depth -> (block, blocks per stage), as torchvision's resnet18 .. resnet152.
RESNET_LAYOUTS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}

NORMS = ("frozen_bn", "batch", "group")

# torchvision's ResNet init: kaiming_normal_(mode="fan_out", nonlinearity="relu").
resnet_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

_EPS = 1e-5  # torchvision's BatchNorm2d, FrozenBatchNorm2d and GroupNorm


def _conv(features: int, kernel: int, *, stride: int = 1, padding: int = 0, dtype: Any,
          name: str) -> nn.Conv:
  """A bias-free ``Conv2d`` with PyTorch's explicit symmetric padding."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)), use_bias=False, dtype=dtype,
                 kernel_init=resnet_conv_init, name=name)


class FrozenBatchNorm(nn.Module):
  """BatchNorm with fixed statistics and affine (torchvision's ``FrozenBatchNorm2d``).

  ``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` per channel, folded
  into one multiply-add as torchvision does. The four ``[D]`` arrays live in
  the ``batch_stats`` collection (start: scale 1, bias 0, mean 0, var 1), are
  read through ``stop_gradient`` and never written.
  """

  epsilon: float = _EPS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c = x.shape[-1]
    get = lambda name, init: jax.lax.stop_gradient(
        self.variable("batch_stats", name, init, (c,), jnp.float32).value)
    scale, bias = get("scale", jnp.ones), get("bias", jnp.zeros)
    mean, var = get("mean", jnp.zeros), get("var", jnp.ones)
    mult = scale * jax.lax.rsqrt(var + self.epsilon)  # [D] float32
    add = bias - mean * mult
    return x * mult.astype(self.dtype) + add.astype(self.dtype)


class ResidualBlock(nn.Module):
  """The fields of a residual block: ``width`` (its inner channels; it returns
  ``expansion * width``), the stride of its first strided convolution, the
  normalisation layer and the computation dtype."""

  width: int
  stride: int = 1
  norm: Callable[..., nn.Module] = FrozenBatchNorm
  dtype: Any = jnp.float32

  expansion = 1


class BasicBlock(ResidualBlock):
  """Two 3x3 convolutions and the shortcut (ResNet-18/34); ``width`` out channels."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    y = _conv(self.width, 3, stride=self.stride, padding=1, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = _conv(self.width, 3, padding=1, dtype=self.dtype, name="conv2")(y)
    y = self.norm(name="bn2")(y)
    return nn.relu(y + _shortcut(self, x, self.width))


class Bottleneck(ResidualBlock):
  """1x1 (``width``), 3x3 with the stride (v1.5), 1x1 (``4 * width``) and the shortcut."""

  expansion = 4

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    out = self.width * self.expansion
    y = _conv(self.width, 1, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = _conv(self.width, 3, stride=self.stride, padding=1, dtype=self.dtype, name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = _conv(out, 1, dtype=self.dtype, name="conv3")(y)
    y = self.norm(name="bn3")(y)
    return nn.relu(y + _shortcut(self, x, out))


def _shortcut(block: nn.Module, x: jnp.ndarray, out: int) -> jnp.ndarray:
  """Identity, or a strided 1x1 projection + norm when the shape changes (inside ``block``)."""
  if block.stride == 1 and x.shape[-1] == out:
    return x
  x = _conv(out, 1, stride=block.stride, dtype=block.dtype, name="downsample_conv")(x)
  return block.norm(name="downsample_bn")(x)


class _Stage(nn.Module):
  """``layer{s}``: ``num_blocks`` blocks ``block0`` .. , the first with ``stride``."""

  block: type
  width: int
  num_blocks: int
  stride: int
  norm: Callable[..., nn.Module]
  dtype: Any

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for i in range(self.num_blocks):
      x = self.block(self.width, stride=self.stride if i == 0 else 1, norm=self.norm,
                     dtype=self.dtype, name=f"block{i}")(x)
    return x


class ResNet(nn.Module):
  """ResNet feature extractor: the outputs of the chosen stages (C2..C5).

  Attributes:
    depth: 18, 34, 50, 101 or 152 (:data:`RESNET_LAYOUTS`).
    widths: base width of layer1..layer4 (64, 128, 256, 512); a Bottleneck
      stage outputs 4x its width. Smaller for tests.
    stem_width: channels of conv1 (64).
    norm: ``"frozen_bn"``, ``"batch"`` or ``"group"`` (see the module docstring
      for where each keeps its numbers).
    norm_groups: groups of ``norm="group"`` (32).
    norm_eps: the norms' epsilon (1e-5). torchvision's COCO detection weights
      were trained with frozen BatchNorm at epsilon 0 (torchvision sets it
      when it loads them): use 0.0 to evaluate those.
    frozen_stages: ``-1`` nothing, ``0`` the stem, ``k`` the stem and
      layer1..layer``k`` (MMDetection's meaning; torchvision's
      ``trainable_layers = 4 - frozen_stages``).
    out_stages: which of layer1..layer4 to return, in increasing order
      (1 = C2 at stride 4, ..., 4 = C5 at stride 32). Stages after the last
      one are not built, as torchvision's ``IntermediateLayerGetter``.
    dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters and the
      frozen BatchNorm numbers stay float32.
  """

  depth: int = 50
  widths: Sequence[int] = (64, 128, 256, 512)
  stem_width: int = 64
  norm: str = "frozen_bn"
  norm_groups: int = 32
  norm_eps: float = _EPS
  frozen_stages: int = 1
  out_stages: Sequence[int] = (1, 2, 3, 4)
  dtype: Any = jnp.float32

  @property
  def block(self) -> type:
    """:class:`BasicBlock` or :class:`Bottleneck`."""
    return _layout(self.depth)[0]

  @property
  def stage_channels(self) -> tuple[int, ...]:
    """Output channels of layer1..layer4: (256, 512, 1024, 2048) for R50, (64, ..., 512) for R18."""
    return tuple(w * self.block.expansion for w in self.widths)

  @property
  def out_channels(self) -> tuple[int, ...]:
    """Channels of each returned feature map (those of ``out_stages``)."""
    return tuple(self.stage_channels[s - 1] for s in self.out_stages)

  @property
  def out_strides(self) -> tuple[int, ...]:
    """Stride of each returned feature map: 4, 8, 16, 32 for C2..C5."""
    return tuple(2 ** (s + 1) for s in self.out_stages)

  def frozen_modules(self) -> tuple[str, ...]:
    """Names of the top-level submodules that ``frozen_stages`` freezes, e.g.
    ``("conv1", "bn1", "layer1")`` for 1 and ``()`` for -1."""
    stem = ("conv1", "bn1") if self.frozen_stages >= 0 else ()
    return stem + tuple(f"layer{s}" for s in range(1, self.frozen_stages + 1))

  def freeze_patterns(self, prefix: str = "") -> tuple[str, ...]:
    """``optim.freeze`` regexps for the frozen parameters when this ResNet's params sit
    under ``prefix`` (e.g. ``"backbone/"``): ``("^backbone/(conv1|bn1|layer1)/",)``;
    ``()`` when nothing is frozen. ``frozen_bn`` numbers need none (not in ``params``)."""
    names = self.frozen_modules()
    if not names:
      return ()
    return (f"^{prefix}({'|'.join(names)})/",)

  def _check(self) -> None:
    _layout(self.depth)
    if self.norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
    if len(self.widths) != 4:
      raise ValueError(f"widths needs 4 stage widths, got {tuple(self.widths)}")
    if not -1 <= self.frozen_stages <= 4:
      raise ValueError(f"frozen_stages must be in -1..4, got {self.frozen_stages}")
    stages = tuple(self.out_stages)
    if not stages or list(stages) != sorted(set(stages)) or not set(stages) <= {1, 2, 3, 4}:
      raise ValueError(f"out_stages must be increasing stages in 1..4, got {stages}")

  def _norm(self, train: bool, frozen: bool) -> Callable[..., nn.Module]:
    if self.norm == "frozen_bn":
      return functools.partial(FrozenBatchNorm, epsilon=self.norm_eps, dtype=self.dtype)
    if self.norm == "batch":
      return functools.partial(nn.BatchNorm, use_running_average=frozen or not train,
                               momentum=0.9, epsilon=self.norm_eps, use_fast_variance=False,
                               dtype=self.dtype)
    return functools.partial(nn.GroupNorm, num_groups=self.norm_groups, epsilon=self.norm_eps,
                             use_fast_variance=False, dtype=self.dtype)

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool = False) -> list[jnp.ndarray]:
    """``x: [B, H, W, 3]`` normalised image -> ``[C2, C3, C4, C5]`` (those of
    ``out_stages``), ``C_{s+1}: [B, ceil(H / 2^(s+1)), ..., stage_channels[s-1]]``.

    ``train`` uses batch statistics (and updates ``batch_stats``, which must
    then be mutable) for ``norm="batch"`` outside the frozen stages; the
    other norms do not depend on it.
    """
    self._check()
    block, blocks = _layout(self.depth)
    x = x.astype(self.dtype)
    x = _conv(self.stem_width, 7, stride=2, padding=3, dtype=self.dtype, name="conv1")(x)
    x = self._norm(train, self.frozen_stages >= 0)(name="bn1")(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # -inf padding
    if self.frozen_stages >= 0:
      x = jax.lax.stop_gradient(x)
    outputs = []
    for s in range(1, max(self.out_stages) + 1):
      frozen = s <= self.frozen_stages
      x = _Stage(block, self.widths[s - 1], blocks[s - 1], 1 if s == 1 else 2,
                 self._norm(train, frozen), self.dtype, name=f"layer{s}")(x)
      if frozen:
        x = jax.lax.stop_gradient(x)
      if s in self.out_stages:
        outputs.append(x)
    return outputs


def _layout(depth: int) -> tuple[type, tuple[int, ...]]:
  if depth not in RESNET_LAYOUTS:
    raise ValueError(f"depth must be one of {sorted(RESNET_LAYOUTS)}, got {depth}")
  kind, blocks = RESNET_LAYOUTS[depth]
  return (BasicBlock if kind == "basic" else Bottleneck), blocks
