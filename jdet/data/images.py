"""Image decoding: any stored image to upright ``[H, W, 3]`` uint8 RGB.

Every source decodes through :func:`decode_image`, so that every dataset gets
the same treatment of the quirks of real photo collections:

* **EXIF orientation.** Cameras store pixels as the sensor saw them and an
  orientation tag (1..8) saying how to turn them upright. The image is turned
  upright (``PIL.ImageOps.exif_transpose``), counted as a fix; box coordinates
  everywhere in jdet refer to the upright image.
* **Modes.** Greyscale (``L``, ``1``), greyscale with alpha (``LA``), palette
  (``P``, ``PA``, with or without transparency), ``CMYK``, ``RGBA`` and 16-bit
  greyscale (``I;16*``, ``I``) become 8-bit RGB, each counted as a fix under a
  reason naming the mode. Alpha is dropped, not composited: the colour channels
  come out as stored, the pixels OpenCV's ``IMREAD_COLOR`` and Pillow's
  ``convert("RGB")`` give, so a model sees what common deployment readers see.
  16-bit values are scaled to 8 bits with rounding (``round(v * 255 / 65535)``),
  never clipped; 16-bit colour PNGs are reduced by Pillow itself (to their high
  byte, within one level of the rounded value) and counted too.
* **Missing or corrupt files** (absent, truncated, not an image) give ``None``
  after :meth:`SkipLog.skip` names the file and record: the pipeline drops the
  example instead of crashing. A JPEG that lost only the end of its data (at
  most :data:`MAX_TRUNCATED_ROWS` of its rows) is decoded as OpenCV would, the
  missing end mid-grey, and used with a counted fix.

:func:`image_size` and :func:`probe_image` read only the header, for start-up
checks of the sizes stored in annotation files, and :func:`fit_boxes` maps boxes
annotated against a stored size that disagrees with the real image.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
  from jdet.data.records import SkipLog

__all__ = [
    "ImageInfo", "decode_image", "probe_image", "image_size", "exif_orientation",
    "orient_boxes", "fit_boxes", "decode_fitted", "TRANSPOSING_ORIENTATIONS", "DECODE_ERRORS",
    "ROTATED", "RESCALED", "KEPT",
]

ImageData = bytes | str | Path

_ORIENTATION_TAG = 0x0112
# EXIF orientations whose upright image has width and height swapped.
TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
# Exceptions by which Pillow reports an unreadable image (``UnidentifiedImageError``
# and truncation are ``OSError``s; some corrupt headers raise the others).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class ImageInfo:
  """What an image header says: upright size and EXIF orientation.

  Attributes:
    height, width: size of the upright image (after EXIF orientation).
    orientation: EXIF orientation 1..8 (1 when absent or invalid).
  """

  height: int
  width: int
  orientation: int = 1

  @property
  def size(self) -> tuple[int, int]:
    """``(h, w)`` of the upright image."""
    return self.height, self.width

  @property
  def stored_size(self) -> tuple[int, int]:
    """``(h, w)`` of the pixels as stored, before EXIF orientation."""
    if self.orientation in TRANSPOSING_ORIENTATIONS:
      return self.width, self.height
    return self.height, self.width


def _open(data: ImageData) -> Image.Image:
  """Opens (lazily) an image from bytes or a path."""
  if isinstance(data, (bytes, bytearray, memoryview)):
    return Image.open(io.BytesIO(data))
  return Image.open(data)


def exif_orientation(image: Image.Image) -> int:
  """The EXIF orientation 1..8 of an opened image; 1 when absent or unreadable."""
  try:
    value = image.getexif().get(_ORIENTATION_TAG, 1)
  except DECODE_ERRORS:
    return 1
  return value if isinstance(value, int) and 1 <= value <= 8 else 1


def probe_image(data: ImageData) -> ImageInfo:
  """Reads an image header (not its pixels): upright size and orientation.

  Raises:
    OSError: the file is missing (``FileNotFoundError``) or not an image
      (``PIL.UnidentifiedImageError``), or another error of ``DECODE_ERRORS``.
  """
  with _open(data) as im:
    w, h = im.size
    orientation = exif_orientation(im)
  if orientation in TRANSPOSING_ORIENTATIONS:
    h, w = w, h
  return ImageInfo(height=h, width=w, orientation=orientation)


def image_size(data: ImageData) -> tuple[int, int]:
  """``(h, w)`` of the upright image, from its header only (EXIF rotation honoured)."""
  return probe_image(data).size


# ----------------------------------------------------------------------------
# Boxes under EXIF orientation and stored sizes.
# ----------------------------------------------------------------------------

# Where a point (x, y) of the stored pixels (width W, height H) lands in the
# upright image, for each EXIF orientation (Pillow's exif_transpose methods:
# 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 clockwise,
# 7 transverse, 8 rotate 90 anticlockwise).
_POINT_MAPS: dict[int, Callable[[Any, Any, float, float], tuple[Any, Any]]] = {
    1: lambda x, y, w, h: (x, y),
    2: lambda x, y, w, h: (w - x, y),
    3: lambda x, y, w, h: (w - x, h - y),
    4: lambda x, y, w, h: (x, h - y),
    5: lambda x, y, w, h: (y, x),
    6: lambda x, y, w, h: (h - y, x),
    7: lambda x, y, w, h: (h - y, w - x),
    8: lambda x, y, w, h: (y, w - x),
}


def orient_boxes(boxes: np.ndarray, orientation: int, stored_size: tuple[int, int]) -> np.ndarray:
  """Maps boxes from the stored pixels' frame to the upright image's frame.

  Args:
    boxes: ``[N, 4]`` xyxy in the frame of the pixels as stored.
    orientation: EXIF orientation 1..8.
    stored_size: ``(h, w)`` of the pixels as stored.
  Returns:
    ``[N, 4]`` float32 xyxy in the upright image (``x1 <= x2``, ``y1 <= y2``).
  """
  b = np.asarray(boxes, np.float32).reshape(-1, 4)
  h, w = stored_size
  xa, ya = _POINT_MAPS[orientation](b[:, 0], b[:, 1], w, h)
  xb, yb = _POINT_MAPS[orientation](b[:, 2], b[:, 3], w, h)
  return np.stack([np.minimum(xa, xb), np.minimum(ya, yb),
                   np.maximum(xa, xb), np.maximum(ya, yb)], axis=-1).astype(np.float32)


# The reasons :func:`fit_boxes` gives, as counted in a skip log.
ROTATED = "boxes given in unrotated EXIF frame, rotated upright"
RESCALED = "stored image size differs from the image, boxes rescaled"
KEPT = ("stored image size differs from the image and is no uniform scale of it, boxes kept "
        "as annotated (those outside the image clipped or skipped)")


def _uniform_scale(stored_size: tuple[int, int], size: tuple[int, int]) -> bool:
  """Whether ``size`` is ``stored_size`` scaled by one factor (sides rounded to pixels)."""
  (hs, ws), (h, w) = stored_size, size
  sx, sy = w / ws, h / hs
  return abs(hs * sx - h) <= 1.0 or abs(ws * sy - w) <= 1.0


def fit_boxes(boxes: np.ndarray, stored_size: tuple[int, int],
              info: ImageInfo) -> tuple[np.ndarray, str | None]:
  """Moves boxes annotated against ``stored_size`` into the real upright image.

  Annotation files record the size of the frame their coordinates live in. When
  it disagrees with the upright image, the image is trusted:

  * it equals the stored pixels' size of an image with a rotating EXIF
    orientation (5..8): the boxes were drawn on the unrotated pixels and are
    turned with the image (:func:`orient_boxes`), reason :data:`ROTATED`;
  * the image is the stored size scaled by one factor (resized after
    annotation, sides rounded to whole pixels): the boxes are scaled by it,
    reason :data:`RESCALED`;
  * otherwise (e.g. a wrong ``<width>`` alone, which would stretch the boxes
    along one axis): the boxes are kept as annotated, reason :data:`KEPT`;
    the caller clips (or skips) those that do not fit the image.

  Orientations 2..4 keep the size, so a mismatch cannot reveal them: boxes of an
  image whose stored size equals its upright size are taken to be upright.

  Args:
    boxes: ``[N, 4]`` xyxy against ``stored_size``.
    stored_size: ``(h, w)`` recorded in the annotation file.
    info: the real image, from :func:`probe_image`.
  Returns:
    ``([N, 4] float32 boxes in the upright image, reason)``; ``reason`` is None
    when nothing had to change, else one of the texts above for :meth:`SkipLog.fix`.
  """
  b = np.asarray(boxes, np.float32).reshape(-1, 4)
  stored_size = (int(stored_size[0]), int(stored_size[1]))
  if stored_size == info.size:
    return b, None
  if info.orientation in TRANSPOSING_ORIENTATIONS and stored_size == info.stored_size:
    return orient_boxes(b, info.orientation, stored_size), ROTATED
  if not _uniform_scale(stored_size, info.size):
    return b, KEPT
  sy = info.height / stored_size[0]
  sx = info.width / stored_size[1]
  scale = np.array([sx, sy, sx, sy], np.float32)
  return (b * scale).astype(np.float32), RESCALED


# ----------------------------------------------------------------------------
# Decoding.
# ----------------------------------------------------------------------------


def _scale_16bit(a: np.ndarray) -> np.ndarray:
  """``[H, W]`` integers in ``0 .. 65535`` -> ``[H, W]`` uint8, rounded."""
  a = np.clip(a.astype(np.int64), 0, 65535)
  return ((a * 255 + 32767) // 65535).astype(np.uint8)


def _grey_to_rgb(a: np.ndarray) -> np.ndarray:
  """``[H, W]`` uint8 -> ``[H, W, 3]`` uint8 with equal channels."""
  return np.repeat(a[:, :, None], 3, axis=2)


def _is_16bit_colour(im: Image.Image) -> bool:
  """Whether Pillow will reduce this (not yet loaded) colour image from 16 bits."""
  return any(";16" in str(tile.args[0] if isinstance(tile.args, tuple) else tile.args)
             for tile in (im.tile or []) if tile.args)


def _to_rgb8(im: Image.Image, fix: Callable[[str], None]) -> np.ndarray:
  """Any Pillow image -> ``[H, W, 3]`` uint8 RGB, reporting each conversion."""
  mode = im.mode
  if mode == "RGB":
    return np.asarray(im)
  if mode.startswith("I;16") or mode == "I":
    fix(f"{mode} image scaled from 16 to 8 bits")
    return _grey_to_rgb(_scale_16bit(np.asarray(im)))
  if mode in ("RGBA", "RGBX"):
    fix(f"{mode} image converted to RGB (alpha dropped)")
    return np.ascontiguousarray(np.asarray(im)[:, :, :3])
  if mode in ("L", "1"):
    fix(f"{mode} (greyscale) image converted to RGB")
    return _grey_to_rgb(np.asarray(im.convert("L")))
  if mode in ("LA", "La"):
    fix(f"{mode} (greyscale with alpha) image converted to RGB (alpha dropped)")
    return _grey_to_rgb(np.asarray(im.getchannel("L")))
  if mode in ("P", "PA"):
    transparent = mode == "PA" or "transparency" in im.info
    if transparent:
      fix(f"{mode} (palette with transparency) image converted to RGB (alpha dropped)")
      return np.ascontiguousarray(np.asarray(im.convert("RGBA"))[:, :, :3])
    fix(f"{mode} (palette) image converted to RGB")
    return np.asarray(im.convert("RGB"))
  fix(f"{mode} image converted to RGB")  # CMYK, YCbCr, LAB, HSV, RGBa, F
  return np.asarray(im.convert("RGB"))


# A JPEG cut short (a copy or download that lost its last bytes) still decodes when
# its end-of-image marker is put back: libjpeg fills the missing end of the scan with
# mid-grey, as OpenCV and Pillow's LOAD_TRUNCATED_IMAGES do. Such an image is used (a
# counted fix) when at most this fraction of its rows is fill, else it is skipped.
MAX_TRUNCATED_ROWS = 0.1
_JPEG_START, _JPEG_END = b"\xff\xd8", b"\xff\xd9"
_FILL = 128  # the grey libjpeg decodes missing blocks to


class _MostlyMissing(OSError):
  """A truncated JPEG whose decodable part is too small to train on."""


def _filled_rows(pixels: np.ndarray) -> int:
  """How many rows at the bottom of ``[H, W(, C)]`` pixels are uniform decoder fill."""
  fill = np.all(pixels.reshape(pixels.shape[0], -1) == _FILL, axis=1)
  return int(np.argmin(fill[::-1])) if not fill.all() else len(fill)


def _decode(data: ImageData, fix: Callable[[str], None], *, truncated: bool = False) -> np.ndarray:
  """Decodes to upright ``[H, W, 3]`` uint8 RGB, reporting conversions; raises on failure.

  ``truncated``: ``data`` is a cut JPEG with its end marker put back; more than
  :data:`MAX_TRUNCATED_ROWS` of fill raises :class:`_MostlyMissing`.
  """
  with _open(data) as im:
    if im.mode == "RGB" and _is_16bit_colour(im):
      fix("16-bit colour image reduced to 8 bits")
    im.load()  # Decodes now, so truncation raises here.
    if truncated:
      h = im.size[1]
      filled = _filled_rows(np.asarray(im))
      if filled > MAX_TRUNCATED_ROWS * h:
        raise _MostlyMissing(f"truncated JPEG: {filled} of its {h} rows missing")
    orientation = exif_orientation(im)
    if orientation != 1:
      im = ImageOps.exif_transpose(im)
      fix(f"EXIF orientation {orientation} applied")
    return _to_rgb8(im, fix)


def _read_bytes(data: ImageData) -> bytes:
  if isinstance(data, (bytes, bytearray, memoryview)):
    return bytes(data)
  with open(data, "rb") as f:
    return f.read()


def decode_image(data: ImageData, *, file: str, record: Any,
                 skip_log: SkipLog) -> np.ndarray | None:
  """Decodes an image to upright 8-bit RGB.

  A JPEG that lost the end of its data is decoded as far as it goes (the rest
  mid-grey, as OpenCV does) and used with a counted fix when at most
  :data:`MAX_TRUNCATED_ROWS` of its rows are missing; with more it is skipped.

  Args:
    data: encoded bytes, or a path to the file.
    file: the file name for messages.
    record: the record (e.g. image id) for messages.
    skip_log: where conversions (:meth:`SkipLog.fix`) and failures
      (:meth:`SkipLog.skip`) are counted.
  Returns:
    ``[H, W, 3]`` uint8 RGB, upright (EXIF orientation applied), or None if the
    file is missing or cannot be decoded (counted as a skip).
  """
  def fix(reason: str) -> None:
    skip_log.fix(reason, file=file, record=record)

  try:
    try:
      array = _decode(data, fix)
    except OSError as e:
      if "truncated" not in str(e).lower() or isinstance(e, FileNotFoundError):
        raise
      raw = _read_bytes(data)
      if not raw.startswith(_JPEG_START):
        raise
      array = _decode(raw + _JPEG_END, fix, truncated=True)
      skip_log.fix("truncated JPEG decoded, its missing end filled", file=file, record=record,
                   detail=f"{type(e).__name__}: {e}")
  except FileNotFoundError as e:
    skip_log.skip("missing image", file=file, record=record, detail=str(e))
    return None
  except DECODE_ERRORS as e:
    skip_log.skip("unreadable image", file=file, record=record, detail=f"{type(e).__name__}: {e}")
    return None
  return np.ascontiguousarray(array, dtype=np.uint8)


def decode_fitted(path: ImageData, boxes: np.ndarray, size: tuple[int, int], *, file: str,
                  record: Any, skip_log: SkipLog) -> tuple[np.ndarray, np.ndarray, bool] | None:
  """Decodes an image and moves boxes recorded against ``size`` into it.

  Sources check sizes at start-up (:func:`probe_image`, :func:`fit_boxes`), so
  the decoded image normally has ``size`` and the boxes are returned as given.
  When it does not (sizes not checked, or the file changed), the boxes are
  fitted with :func:`fit_boxes` and the fix is counted.

  Args:
    path: the image (path or bytes).
    boxes: ``[N, 4]`` xyxy against ``size``.
    size: ``(h, w)`` the boxes were recorded against.
    file, record, skip_log: as for :func:`decode_image`.
  Returns:
    ``(image [H, W, 3] uint8, boxes [N, 4] float32, fitted)``, ``fitted`` telling
    whether the boxes changed (then clip them again), or None if the image
    cannot be decoded (counted).
  """
  image = decode_image(path, file=file, record=record, skip_log=skip_log)
  if image is None:
    return None
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  if image.shape[:2] == tuple(size):
    return image, boxes, False
  try:
    orientation = probe_image(path).orientation
  except DECODE_ERRORS:
    orientation = 1
  info = ImageInfo(height=image.shape[0], width=image.shape[1], orientation=orientation)
  boxes, reason = fit_boxes(boxes, size, info)
  skip_log.fix(reason or "image size changed", file=file, record=record,
               detail=f"recorded (h, w) {tuple(size)}, image {info.size}")
  return image, boxes, True
