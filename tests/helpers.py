"""Helpers shared by jdet's tests, in one place (what users need is in :mod:`jdet.testing`).

* NumPy weights for a model's abstract variables (:func:`numpy_variables`).
* NumPy references: pairwise IoU (:func:`np_iou`), the best IoU of each object
  with a set of anchors (:func:`best_iou_per_object`).
* Files and runs: PNG writing, damaging files, a pickle that records being
  unpickled, orbax resumption of a data iterator, the checkpoint steps of a
  workdir, a JAX compilation cache for a module's runs.
* torch references: torchvision ResNets with random norms, layout changes,
  state dicts as NumPy, raccoon photos, a relative closeness check.
* The papers' anchor presets (SSD300, SSD512, RefineDet), which no model
  builds from: the models compute their anchors from their own fields; these
  are the references that the anchor and model tests compare with.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jdet.ops.anchors import ssd_default_boxes, ssd_sizes

# ----------------------------------------------------------------------------
# Weights.
# ----------------------------------------------------------------------------


def numpy_variables(shapes, seed: int = 0, *, head_std: float | None = None,
                    random_norms: bool = False):
  """Deterministic variables for the abstract ``shapes`` of ``model.init``.

  Conv and dense kernels ``[..., cin, cout]`` are He-normal, or ``N(0,
  head_std^2)`` under a top-level module named ``*_head`` when ``head_std`` is
  given (Faster R-CNN's heads, as their own initialisers); biases and means 0;
  norm scales and variances 1, except an L2Norm's scale (a ``*_norm``
  module): 20, SSD's initial value. With ``random_norms``, scales and
  variances are ``U(0.5, 1.5)`` and biases and means ``U(-0.2, 0.2)`` instead
  (norms that are not identities). Values do not matter to the tests that use
  them, and compiling every layer's random initialiser would cost more than
  the tests.
  """
  rng = np.random.default_rng(seed)

  def make(path, leaf):
    names = [getattr(p, "key", str(p)) for p in path]
    name, parent = names[-1], names[-2] if len(names) > 1 else ""
    if name == "kernel" and head_std is not None and names[1].endswith("_head"):
      value = rng.normal(0.0, head_std, leaf.shape)
    elif name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      value = rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape)
    elif random_norms:
      value = (rng.uniform(0.5, 1.5, leaf.shape) if name in ("scale", "var")
               else rng.uniform(-0.2, 0.2, leaf.shape))
    elif name == "scale":
      value = np.full(leaf.shape, 20.0 if parent.endswith("_norm") else 1.0)
    elif name == "var":
      value = np.ones(leaf.shape)
    else:  # bias, mean
      value = np.zeros(leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(make, shapes)


# ----------------------------------------------------------------------------
# NumPy references.
# ----------------------------------------------------------------------------


def np_iou(a, b) -> np.ndarray:
  """Pairwise IoU in the inputs' precision: ``a [..., 4]`` and ``b [N, 4]`` xyxy -> ``[..., N]``
  (``[4]`` -> ``[N]``, ``[M, 4]`` -> ``[M, N]``)."""
  a, b = np.asarray(a), np.asarray(b)
  lt = np.maximum(a[..., None, :2], b[:, :2])
  rb = np.minimum(a[..., None, 2:], b[:, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
  return inter / (area(a)[..., None] + area(b) - inter)


def best_iou_per_object(anchors, boxes_per_image: Sequence[np.ndarray]) -> np.ndarray:
  """``[N]`` the highest IoU of each object with any of ``anchors [A, 4]`` (xyxy), over
  the images' ground-truth boxes ``[M_i, 4]`` (images without objects add nothing)."""
  from jdet import boxes as box_lib

  return np.concatenate([np.asarray(box_lib.iou(g, anchors)).max(axis=1)
                         for g in boxes_per_image if len(g)])


# ----------------------------------------------------------------------------
# Files and runs.
# ----------------------------------------------------------------------------


def write_image(path, h: int, w: int, *, seed: int = 0, orientation: int | None = None) -> None:
  """Writes an ``h x w`` PNG of random pixels, with an EXIF ``orientation`` if given."""
  from PIL import Image

  pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), np.uint8)
  kw = {}
  if orientation:
    exif = Image.Exif()
    exif[0x0112] = orientation
    kw["exif"] = exif.tobytes()
  Image.fromarray(pixels).save(path, "PNG", **kw)


def assert_resumes_through_orbax(make_iterator: Callable[[], Any], steps: int, directory,
                                 keys: Sequence[str]) -> None:
  """Asserts that a data iterator saved by orbax after ``steps`` batches and
  restored into a fresh one (``make_iterator()``) gives the same next batch."""
  import grain
  import orbax.checkpoint as ocp

  it = make_iterator()
  for _ in range(steps):
    next(it)
  with ocp.CheckpointManager(directory) as mngr:
    mngr.save(steps, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = next(it)
  fresh = make_iterator()
  with ocp.CheckpointManager(directory) as mngr:
    mngr.restore(steps, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  got = next(fresh)
  for k in keys:
    np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


def largest_file(folder) -> str:
  """The largest file anywhere under ``folder``."""
  files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
  return max(files, key=os.path.getsize)


def truncate_file(path, keep: float = 0.5) -> None:
  """Cuts ``path`` to the first ``keep`` of its bytes."""
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(int(size * keep))


def flip_bytes(path, count: int = 3) -> None:
  """Inverts ``count`` bytes in the middle of ``path``."""
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    for k in range(count):
      f.seek(size // 2 + 13 * k)
      byte = f.read(1)[0]
      f.seek(size // 2 + 13 * k)
      f.write(bytes([byte ^ 0xFF]))


# A pickle whose loading would call this function: a safe reader (weights_only) must refuse it.
UNPICKLED = []


def _record_unpickling():
  UNPICKLED.append(True)
  return "payload"


class Payload:
  """Pickles to a call of :func:`_record_unpickling`: unpickling it appends to ``UNPICKLED``."""

  def __reduce__(self):
    return (_record_unpickling, ())


def jax_compile_cache(tmp_path_factory):
  """A persistent JAX compilation cache for one test module's runs, as a fixture body:
  ``compile_cache = pytest.fixture(scope="module")(jax_compile_cache)``.

  Every ``train_and_evaluate`` call jits new functions; most of a smoke run is
  compiling them (model init alone takes ~15 s on a 2-core CPU). The cache is
  exact (keyed by the compiled program), so it changes the speed of the runs
  and nothing else. Yields its folder (for subprocesses'
  ``JAX_COMPILATION_CACHE_DIR``) and is switched off again afterwards.
  """
  from jax.experimental.compilation_cache import compilation_cache

  path = str(tmp_path_factory.mktemp("jax_cache"))
  previous = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", path)
  compilation_cache.reset_cache()
  yield path
  jax.config.update("jax_compilation_cache_dir", previous)
  compilation_cache.reset_cache()


def checkpoint_steps(workdir) -> list[int]:
  """The committed checkpoint steps of a workdir (orbax writes ``<step>`` only once a save
  is complete); ``[]`` before the first."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


# ----------------------------------------------------------------------------
# torch references (torch is imported on first use).
# ----------------------------------------------------------------------------

RACCOON_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "raccoon" / "JPEGImages"


def photo_batch(size: tuple[int, int] = (96, 128), count: int = 2) -> np.ndarray:
  """``[count, h, w, 3]`` float32: raccoon photos resized to ``size = (h, w)``, normalised
  with the ImageNet mean and std."""
  import pytest
  from PIL import Image

  from jdet.data.transforms import IMAGENET_MEAN, IMAGENET_STD

  if not RACCOON_PHOTOS.is_dir():
    pytest.skip(f"the raccoon photos are not at {RACCOON_PHOTOS}")
  images = []
  for i in range(1, count + 1):
    img = Image.open(RACCOON_PHOTOS / f"raccoon-{i}.jpg").convert("RGB").resize(size[::-1],
                                                                                Image.BILINEAR)
    pixels = np.asarray(img, np.float32)
    images.append((pixels - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD))
  return np.stack(images)


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Draws every norm layer's affine (and BatchNorm's running statistics) at random, in place."""
  import torch

  g = torch.Generator().manual_seed(seed)
  uniform = lambda t, lo, hi: t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
  with torch.no_grad():
    for m in model.modules():
      if hasattr(m, "running_var") and hasattr(m, "weight"):  # BatchNorm2d, FrozenBatchNorm2d
        uniform(m.running_mean, -0.5, 0.5)
        uniform(m.running_var, 0.5, 2.0)
      if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)) or hasattr(m, "running_var"):
        uniform(m.weight, 0.5, 1.5)
        uniform(m.bias, -0.5, 0.5)
  return model


def torch_resnet(depth: int, *, seed: int = 0, **kwargs) -> torch.nn.Module:
  """torchvision's ``resnet{depth}(weights=None)`` (18, 34 or 50) in eval mode, random norms."""
  import torch
  import torchvision

  torch.manual_seed(seed)
  make = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34,
          50: torchvision.models.resnet50}[depth]
  return randomize_norms(make(weights=None, **kwargs), seed).eval()


def to_nchw(x: np.ndarray) -> torch.Tensor:
  import torch

  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def to_nhwc(x: torch.Tensor) -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1)


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
  """Copies: ``Tensor.numpy()`` shares memory, and torch's train mode updates buffers in place."""
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def assert_close(got, want, *, rel: float = 1e-4, what: str = "") -> None:
  """``max |got - want| <= rel * max |want|`` (the same shape)."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
  err = np.abs(got - want).max() / np.abs(want).max()
  assert err <= rel, f"{what}: relative error {err:.2e} > {rel:.0e}"


# ----------------------------------------------------------------------------
# The papers' anchor presets (references; the models build anchors from their fields).
# ----------------------------------------------------------------------------

# (image size, dataset) -> (s_min, s_max, first), as in the released Caffe models.
SSD_SIZE_RULES = {
    (300, "voc"): (0.2, 0.9, 0.1),
    (300, "coco"): (0.15, 0.9, 0.07),
    (512, "voc"): (0.15, 0.9, 0.07),
    (512, "coco"): (0.1, 0.9, 0.04),
}
SSD300_FEATURE_SIZES = (38, 19, 10, 5, 3, 1)
SSD300_STRIDES = (8, 16, 32, 64, 100, 300)
SSD512_FEATURE_SIZES = (64, 32, 16, 8, 4, 2, 1)
SSD512_STRIDES = (8, 16, 32, 64, 128, 256, 512)
SSD512_ASPECT_RATIOS = ((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,))


def _ssd_preset(image_size: int, feature_sizes, strides, aspect_ratios, dataset: str,
                clip: bool, clamp_size: bool) -> np.ndarray:
  if (image_size, dataset) not in SSD_SIZE_RULES:
    raise ValueError(f"dataset must be 'voc' or 'coco', got {dataset!r}")
  s_min, s_max, first = SSD_SIZE_RULES[(image_size, dataset)]
  min_sizes, max_sizes = ssd_sizes(image_size, len(feature_sizes), s_min, s_max, first)
  return ssd_default_boxes(image_size, feature_sizes, strides, min_sizes, max_sizes,
                           aspect_ratios, clip=clip, clamp_size=clamp_size)


def ssd300_default_boxes(dataset: str = "voc", *, clip: bool = False,
                         clamp_size: bool = False) -> np.ndarray:
  """The 8732 default boxes of SSD300 (VGG16), ``[8732, 4]`` float32 xyxy.

  Feature maps 38, 19, 10, 5, 3, 1 with strides 8, 16, 32, 64, 100, 300 and
  ratios [2], [2, 3], [2, 3], [2, 3], [2], [2]. ``dataset="voc"``: min sizes
  30, 60, 111, 162, 213, 264 and max sizes 60, 111, 162, 213, 264, 315;
  ``dataset="coco"``: 21, 45, 99, 153, 207, 261 and 45, 99, 153, 207, 261, 315.
  ``clip`` and ``clamp_size`` as in :func:`jdet.ops.anchors.ssd_default_boxes`.
  """
  from jdet.models.ssd import SSD300_ASPECT_RATIOS  # the SSD model's default

  return _ssd_preset(300, SSD300_FEATURE_SIZES, SSD300_STRIDES, SSD300_ASPECT_RATIOS,
                     dataset, clip, clamp_size)


def ssd512_default_boxes(dataset: str = "voc", *, clip: bool = False,
                         clamp_size: bool = False) -> np.ndarray:
  """The 24564 default boxes of SSD512 (VGG16), ``[24564, 4]`` float32 xyxy.

  Feature maps 64, 32, 16, 8, 4, 2, 1 with strides 8, 16, ..., 512 and ratios
  [2], [2, 3] x 4, [2], [2]. ``dataset="voc"``: min sizes 35.84, 76.8, 153.6,
  230.4, 307.2, 384, 460.8 and max sizes 76.8, ..., 537.6; ``dataset="coco"``:
  20.48, 51.2, 133.12, 215.04, 296.96, 378.88, 460.8 and 51.2, ..., 542.72.
  """
  return _ssd_preset(512, SSD512_FEATURE_SIZES, SSD512_STRIDES, SSD512_ASPECT_RATIOS,
                     dataset, clip, clamp_size)


def refinedet_anchors(image_size: int = 320, *, strides: Sequence[int] = (8, 16, 32, 64),
                      sizes: Sequence[float] | None = None,
                      aspect_ratios: Sequence[float] = (2,), clip: bool = False) -> np.ndarray:
  """RefineDet's anchors (Zhang et al. 2018), shared by its ARM and ODM.

  One size per level, ``4 * stride`` by default (32, 64, 128, 256), on feature
  maps of ``ceil(image_size / stride)`` (40, 20, 10, 5 for a 320 input), centred
  at ``(j + 0.5) * stride``. At each location: the 1:1 box, then ``(s sqrt(2),
  s / sqrt(2))`` and ``(s / sqrt(2), s sqrt(2))`` (ratios 1, 2, 1/2), i.e. SSD's
  default boxes with no max size. RefineDet320 has
  ``(40^2 + 20^2 + 10^2 + 5^2) * 3 = 6375`` anchors.

  Returns:
    ``[A, 4]`` float32 xyxy in input-image pixels.
  """
  if sizes is None:
    sizes = [4 * s for s in strides]
  feature_sizes = [math.ceil(image_size / s) for s in strides]
  return ssd_default_boxes(image_size, feature_sizes, strides, sizes, None,
                           [tuple(aspect_ratios)] * len(strides), clip=clip)
