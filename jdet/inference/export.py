"""Exporting a :class:`~jdet.inference.Predictor` to one file that runs without jdet's model code.

::

  from jdet.inference.export import export_predictor
  from jdet.inference.predictor import Predictor

  predictor = Predictor.from_workdir("runs/ssd_shapes")
  export_predictor(predictor, "ssd_shapes.jdet")

  python -m jdet.inference.export --config configs/ssd300.py:shapes --workdir runs/ssd_shapes \\
      --out ssd_shapes.jdet [--weights FILE] [--step N] [--batch_size 1] [--platforms cpu,cuda]

The model's ``predict`` is lowered with ``jax.export`` (StableHLO) as a
function of ``(weights, image, image_size, orig_size, scale_factor, valid)``
and written, with the weights and the preprocessing that the evaluation
transform does, into one zip file; :mod:`jdet.inference.exported` reads and runs it
(:class:`jdet.inference.exported.ExportedDetector`) and documents the format. The boxes
come back from the function already in the original image's pixels (the
model's own ``finalize_detections``), so the loader only filters and sorts.

One function is exported per input canvas: one for SSD / RefineDet (the fixed
square) and for R-CNN configs with a ``canvas``; one per bucket for R-CNN
configs that pad to ``buckets`` only. The batch size is fixed at export
(default 1). The functions are lowered for ``platforms`` (default CPU and
CUDA), whatever machine exports them.

Only the model's own ``predict`` can be exported: a predictor with test-time
augmentation (``tta=True``) or another ``predict_fn`` is refused.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from typing import Sequence

import jax
import numpy as np

from jdet.data import transforms as T
from jdet.inference import exported as exported_lib

__all__ = ["export_predictor", "preprocess_spec", "DEFAULT_PLATFORMS"]

DEFAULT_PLATFORMS = ("cpu", "cuda")


def preprocess_spec(transform) -> dict:
  """The evaluation transform (a :class:`jdet.data.transforms.Compose`) as ``meta.json``'s
  ``preprocess``: what :func:`jdet.inference.exported.preprocess` does with it.

  Raises:
    ValueError: a step that is not a resize, a normalisation, a padding or box
      padding (nothing else happens at evaluation), or a multi-scale resize.
  """
  resize = normalize = pad = None
  pad_value = 0.0
  for step in getattr(transform, "transforms", [transform]):
    if isinstance(step, T.Resize):
      resize = dict(kind="fixed", size=[int(step.size[0]), int(step.size[1])])
    elif isinstance(step, T.KeepRatioResize):
      if len(step.scales) != 1:
        raise ValueError(f"cannot export the multi-scale resize {step!r}: evaluation uses one "
                         "scale")
      short, max_long = step.scales[0]
      resize = dict(kind="keep_ratio", short=int(short), max_long=int(max_long))
    elif isinstance(step, T.Normalize):
      if pad is not None or resize is None:
        raise ValueError(f"cannot export {transform!r}: expected resize, normalise, pad in "
                         "this order")
      normalize = dict(mean=[float(v) for v in step.mean], std=[float(v) for v in step.std])
    elif isinstance(step, T.Pad):
      pad = (dict(canvas=[int(v) for v in step.size], buckets=None) if step.size is not None
             else dict(canvas=None, buckets=[[int(h), int(w)] for h, w in step.buckets]))
      pad_value = float(step.value)
    elif isinstance(step, T.PadBoxes):
      continue
    else:
      raise ValueError(f"cannot export the evaluation transform step {step!r} (only Resize, "
                       "KeepRatioResize, Normalize, Pad and PadBoxes are known)")
  if resize is None:
    raise ValueError(f"cannot export {transform!r}: no resize step")
  if pad is None and resize["kind"] != "fixed":
    raise ValueError(f"cannot export {transform!r}: a keep-ratio resize without padding gives "
                     "an input of another shape for every image")
  return dict(resize=resize, interpolation="linear", normalize=normalize, pad=pad,
              pad_value=pad_value)


def _canvases(spec: dict) -> list[tuple[int, int]]:
  pad = spec["pad"]
  if pad is None:
    return [tuple(spec["resize"]["size"])]
  if pad["canvas"] is not None:
    return [tuple(pad["canvas"])]
  return [tuple(b) for b in pad["buckets"]]


def _names(variables) -> tuple[list[str], list[np.ndarray], object]:
  """``(names, host arrays, treedef)`` of the variables, in tree order."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
  names, arrays = [], []
  for path, leaf in leaves:
    names.append("/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                          for k in path))
    arrays.append(np.ascontiguousarray(np.asarray(jax.device_get(leaf))))
  return names, arrays, treedef


def export_predictor(predictor, path: str | os.PathLike, *, batch_size: int = 1,
                     platforms: Sequence[str] | None = DEFAULT_PLATFORMS) -> dict:
  """Writes ``predictor`` (its model's ``predict``, weights, preprocessing, class names
  and score threshold) to the file ``path``, read back by
  :meth:`jdet.inference.exported.ExportedDetector.load`.

  Args:
    predictor: a :class:`jdet.inference.Predictor` with the model's own ``predict``.
    path: the file to write (by convention ``.jdet``); replaced if it exists.
    batch_size: images per call of the exported function.
    platforms: the platforms to lower for (``"cpu"``, ``"cuda"``, ``"rocm"``,
      ``"tpu"``); None for this machine's.
  Returns:
    The ``meta.json`` written.
  Raises:
    ValueError: a predictor with TTA or another ``predict_fn``, or an evaluation
      transform that cannot be described (see :func:`preprocess_spec`).
  """
  from jax import export as jax_export
  if not predictor.runs_model_predict:
    raise ValueError("only a predictor running the model's own predict can be exported "
                     "(not one with tta=True or another predict_fn)")
  batch_size = int(batch_size)
  if batch_size < 1:
    raise ValueError(f"batch_size must be at least 1, not {batch_size}")
  spec = preprocess_spec(predictor.transform)
  model = predictor.model
  names, arrays, treedef = _names(predictor.variables)

  def predict(weights, image, image_size, orig_size, scale_factor, valid):
    variables = jax.tree_util.tree_unflatten(treedef, list(weights))
    batch = dict(image=image, image_size=image_size, orig_size=orig_size,
                 scale_factor=scale_factor, valid=valid)
    d = model.apply(variables, batch, method="predict")
    return dict(boxes=d.boxes, scores=d.scores, labels=d.labels, valid=d.valid)

  weight_shapes = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays)
  modules = {}
  for h, w in _canvases(spec):
    args = (weight_shapes,
            jax.ShapeDtypeStruct((batch_size, h, w, 3), np.float32),
            jax.ShapeDtypeStruct((batch_size, 2), np.int32),
            jax.ShapeDtypeStruct((batch_size, 2), np.int32),
            jax.ShapeDtypeStruct((batch_size, 2), np.float32),
            jax.ShapeDtypeStruct((batch_size,), np.bool_))
    kwargs = {} if platforms is None else dict(platforms=tuple(platforms))
    exp = jax_export.export(jax.jit(predict), **kwargs)(*args)
    modules[(h, w)] = (exp, bytes(exp.serialize()))
  first = next(iter(modules.values()))[0]
  import jdet
  meta = dict(
      format=exported_lib.FORMAT, format_version=exported_lib.FORMAT_VERSION,
      model=type(model).__name__, class_names=list(predictor.class_names),
      batch_size=batch_size, score_threshold=float(predictor.score_threshold),
      preprocess=spec, inputs=list(exported_lib.INPUTS), outputs=list(exported_lib.OUTPUTS),
      boxes="x1, y1, x2, y2 in the original image's pixels",
      modules=[dict(file=exported_lib.module_name(c), canvas=list(c)) for c in modules],
      weights=[dict(name=n, file=f"weights/{i}.bin", shape=list(a.shape), dtype=str(a.dtype))
               for i, (n, a) in enumerate(zip(names, arrays))],
      platforms=list(first.platforms), jax_version=jax.__version__,
      jdet_version=jdet.__version__,
      calling_convention_version=int(first.calling_convention_version),
  )
  path = os.fspath(path)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with zipfile.ZipFile(tmp, "w") as zf:
      zf.writestr("meta.json", json.dumps(meta, indent=1), compress_type=zipfile.ZIP_DEFLATED)
      for canvas, (_, blob) in modules.items():
        zf.writestr(exported_lib.module_name(canvas), blob, compress_type=zipfile.ZIP_DEFLATED)
      for item, a in zip(meta["weights"], arrays):
        zf.writestr(item["file"], a.tobytes(order="C"), compress_type=zipfile.ZIP_STORED)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return meta


def _main() -> None:
  from absl import app, flags

  from jdet import cli
  config = cli.define_flags("run directory of train.py (its checkpoints and config)", step=True,
                            weights=True, distributed=False, saved_config=True)
  out = flags.DEFINE_string("out", None, "the file to write (e.g. model.jdet)")
  batch = flags.DEFINE_integer("batch_size", 1, "images per call of the exported function")
  from jdet.inference.predictor import DEFAULT_SCORE_THRESHOLD
  score = flags.DEFINE_float("score_threshold", DEFAULT_SCORE_THRESHOLD,
                             "the loader's default threshold (it can change it)")
  plats = flags.DEFINE_list("platforms", list(DEFAULT_PLATFORMS),
                            "platforms to lower for (cpu, cuda, rocm, tpu)")
  flags.mark_flags_as_required(["out"])

  def main(argv):
    cli.start(argv)
    from jdet import parallel
    with cli.exit_on_errors():
      predictor = cli.predictor_from_flags(config.value,
                                           mesh=parallel.make_mesh(jax.devices()[:1]),
                                           score_threshold=score.value)
    meta = export_predictor(predictor, out.value, batch_size=batch.value,
                            platforms=plats.value)
    size = os.path.getsize(out.value)
    print(f"wrote {out.value} ({size / 2**20:.1f} MiB): {meta['model']}, "
          f"{len(meta['class_names'])} classes, canvases "
          f"{[m['canvas'] for m in meta['modules']]}, batch {meta['batch_size']}, "
          f"platforms {meta['platforms']}")

  app.run(main, argv=sys.argv, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  _main()
