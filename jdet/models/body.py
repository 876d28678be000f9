"""The ResNet-FPN body and the RoI feature step that the R-CNN detectors share.

* :class:`ResNetFPN`: ResNet C2..C5 (:mod:`jdet.models.backbones.resnet`)
  and an FPN on them (:mod:`jdet.models.necks.fpn`), P2..P5 plus ``num_extra``
  max-pooled levels (Faster R-CNN's P6; none for Sparse R-CNN). A detector
  inherits its :class:`BodyFields`, builds it with
  ``build_from_fields(ResNetFPN, self, num_extra=...)``
  (:func:`jdet.models.detector.build_from_fields`) and holds it with
  :func:`flax.linen.share_scope`, so its variables keep the names
  ``backbone/...`` and ``neck/...`` at the detector's top level (the names
  the weight converters write).
* :func:`roi_features`: multi-level RoIAlign of a batch of boxes from the
  first levels of the pyramid (:func:`jdet.ops.roi_align.multilevel_roi_align`,
  level ``floor(4 + log2(sqrt(area) / 224))``), with no gradient through the
  boxes.

Shapes (the letters of :mod:`jdet.models.detector`): B images, H x W input,
L levels, R RoIs per image (proposals, sampled RoIs or learnable proposals),
D feature channels; RoIAlign gives ``s x s`` cells (``output_size``, 7).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdet.models.backbones.resnet import ResNet
from jdet.models.necks.fpn import FPN
from jdet.ops.roi_align import multilevel_roi_align

__all__ = ["BodyFields", "ResNetFPN", "roi_features", "frozen_body_parameters"]


class BodyFields(nn.Module):
  """The fields a detector shares with its ResNet-FPN body, under the same names.

  A detector built on the body inherits them (``class FasterRCNN(BodyFields)``)
  and builds the body from them with
  :func:`~jdet.models.detector.build_from_fields`; its config sets them as
  its own (``--config.model.depth=101``).

  Attributes:
    depth, widths, stem_width, norm, norm_eps, frozen_stages: the ResNet
      (:class:`~jdet.models.backbones.resnet.ResNet`; defaults R50, frozen
      BatchNorm, stem and layer1 frozen).
    fpn_channels: the FPN's width (256).
    dtype: computation dtype.
  """

  depth: int = 50
  widths: Sequence[int] = (64, 128, 256, 512)
  stem_width: int = 64
  norm: str = "frozen_bn"
  norm_eps: float = 1e-5
  frozen_stages: int = 1
  fpn_channels: int = 256
  dtype: Any = jnp.float32



class ResNetFPN(BodyFields):
  """ResNet + FPN: ``image [B, H, W, 3]`` -> ``[P2, ..., P(5 + num_extra)]``.

  Attributes:
    the :class:`BodyFields`, and
    num_extra: levels after P5 by max-pooling (1: Faster R-CNN's P6; 0: P2..P5).
  """

  num_extra: int = 1

  def setup(self):
    self.backbone = ResNet(depth=self.depth, widths=tuple(self.widths), stem_width=self.stem_width,
                           norm=self.norm, norm_eps=self.norm_eps,
                           frozen_stages=self.frozen_stages, out_stages=(1, 2, 3, 4),
                           dtype=self.dtype)
    self.neck = FPN(out_channels=self.fpn_channels, extra="maxpool" if self.num_extra else "none",
                    num_extra=self.num_extra, dtype=self.dtype)

  @property
  def strides(self) -> tuple[int, ...]:
    """Strides of the returned levels: 4, 8, 16, 32 (, 64, ...)."""
    return tuple(2 ** (l + 2) for l in range(4 + self.num_extra))

  def frozen_parameters(self) -> tuple[str, ...]:
    """Regexps of the parameters ``frozen_stages`` freezes (``"^backbone/(conv1|...)/"``)."""
    return ResNet(frozen_stages=self.frozen_stages, parent=None).freeze_patterns("backbone/")

  def __call__(self, image, *, train: bool = False) -> list[jnp.ndarray]:
    """``image [B, H, W, 3]`` -> levels ``[B, ceil(H / stride), ceil(W / stride), D]``
    (``D = fpn_channels``)."""
    return list(self.neck(self.backbone(image, train=train)))


def frozen_body_parameters(frozen_stages: int) -> tuple[str, ...]:
  """Regexps of the parameters a ResNetFPN body with ``frozen_stages`` freezes."""
  return ResNetFPN(frozen_stages=frozen_stages, parent=None).frozen_parameters()


def roi_features(features: Sequence[jnp.ndarray], rois, *, strides: Sequence[int],
                 output_size: int = 7, sampling_ratio: int = 2,
                 aligned: bool = True) -> jnp.ndarray:
  """RoIAlign of ``rois [B, R, 4]`` (input pixels) from the levels ``features``.

  Args:
    features: ``[B, H_l, W_l, D]`` per level, finest first (as many as ``strides``).
    rois: ``[B, R, 4]`` xyxy; they carry no gradient (the boxes are a stopped input).
    strides: of the levels, consecutive powers of two (``(4, 8, 16, 32)``).
    output_size, sampling_ratio, aligned: of RoIAlign (torchvision's Faster
      R-CNN: 7, 2, False; MMDetection and Sparse R-CNN: 7, 2, True).
  Returns:
    ``[B, R, s, s, D]`` with ``s = output_size``. Padding RoIs are pooled too
    (from real features): mask their results.
  """
  levels = list(features[:len(strides)])

  def one(feats, r):
    return multilevel_roi_align(feats, r, strides=tuple(strides), output_size=output_size,
                                sampling_ratio=sampling_ratio, aligned=aligned)

  return jax.vmap(one)(levels, jax.lax.stop_gradient(rois))
