"""Helpers shared by jdet's tests, one module per topic (what users need is in :mod:`jdet.testing`).

* :mod:`tests.helpers.weights`: NumPy weights for a model's abstract variables.
* :mod:`tests.helpers.references`: NumPy references (pairwise IoU, the best IoU
  of each object with a set of anchors) and a relative closeness check.
* :mod:`tests.helpers.torch_models`: torchvision ResNets with random norms,
  NHWC/NCHW layout changes, state dicts as NumPy (torch is imported on first use).
* :mod:`tests.helpers.anchor_presets`: the papers' anchor presets (SSD300,
  SSD512, RefineDet), references the anchor and model tests compare with.
* :mod:`tests.helpers.images`: random PNGs written for fixtures, the raccoon photos.
* :mod:`tests.helpers.iterators`: data iterators resumed from a saved state.
* :mod:`tests.helpers.faults`: damaging files, a pickle that records being unpickled.
* :mod:`tests.helpers.detector_batches`: a predict batch with resized, filler and
  padded images; a detector's loss with its gradient.
* :mod:`tests.helpers.runs`: the programs run as subprocesses, a JAX compilation
  cache for a module's runs, the checkpoint steps of a workdir.

Import from the topic module (``from tests.helpers.faults import flip_bytes``).
"""
