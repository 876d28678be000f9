"""One Sparse R-CNN stage: the dynamic instance-interactive head (Sun et al., CVPR 2021, Fig. 3-4).

For B images with N proposals each, a stage takes every proposal's RoI
features ``[B, N, s, s, D]`` (s = 7, D = 256 channels), its proposal feature
``[B, N, D]`` and its box ``[B, N, 4]``, and returns class logits,
a refined box and the updated proposal feature:

1. **Self-attention** over the N proposals of each image (8 heads, no
   positional encoding): ``x = LN(x + MHA(x))``.
2. **Dynamic convolution** (:class:`DynamicConv`, "instance interaction"):
   each proposal's feature generates the weights of two 1x1 convolutions
   (``D -> 64 -> D``) applied to its own RoI features, then a linear layer
   from the flattened ``s * s * D`` to D: ``x = LN(x + DynamicConv(x, roi))``.
3. **FFN**: ``x = LN(x + Linear(ReLU(Linear(x, 2048)), D))``.
4. **Towers**: class ``num_cls_fcs x [Linear(no bias), LN, ReLU]`` then
   ``Linear(D, num_classes)`` (sigmoid scores, no background); box
   ``num_reg_fcs x`` the same, then ``Linear(D, 4)``.
5. **Box update** (:func:`apply_deltas`): offsets with weights (2, 2, 1, 1)
   on the stage's input box; ``dw``, ``dh`` clamped at ``scale_clamp`` from
   above (the authors) or on both sides (MMDetection's +-4.135).

Variables (MMDetection's ``roi_head.bbox_head.{s}`` names on the right)::

  attention/in_proj, out_proj         attention.attn.in_proj_*, out_proj
  attention_norm                      attention_norm
  dynamic_conv/dynamic_layer          instance_interactive_conv.dynamic_layer
  dynamic_conv/norm_in, norm_out      instance_interactive_conv.norm_in, norm_out
  dynamic_conv/fc_layer, fc_norm      instance_interactive_conv.fc_layer, fc_norm
  dynamic_conv_norm                   instance_interactive_conv_norm
  ffn/fc1, ffn/fc2, ffn_norm          ffn.layers.0.0, ffn.layers.1, ffn_norm
  cls_fc{i}, cls_norm{i}              cls_fcs.{3i}, cls_fcs.{3i+1}
  reg_fc{i}, reg_norm{i}              reg_fcs.{3i}, reg_fcs.{3i+1}
  cls_logits, box_deltas              fc_cls, fc_reg

Initialisation as both implementations: xavier-uniform for every matrix
(the attention's q/k/v as one ``[D, 3D]`` matrix), torch's default uniform
for linear biases, zero attention biases, class bias ``-log((1 - p) / p)``
with ``p = 0.01``, LayerNorm 1 / 0 with epsilon 1e-5.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdet import boxes as box_lib

__all__ = ["StageFields", "DynamicStage", "DynamicConv", "SelfAttention", "FFN", "apply_deltas",
           "SPARSE_RCNN_BOX_STDS", "AUTHORS_SCALE_CLAMP", "MMDET_SCALE_CLAMP"]

# Sparse R-CNN's offsets are scaled by weights (2, 2, 1, 1): stds (0.5, 0.5, 1, 1).
SPARSE_RCNN_BOX_STDS = (0.5, 0.5, 1.0, 1.0)
# The authors clamp dw, dh from above at log(100000 / 16); MMDetection at +-log(1000 / 16).
AUTHORS_SCALE_CLAMP = math.log(100000.0 / 16)
MMDET_SCALE_CLAMP = math.log(1000.0 / 16)

LN_EPS = 1e-5  # torch's LayerNorm default (Flax's is 1e-6)
xavier = nn.initializers.xavier_uniform()


def torch_bias_init(fan_in: int):
  """torch.nn.Linear's default bias: uniform in ``+-1 / sqrt(fan_in)``."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _dense(features: int, fan_in: int, *, dtype, name: str, use_bias: bool = True,
           bias_init=None) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, kernel_init=xavier,
                  bias_init=bias_init or torch_bias_init(fan_in), dtype=dtype, name=name)


def _ln(name: str, dtype) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, name=name)


def apply_deltas(deltas, boxes, *, scale_clamp: float = AUTHORS_SCALE_CLAMP,
                 symmetric_clamp: bool = False) -> jnp.ndarray:
  """The box update: ``deltas [..., 4]`` (weights 2, 2, 1, 1) on xyxy ``boxes [..., 4]``.

  ``dw`` and ``dh`` are clamped at ``scale_clamp`` from above, and at
  ``-scale_clamp`` from below too when ``symmetric_clamp`` (MMDetection). No
  clipping to the image. float32 (or float64) whatever the network's dtype.
  """
  deltas = box_lib.as_f32(deltas)
  if symmetric_clamp:
    deltas = jnp.concatenate([deltas[..., :2], jnp.maximum(deltas[..., 2:], -scale_clamp)], -1)
  return box_lib.decode(deltas, box_lib.as_f32(boxes), stds=SPARSE_RCNN_BOX_STDS, scale_clamp=scale_clamp)


class SelfAttention(nn.Module):
  """Multi-head self-attention as ``torch.nn.MultiheadAttention`` computes it (q, k, v
  from one ``in_proj`` matrix). ``x [B, N, D] -> [B, N, D]``."""

  num_heads: int = 8
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    b, n, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"{d} channels do not split into {self.num_heads} heads")
    zeros = nn.initializers.zeros
    qkv = nn.Dense(3 * d, kernel_init=xavier, bias_init=zeros, dtype=self.dtype,
                   name="in_proj")(x)  # [B, N, 3D]
    q, k, v = jnp.split(qkv.reshape(b, n, 3, self.num_heads, d // self.num_heads), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # [B, N, heads, D / heads]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // self.num_heads)
    weights = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), -1)
    weights = nn.Dropout(self.dropout)(weights, deterministic=not train).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, d)
    return nn.Dense(d, kernel_init=xavier, bias_init=zeros, dtype=self.dtype,
                    name="out_proj")(out)


class DynamicConv(nn.Module):
  """Instance interaction: ``(x [B, N, D], roi [B, N, s, s, D']) -> [B, N, D]``
  (D' RoI feature channels, D in Sparse R-CNN).

  ``Linear(D -> 2 * D' * dim_dynamic)(x)`` gives, per proposal, ``W1 [D', dim_dynamic]``
  and ``W2 [dim_dynamic, D']`` (row-major split); the RoI's ``s * s`` positions
  go through ``ReLU(LN(h @ W1))``, ``ReLU(LN(h @ W2))``, are flattened
  position-major (``[s * s * D']``) and mapped by ``Linear(s * s * D' -> D)``, LN, ReLU.
  """

  dim_dynamic: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, roi):
    b, n, d = x.shape
    s1, s2, c = roi.shape[2:]
    e = self.dim_dynamic
    params = _dense(2 * c * e, d, dtype=self.dtype, name="dynamic_layer")(x)  # [B, N, 2Ce]
    w1 = params[..., :c * e].reshape(b, n, c, e)
    w2 = params[..., c * e:].reshape(b, n, e, c)
    h = roi.reshape(b, n, s1 * s2, c).astype(self.dtype)
    h = nn.relu(_ln("norm_in", self.dtype)(jnp.einsum("bnpc,bnce->bnpe", h, w1)))
    h = nn.relu(_ln("norm_out", self.dtype)(jnp.einsum("bnpe,bnec->bnpc", h, w2)))
    h = h.reshape(b, n, s1 * s2 * c)
    h = _dense(d, s1 * s2 * c, dtype=self.dtype, name="fc_layer")(h)
    return nn.relu(_ln("fc_norm", self.dtype)(h))


class StageFields(nn.Module):
  """The fields of a :class:`DynamicStage`, which SparseRCNN inherits and builds each
  stage from (:func:`jdet.models.detector.build_from_fields`).

  Attributes:
    num_classes: foreground classes (sigmoid scores).
    num_heads: of the self-attention between proposals (8).
    dim_feedforward: the FFN's hidden width (2048).
    dim_dynamic: the dynamic convolution's width (64).
    num_cls_fcs, num_reg_fcs: layers of the class and box towers (1, 3).
    dropout: in attention and FFN (0.0).
    prior_prob: initial foreground probability of the focal classifier (0.01).
    scale_clamp, symmetric_clamp: the clamp of ``dw, dh`` in the box update
      (authors: 8.74 from above; MMDetection: 4.135 both ways).
    dtype: computation dtype; boxes stay float32.
  """

  num_classes: int = 80
  num_heads: int = 8
  dim_feedforward: int = 2048
  dim_dynamic: int = 64
  num_cls_fcs: int = 1
  num_reg_fcs: int = 3
  dropout: float = 0.0
  prior_prob: float = 0.01
  scale_clamp: float = AUTHORS_SCALE_CLAMP
  symmetric_clamp: bool = False
  dtype: Any = jnp.float32


class DynamicStage(StageFields):
  """One stage: ``(roi [B, N, s, s, D], x [B, N, D], boxes [B, N, 4])`` ->
  ``(logits [B, N, num_classes], new_boxes [B, N, 4], x' [B, N, D])``.

  ``new_boxes`` (float32, xyxy, input pixels) carry the gradient of the
  offsets; the caller stops it before the next stage.
  """

  @nn.compact
  def __call__(self, roi, x, boxes, *, train: bool = False):
    d = x.shape[-1]
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=not train)  # noqa: E731
    x = x.astype(self.dtype)
    # 1. Self-attention between the proposals of an image.
    a = SelfAttention(self.num_heads, self.dropout, self.dtype, name="attention")(x, train=train)
    x = _ln("attention_norm", self.dtype)(x + drop(a))
    # 2. Dynamic convolution on each proposal's own RoI features.
    i = DynamicConv(self.dim_dynamic, self.dtype, name="dynamic_conv")(x, roi)
    x = _ln("dynamic_conv_norm", self.dtype)(x + drop(i))
    # 3. FFN.
    h = FFN(self.dim_feedforward, self.dropout, self.dtype, name="ffn")(x, train=train)
    x = _ln("ffn_norm", self.dtype)(x + drop(h))
    # 4. Class and box towers.
    cls = x
    for k in range(self.num_cls_fcs):
      cls = _dense(d, d, use_bias=False, dtype=self.dtype, name=f"cls_fc{k}")(cls)
      cls = nn.relu(_ln(f"cls_norm{k}", self.dtype)(cls))
    reg = x
    for k in range(self.num_reg_fcs):
      reg = _dense(d, d, use_bias=False, dtype=self.dtype, name=f"reg_fc{k}")(reg)
      reg = nn.relu(_ln(f"reg_norm{k}", self.dtype)(reg))
    prior = -math.log((1.0 - self.prior_prob) / self.prior_prob)
    logits = _dense(self.num_classes, d, dtype=self.dtype, name="cls_logits",
                    bias_init=nn.initializers.constant(prior))(cls)
    deltas = _dense(4, d, dtype=self.dtype, name="box_deltas")(reg)
    # 5. Box update.
    new_boxes = apply_deltas(deltas, boxes, scale_clamp=self.scale_clamp,
                             symmetric_clamp=self.symmetric_clamp)
    return box_lib.as_f32(logits), new_boxes, x


class FFN(nn.Module):
  """``Linear(D, hidden), ReLU, dropout, Linear(hidden, D)``: ``[..., D] -> [..., D]``."""

  hidden: int = 2048
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    d = x.shape[-1]
    h = nn.relu(_dense(self.hidden, d, dtype=self.dtype, name="fc1")(x))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    return _dense(d, self.hidden, dtype=self.dtype, name="fc2")(h)
