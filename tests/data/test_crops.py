"""Crop geometry: boxes map back onto the original pixels, flips are recorded, RRC statistics."""

import math

import numpy as np
import pytest
from PIL import Image

from sslx.data import crops


def _coordinate_image(height: int, width: int) -> np.ndarray:
  """channel 0 = column x, channel 1 = row y (both < 256)."""
  image = np.zeros((height, width, 3), np.uint8)
  image[..., 0] = np.arange(width)[None, :]
  image[..., 1] = np.arange(height)[:, None]
  return image


def test_box_reads_back_exactly_when_upsampling():
  # Every box side <= output side, so nearest upsampling shows every source pixel exactly once or
  # more: the crop's value range IS the box.
  image = _coordinate_image(45, 60)
  rng = np.random.default_rng(0)
  out = crops.multi_crop(
    rng,
    image,
    image.shape[:2],
    crops.CropSpec(4, 64, (0.3, 1.0)),
    crops.CropSpec(6, 64, (0.05, 0.3)),
    interpolation='nearest',
  )
  for kind in ('global', 'local'):
    for crop, box, flip in zip(out[f'{kind}_crops'], out[f'{kind}_boxes'], out[f'{kind}_flips']):
      x0, y0, w, h = box.astype(int)
      assert crop[..., 0].min() == x0 and crop[..., 0].max() == x0 + w - 1
      assert crop[..., 1].min() == y0 and crop[..., 1].max() == y0 + h - 1
      row = crop[0, :, 0].astype(int)
      steps = np.diff(row)
      if flip:  # mirrored after resizing: x decreases left to right
        assert row[0] == x0 + w - 1 and row[-1] == x0 and np.all(steps <= 0)
      else:
        assert row[0] == x0 and row[-1] == x0 + w - 1 and np.all(steps >= 0)
      assert np.all(np.diff(crop[:, 0, 1].astype(int)) >= 0)  # never flipped vertically
  flips = np.concatenate([out['global_flips'], out['local_flips']])
  assert out['global_boxes'].dtype == np.float32 and flips.dtype == bool


def test_box_reads_back_with_bicubic_any_scale():
  # PIL's bicubic (with its antialias support when shrinking) reproduces a linear ramp inside
  # the crop, so interior output column i reads x0 + (i + 0.5) * w / S - 0.5 (+- uint8 rounding).
  height, width = 180, 250
  pil = Image.fromarray(_coordinate_image(height, width))
  rng = np.random.default_rng(1)
  for _ in range(50):
    size = int(rng.integers(16, 200))
    x0, y0, w, h = crops.random_resized_crop_box(rng, height, width, (0.05, 1.0))
    out = crops.resize_box(pil, (x0, y0, w, h), size, 'bicubic').astype(float)
    i = np.arange(size)
    expect_x = x0 + (i + 0.5) * w / size - 0.5
    expect_y = y0 + (i + 0.5) * h / size - 0.5
    inner = slice(size // 4, size - size // 4)
    assert np.abs(out[size // 2, inner, 0] - expect_x[inner]).max() <= 1.0
    assert np.abs(out[inner, size // 2, 1] - expect_y[inner]).max() <= 1.0


def test_random_resized_crop_statistics():
  rng = np.random.default_rng(2)
  height, width, scale, ratio = 200, 300, (0.08, 1.0), (3 / 4, 4 / 3)
  boxes = np.array(
    [crops.random_resized_crop_box(rng, height, width, scale, ratio) for _ in range(3000)]
  )
  x0, y0, w, h = boxes.T
  assert np.all((x0 >= 0) & (y0 >= 0) & (w >= 1) & (h >= 1))
  assert np.all((x0 + w <= width) & (y0 + h <= height))
  fraction = w * h / (height * width)
  aspect = w / h
  # Rounding w and h to integers moves the area by at most about (w + h) / 2 pixels.
  slack = (w + h) / (height * width)
  assert np.all(fraction >= scale[0] - slack) and np.all(fraction <= scale[1] + slack)
  assert np.all(aspect >= ratio[0] * (1 - 1 / h) - 1e-9)
  assert np.all(aspect <= ratio[1] * (1 + 1 / h) + 1e-9)
  # Spread: fractions and log-aspects cover their ranges, placement covers the image.
  assert fraction.min() < 0.12 and fraction.max() > 0.8
  assert np.log(aspect).min() < math.log(ratio[0]) + 0.05
  assert np.log(aspect).max() > math.log(ratio[1]) - 0.05
  assert x0.min() == 0 and (x0 + w).max() == width


def test_random_resized_crop_fallback_is_centred_and_clamped():
  rng = np.random.default_rng(3)
  # A 10:1 strip cannot host a 3/4..4/3 box of >= 90% area: centre crop at the widest ratio.
  assert crops.random_resized_crop_box(rng, 100, 1000, (0.9, 1.0)) == (
    (1000 - 133) // 2,
    0,
    133,
    100,
  )
  # Tall strip: clamped to the narrowest ratio.
  assert crops.random_resized_crop_box(rng, 1000, 100, (0.9, 1.0)) == (
    0,
    (1000 - 133) // 2,
    100,
    133,
  )


def test_tiny_image_upsamples_and_same_seed_same_crops():
  image = np.random.default_rng(4).integers(0, 256, (10, 10, 3), dtype=np.uint8)
  spec_g, spec_l = crops.CropSpec(2, 32, (0.4, 1.0)), crops.CropSpec(0, 16, (0.05, 0.4))
  a = crops.multi_crop(np.random.default_rng(7), image, (10, 10), spec_g, spec_l)
  b = crops.multi_crop(np.random.default_rng(7), image, (10, 10), spec_g, spec_l)
  c = crops.multi_crop(np.random.default_rng(8), image, (10, 10), spec_g, spec_l)
  assert a['global_crops'].shape == (2, 32, 32, 3) and a['local_crops'].shape == (0, 16, 16, 3)
  assert a['local_boxes'].shape == (0, 4) and a['local_flips'].shape == (0,)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a['global_boxes'], c['global_boxes'])


def test_bad_arguments_fail_clearly():
  with pytest.raises(ValueError, match='config.data.interpolation'):
    crops.resample_filter('cubic-ish')
  with pytest.raises(ValueError, match='0 < low <= high <= 1'):
    crops.CropSpec(2, 224, (0.0, 1.0))
  with pytest.raises(ValueError, match='eval_resize'):
    crops.resize_center_crop(np.zeros((8, 8, 3), np.uint8), 8, 16)


def test_resize_center_crop():
  image = _coordinate_image(100, 200)
  out = crops.resize_center_crop(image, 50, 40, 'nearest')
  assert out.shape == (40, 40, 3)
  # Shorter side 100 -> 50 (x0.5); centre crop of the 100x50 resize starts at column 30.
  assert abs(int(out[0, 0, 0]) - 61) <= 1 and abs(int(out[0, 0, 1]) - 11) <= 1
  same = crops.resize_center_crop(image[:28, :28], 28, 28)
  np.testing.assert_array_equal(same, image[:28, :28])
