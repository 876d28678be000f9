"""Decoding of real-world image quirks: EXIF orientation, modes, bad files."""

from __future__ import annotations

import io
import logging

import cv2
import numpy as np
import pytest
from PIL import Image

from jdet.data import images
from jdet.data.records import SkipLog

# Pillow's transpose that turns the stored pixels of each EXIF orientation upright
# (what a viewer does), and its inverse, used to write the stored pixels.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}
_INVERSE = {**_UPRIGHT, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
RED = (220, 20, 30)


def decode(data, log=None):
  log = log if log is not None else SkipLog("test")
  return images.decode_image(data, file="f.img", record=7, skip_log=log), log


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
  buf = io.BytesIO()
  im.save(buf, fmt, **kw)
  return buf.getvalue()


def jpeg_bytes(h=40, w=60) -> bytes:
  rng = np.random.default_rng(0)
  return encode(Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)), "JPEG", quality=90)


def fixes(log: SkipLog) -> list[str]:
  return [k for k in log.counts() if k.startswith("fixed")]


def upright_scene(h=64, w=96):
  """``[h, w, 3]`` grey image with a red rectangle; returns it and the box (xyxy).

  Sides and edges are multiples of 16, so that JPEG blocks never straddle an
  edge, whichever way the pixels are stored.
  """
  a = np.full((h, w, 3), 128, np.uint8)
  box = (16, 16, 48, 32)
  a[box[1]:box[3], box[0]:box[2]] = RED
  return a, box


def coloured_box(a: np.ndarray, colour=RED, tol=40) -> tuple[int, int, int, int]:
  """Bounding xyxy box of the pixels close to ``colour``."""
  ys, xs = np.nonzero(np.abs(a.astype(int) - colour).max(axis=-1) < tol)
  return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# ----------------------------------------------------------------------------
# Bad files.
# ----------------------------------------------------------------------------


def test_missing_file_is_skipped_with_file_and_record(tmp_path, caplog):
  path = tmp_path / "nope.jpg"
  log = SkipLog("test")
  with caplog.at_level(logging.WARNING, logger="jdet.data"):
    out = images.decode_image(path, file=str(path), record=42, skip_log=log)
  assert out is None
  assert log.counts() == {"skipped: missing image": 1}
  assert str(path) in caplog.text and "42" in caplog.text


@pytest.mark.parametrize("data", [
    jpeg_bytes()[:400],  # truncated inside the scan data
    jpeg_bytes()[:100],  # truncated inside the header
    np.random.default_rng(1).integers(0, 256, 2000, np.uint8).tobytes(),
    b"",
], ids=["truncated-jpeg", "truncated-header", "random-bytes", "empty"])
def test_corrupt_data_is_skipped(data, tmp_path):
  out, log = decode(data)
  assert out is None
  assert log.counts() == {"skipped: unreadable image": 1}
  path = tmp_path / "bad.jpg"
  path.write_bytes(data)
  out, log = decode(path)
  assert out is None and log.counts() == {"skipped: unreadable image": 1}


def test_plain_rgb_is_untouched_from_path_and_bytes(tmp_path):
  a = np.random.default_rng(0).integers(0, 255, (9, 13, 3), np.uint8)
  data = encode(Image.fromarray(a))
  path = tmp_path / "x.png"
  path.write_bytes(data)
  for src in (data, path, str(path)):
    out, log = decode(src)
    np.testing.assert_array_equal(out, a)
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    assert log.total() == 0


# ----------------------------------------------------------------------------
# Modes.
# ----------------------------------------------------------------------------


def test_greyscale_has_equal_channels():
  g = np.arange(12 * 7, dtype=np.uint8).reshape(12, 7)
  out, log = decode(encode(Image.fromarray(g)))
  assert out.shape == (12, 7, 3) and out.dtype == np.uint8
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], g)
  assert len(fixes(log)) == 1 and "greyscale" in fixes(log)[0]


def test_greyscale_with_alpha_keeps_grey_values():
  g = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
  la = np.stack([g, np.zeros_like(g)], axis=-1)  # fully transparent
  out, log = decode(encode(Image.fromarray(la, "LA")))
  np.testing.assert_array_equal(out, np.repeat(g[..., None], 3, axis=-1))
  assert fixes(log) == ["fixed: LA (greyscale with alpha) image converted to RGB (alpha dropped)"]


def test_16bit_greyscale_is_scaled_with_rounding_not_clipped():
  v = np.array([[0, 1000, 32896, 65535]], np.uint16)  # 32896 = 128 * 257
  out, log = decode(encode(Image.fromarray(v)))
  np.testing.assert_array_equal(out[0, :, 0], [0, 4, 128, 255])  # round(v / 257)
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  assert "16 to 8 bits" in fixes(log)[0]


def test_16bit_colour_png_is_reduced_and_counted():
  rgb = np.array([[[1000, 30000, 65535]]], np.uint16)
  ok, buf = cv2.imencode(".png", rgb[..., ::-1])  # OpenCV writes BGR
  assert ok
  out, log = decode(buf.tobytes())
  np.testing.assert_allclose(out[0, 0], rgb[0, 0] / 257, atol=1)
  assert fixes(log) == ["fixed: 16-bit colour image reduced to 8 bits"]


def test_rgba_drops_alpha():
  rgba = np.zeros((3, 4, 4), np.uint8)
  rgba[..., :3] = (10, 200, 30)
  rgba[0, 0] = (1, 2, 3, 0)
  out, log = decode(encode(Image.fromarray(rgba, "RGBA")))
  np.testing.assert_array_equal(out, rgba[..., :3])
  assert "alpha dropped" in fixes(log)[0]


def test_palette_with_transparency_uses_palette_colours():
  idx = np.array([[0, 1], [2, 1]], np.uint8)
  im = Image.fromarray(idx, "P")
  im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (253 * 3))
  im.info["transparency"] = 1
  out, log = decode(encode(im, transparency=1))
  np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
  np.testing.assert_array_equal(out[0, 1], [0, 255, 0])  # the transparent entry's colour
  np.testing.assert_array_equal(out[1, 0], [0, 0, 255])
  assert "palette with transparency" in fixes(log)[0]


def test_palette_without_transparency():
  im = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
  im.putpalette([9, 8, 7, 1, 2, 3] + [0] * (254 * 3))
  out, log = decode(encode(im))
  np.testing.assert_array_equal(out[0], [[9, 8, 7], [1, 2, 3]])
  assert fixes(log) == ["fixed: P (palette) image converted to RGB"]


def test_cmyk_jpeg_is_converted_to_rgb():
  # Pure cyan, magenta, yellow and black inks; JPEG stores CMYK inverted (Adobe).
  cmyk = np.zeros((16, 64, 4), np.uint8)
  for i, ink in enumerate([(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255)]):
    cmyk[:, 16 * i:16 * (i + 1)] = ink
  out, log = decode(encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=100))
  assert out.shape == (16, 64, 3)
  expected = [(0, 255, 255), (255, 0, 255), (255, 255, 0), (0, 0, 0)]
  for i, rgb in enumerate(expected):
    np.testing.assert_allclose(out[8, 16 * i + 8], rgb, atol=12)
  assert fixes(log) == ["fixed: CMYK image converted to RGB"]


# ----------------------------------------------------------------------------
# EXIF orientation.
# ----------------------------------------------------------------------------


def exif_jpeg(upright: np.ndarray, orientation: int) -> bytes:
  """JPEG whose stored pixels turned by ``orientation`` give ``upright``."""
  im = Image.fromarray(upright)
  stored = im.transpose(_INVERSE[orientation]) if orientation != 1 else im
  exif = Image.Exif()
  exif[0x0112] = orientation
  return encode(stored, "JPEG", quality=95, subsampling=0, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_upright_pixels(orientation):
  upright, box = upright_scene()
  data = exif_jpeg(upright, orientation)
  with Image.open(io.BytesIO(data)) as raw:
    assert raw.getexif()[0x0112] == orientation
    if orientation in images.TRANSPOSING_ORIENTATIONS:
      assert raw.size == (64, 96)  # stored sideways
  out, log = decode(data)
  assert out.shape == (64, 96, 3)
  assert coloured_box(out) == box  # the red rectangle is where it is upright
  assert images.image_size(data) == (64, 96)
  assert images.probe_image(data) == images.ImageInfo(64, 96, orientation)
  assert (f"fixed: EXIF orientation {orientation} applied" in log.counts()) == (orientation != 1)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_boxes_follows_the_pixels(orientation):
  # A rectangle drawn on the stored pixels lands, after decoding, where
  # orient_boxes says (checked against Pillow's own transposition).
  stored = np.full((50, 80, 3), 128, np.uint8)
  box = (7, 11, 30, 20)
  stored[box[1]:box[3], box[0]:box[2]] = RED
  exif = Image.Exif()
  exif[0x0112] = orientation
  data = encode(Image.fromarray(stored), "PNG", exif=exif.tobytes())
  out, _ = decode(data)
  mapped = images.orient_boxes(np.array([box], np.float32), orientation, (50, 80))
  np.testing.assert_array_equal(mapped[0], coloured_box(out, tol=1))
  if orientation != 1:
    reference = np.asarray(Image.fromarray(stored).transpose(_UPRIGHT[orientation]))
    np.testing.assert_array_equal(out, reference)


def test_fit_boxes_rotates_boxes_of_the_unrotated_frame_and_rescales_others():
  boxes = np.array([[7, 11, 30, 20]], np.float32)
  info = images.ImageInfo(height=80, width=50, orientation=6)  # stored 50 x 80, turned
  same, reason = images.fit_boxes(boxes, (80, 50), info)
  assert reason is None
  np.testing.assert_array_equal(same, boxes)
  turned, reason = images.fit_boxes(boxes, (50, 80), info)
  assert "rotated" in reason
  np.testing.assert_array_equal(turned, images.orient_boxes(boxes, 6, (50, 80)))
  scaled, reason = images.fit_boxes(boxes, (40, 25), info)  # image was enlarged 2x
  assert "rescaled" in reason
  np.testing.assert_allclose(scaled, boxes * 2)


def test_decode_fitted_moves_boxes_when_the_recorded_size_is_the_stored_frame():
  upright, box = upright_scene()
  data = exif_jpeg(upright, 8)
  with Image.open(io.BytesIO(data)) as raw:
    w, h = raw.size  # the stored pixels: 64 wide, 96 high
  stored = np.asarray(Image.open(io.BytesIO(data)))
  raw_box = coloured_box(stored)
  log = SkipLog("test")
  image, boxes, fitted = images.decode_fitted(data, np.array([raw_box]), (h, w), file="f",
                                              record=1, skip_log=log)
  assert fitted and image.shape == (64, 96, 3)
  np.testing.assert_array_equal(boxes[0], box)
  assert any("rotated" in k for k in fixes(log))
  image, boxes, fitted = images.decode_fitted(data, np.array([box]), (64, 96), file="f",
                                              record=1, skip_log=log)
  assert not fitted
  np.testing.assert_array_equal(boxes[0], box)


def test_image_size_of_missing_file_raises(tmp_path):
  with pytest.raises(FileNotFoundError):
    images.image_size(tmp_path / "nope.png")
