"""Data augmentation and fixed-shape preparation of one sample, in NumPy/OpenCV.

Transforms run on the host, in grain workers, one sample at a time. A *sample*
is a dict:

* ``image``: ``[H, W, 3]`` uint8 or float32, RGB pixels in 0..255 (float32
  after :class:`PhotometricDistort`, normalised after :class:`Normalize`).
* ``boxes``: ``[N, 4]`` float32 ``[x1, y1, x2, y2]`` in pixels of ``image``,
  ``0 <= x1 < x2 <= W``.
* ``labels``: ``[N]`` int32 class index (``-1`` where padded by :func:`pad_boxes`).
* ``crowd``, ``difficult``: ``[N]`` bool, COCO ``iscrowd`` and VOC ``difficult``.
* ``image_size``: ``[2]`` int32 ``(h, w)`` of the real image inside the padded one.
* ``scale_factor``: ``[2]`` float32 ``(sy, sx)``, the product of the resizes applied.
* ``dropped_boxes``: int (int32 after :func:`pad_boxes`), boxes removed by
  geometric transforms (see below).
* ``truncated_boxes``: int32, boxes cut by :func:`pad_boxes` beyond ``max_boxes``.
* ``image_id``, ``orig_size`` (``[2]`` int32 ``(h, w)`` as stored): passed through.

Any other key passes through unchanged. :func:`sample_from_example` builds a
sample from a source's :class:`~jdet.data.records.Example`.

Every transform is a callable ``(sample, rng) -> sample`` where ``rng`` is a
``np.random.Generator``; given the same generator state the result is the same
(the pipeline gives each (seed, epoch, index) its own generator, e.g. through
grain's ``random_map``). Deterministic transforms accept and ignore ``rng``.
Transforms never modify their input arrays; they return a new dict.

Box bookkeeping: every geometric transform clips the boxes to the new image
and removes the boxes that are outside it (e.g. centre outside a crop), that
became degenerate, or whose width or height is below ``min_size`` pixels,
together with their ``labels``, ``crowd`` and ``difficult`` rows. How many it
removed is added to ``sample["dropped_boxes"]`` (an int), so the pipeline can
sum it over samples. :func:`pad_boxes` then fixes the number of boxes to M and
records how many it had to cut in ``sample["truncated_boxes"]``.

The package, by topic (everything is imported from here):

* :mod:`~jdet.data.transforms.core`: the sample, :func:`sample_from_example`,
  box bookkeeping (:func:`clip_sample_boxes`, :func:`pad_boxes`), :class:`Compose`.
* :mod:`~jdet.data.transforms.boxes`: the NumPy box maths transforms need
  (flip, resize, translate, clip, IoU), with :mod:`jdet.boxes`'s conventions.
* :mod:`~jdet.data.transforms.geometry`: flips, resizes, crops, zoom out, padding.
* :mod:`~jdet.data.transforms.choice`: :class:`RandomChoice`, one of several
  chains per sample.
* :mod:`~jdet.data.transforms.photometric`: colour distortion, normalisation.
* :mod:`~jdet.data.transforms.recipes`: the SSD / RefineDet and the Faster /
  Sparse R-CNN chains (:func:`ssd_train_transforms` & co.).

Deterministic operations are functions of a sample (:func:`hflip`,
:func:`resize`, :func:`crop`, :func:`expand`, :func:`pad`, :func:`pad_boxes`);
the steps of a chain are transforms (classes holding their settings), which
draw random parameters where there are any and call those functions.

Detections map back to the stored image with
``resize_boxes(boxes, 1 / sample["scale_factor"])`` (no crop or expand happens at
evaluation), which equals ``image_size / orig_size`` up to float rounding.
"""

from jdet.data.transforms.boxes import (box_iou, clip_boxes, hflip_boxes, resize_boxes,
                                        translate_boxes)
from jdet.data.transforms.choice import RandomChoice
from jdet.data.transforms.core import (BOX_KEYS, DEFAULT_MIN_SIZE, Compose, PadBoxes, Sample,
                                       Transform, clip_sample_boxes, drop_boxes, pad_boxes,
                                       sample_from_example)
from jdet.data.transforms.geometry import (Expand, KeepRatioResize, MinIoURandomCrop, Pad,
                                           RandomHFlip, RandomSizeCrop, Resize, choose_bucket,
                                           crop, expand, hflip, pad, rescale_size, resize)
from jdet.data.transforms.photometric import (IMAGENET_MEAN, IMAGENET_STD, Normalize,
                                              PhotometricDistort, ToFloat)
from jdet.data.transforms.recipes import (CROP_SCALES, CROP_SIZE, rcnn_eval_transforms,
                                          rcnn_resize, rcnn_train_transforms,
                                          ssd_eval_transforms, ssd_train_transforms)

__all__ = [
    # Constants.
    "IMAGENET_MEAN", "IMAGENET_STD", "DEFAULT_MIN_SIZE", "BOX_KEYS",
    # Box maths (NumPy) and sizes.
    "hflip_boxes", "resize_boxes", "translate_boxes", "clip_boxes", "box_iou",
    "rescale_size", "choose_bucket",
    # Samples and deterministic operations on them.
    "Sample", "sample_from_example", "drop_boxes", "clip_sample_boxes", "hflip", "resize", "crop",
    "expand", "pad", "pad_boxes",
    # Transforms.
    "Transform", "Compose", "RandomChoice", "ToFloat", "PhotometricDistort", "Expand",
    "MinIoURandomCrop", "RandomSizeCrop", "RandomHFlip", "Resize", "KeepRatioResize",
    "Normalize", "Pad", "PadBoxes",
    # Recipes.
    "ssd_train_transforms", "ssd_eval_transforms", "rcnn_train_transforms",
    "rcnn_eval_transforms", "rcnn_resize", "CROP_SCALES", "CROP_SIZE",
]
