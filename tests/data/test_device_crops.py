"""Crops resampled on the device (crops_on='device') against PIL's host crops."""

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sslx.data import crops, device_crops, pipeline


def _device_crop(image, box, size, interpolation, canvas_size=64, flip=False):
  canvas, extent, _ = crops.canvas_of(image, canvas_size)
  out = device_crops.crop_resize(
    jnp.asarray(canvas[None]),
    jnp.asarray([extent], jnp.int32),
    jnp.asarray([[box]], jnp.float32),
    jnp.asarray([[flip]]),
    size,
    interpolation,
  )
  return np.asarray(out[0, 0])


@pytest.mark.parametrize('interpolation', sorted(device_crops.FILTERS))
def test_matches_pil_within_one_grey_level(interpolation):
  # Noise is the hard case: bicubic/lanczos overshoot, which PIL clips between its passes.
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
  pil = Image.fromarray(image)
  canvas, extent, _ = crops.canvas_of(image, 64)
  for size in (5, 16, 47):  # shrinking (antialiased) and enlarging
    x0, y0 = rng.uniform(0, 40, 6), rng.uniform(0, 30, 6)
    boxes = np.stack([x0, y0, rng.uniform(1, 53 - x0), rng.uniform(1, 37 - y0)], -1)  # fractional
    got = device_crops.crop_resize(
      jnp.asarray(canvas[None]),
      jnp.asarray([extent], jnp.int32),
      jnp.asarray(boxes[None], jnp.float32),
      jnp.zeros((1, 6), bool),
      size,
      interpolation,
    )
    for box, crop in zip(boxes, np.asarray(got[0])):
      ref = crops.resize_box(pil, tuple(box), size, interpolation)
      diff = np.abs(crop.astype(int) - ref.astype(int))
      assert diff.max() <= 1, (box, size)
      assert (diff > 0).mean() < 0.1


def test_flip_mirrors_the_columns():
  image = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
  box = (3.0, 2.0, 20.0, 15.0)
  plain = _device_crop(image, box, 12, 'bicubic')
  np.testing.assert_array_equal(_device_crop(image, box, 12, 'bicubic', flip=True), plain[:, ::-1])


def test_padding_never_leaks_into_a_box_at_the_image_edge():
  # A white image in a black (zero) canvas: a box touching the right/bottom edges must stay white.
  image = np.full((20, 30, 3), 255, np.uint8)
  out = _device_crop(image, (10.0, 5.0, 20.0, 15.0), 7, 'bicubic', canvas_size=40)
  assert out.min() == 255


def test_canvas_of_shrinks_only_large_images():
  small = np.zeros((30, 40, 3), np.uint8)
  canvas, extent, scale = crops.canvas_of(small, 64)
  assert canvas.shape == (64, 64, 3) and extent == (30, 40) and scale == (1.0, 1.0)
  big = np.full((100, 150, 3), 9, np.uint8)
  canvas, extent, (sy, sx) = crops.canvas_of(big, 64)
  assert extent == (43, 64)
  assert sy == pytest.approx(43 / 100) and sx == pytest.approx(64 / 150)
  assert (canvas[:43, :64] == 9).all() and (canvas[43:] == 0).all()
  stacked = crops.stack_canvases([crops.fit_image(small, 64)[0], crops.fit_image(big, 64)[0]], 64)
  np.testing.assert_array_equal(stacked[1], canvas)
  assert stacked.shape == (2, 64, 64, 3) and not stacked[0].any()
  dirty = np.full((2, 64, 64, 3), 255, np.uint8)  # e.g. reused memory: the padding is rewritten
  np.testing.assert_array_equal(
    crops.stack_canvases(
      [crops.fit_image(small, 64)[0], crops.fit_image(big, 64)[0]], 64, out=dirty
    ),
    stacked,
  )


def test_unknown_interpolation_names_the_fix(fmnist_cfg):
  fmnist_cfg.crops_on = 'device'
  fmnist_cfg.interpolation = 'nearest'
  with pytest.raises(pipeline.DataError, match="crops_on='host'"):
    pipeline.train_dataset(fmnist_cfg, seed=0, batch_size=4)


def test_device_batches_rebuild_the_host_crops(image_folder, cfg_factory):
  """Same seed: identical boxes, flips and masks-free geometry; crops within one grey level."""
  root, _ = image_folder
  common = dict(source='image_folder', path=root, eval_resize=40, eval_size=32)
  host_cfg = cfg_factory(**common)
  device_cfg = cfg_factory(**common, crops_on='device', canvas_size=600)  # no image shrinks
  host = next(iter(pipeline.train_dataset(host_cfg, seed=3, batch_size=4)))
  dev = next(iter(pipeline.train_dataset(device_cfg, seed=3, batch_size=4)))
  assert 'global_crops' not in dev and dev['canvas'].shape == (4, 600, 600, 3)
  for key in (
    'global_boxes',
    'global_flips',
    'local_boxes',
    'local_flips',
    'image_size',
    'index',
    'gg_rects',
    'lg_rects',
  ):
    np.testing.assert_array_equal(dev[key], host[key], err_msg=key)
  made = device_crops.canvas_crops(
    {k: jnp.asarray(v) for k, v in dev.items() if k != 'index'},
    host_cfg.global_crops.size,
    host_cfg.local_crops.size,
  )
  assert not any(k.startswith('canvas') for k in made)
  for key in ('global_crops', 'local_crops'):
    diff = np.abs(np.asarray(made[key]).astype(int) - host[key].astype(int))
    assert diff.max() <= 1, key


def test_bad_crops_on_is_rejected(fmnist_cfg):
  fmnist_cfg.crops_on = 'gpu'
  with pytest.raises(ValueError, match="'host', 'device'"):
    pipeline.train_dataset(fmnist_cfg, seed=0, batch_size=4)
