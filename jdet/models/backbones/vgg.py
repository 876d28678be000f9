"""VGG16 as SSD and RefineDet use it: dilated fc6/fc7, L2Norm, extra layers.

The network of the SSD paper (Liu et al., ECCV 2016, Fig. 2), in the layout of
torchvision's ``ssd300_vgg16`` so that its weights convert one to one:

==========  ==========================================  ======  =============
stage       layers                                      stride  SSD300 output
==========  ==========================================  ======  =============
conv1..3    2, 2, 3 convs 3x3 (64, 128, 256), max pools      8  (pool3 uses ceil mode: 75 -> 38)
conv4       3 convs 3x3 (512)                                8  conv4_3: 38x38x512, L2Norm x 20
pool4, 5    3 convs 3x3 (512), pool5 3x3 stride 1           16
fc6, fc7    3x3 dilation 6 (1024), 1x1 (1024)               16  fc7: 19x19x1024
extras      per level: 1x1 (mid) then 3x3 (out)             ...  10, 5, 3, 1
==========  ==========================================  ======  =============

An extra level is ``(mid_channels, out_channels, kernel, stride, padding)``:
:data:`SSD300_EXTRAS` (conv8_2 .. conv11_2) and :data:`SSD512_EXTRAS`
(conv8_2 .. conv12_2, as the original Caffe model). Narrower or shorter
networks for tests and the CPU quick start come from ``widths``, ``fc_width``
and ``extras``.

RefineDet (Zhang et al., CVPR 2018; the ``VGGNetBody(reduced=True,
dilated=False)`` of its Caffe code) differs in four ways, each a field:
pool5 is a 2x2 stride-2 pool (``pool5_stride=2``) so that fc7 has stride 32,
fc6 is dilated by 3 (``fc6_dilation=3``), conv5_3 is a source too, L2-normalised
with scale 8 (``conv5_3_l2norm_scale=8``; conv4_3's is 10), and the one extra
level is called conv6 (``extras_first=6``, :data:`REFINEDET_EXTRAS`). For a
320x320 input the sources are conv4_3 40x40x512, conv5_3 20x20x512, fc7
10x10x1024 and conv6_2 5x5x512 (strides 8, 16, 32, 64).

A stride-4 source for small objects, as S3FD (Zhang et al., ICCV 2017) adds to
SSD for faces down to 16 pixels: ``conv3_3_l2norm_scale=10`` returns conv3_3
(L2-normalised with that initial scale) before every other source. The
128-pixel quick-start variants use it, so that their smallest default boxes
(about 10 pixels) sit on a grid of 4 pixels, as SSD300's 30-pixel boxes sit on
one of 8: with conv4_3 first, 29 % of the objects under 16 pixels overlap no
default box by IoU 0.5.

Convolutions are written with explicit symmetric padding (as PyTorch's
``padding=``), never ``"SAME"``, so stride-2 layers see the same pixels as
in the reference implementations.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jdet.models.initializers import xavier_conv_init

__all__ = ["L2Norm", "VGGFields", "VGG16", "SSD300_EXTRAS", "SSD512_EXTRAS", "REFINEDET_EXTRAS"]

# (mid_channels, out_channels, kernel, stride, padding) of each extra level.
SSD300_EXTRAS = ((256, 512, 3, 2, 1), (128, 256, 3, 2, 1), (128, 256, 3, 1, 0), (128, 256, 3, 1, 0))
SSD512_EXTRAS = ((256, 512, 3, 2, 1), (128, 256, 3, 2, 1), (128, 256, 3, 2, 1), (128, 256, 3, 2, 1),
                 (128, 256, 4, 1, 1))
# RefineDet's conv6_1 (1x1, 256) and conv6_2 (3x3 stride 2, 512).
REFINEDET_EXTRAS = ((256, 512, 3, 2, 1),)

# Convolutions per VGG16 stage.
_STAGE_DEPTHS = (2, 2, 3, 3, 3)

def _conv(features: int, kernel: int, *, stride: int = 1, padding: int = 0, dilation: int = 1,
          dtype: Any, name: str) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)),
                 kernel_dilation=(dilation, dilation), dtype=dtype, kernel_init=xavier_conv_init,
                 name=name)


def _max_pool(x: jnp.ndarray, *, window: int, stride: int, padding: int = 0,
              ceil_mode: bool = False) -> jnp.ndarray:
  """PyTorch's ``MaxPool2d`` (padding with -inf; ceil mode pads the far side)."""
  pads = []
  for size in x.shape[1:3]:
    span = size + 2 * padding - window
    if ceil_mode:
      out = -(-span // stride) + 1
      if (out - 1) * stride >= size + padding:  # PyTorch drops a window starting in the padding
        out -= 1
    else:
      out = span // stride + 1
    pads.append((padding, (out - 1) * stride + window - size - padding))
  return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)


class L2Norm(nn.Module):
  """Channel-wise L2 normalisation with a learned per-channel scale (ParseNet).

  ``y = scale * x / max(||x||_2, eps)`` over the channel axis; ``scale``
  starts at ``init_scale`` (20 for SSD's conv4_3, 10 and 8 in RefineDet).
  """

  init_scale: float = 20.0
  eps: float = 1e-12

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    scale = self.param("scale", nn.initializers.constant(self.init_scale), (x.shape[-1],),
                       jnp.float32)
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
    return (x32 / jnp.maximum(norm, self.eps) * scale).astype(x.dtype)


class VGGFields(nn.Module):
  """The VGG16 fields a detector shares with its backbone, under the same names.

  SSD and RefineDet inherit them and build the backbone from them with
  ``build_from_fields(VGG16, self, l2norm_scale=...)``
  (:func:`jdet.models.detector.build_from_fields`).

  Attributes:
    widths: channels of the five VGG stages (64, 128, 256, 512, 512).
    fc_width: channels of fc6 and fc7 (1024).
    fc6_dilation: fc6's dilation (6; its padding equals it).
    extras: the extra levels after fc7, ``(mid, out, kernel, stride, padding)``.
    norm: ``"none"`` (the paper's VGG16) or ``"batch"``: BatchNorm after every
      convolution (torchvision's ``vgg16_bn`` layout), which trains from
      scratch much faster; used by the small CPU variants.
    conv3_3_l2norm_scale: if set, conv3_3 (stride 4) is returned too, first,
      through an L2Norm with this initial scale (S3FD: 10).
    dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
  """

  widths: Sequence[int] = (64, 128, 256, 512, 512)
  fc_width: int = 1024
  fc6_dilation: int = 6
  extras: Sequence[Sequence[int]] = SSD300_EXTRAS
  norm: str = "none"
  conv3_3_l2norm_scale: float | None = None
  dtype: Any = jnp.float32


class VGG16(VGGFields):
  """SSD's VGG16 feature extractor: returns the source feature maps.

  Attributes:
    the :class:`VGGFields`, and
    l2norm_scale: initial scale of the L2Norm on conv4_3.
    pool5_stride: 1 for SSD's pool5 (3x3, stride 1, padding 1: fc7 keeps
      conv5_3's stride 16) or 2 for RefineDet's (2x2, stride 2, ceil mode as
      Caffe: fc7 at stride 32).
    conv5_3_l2norm_scale: if set, conv5_3 is returned too, right after
      conv4_3, through an L2Norm with this initial scale (RefineDet: 8).
    extras_first: the number in the first extra level's name (``conv8_1``,
      ``conv8_2`` in SSD; 6 in RefineDet).
  """

  l2norm_scale: float = 20.0
  pool5_stride: int = 1
  conv5_3_l2norm_scale: float | None = None
  extras_first: int = 8

  @property
  def out_channels(self) -> tuple[int, ...]:
    """Channels of each returned feature map."""
    conv3_3 = () if self.conv3_3_l2norm_scale is None else (self.widths[2],)
    conv5_3 = () if self.conv5_3_l2norm_scale is None else (self.widths[4],)
    return (conv3_3 + (self.widths[3],) + conv5_3 + (self.fc_width,)
            + tuple(e[1] for e in self.extras))

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool = False) -> list[jnp.ndarray]:
    """``x: [B, H, W, 3]`` normalised image -> ``[conv4_3 (L2-normalised), fc7, extras...]``,
    each ``[B, h, w, c]``, with conv5_3 (L2-normalised) after conv4_3 if
    ``conv5_3_l2norm_scale`` is set and conv3_3 (L2-normalised) first if
    ``conv3_3_l2norm_scale`` is set. ``train`` updates BatchNorm statistics
    (``norm="batch"``)."""
    if self.norm not in ("none", "batch"):
      raise ValueError(f"norm must be 'none' or 'batch', got {self.norm!r}")
    if self.pool5_stride not in (1, 2):
      raise ValueError(f"pool5_stride must be 1 or 2, got {self.pool5_stride!r}")

    def conv(features, kernel, name, **kw):
      layer = _conv(features, kernel, dtype=self.dtype, name=name, **kw)
      if self.norm == "none":
        return lambda y: nn.relu(layer(y))
      bn = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        dtype=self.dtype, name=f"{name}_bn")
      return lambda y: nn.relu(bn(layer(y)))

    x = x.astype(self.dtype)
    outputs = []
    for stage, (depth, width) in enumerate(zip(_STAGE_DEPTHS, self.widths), start=1):
      for i in range(1, depth + 1):
        x = conv(width, 3, f"conv{stage}_{i}", padding=1)(x)
      if stage == 3 and self.conv3_3_l2norm_scale is not None:
        outputs.append(L2Norm(self.conv3_3_l2norm_scale, name="conv3_3_norm")(x))
      if stage == 4:
        outputs.append(L2Norm(self.l2norm_scale, name="conv4_3_norm")(x))
      if stage == 5 and self.conv5_3_l2norm_scale is not None:
        outputs.append(L2Norm(self.conv5_3_l2norm_scale, name="conv5_3_norm")(x))
      if stage < 5:  # pool1..pool4: 2x2 stride 2; pool3 in ceil mode (75 -> 38 in SSD300)
        x = _max_pool(x, window=2, stride=2, ceil_mode=stage == 3)
      elif self.pool5_stride == 1:  # pool5: 3x3 stride 1 keeps the resolution for the dilated fc6
        x = _max_pool(x, window=3, stride=1, padding=1)
      else:  # RefineDet's pool5: 2x2 stride 2, rounding up as Caffe's pooling does
        x = _max_pool(x, window=2, stride=2, ceil_mode=True)
    d = self.fc6_dilation
    x = conv(self.fc_width, 3, "fc6", padding=d, dilation=d)(x)
    x = conv(self.fc_width, 1, "fc7")(x)
    outputs.append(x)
    for level, (mid, out, kernel, stride, padding) in enumerate(self.extras):
      n = level + self.extras_first  # conv8_1, conv8_2, conv9_1, ... (RefineDet: conv6_1, conv6_2)
      x = conv(mid, 1, f"conv{n}_1")(x)
      x = conv(out, kernel, f"conv{n}_2", stride=stride, padding=padding)(x)
      outputs.append(x)
    return outputs
