"""MMDetection 3.3.0's Sparse R-CNN R50-FPN on the CPU: the reference oracle of jdet's.

MMDetection is installed by ``tests/oracles/requirements.txt`` (``pip install --no-deps``,
see that file for why). ``mmcv-lite`` has no compiled ops: :func:`install_cpu_ops`
provides a stand-in ``mmcv._ext`` module before anything imports ``mmcv.ops`` and
points ``mmcv.ops.RoIAlign`` and ``mmcv.ops.nms`` at torchvision's compiled ops (our
own small wrappers, below). Sparse R-CNN needs only RoIAlign from them; its focal
loss falls back to MMDetection's pure-torch code on a CPU.

:func:`build` makes the model from the config shipped in the ``mmdet`` package
(``sparse_rcnn/sparse-rcnn_r50_fpn_1x_coco.py``) with seeded random weights (no
download: ``backbone.init_cfg=None``), in float64 by default; :func:`run` feeds it
images that are already normalised and padded and returns, as NumPy arrays, every
stage's class logits and boxes, the final detections, every stage's Hungarian
matching and the 18 loss terms.

Ground truth with no boxes: MMDetection's data pipeline drops such images from
training (``filter_empty_gt``), but its loss code handles them: the Hungarian
assigner marks every proposal of the image background, the focal loss counts all of
the image's logits with target 0, and the normaliser (the number of matched
proposals in the batch, which equals the number of ground-truth boxes when every
image has at most N) does not change. :func:`run` passes such an image through as
it is; ``tests/convert/test_mmdet_sparse_rcnn.py`` checks that the image's terms
are the background-only focal terms.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
import types
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torchvision

# MMDetection 3.3.0, the version whose config and code the note describes.
MMDET_VERSION = "3.3.0"
CONFIG = "sparse_rcnn/sparse-rcnn_r50_fpn_1x_coco.py"
# The config's DetDataPreprocessor: RGB on 0..255.
MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])
_OPS_INSTALLED = False


def available() -> bool:
  """Whether ``mmdet``, ``mmengine`` and ``mmcv`` (lite) are importable."""
  return all(importlib.util.find_spec(m) is not None for m in ("mmdet", "mmengine", "mmcv"))


# ----------------------------------------------------------------------------
# Stand-ins for mmcv's compiled ops.
# ----------------------------------------------------------------------------


def install_cpu_ops() -> None:
  """Makes ``mmcv.ops`` importable without mmcv's compiled extension.

  ``sys.modules["mmcv._ext"]`` becomes a module whose every attribute is a
  function that raises (mmcv's loader only checks that the names exist), except
  ``nms``, which torchvision computes. Then ``mmcv.ops.RoIAlign`` becomes
  :class:`TorchvisionRoIAlign` and ``mmcv.ops.nms`` :func:`torchvision_nms`.
  Idempotent; call it before importing anything from ``mmdet``.
  """
  global _OPS_INSTALLED
  if _OPS_INSTALLED:
    return
  try:
    import mmcv._ext  # noqa: F401  (a full mmcv build: nothing to stand in for)
  except ImportError:
    sys.modules["mmcv._ext"] = _StandInExt("mmcv._ext")
  import mmcv.ops
  mmcv.ops.RoIAlign = TorchvisionRoIAlign
  mmcv.ops.nms = torchvision_nms
  _OPS_INSTALLED = True


class _StandInExt(types.ModuleType):
  """``mmcv._ext`` without compiled code: ``nms`` by torchvision, anything else raises
  when called (not when looked up: ``mmcv.ops`` looks up ~200 names at import)."""

  def __getattr__(self, name: str):
    if name.startswith("__"):
      raise AttributeError(name)

    def missing(*args, **kwargs):
      raise NotImplementedError(f"mmcv._ext.{name} is not available: mmcv-lite has no compiled "
                                f"ops and the test stand-in provides only RoIAlign and nms")
    return missing

  @staticmethod
  def nms(boxes, scores, iou_threshold: float, offset: int = 0):
    """The signature ``mmcv.ops.nms`` calls: kept indices in descending score order."""
    if offset != 0:
      raise NotImplementedError("the stand-in nms supports offset=0 only")
    return torchvision.ops.nms(boxes, scores, float(iou_threshold))


class TorchvisionRoIAlign(torch.nn.Module):
  """``mmcv.ops.RoIAlign``'s interface on torchvision's compiled ``roi_align``.

  mmcv's defaults differ from torchvision's: ``aligned=True`` (the half-pixel
  shift), and MMDetection's extractor reads ``output_size`` back as an (h, w)
  pair. Only ``pool_mode="avg"`` exists in torchvision.
  """

  def __init__(self, output_size, spatial_scale: float = 1.0, sampling_ratio: int = 0,
               pool_mode: str = "avg", aligned: bool = True, use_torchvision: bool = False):
    super().__init__()
    del use_torchvision  # always
    if pool_mode != "avg":
      raise NotImplementedError(f"pool_mode={pool_mode!r}: torchvision's roi_align averages")
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    self.output_size = size
    self.spatial_scale = float(spatial_scale)
    self.sampling_ratio = int(sampling_ratio)
    self.aligned = bool(aligned)

  def forward(self, features, rois):
    """``features [B, C, H, W]``, ``rois [K, 5]`` (image index, x1, y1, x2, y2) ->
    ``[K, C, h, w]``."""
    return torchvision.ops.roi_align(features, rois, self.output_size, self.spatial_scale,
                                     self.sampling_ratio, self.aligned)


def torchvision_nms(boxes, scores, iou_threshold: float, offset: int = 0, score_threshold=0,
                    max_num: int = -1):
  """``mmcv.ops.nms``'s interface: ``(dets [K, 5] = boxes and score, kept indices)``."""
  if offset != 0:
    raise NotImplementedError("the stand-in nms supports offset=0 only")
  is_numpy = isinstance(boxes, np.ndarray)
  boxes_t, scores_t = torch.as_tensor(boxes), torch.as_tensor(scores)
  index = torch.arange(len(scores_t))
  if score_threshold > 0:
    keep = scores_t > score_threshold
    boxes_t, scores_t, index = boxes_t[keep], scores_t[keep], index[keep]
  inds = torchvision.ops.nms(boxes_t, scores_t, float(iou_threshold))
  if max_num > 0:
    inds = inds[:max_num]
  dets = torch.cat([boxes_t[inds], scores_t[inds, None]], dim=1)
  inds = index[inds]
  if is_numpy:
    return dets.numpy(), inds.numpy()
  return dets, inds


# ----------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------


def config_path() -> Path:
  """The Sparse R-CNN R50-FPN 1x config inside the installed ``mmdet`` package."""
  import mmdet
  path = Path(mmdet.__file__).parent / ".mim" / "configs" / CONFIG
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing: is mmdet=={MMDET_VERSION} installed?")
  return path


def build(*, num_classes: int = 80, num_proposals: int = 100, seed: int = 0,
          double: bool = True, tame: bool = True):
  """MMDetection's Sparse R-CNN R50-FPN, random weights, in eval mode.

  Args:
    num_classes: foreground classes of every stage's class layer.
    num_proposals: learnable proposals (the config's 100; 300 for the 3x crop model).
    seed: seeds ``torch.manual_seed`` for MMDetection's own initialisation
      (``init_weights``: xavier-uniform head matrices, class bias -log(99), proposal
      boxes the whole image, features N(0, 1)) and the generator of ``tame``.
    double: convert to float64 (``.double()``) after initialising.
    tame: redraw, from the seeded generator, what MMDetection's initialisation
      leaves degenerate for a comparison: every backbone BatchNorm's affine and
      statistics (otherwise 1, 0, 0, 1), the proposal boxes (otherwise all the
      whole image: random centres in the middle 60 %, square roots of the area
      log-uniform in 8-220 % of the image's, so RoIs fall on every FPN level) and the box layer of every
      stage (std 0.02, so that boxes move by some pixels per stage instead of
      running into the clamp).
  Returns:
    The ``mmdet.models.detectors.SparseRCNN`` module, ``.eval()``.
  """
  install_cpu_ops()
  from mmengine.config import Config
  from mmengine.logging import MMLogger
  from mmdet.registry import MODELS
  from mmdet.utils import register_all_modules

  register_all_modules()
  cfg = Config.fromfile(str(config_path()))
  model_cfg = cfg.model
  model_cfg.backbone.init_cfg = None  # it would download torchvision's ImageNet weights
  model_cfg.rpn_head.num_proposals = num_proposals
  model_cfg.test_cfg.rcnn.max_per_img = num_proposals
  for head in model_cfg.roi_head.bbox_head:
    head.num_classes = num_classes
  torch.manual_seed(seed)
  model = MODELS.build(model_cfg)
  logger = MMLogger.get_current_instance()
  level = logger.level
  logger.setLevel(logging.WARNING)  # init_weights logs every tensor's initialiser
  try:
    model.init_weights()
  finally:
    logger.setLevel(level)
  if tame:
    _tame(model, seed)
  if double:
    model = model.double()
  return model.eval()


def _tame(model, seed: int) -> None:
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for m in model.backbone.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.3, 0.8, generator=g)
        m.bias.normal_(0.0, 0.1, generator=g)
        m.running_mean.normal_(0.0, 0.1, generator=g)
        m.running_var.uniform_(0.5, 1.5, generator=g)
    boxes = model.rpn_head.init_proposal_bboxes.weight  # [N, 4] normalised cx, cy, w, h
    boxes[:, :2].uniform_(0.2, 0.8, generator=g)
    # sqrt(area) log-uniform in [0.08, 2.2] of the image's, aspect ratio in [1/2, 2]:
    # RoIs on P2..P5 (P5 reads boxes of sqrt(area) >= 448 px, beyond a small image).
    scale = torch.empty(len(boxes)).uniform_(np.log(0.08), np.log(2.2), generator=g).exp()
    ratio = torch.empty(len(boxes)).uniform_(np.log(0.5), np.log(2.0), generator=g).exp()
    boxes[:, 2] = scale * ratio.sqrt()
    boxes[:, 3] = scale / ratio.sqrt()
    for head in model.roi_head.bbox_head:
      head.fc_reg.weight.normal_(0.0, 0.02, generator=g)
      head.fc_reg.bias.normal_(0.0, 0.02, generator=g)


def num_parameters(model) -> int:
  """MMDetection's count: every trainable tensor (the backbone BN affine included)."""
  return sum(p.numel() for p in model.parameters())


def state_dict_numpy(model) -> dict[str, np.ndarray]:
  """``model.state_dict()`` as NumPy arrays (float64 for a ``.double()`` model)."""
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------
# Running it.
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def _recording(model, record: dict):
  """Wraps ``roi_head._bbox_forward`` (each stage's logits and boxes) and the Hungarian
  assigner's ``linear_sum_assignment`` (each stage's cost matrix and matching) to
  record them in ``record``."""
  from mmdet.models.task_modules.assigners import hungarian_assigner

  roi_head = model.roi_head
  bbox_forward = roi_head._bbox_forward
  solve = hungarian_assigner.linear_sum_assignment

  def recorded_bbox_forward(stage, x, rois, object_feats, batch_img_metas):
    out = bbox_forward(stage, x, rois, object_feats, batch_img_metas)
    b = len(batch_img_metas)
    record.setdefault("logits", []).append(out["cls_score"].detach().cpu().numpy())
    record.setdefault("boxes", []).append(
        out["decoded_bboxes"].detach().cpu().numpy().reshape(b, -1, 4))
    return out

  def recorded_solve(cost):
    rows, cols = solve(cost)
    record.setdefault("costs", []).append(np.asarray(cost, np.float64))
    record.setdefault("matches", []).append((np.asarray(rows), np.asarray(cols)))
    return rows, cols

  roi_head._bbox_forward = recorded_bbox_forward
  hungarian_assigner.linear_sum_assignment = recorded_solve
  try:
    yield
  finally:
    del roi_head._bbox_forward  # the instance attribute: back to the class's method
    hungarian_assigner.linear_sum_assignment = solve


def data_samples(image_sizes, canvas, gt_boxes, gt_labels, dtype):
  """MMDetection's ``DetDataSample`` per image: its ``(h, w)`` inside the padded ``canvas``
  and, when given, its ground truth (``gt_boxes`` / ``gt_labels`` per image)."""
  from mmdet.structures import DetDataSample
  from mmengine.structures import InstanceData

  samples = []
  for i, (h, w) in enumerate(image_sizes):
    sample = DetDataSample(metainfo=dict(img_shape=(int(h), int(w)), ori_shape=(int(h), int(w)),
                                         pad_shape=tuple(canvas), batch_input_shape=tuple(canvas),
                                         scale_factor=(1.0, 1.0)))
    gt = InstanceData()
    boxes = np.zeros((0, 4)) if gt_boxes is None else np.asarray(gt_boxes[i]).reshape(-1, 4)
    labels = np.zeros((0,)) if gt_labels is None else np.asarray(gt_labels[i]).reshape(-1)
    gt.bboxes = torch.as_tensor(boxes, dtype=dtype)
    gt.labels = torch.as_tensor(labels, dtype=torch.long)
    sample.gt_instances = gt
    samples.append(sample)
  return samples


def run(model, images: np.ndarray, image_sizes: Sequence[tuple[int, int]],
        gt_boxes: Sequence[np.ndarray] | None = None,
        gt_labels: Sequence[np.ndarray] | None = None, *, head_grads: bool = False) -> dict:
  """Runs MMDetection's Sparse R-CNN: inference, and the training loss if ground truth is given.

  Shapes: B images, N proposals, C classes, S stages, G_b boxes of image b.

  Args:
    model: from :func:`build`.
    images: ``[B, 3, H, W]`` normalised (mean/std on 0..255, RGB) and zero-padded
      NCHW, in the model's dtype; H and W multiples of 32.
    image_sizes: ``(h, w)`` of each real image inside the canvas (MMDetection's
      ``img_shape``: it scales the learnable proposals and normalises the L1 cost
      and loss).
    gt_boxes: per image ``[G_b, 4]`` xyxy in input pixels (``G_b`` may be 0).
    gt_labels: per image ``[G_b]`` in ``0 .. C-1``.
    head_grads: also return the gradient of the summed 18 terms with respect to the
      proposals and the stages (the backbone and FPN are held fixed for this pass, so
      that no backward runs through them).
  Returns:
    A dict of NumPy arrays:

    * ``logits``: S arrays ``[B, N, C]``, each stage's class logits (inference);
    * ``boxes``: S arrays ``[B, N, 4]``, each stage's decoded boxes, xyxy input pixels;
    * ``det_boxes [B, N, 4]``, ``det_scores [B, N]``, ``det_labels [B, N]``,
      ``det_index [B, N]`` (the flat index ``n * C + c`` in the last stage's
      scores): the final detections, sorted by descending score (ties by index);
      MMDetection's ``topk(sorted=False)`` leaves its order unspecified.

    With ground truth, also:

    * ``losses``: ``{"s{stage}.loss_cls" | ".loss_bbox" | ".loss_iou": float}``, the
      18 terms as MMDetection returns them (stage weights 1, loss weights 2, 5, 2
      included);
    * ``train_logits`` / ``train_boxes``: each stage's outputs in the loss pass (the
      same as inference: dropout is 0 and the backbone's BN frozen);
    * ``assignment``: S arrays ``[B, N]`` int, the matched ground-truth index of each
      proposal, -1 for background;
    * ``costs``: S lists of B cost matrices ``[N, G_b]`` (None for an image without
      boxes: MMDetection builds no cost for it);
    * with ``head_grads``, ``grads``: ``{parameter name: gradient}`` of every
      ``rpn_head.*`` and ``roi_head.*`` parameter.
  """

  dtype = next(model.parameters()).dtype
  x = torch.as_tensor(np.asarray(images), dtype=dtype)
  canvas = tuple(x.shape[-2:])
  b = x.shape[0]
  out: dict = {}
  record: dict = {}
  with torch.no_grad(), _recording(model, record):
    samples = data_samples(image_sizes, canvas, None, None, dtype)
    results = model.predict(x, samples, rescale=False)
  out["logits"] = record["logits"]
  out["boxes"] = record["boxes"]
  det = {k: [] for k in ("det_boxes", "det_scores", "det_labels", "det_index")}
  num_classes = out["logits"][-1].shape[-1]
  last_scores = 1.0 / (1.0 + np.exp(-out["logits"][-1].reshape(b, -1)))  # [B, N * C]
  for i, sample in enumerate(results):
    inst = sample.pred_instances
    scores = inst.scores.numpy()
    labels = inst.labels.numpy()
    boxes = inst.bboxes.numpy()
    # The flat index of each detection: its box's proposal and its label give it.
    proposal = np.array([np.flatnonzero((out["boxes"][-1][i] == bx).all(-1))[0] for bx in boxes])
    index = proposal * num_classes + labels
    np.testing.assert_allclose(last_scores[i, index], scores, rtol=1e-12)
    order = np.lexsort((index, -scores))
    det["det_boxes"].append(boxes[order])
    det["det_scores"].append(scores[order])
    det["det_labels"].append(labels[order])
    det["det_index"].append(index[order])
  out.update({k: np.stack(v) for k, v in det.items()})

  if gt_boxes is None:
    return out
  record.clear()
  fixed = [p for name, p in model.named_parameters() if name.startswith(("backbone.", "neck."))]
  trainable = [p.requires_grad for p in fixed]
  try:
    for p in fixed:
      p.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(head_grads), _recording(model, record):
      samples = data_samples(image_sizes, canvas, gt_boxes, gt_labels, dtype)
      losses = model.loss(x, samples)
      if head_grads:
        sum(v for k, v in losses.items() if "loss" in k).backward()
  finally:
    for p, flag in zip(fixed, trainable):
      p.requires_grad_(flag)
  if head_grads:
    out["grads"] = {name: p.grad.detach().cpu().numpy() for name, p in model.named_parameters()
                    if name.startswith(("rpn_head.", "roi_head.")) and p.grad is not None}
    model.zero_grad(set_to_none=True)
  out["losses"] = {k: float(v.detach()) for k, v in losses.items() if "loss" in k}
  out["train_logits"] = record["logits"]
  out["train_boxes"] = record["boxes"]
  stages = len(record["logits"])
  nonempty = [i for i in range(b) if len(np.asarray(gt_boxes[i]).reshape(-1, 4))]
  n = record["logits"][0].shape[1]
  assignment, costs = [], []
  solved = iter(zip(record["costs"], record["matches"]))
  for _ in range(stages):  # the assigner runs image by image, stage by stage
    a = np.full((b, n), -1, np.int64)
    c = [None] * b
    for i in nonempty:
      cost, (rows, cols) = next(solved)
      a[i, rows] = cols
      c[i] = cost
    assignment.append(a)
    costs.append(c)
  out["assignment"] = assignment
  out["costs"] = costs
  return out


def pad_batch(photos: Sequence[np.ndarray], canvas: tuple[int, int]) -> np.ndarray:
  """RGB photos ``[h_b, w_b, 3]`` (0..255) -> ``[B, H, W, 3]`` float64: normalised with the
  config's mean and std, then zero-padded at the bottom and right, as MMDetection's
  ``DetDataPreprocessor`` does (normalise, then pad with 0). Transpose to NCHW for
  :func:`run`."""
  out = np.zeros((len(photos),) + tuple(canvas) + (3,), np.float64)
  for i, photo in enumerate(photos):
    h, w = photo.shape[:2]
    out[i, :h, :w] = (np.asarray(photo, np.float64) - MEAN) / STD
  return out
