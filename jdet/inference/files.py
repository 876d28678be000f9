"""A predictor over image files and folders, with its results written to a folder.

:func:`predict_files` is what ``predict.py`` runs: it expands the inputs
(:func:`expand_inputs`: files, folders, globs), reads them in chunks (a file
that cannot be read is reported and skipped), predicts, and writes to the output
folder:

* one annotated image per input, ``<name>.png`` for PNG inputs and
  ``<name>.jpg`` otherwise (``<name>_2.jpg`` ... when two inputs share a name);
* ``detections.json``: every detection in COCO results format (``image_id`` =
  the input's position, ``category_id`` = class id + 1);
* ``images.json``: the inputs with their ids, sizes and file names, the class
  names, the score threshold, the inputs ``skipped`` and those read with a
  ``fixed`` problem (a truncated JPEG, an EXIF-rotated photo), by reason;
* ``summary.txt``: per image, its detections (class, score, box), then the
  skipped and fixed inputs: the text :func:`predict_files` returns.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import time
from typing import Sequence

from jdet import viz
from jdet.engine.metrics import ProgressBar
from jdet.inference.images import ImageReadError

__all__ = ["expand_inputs", "predict_files", "FilesResult"]

CHUNK = 64  # images decoded and predicted at a time (bounds the memory held)


def expand_inputs(args: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """``(files, problems)``: folders -> their files (sorted, not recursing; every file is
  tried so that a non-image among them is reported), globs -> their matches; an
  argument that names nothing is a problem ``(argument, reason)``."""
  files, problems = [], []
  for arg in args:
    if os.path.isdir(arg):
      found = sorted(os.path.join(arg, n) for n in os.listdir(arg)
                     if os.path.isfile(os.path.join(arg, n)) and not n.startswith("."))
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


@dataclasses.dataclass
class FilesResult:
  """What :func:`predict_files` did: ``images`` processed, ``detections`` written,
  ``problems`` (file, reason) skipped, ``fixed`` (file, reason) read with a repair,
  ``text`` (``summary.txt``), ``seconds``."""

  images: int
  detections: int
  problems: list[tuple[str, str]]
  fixed: list[tuple[str, str]]
  text: str
  seconds: float


def predict_files(predictor, inputs: Sequence[str], out: str, *,
                  progress: bool = True) -> FilesResult:
  """Runs ``predictor`` on the images that ``inputs`` name and writes the results to
  ``out`` (see the module doc). Detections below ``predictor.score_threshold`` are
  left out."""
  t0 = time.time()
  files, problems = expand_inputs(inputs)
  os.makedirs(out, exist_ok=True)
  detections, images, lines, used, fixed = [], [], [], set(), []
  bar = ProgressBar(len(files), enabled=progress and len(files) > 1)
  for start in range(0, len(files), CHUNK):
    arrays, names = [], []
    for file in files[start:start + CHUNK]:
      try:
        arrays.append(predictor.read(file, fixes=fixed))
        names.append(file)
      except ImageReadError as e:
        problems.append((file, e.reason))
    for file, array, result in zip(names, arrays, predictor.predict_arrays(arrays, files=names)):
      out_name = _out_name(file, used)
      viz.save_image(os.path.join(out, out_name),
                     viz.draw_boxes(array, result.boxes, result.labels, predictor.class_names,
                                    scores=result.scores))
      images.append(dict(id=len(images), file_name=file, annotated=out_name,
                         height=result.image_size[0], width=result.image_size[1]))
      detections += result.to_coco(images[-1]["id"])
      lines.append(result.describe())
    bar.update(min(start + CHUNK, len(files)))
  bar.close()

  names = list(predictor.class_names)
  _write_json(os.path.join(out, "detections.json"), detections)
  _write_json(os.path.join(out, "images.json"), dict(
      images=images, class_names=names,
      categories=[dict(id=i + 1, name=n) for i, n in enumerate(names)],
      score_threshold=predictor.score_threshold,
      skipped=[dict(file=p, reason=r) for p, r in problems],
      fixed=[dict(file=p, reason=r) for p, r in fixed]), indent=1)
  text = "\n".join(lines)
  if problems:
    text += "\n\nSkipped (not read):\n" + "\n".join(f"  {p}: {r}" for p, r in problems)
  if fixed:
    text += "\n\nRead with a repair:\n" + "\n".join(f"  {p}: {r}" for p, r in fixed)
  with open(os.path.join(out, "summary.txt"), "w", encoding="utf-8") as f:
    f.write(text + "\n")
  return FilesResult(images=len(images), detections=len(detections), problems=problems,
                     fixed=fixed, text=text, seconds=time.time() - t0)


def _write_json(path: str, obj, **kwargs) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, **kwargs)
