"""Runs a trained detector on your own images.

  python predict.py --workdir runs/ssd_shapes --out predictions photos/ extra.jpg "more/*.png"

Inputs are files, folders (their images, not recursing) and globs. The weights
are the latest checkpoint of ``--workdir`` (or ``--step N``), with the config
its run saved (or ``--config``), or ``--weights FILE`` (a jdet ``.npz`` or a
checkpoint ``jdet.convert`` reads) with ``--config``.
Writes to ``--out`` one annotated image per input, ``detections.json`` (COCO
results format), ``images.json`` and ``summary.txt``
(:mod:`jdet.inference.files`). Detections scoring below ``--score_threshold``
are left out. A file that cannot be read is reported and skipped; one read
with a repair (a truncated JPEG) is reported as fixed. The status is 0 when at
least one image was processed, else 1.
"""

from __future__ import annotations

import sys

from absl import app, flags

from jdet import cli
from jdet.inference.predictor import DEFAULT_SCORE_THRESHOLD

_CONFIG = cli.define_flags("run directory of train.py (its checkpoints and config)", step=True,
                           weights=True, distributed=False, saved_config=True)
_OUT = flags.DEFINE_string("out", "predictions", "output folder")
_SCORE = flags.DEFINE_float("score_threshold", DEFAULT_SCORE_THRESHOLD,
                            "leave out detections scoring below this")
_TTA = flags.DEFINE_bool("tta", False, "the config's test-time augmentation (SSD, RefineDet)")
_BATCH = flags.DEFINE_integer("batch_size", None, "images per batch (default data.eval_batch_size)")


def main(argv) -> None:
  cli.start(argv, positional=True)
  if len(argv) < 2:
    raise app.UsageError("give the images: files, folders or globs after the flags")
  from jdet.inference.files import predict_files
  with cli.exit_on_errors():
    predictor = cli.predictor_from_flags(_CONFIG.value, tta=_TTA.value,
                                         score_threshold=_SCORE.value, batch_size=_BATCH.value)
  result = predict_files(predictor, argv[1:], _OUT.value)
  print(result.text)
  print(f"{result.images} image{'s' * (result.images != 1)} in {result.seconds:.1f} s, "
        f"{result.detections} detections, {len(result.problems)} skipped, "
        f"{len(result.fixed)} fixed -> {_OUT.value}")
  if not result.images:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
