"""Evaluates a detector: ``python eval.py --workdir runs/ssd`` (``--config`` defaults to the
config its run saved; ``--config configs/ssd300.py:shapes`` gives another).

Evaluates the latest checkpoint of ``--workdir`` (or ``--step N``; without
any checkpoint, the weights named by ``--config.init.weights``) on the
config's validation split and writes to ``WORKDIR/eval/``:

* ``metrics.json``: AP, AP50, AP75, APs, APm, APl (pycocotools, with the
  dataset's category ids), AR, per-class AP (and VOC07 mAP for VOC configs),
  and under ``data`` the distinct images and boxes skipped or fixed while
  reading, by reason;
* ``detections.json``: the detections in COCO results format;
* ``pr_curves.png``: precision-recall curves per class at IoU 0.5;
* ``detections.png``: a grid of evaluation images with their detections.

A per-class table is printed on the terminal.

``--tta`` evaluates with test-time augmentation (single-stage detectors:
several input sizes and flips, merged by NMS or box voting; see
:mod:`jdet.evaluation.tta`), set by the config's ``tta`` section
(``--config.tta.merge=vote``) or, without one, by the defaults;
``metrics.json`` then records the settings under ``tta``.
"""

from __future__ import annotations

import os

# Keep freed host memory in the process (jdet/engine/hostmem.py: a quarter of a CPU training
# step went to zero-filling fresh pages); set before jdet imports jax. 0 turns it off.
os.environ.setdefault("JDET_KEEP_HOST_MEMORY", "1")

from absl import app, flags  # noqa: E402

from jdet import cli  # noqa: E402

_CONFIG = cli.define_flags("run directory of train.py", step=True, saved_config=True)
_SPLIT = flags.DEFINE_string("split", "val", "data split to evaluate")
_MAX_IMAGES = flags.DEFINE_integer("max_images", 0, "evaluate only the first N images (0: all)")
_TTA = flags.DEFINE_bool("tta", False, "test-time augmentation: several scales and flips, merged "
                         "(config.tta, or jdet.evaluation.tta's defaults)")


def main(argv) -> None:
  cli.start(argv)
  from jdet.engine.evaluate import evaluate_workdir
  f = flags.FLAGS
  with cli.exit_on_errors():
    result = evaluate_workdir(cli.config_of(_CONFIG.value, f.workdir), f.workdir, step=f.step,
                              split=_SPLIT.value,
                              max_images=_MAX_IMAGES.value, use_tta=_TTA.value)
  if result.text:
    print(result.text)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
