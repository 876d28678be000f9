"""Weight initialisers that several parts share (a backbone and the heads built on it).

* :data:`xavier_conv_init`: Xavier-uniform kernels (with zero biases, Flax's
  default), as torchvision initialises SSD's new layers; the SSD family's VGG
  extras, SSD head and RefineDet heads use it.
"""

from __future__ import annotations

import flax.linen as nn

__all__ = ["xavier_conv_init"]

xavier_conv_init = nn.initializers.xavier_uniform()
