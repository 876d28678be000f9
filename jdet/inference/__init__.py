"""The inference side: running a trained detector, exporting it, and the exported file.

* :mod:`jdet.inference.predictor`: :class:`~jdet.inference.predictor.Predictor`,
  a detector with its weights, evaluation transform and class names, on your
  own images (``predict.py``);
* :mod:`jdet.inference.export`: one ``.jdet`` file per detector (``jax.export``;
  ``python -m jdet.inference.export``);
* :mod:`jdet.inference.exported`: the standalone loader of that file (no Flax,
  no jdet model code; ``python -m jdet.inference.exported``);
* :mod:`jdet.inference.images`: reading an input image, shared by the two.

``from jdet.inference import Predictor`` works; the predictor (and the data
pipeline it brings) is imported on first use, so that the exported-file loader
stays light.
"""

_LAZY = {"Predictor": "predictor", "ImageDetections": "predictor", "load_config": "predictor",
         "ImageReadError": "images", "to_rgb8": "images", "read_image": "images"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(f"jdet.inference.{_LAZY[name]}"), name)
  raise AttributeError(f"module 'jdet.inference' has no attribute {name!r}")
