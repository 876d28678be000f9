"""Running a trained detector on your own pictures: :class:`Predictor`.

::

  from jdet.inference.predictor import Predictor

  predictor = Predictor.from_workdir("runs/ssd_shapes")  # the config its run saved
  result = predictor("photo.jpg")               # or an [H, W, 3] / [H, W] array
  for box, score, name in zip(result.boxes, result.scores, result.names):
    print(name, score, box)                     # box: [x1, y1, x2, y2] in the photo's pixels
  results = predictor(["a.jpg", "b.png", array])  # a list in, a list out

A predictor is built from a config and a run directory (the latest or a given
checkpoint, as ``eval.py``), or from a config and a weights file (a jdet
``.npz`` or any checkpoint :mod:`jdet.convert` reads). It applies the model's
own evaluation transform (the config's ``data.transforms``) to each image,
batches images of the same transformed shape (``data.eval_batch_size`` per
batch, the last one completed with filler images), so the model compiles once
per input shape, and returns the detections in the original image's pixels
with their class names: exactly what ``eval.py`` computes for the same images
and checkpoint (``tests/test_predict.py``). With ``tta=True`` it runs the
config's test-time augmentation (``eval.py --tta``; SSD and RefineDet).

Images: file paths (decoded as the data sources decode them: EXIF
orientation applied, greyscale, palette, 16-bit and alpha images converted to
8-bit RGB), or NumPy arrays ``[H, W, 3]`` RGB, ``[H, W]`` / ``[H, W, 1]``
greyscale or ``[H, W, 4]`` RGBA, ``uint8`` (other dtypes are taken as 0..255,
or as 0..1 when every value is within it). A file that cannot be read raises
:class:`ImageReadError` naming it; :meth:`Predictor.read` does only the reading,
for programs that skip bad files (``predict.py``).

Class names come from, in order: the ``class_names`` argument, the run's
``class_names.json`` (written by ``train.py``), the config's
``data.class_names`` (the ``custom`` variant), the config's validation data,
and else ``"class 0"``, ``"class 1"``, ...
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jdet import parallel
from jdet.class_names import read_class_names
from jdet.data import builder, pipeline
from jdet.data.records import Example, SkipLog, empty_annotations
from jdet.engine.restore import NoCheckpointError, restore_for_eval
from jdet.inference.images import ImageReadError, to_rgb8

__all__ = ["Predictor", "ImageDetections", "ImageReadError", "load_config", "to_rgb8",
           "DEFAULT_SCORE_THRESHOLD"]

log = logging.getLogger(__name__)

ImageInput = Any  # str | os.PathLike | np.ndarray
# The score below which predict.py, the Predictor and the exported loader leave a detection out.
DEFAULT_SCORE_THRESHOLD = 0.3


@dataclasses.dataclass
class ImageDetections:
  """The detections of one image, in its own pixels.

  Attributes:
    boxes: ``[K, 4]`` float32 ``[x1, y1, x2, y2]`` in the original image's pixels,
      ``0 <= x1 <= x2 <= W``.
    scores: ``[K]`` float32, highest first.
    labels: ``[K]`` int32 class ids (``0 .. num_classes - 1``, as in the data).
    names: the class name of each detection.
    image_size: ``(h, w)`` of the image as given (after EXIF orientation).
    file: the file it came from, or ``None`` for an array.
  """

  boxes: np.ndarray
  scores: np.ndarray
  labels: np.ndarray
  names: list[str]
  image_size: tuple[int, int]
  file: str | None = None

  def __len__(self) -> int:
    return len(self.scores)

  def describe(self) -> str:
    """A few lines for people: the file (or "array"), its size, and one line per detection
    (class name, score, box)."""
    h, w = self.image_size
    n = len(self)
    lines = [f"{self.file or 'array'} ({w}x{h}): {n} detection{'s' * (n != 1)}"]
    for name, score, box in zip(self.names, self.scores.tolist(), self.boxes.tolist()):
      lines.append(f"  {name:<16} {score:.3f}  [{box[0]:.1f}, {box[1]:.1f}, {box[2]:.1f}, "
                   f"{box[3]:.1f}]")
    return "\n".join(lines)

  def to_coco(self, image_id: int, category_ids: Sequence[int] | None = None) -> list[dict]:
    """COCO results entries (``bbox`` as ``[x, y, w, h]``); category id ``label + 1``
    unless ``category_ids`` maps labels to ids."""
    out = []
    for box, score, label in zip(self.boxes.tolist(), self.scores.tolist(), self.labels.tolist()):
      cat = int(category_ids[label]) if category_ids is not None else int(label) + 1
      out.append(dict(image_id=int(image_id), category_id=cat, score=float(score),
                      bbox=[box[0], box[1], box[2] - box[0], box[3] - box[1]]))
    return out


def load_config(config: Any):
  """A config object, or ``"configs/<model>.py[:variant]"`` loaded as ``--config`` loads it
  (its ``get_config(variant)``; ``configs`` importable from the file's repository)."""
  if not isinstance(config, (str, os.PathLike)):
    return config
  import importlib.util
  spec_text = os.fspath(config)
  path, sep, arg = spec_text.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} not found")
  builder.put_configs_on_path(["", f"--config={spec_text}"])
  spec = importlib.util.spec_from_file_location(f"_jdet_config_{Path(path).stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if sep else module.get_config()


class _Images:
  """Decoded images as a source (for :func:`jdet.data.pipeline.eval_batches`)."""

  def __init__(self, images: Sequence[np.ndarray], class_names: Sequence[str]):
    self.images = list(images)
    self.class_names = tuple(class_names)

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> Example:
    annotations = empty_annotations()
    return Example(image=self.images[index], image_id=int(index), file=f"input {index}",
                   **annotations)


class Predictor:
  """A detector with its weights, its evaluation transform and its class names.

  Build it with :meth:`from_workdir` or :meth:`from_weights`; call it on one image
  (an :class:`ImageDetections` back) or a list (a list back).

  Args:
    model: the detector module (``jdet.build_model(...)``).
    variables: its variables (``params``, ``batch_stats``), replicated on ``mesh``.
    data_config: the config's ``data`` section (the evaluation transform and
      ``eval_batch_size``).
    class_names: one name per class id.
    mesh: the device mesh (default: all devices).
    batch_size: images per compiled batch (default ``data.eval_batch_size``);
      a multiple of the number of devices.
    score_threshold: detections scoring below it are left out (the model's own
      threshold applies first); :data:`DEFAULT_SCORE_THRESHOLD` (0.3) as
      ``predict.py`` and the exported loader; 0 keeps every detection, as ``eval.py``.
    predict_fn: a jitted ``(variables, batch) -> Detections`` (default the
      model's ``predict``; :mod:`jdet.evaluation.tta` gives the TTA one).
  """

  def __init__(self, model, variables, data_config, class_names: Sequence[str], *,
               mesh=None, batch_size: int | None = None,
               score_threshold: float = DEFAULT_SCORE_THRESHOLD,
               predict_fn: Callable | None = None):
    self.model = model
    self.mesh = mesh if mesh is not None else parallel.make_mesh()
    self.variables = variables
    self.data_config = data_config
    self.class_names = tuple(class_names)
    self.batch_size = int(batch_size or data_config.eval_batch_size)
    if self.batch_size % self.mesh.size:
      raise ValueError(f"batch_size={self.batch_size} does not divide over {self.mesh.size} "
                       f"devices")
    self.score_threshold = float(score_threshold)
    self.transform = builder.build_transforms(data_config, train=False)
    # The detections are the model's own ``predict`` (no TTA, no custom
    # ``predict_fn``): what jdet.inference.export can lower.
    self.runs_model_predict = predict_fn is None
    if predict_fn is None:  # shared by equal models (Linen modules compare by their fields)
      predict_fn = functools.partial(_model_predict, model)
    self._predict = predict_fn
    self._skip_log = SkipLog("predict")

  # --------------------------------------------------------------------------
  # Building one.
  # --------------------------------------------------------------------------

  @classmethod
  def from_workdir(cls, workdir: str | os.PathLike, *, config=None, step: int | None = None,
                   tta: bool = False, class_names: Sequence[str] | None = None,
                   **kwargs) -> "Predictor":
    """The checkpoint ``step`` (default the latest) of ``train.py``'s ``workdir``.

    Args:
      workdir: the run directory (``checkpoints/``, ``class_names.json``,
        ``config.json``).
      config: a config object or ``"configs/<model>.py[:variant]"``; None: the
        config the run saved in ``workdir``.
      step: the checkpoint step; None for the latest. Without any checkpoint the
        config's ``init.weights`` are used, as ``eval.py`` does.
      tta: the config's test-time augmentation (``eval.py --tta``).
      class_names: overrides the names found (see the module doc).
      **kwargs: :class:`Predictor`'s keyword arguments.
    """
    from jdet.models import build_model
    workdir = os.fspath(workdir)
    if config is None:
      from jdet.engine.workdir import CONFIG_FILE, saved_config
      config = saved_config(workdir)
      if config is None:
        raise NoCheckpointError(f"{workdir} has no {CONFIG_FILE} (train.py saves it); give the "
                                f"config")
    config = load_config(config)
    mesh = kwargs.pop("mesh", None) or parallel.make_mesh()
    model = build_model(config.model_name, **config.model)
    data_config, predict_fn = _tta(model, config, tta)
    sample = _sample_batch(config.data)  # the model's own input size (not TTA's)
    variables, _ = restore_for_eval(model, config, workdir, sample, mesh=mesh, step=step)
    names = class_names or read_class_names(workdir) or _config_class_names(config)
    return cls(model, variables, data_config, names, mesh=mesh, predict_fn=predict_fn, **kwargs)

  @classmethod
  def from_weights(cls, config, weights: str | os.PathLike, *, tta: bool = False,
                   class_names: Sequence[str] | None = None, **kwargs) -> "Predictor":
    """Weights from a file (a jdet ``.npz`` or any checkpoint :mod:`jdet.convert`
    reads, e.g. torchvision's or MMDetection's COCO models) for the model of
    ``config``; every variable must be in it (no class layer left initialised)."""
    from jdet import convert
    from jdet.models import build_model
    if not os.path.isfile(weights):
      raise NoCheckpointError(f"weights file {os.fspath(weights)} not found")
    config = load_config(config)
    mesh = kwargs.pop("mesh", None) or parallel.make_mesh()
    model = build_model(config.model_name, **config.model)
    data_config, predict_fn = _tta(model, config, tta)
    image = jnp.asarray(_sample_batch(config.data)["image"][:1])  # the model's own size
    # Shapes only: every variable must come from the file.
    variables = jax.eval_shape(lambda key: model.init(key, image), jax.random.key(0))
    variables, report = convert.load_model_variables(weights, variables, return_report=True)
    if report.reinitialised:
      raise ValueError(f"{os.fspath(weights)} does not fit the model of the config: "
                       f"{report.summary()}\n(fine-tune it first: train.py with "
                       f"--config.init.weights)")
    names = class_names or _config_class_names(config)
    return cls(model, parallel.replicate(variables, mesh), data_config, names, mesh=mesh,
               predict_fn=predict_fn, **kwargs)

  # --------------------------------------------------------------------------
  # Using it.
  # --------------------------------------------------------------------------

  def read(self, image: ImageInput, *, fixes: list[tuple[str, str]] | None = None) -> np.ndarray:
    """One input -> ``[H, W, 3]`` uint8 RGB, upright.

    A file read with a repair (a truncated JPEG, EXIF orientation, a 16-bit or
    palette image) is logged and, if ``fixes`` is given, ``(file, reason)`` is
    appended to it.

    Raises:
      ImageReadError: a missing, unreadable or non-image file, or a bad array.
    """
    if isinstance(image, (str, os.PathLike)):
      from jdet.data.images import decode_image
      file = os.fspath(image)
      if os.path.isdir(file):
        raise ImageReadError(file, "a folder, not an image")
      if not os.path.exists(file):
        raise ImageReadError(file, "no such file")
      skips: list[str] = []
      log_ = _CollectingLog(self._skip_log, skips, file=file, fixes=fixes)
      array = decode_image(file, file=file, record=Path(file).name, skip_log=log_)
      if array is None:
        raise ImageReadError(file, skips[-1] if skips else "cannot be decoded")
      return array
    return to_rgb8(image)

  def __call__(self, images: ImageInput | Sequence[ImageInput]):
    """Detections of one image (:class:`ImageDetections`) or of a list of them (a list).

    Raises:
      ImageReadError: an input cannot be read (nothing is predicted then).
    """
    single = isinstance(images, (str, os.PathLike)) or (
        isinstance(images, np.ndarray) and images.ndim in (2, 3) and images.dtype != object)
    inputs = [images] if single else list(images)
    arrays = [self.read(x) for x in inputs]
    files = [os.fspath(x) if isinstance(x, (str, os.PathLike)) else None for x in inputs]
    results = self.predict_arrays(arrays, files=files)
    return results[0] if single else results

  def predict_arrays(self, arrays: Sequence[np.ndarray], *,
                     files: Sequence[str | None] | None = None) -> list[ImageDetections]:
    """Detections of decoded ``[H, W, 3]`` uint8 RGB images (see :meth:`read`), in order.

    Images are transformed by the evaluation transform and batched by their
    transformed shape (one compiled program per shape), ``batch_size`` at a
    time; the last batch of each shape is completed with filler images.
    """
    files = list(files) if files is not None else [None] * len(arrays)
    if len(files) != len(arrays):
      raise ValueError(f"{len(files)} file names for {len(arrays)} images")
    source = _Images(arrays, self.class_names)
    # Transformed one by one (as eval_batches does), then grouped by input shape.
    samples = list(pipeline.eval_batches(source, self.transform, batch_size=1))
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(samples):
      groups.setdefault(tuple(s["image"].shape[1:]), []).append(i)
    results: list[ImageDetections | None] = [None] * len(arrays)
    for indices in groups.values():
      for start in range(0, len(indices), self.batch_size):
        chunk = indices[start:start + self.batch_size]
        batch = pipeline.pad_batch(
            {k: np.concatenate([samples[i][k] for i in chunk]) for k in samples[chunk[0]]},
            self.batch_size)
        detections = self.predict_batch(batch)
        for row, i in enumerate(chunk):
          results[i] = self._one(detections, row, arrays[i].shape[:2], files[i])
    return results  # type: ignore[return-value]

  def predict_batch(self, batch: dict[str, np.ndarray]):
    """The model's :class:`jdet.Detections` (host arrays) of one prepared batch."""
    with parallel.mesh_context(self.mesh):
      out = self._predict(self.variables, parallel.shard_batch(batch, self.mesh))
    return parallel.gather_to_host(out)

  def _one(self, detections, row: int, size: tuple[int, int], file: str | None) -> ImageDetections:
    keep = np.asarray(detections.valid[row], bool) & (
        np.asarray(detections.scores[row]) >= self.score_threshold)
    scores = np.asarray(detections.scores[row], np.float32)[keep]
    order = np.argsort(-scores, kind="stable")
    labels = np.asarray(detections.labels[row], np.int32)[keep][order]
    names = [self.class_names[k] if 0 <= k < len(self.class_names) else f"class {k}"
             for k in labels.tolist()]
    return ImageDetections(boxes=np.asarray(detections.boxes[row], np.float32)[keep][order],
                           scores=scores[order], labels=labels, names=names,
                           image_size=(int(size[0]), int(size[1])), file=file)


@functools.partial(jax.jit, static_argnums=0)
def _model_predict(model, variables, batch):
  """The model's ``predict`` (one compiled program per model and input shape)."""
  return model.apply(variables, batch, method="predict")


class _CollectingLog:
  """A :class:`SkipLog` front that also remembers the reasons of skips, and the fixes of
  ``file`` in ``fixes`` (when given)."""

  def __init__(self, log_: SkipLog, reasons: list[str], *, file: str = "",
               fixes: list[tuple[str, str]] | None = None):
    self._log, self._reasons, self._file, self._fixes = log_, reasons, file, fixes

  def skip(self, reason: str, *, detail: str = "", **kwargs) -> None:
    self._reasons.append(f"{reason} ({detail})" if detail else reason)
    self._log.skip(reason, detail=detail, **kwargs)

  def fix(self, reason: str, **kwargs) -> None:
    if self._fixes is not None:
      detail = kwargs.get("detail")
      self._fixes.append((self._file, f"{reason} ({detail})" if detail else reason))
    self._log.fix(reason, **kwargs)


def _tta(model, config, tta: bool):
  """``(data config, predict_fn or None)``: the TTA ones if asked."""
  if not tta:
    return config.data, None
  from jdet.evaluation.tta import tta_setup
  data_config, predict_fn, _ = tta_setup(model, config)
  return data_config, predict_fn


def _sample_batch(data_config) -> dict[str, np.ndarray]:
  """One prepared batch of a mid-grey 64x48 image (for the variables' shapes)."""
  source = _Images([np.full((48, 64, 3), 128, np.uint8)], ("x",))
  transform = builder.build_transforms(data_config, train=False)
  return pipeline.first_sample(source, transform)


def _config_class_names(config) -> tuple[str, ...]:
  """Class names from the config: ``data.class_names``, else its validation data, else
  (no data here: COCO or VOC weights on a laptop) the COCO or VOC classes where the
  config's validation data is that data set with its class count, else ``class i`` for
  the model's ``num_classes``."""
  if "class_names" in config.data and config.data.class_names:
    return tuple(config.data.class_names)
  try:
    return tuple(builder.build_source(config.data, "val").class_names)
  except Exception as e:
    from jdet.class_names import COCO_CLASS_NAMES
    from jdet.data.voc import VOC_CLASSES
    num_classes = int(config.model.num_classes)
    kind = config.data.get("val", {}).get("kind")
    known = {"coco": COCO_CLASS_NAMES, "voc": VOC_CLASSES}.get(kind, ())
    if len(known) == num_classes:
      log.info("the config's validation data cannot be read (%s); using the %s class names",
               e, kind.upper())
      return tuple(known)
    log.info("no class names (the config's validation data: %s); using numbers", e)
    return tuple(f"class {i}" for i in range(num_classes))
