"""Drawing: box outlines in class colours, captions, skipped padding, grids and PNG files."""

import cv2
import numpy as np
import pytest

from jdet import viz
from jdet.data.transforms import IMAGENET_MEAN, IMAGENET_STD

NAMES = ("ellipse", "rectangle", "triangle")
H, W = 100, 120


def _image():
  return np.full((H, W, 3), 90, np.uint8)


def _outline_mask(cols, rows, t=1):
  """The border band of the pixel block ``cols x rows`` (inclusive ranges), written out by hand."""
  mask = np.zeros((H, W), bool)
  (c0, c1), (r0, r1) = cols, rows
  mask[r0:r0 + t, c0:c1 + 1] = True
  mask[r1 - t + 1:r1 + 1, c0:c1 + 1] = True
  mask[r0:r1 + 1, c0:c0 + t] = True
  mask[r0:r1 + 1, c1 - t + 1:c1 + 1] = True
  return mask


@pytest.mark.parametrize("box", [[20.0, 30.0, 60.0, 80.0], [20.4, 30.9, 59.2, 79.1]])
def test_outline_has_the_class_colour_and_nothing_else_changes(box):
  image = _image()
  out = viz.draw_boxes(image, [box], [2], NAMES, captions=False, thickness=1)
  # Pixel i covers [i, i + 1): the box covers columns 20..59 and rows 30..79.
  mask = _outline_mask((20, 59), (30, 79))
  assert np.all(out[mask] == viz.class_colour(2))
  assert np.array_equal(out[~mask], image[~mask])
  assert np.array_equal(image, _image())  # the input is not modified


def test_thicker_outline_stays_inside_the_box():
  image = _image()
  out = viz.draw_boxes(image, [[10, 10, 50, 40]], [0], NAMES, captions=False, thickness=3)
  mask = _outline_mask((10, 49), (10, 39), t=3)
  assert np.all(out[mask] == viz.class_colour(0))
  assert np.array_equal(out[~mask], image[~mask])


def test_caption_sits_above_the_box_and_leaves_the_interior_alone():
  image = _image()
  out = viz.draw_boxes(image, [[20, 40, 70, 90]], [1], NAMES, thickness=1)
  outline = _outline_mask((20, 69), (40, 89))
  caption = np.zeros((H, W), bool)
  caption[40 - 20:40, 20:W] = True  # a generous strip above the box
  changed = np.any(out != image, axis=-1)
  assert np.all(out[outline] == viz.class_colour(1))
  assert not np.any(changed & ~outline & ~caption)  # interior and outside untouched
  strip = out[caption]
  # The strip is filled with the class colour, with text in another ink on it.
  colour = np.all(strip == viz.class_colour(1), axis=-1)
  assert colour.sum() > 50 and (~colour & np.any(strip != image[0, 0], axis=-1)).sum() > 10


def test_score_lengthens_the_caption():
  image = _image()
  plain = viz.draw_boxes(image, [[20, 40, 70, 90]], [1], NAMES)
  scored = viz.draw_boxes(image, [[20, 40, 70, 90]], [1], NAMES, scores=[0.87])

  def right_end(out):  # the last column that the caption strip changed
    return np.flatnonzero(np.any(out[20:40] != image[20:40], axis=(0, 2))).max()

  assert right_end(scored) > right_end(plain)


def test_padded_and_invalid_boxes_are_not_drawn():
  image = _image()
  boxes = [[10, 10, 50, 50], [60, 20, 100, 70], [0, 0, 0, 0], [5, 5, 5, 30]]
  labels = [0, 1, -1, 2]  # padding label; the last box has no width
  out = viz.draw_boxes(image, boxes, labels, NAMES, valid=[False, True, True, True],
                       captions=False)
  mask = _outline_mask((60, 99), (20, 69))
  assert np.all(out[mask] == viz.class_colour(1))
  assert np.array_equal(out[~mask], image[~mask])
  none = viz.draw_boxes(image, boxes[:3], [0, 1, -1], NAMES, valid=[False, False, True])
  assert np.array_equal(none, image)


def test_boxes_outside_the_image_are_clipped():
  image = _image()
  out = viz.draw_boxes(image, [[-10, -5, 30, 200]], [0], NAMES, captions=False)
  mask = _outline_mask((0, 29), (0, H - 1))
  assert np.all(out[mask] == viz.class_colour(0))
  assert np.array_equal(out[~mask], image[~mask])


def test_normalised_float_images_are_restored():
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
  normalised = (pixels.astype(np.float32) - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
  out = viz.draw_boxes(normalised, np.zeros((0, 4)), np.zeros((0,), int), NAMES,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD)
  assert out.dtype == np.uint8 and np.array_equal(out, pixels)
  with pytest.raises(ValueError, match="mean and std"):
    viz.to_uint8(normalised, mean=IMAGENET_MEAN)


def test_label_beyond_class_names_is_an_error():
  with pytest.raises(ValueError, match="class names"):
    viz.draw_boxes(_image(), [[1, 1, 5, 5]], [3], NAMES)


def test_class_colours_differ():
  colours = {viz.class_colour(k) for k in range(20)}
  assert len(colours) == 20
  assert all(0 <= v <= 255 for c in colours for v in c)


def test_image_grid_places_images_row_by_row():
  images = [np.full((10, 12, 3), k * 40, np.uint8) for k in range(5)]
  grid = viz.image_grid(images, cols=3, gap=2, background=255)
  assert grid.shape == (2 * 10 + 2, 3 * 12 + 2 * 2, 3) and grid.dtype == np.uint8
  for k in range(5):
    r, c = divmod(k, 3)
    cell = grid[r * 12:r * 12 + 10, c * 14:c * 14 + 12]
    assert np.all(cell == k * 40)
  assert np.all(grid[12:, 28:] == 255)  # the empty sixth cell
  assert np.all(grid[10:12] == 255)  # the gap between rows


def test_image_grid_with_fewer_images_than_columns_and_mixed_sizes():
  assert viz.image_grid(np.zeros((2, 8, 8, 3), np.uint8), cols=4).shape == (8, 18, 3)
  grid = viz.image_grid([np.zeros((4, 6, 3), np.uint8), np.zeros((8, 5, 3), np.uint8)], cols=1,
                        gap=0)
  assert grid.shape == (16, 6, 3)


def test_save_image_round_trip(tmp_path):
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
  path = viz.save_image(tmp_path / "sub" / "x.png", image)
  back = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
  assert np.array_equal(back, image)


def test_pr_curves_plot_has_its_size_and_class_coloured_curves_in_place():
  recall = np.linspace(0, 1, 101)
  curves = {name: (recall, np.full(101, p)) for name, p in zip(NAMES, (0.75, 0.25, 0.5))}
  out = viz.plot_pr_curves(curves, title="PR at IoU 0.5", size=(300, 400),
                           ap={"ellipse": 0.75, "rectangle": 0.25})
  assert out.shape == (300, 400, 3) and out.dtype == np.uint8
  right = out[:, 300:]  # the right quarter: curves only, away from the lower-left legend
  rows = [np.flatnonzero(np.all(right == viz.class_colour(k), axis=-1).any(axis=1))
          for k in range(3)]
  assert all(len(r) for r in rows)
  # Each flat curve is a thin horizontal band, higher in the image for higher
  # precision, and the axis is linear: precision 0.5 lies midway between 0.75 and 0.25.
  assert all(np.ptp(r) <= 3 for r in rows)
  assert rows[0].mean() < rows[2].mean() < rows[1].mean()
  assert abs(rows[2].mean() - (rows[0].mean() + rows[1].mean()) / 2) <= 1


def test_pr_curve_colours_follow_the_class_list():
  recall = np.linspace(0, 1, 101)
  out = viz.plot_pr_curves({"triangle": (recall, np.full(101, 0.5))}, title="t",
                           class_names=NAMES)
  assert out.shape == (480, 640, 3)
  assert np.all(out[:, 500:] == viz.class_colour(2), axis=-1).any()
  assert not np.all(out == viz.class_colour(0), axis=-1).any()
