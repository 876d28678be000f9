"""Runs a trained detector on your own images.

  python predict.py --config configs/ssd300.py:shapes --workdir runs/ssd_shapes \
      --out predictions photos/ extra.jpg "more/*.png"

Inputs are files, folders (their images, not recursing) and globs. The weights
are the latest checkpoint of ``--workdir`` (or ``--step N``), or
``--weights FILE`` (a jdet ``.npz`` or a checkpoint ``jdet.convert`` reads).
Writes to ``--out``:

* one annotated image per input, ``<name>.png`` for PNG inputs and
  ``<name>.jpg`` otherwise (``<name>_2.jpg`` ... when two inputs share a name);
* ``detections.json``: every detection in COCO results format
  (``image_id`` = the input's position, ``category_id`` = class id + 1), and
  ``images.json``: the inputs with their ids, sizes and file names, and the
  class names;
* ``summary.txt``: per image, its detections (class, score, box), the same
  as printed.

Detections scoring below ``--score_threshold`` (default 0.3) are left out
(the model's own threshold applies first). A file that cannot be read (missing,
corrupt, not an image) is reported (printed, in ``summary.txt`` and under
``skipped`` in ``images.json``) and skipped; the others are processed. The
status is 0 when at least one image was processed, else 1. A progress bar
shows while a folder is processed.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
import time

from absl import app, flags

from jdet.inference import define_predictor_flags

_PREDICTOR = define_predictor_flags()  # --config, --workdir or --weights, --step
_OUT = flags.DEFINE_string("out", "predictions", "output folder")
_SCORE = flags.DEFINE_float("score_threshold", 0.3, "leave out detections scoring below this")
_TTA = flags.DEFINE_bool("tta", False, "the config's test-time augmentation (SSD, RefineDet)")
_BATCH = flags.DEFINE_integer("batch_size", None, "images per batch (default data.eval_batch_size)")
_CHUNK = 64  # images decoded and predicted at a time (bounds the memory held)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm")


def expand_inputs(args: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """``(files, problems)``: folders -> their image files (sorted), globs -> their matches;
  an argument that names nothing is a problem ``(argument, reason)``."""
  files, problems = [], []
  for arg in args:
    if os.path.isdir(arg):
      found = sorted(os.path.join(arg, n) for n in os.listdir(arg)
                     if os.path.isfile(os.path.join(arg, n)) and not n.startswith("."))
      # Every file of a folder is tried, so that a non-image among them is reported.
      files += found
      if not found:
        problems.append((arg, "an empty folder"))
    elif os.path.exists(arg):
      files.append(arg)
    elif glob.has_magic(arg):
      found = sorted(p for p in glob.glob(arg) if os.path.isfile(p))
      files += found
      if not found:
        problems.append((arg, "no file matches"))
    else:
      problems.append((arg, "no such file"))
  return files, problems


def _out_name(file: str, used: set[str]) -> str:
  stem, suffix = os.path.splitext(os.path.basename(file))
  ext = ".png" if suffix.lower() == ".png" else ".jpg"
  name, n = f"{stem}{ext}", 1
  while name in used:
    n += 1
    name = f"{stem}_{n}{ext}"
  used.add(name)
  return name


def _save(path: str, image) -> None:
  import cv2
  ok, data = cv2.imencode(os.path.splitext(path)[1], cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
  if not ok:
    raise OSError(f"could not encode {path}")
  with open(path, "wb") as f:
    f.write(data.tobytes())


def _describe(result) -> str:
  h, w = result.image_size
  lines = [f"{result.file} ({w}x{h}): {len(result)} detection{'s' * (len(result) != 1)}"]
  for name, score, box in zip(result.names, result.scores.tolist(), result.boxes.tolist()):
    lines.append(f"  {name:<16} {score:.3f}  [{box[0]:.1f}, {box[1]:.1f}, {box[2]:.1f}, "
                 f"{box[3]:.1f}]")
  return "\n".join(lines)


def main(argv) -> None:
  logging.getLogger().setLevel(logging.INFO)
  from jdet import viz
  from jdet.inference import ImageReadError
  from jdet.metrics import ProgressBar

  files, problems = expand_inputs(argv[1:])
  if not files and not problems:
    raise app.UsageError("give the images: files, folders or globs after the flags")
  predictor = _PREDICTOR(tta=_TTA.value, score_threshold=_SCORE.value, batch_size=_BATCH.value)

  out = _OUT.value
  os.makedirs(out, exist_ok=True)
  detections, images, summary, used = [], [], [], set()
  bar = ProgressBar(len(files), enabled=len(files) > 1)
  t0 = time.time()
  for start in range(0, len(files), _CHUNK):
    chunk, arrays, names = files[start:start + _CHUNK], [], []
    for file in chunk:
      try:
        arrays.append(predictor.read(file))
        names.append(file)
      except ImageReadError as e:
        problems.append((file, e.reason))
    for file, array, result in zip(names, arrays, predictor.predict_arrays(arrays, files=names)):
      image_id = len(images)
      out_name = _out_name(file, used)
      drawn = viz.draw_boxes(array, result.boxes, result.labels, predictor.class_names,
                             scores=result.scores)
      _save(os.path.join(out, out_name), drawn)
      images.append(dict(id=image_id, file_name=file, annotated=out_name,
                         height=result.image_size[0], width=result.image_size[1]))
      detections += result.to_coco(image_id)
      summary.append(_describe(result))
    bar.update(min(start + _CHUNK, len(files)))
  bar.close()

  with open(os.path.join(out, "detections.json"), "w", encoding="utf-8") as f:
    json.dump(detections, f)
  with open(os.path.join(out, "images.json"), "w", encoding="utf-8") as f:
    json.dump(dict(images=images, class_names=list(predictor.class_names),
                   categories=[dict(id=i + 1, name=n)
                               for i, n in enumerate(predictor.class_names)],
                   score_threshold=_SCORE.value,
                   skipped=[dict(file=p, reason=r) for p, r in problems]), f, indent=1)
  text = "\n".join(summary)
  if problems:
    text += "\n\nSkipped (not read):\n" + "\n".join(f"  {p}: {r}" for p, r in problems)
  with open(os.path.join(out, "summary.txt"), "w", encoding="utf-8") as f:
    f.write(text + "\n")
  print(text)
  print(f"{len(images)} image{'s' * (len(images) != 1)} in {time.time() - t0:.1f} s, "
        f"{len(detections)} detections, {len(problems)} skipped -> {out}")
  if not images:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
