"""Checkpoints from other frameworks -> jdet variables (``params`` and ``batch_stats``).

Three steps, each usable alone, each in its own module:

1. **Read** a file into a flat ``{name: np.ndarray}`` dict (:mod:`jdet.convert.files`:
   :func:`read_state_dict`; torch files are read with ``weights_only=True``, so
   no arbitrary object is ever unpickled).
2. **Convert** names and layouts (:mod:`jdet.convert.architectures`): the table
   :data:`ARCHITECTURES` says, per checkpoint layout, how to recognise it and
   how to convert it; :func:`convert_variables` uses it. The conversions
   themselves are pure functions of the state dict, one module per family:
   :mod:`jdet.convert.torchvision` (SSD300/512 VGG16, ImageNet VGG16),
   :mod:`jdet.convert.resnet` (ImageNet ResNets, ResNet-FPN backbones),
   :mod:`jdet.convert.faster_rcnn` (``fasterrcnn_resnet50_fpn``) and
   :mod:`jdet.convert.mmdet_sparse_rcnn` (MMDetection's Sparse R-CNN). A new
   detector's checkpoints need one more table entry and nothing else.
3. **Load** into a model's existing variables (:mod:`jdet.convert.load`:
   :func:`load_model_variables` for a whole model, :func:`load_backbone_variables`
   for ImageNet weights), with every shape mismatch, missing and unexpected
   name reported at once. Fine-tuning: a whole model with another class count
   (or number of learned proposals) loads everything else and keeps the model's
   initial class layers (:data:`RESIZABLE`), logging a :class:`LoadReport`.

Command line (torch needed only here, not where the ``.npz`` is used)::

  python -m jdet.convert ssd300_vgg16 ssd300_vgg16_coco.pth ssd300.npz
  python -m jdet.convert vgg16 vgg16_features.pth vgg16.npz
  python -m jdet.convert resnet50 resnet50.pth resnet50.npz
  python -m jdet.convert fasterrcnn_resnet50_fpn frcnn.pth frcnn.npz --num_classes 80
  python -m jdet.convert sparse_rcnn_r50_fpn_mmdet sparse_rcnn_mmdet.pth sparse_rcnn.npz

then ``--config.init.weights=ssd300.npz`` (a whole model) or
``--config.init.backbone=vgg16.npz`` (the backbone) in ``train.py``.

Converted weights compute what they computed in torchvision only on the input
they were trained for. torchvision's ``ssd300_vgg16`` (and the
``vgg16_features`` backbone it starts from) takes RGB pixels in 0..255 minus
``(123.0, 117.0, 104.0)``, not divided by a standard deviation (its transform's
mean ``[0.48235, 0.45882, 0.40784]`` and std ``1 / 255``), and the matching jdet
model is ``SSD(num_classes=90, clamp_default_boxes=True, size_rule=(0.15, 0.9, 0.07))``
(torchvision's 91 COCO classes count the background and the unused category
ids). A plain ImageNet ``vgg16`` takes ImageNet mean and std normalisation.
"""

from jdet.convert.architectures import (ARCHITECTURES, Architecture, architecture,
                                        convert_variables, find_architecture)
from jdet.convert.faster_rcnn import fasterrcnn_num_classes, fasterrcnn_resnet50_fpn_params
from jdet.convert.files import (flatten_params, load_params_npz, read_state_dict,
                                save_params_npz, unflatten_params)
from jdet.convert.load import (RESIZABLE, LoadReport, load_backbone_variables,
                               load_model_variables, merge_params)
from jdet.convert.resnet import (fpn_params, is_resnet_state_dict, resnet_depth,
                                 resnet_fpn_backbone_params, resnet_params)
from jdet.convert.torchvision import (coco91_to_coco80, ssd300_vgg16_num_classes,
                                      ssd300_vgg16_params, vgg16_backbone_params)

__all__ = [
    # Files.
    "read_state_dict", "save_params_npz", "load_params_npz", "flatten_params", "unflatten_params",
    # The table of layouts.
    "Architecture", "ARCHITECTURES", "architecture", "find_architecture", "convert_variables",
    # Conversions.
    "ssd300_vgg16_params", "ssd300_vgg16_num_classes", "vgg16_backbone_params", "coco91_to_coco80",
    "resnet_params", "resnet_depth", "fpn_params", "resnet_fpn_backbone_params",
    "is_resnet_state_dict", "fasterrcnn_resnet50_fpn_params", "fasterrcnn_num_classes",
    # Loading.
    "load_model_variables", "load_backbone_variables", "merge_params", "LoadReport", "RESIZABLE",
]
