"""Mixup / cutmix / label smoothing / random erasing (sslx/data/mixup.py) on hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx.data import mixup


def test_smoothed_one_hot():
  t = np.asarray(mixup.smooth_one_hot(jnp.asarray([1, 0]), 4, 0.1))
  # on = 1 - 0.1 + 0.1 / 4, off = 0.1 / 4 (timm's mixup targets)
  np.testing.assert_allclose(t[0], [0.025, 0.925, 0.025, 0.025], rtol=1e-6)
  np.testing.assert_allclose(t[1], [0.925, 0.025, 0.025, 0.025], rtol=1e-6)


def _pair():
  # Two 4x4 one-channel images: all ones and all zeros; labels 0 and 2 of 3 classes.
  images = jnp.stack([jnp.ones((4, 4, 1)), jnp.zeros((4, 4, 1))])
  targets = mixup.smooth_one_hot(jnp.asarray([0, 2]), 3, 0.0)
  return images, targets


def test_mixup_blends_with_the_mirrored_example():
  images, targets = _pair()
  box = jnp.asarray([0, 0, 0, 0])
  out, t, lam = mixup.mix_images_and_targets(images, targets, jnp.float32(0.7), False, box)
  np.testing.assert_allclose(out[0], 0.7)  # 0.7 * 1 + 0.3 * 0
  np.testing.assert_allclose(out[1], 0.3)  # 0.7 * 0 + 0.3 * 1
  np.testing.assert_allclose(t, [[0.7, 0.0, 0.3], [0.3, 0.0, 0.7]], rtol=1e-6)
  assert float(lam) == pytest.approx(0.7)


def test_cutmix_pastes_the_box_and_corrects_lambda():
  images, targets = _pair()
  box = jnp.asarray([1, 3, 0, 2])  # rows 1-2, columns 0-1: 4 of 16 pixels
  out, t, lam = mixup.mix_images_and_targets(images, targets, jnp.float32(0.5), True, box)
  want = np.ones((4, 4))
  want[1:3, 0:2] = 0.0
  np.testing.assert_array_equal(out[0, ..., 0], want)
  np.testing.assert_array_equal(out[1, ..., 0], 1.0 - want)
  assert float(lam) == pytest.approx(0.75)  # the drawn 0.5 is replaced by the kept share
  np.testing.assert_allclose(t, [[0.75, 0.0, 0.25], [0.25, 0.0, 0.75]], rtol=1e-6)


def test_cutmix_box_side_and_kept_share():
  for seed in range(5):
    box, kept = mixup.cutmix_box(jax.random.PRNGKey(seed), 10, 10, jnp.float32(0.64))
    y0, y1, x0, x1 = (int(v) for v in box)
    # side = int(10 * sqrt(1 - 0.64)) = 6, centred on a pixel, clipped at the borders
    assert 0 <= y0 <= y1 <= 10 and 0 <= x0 <= x1 <= 10
    assert y1 - y0 <= 6 and x1 - x0 <= 6
    assert float(kept) == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 100)


def test_smoothing_is_folded_into_mixed_targets():
  images = jnp.zeros((2, 4, 4, 3))
  _, t, lam = mixup.mixup_cutmix(
    jax.random.PRNGKey(0),
    images,
    jnp.asarray([0, 1]),
    2,
    mixup_alpha=1.0,
    cutmix_alpha=0.0,
    smoothing=0.2,
  )
  lam = float(lam)
  y0, y1 = np.asarray([0.9, 0.1]), np.asarray([0.1, 0.9])  # smoothed one-hots
  np.testing.assert_allclose(t[0], lam * y0 + (1 - lam) * y1, rtol=1e-5)
  np.testing.assert_allclose(np.sum(t, axis=1), 1.0, rtol=1e-6)


def test_no_mixing_when_disabled_or_not_drawn():
  lam, cut = mixup.batch_mix_params(
    jax.random.PRNGKey(0), mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.0
  )
  assert float(lam) == 1.0 and not bool(cut)
  lam, cut = mixup.batch_mix_params(jax.random.PRNGKey(0), mixup_alpha=0.0, cutmix_alpha=0.0)
  assert float(lam) == 1.0 and not bool(cut)
  lam, cut = mixup.batch_mix_params(jax.random.PRNGKey(1), mixup_alpha=0.0, cutmix_alpha=1.0)
  assert bool(cut) and 0.0 <= float(lam) <= 1.0


def test_random_erasing_fills_one_rectangle_per_image():
  images = jnp.zeros((8, 16, 16, 3))
  assert mixup.random_erasing(jax.random.PRNGKey(0), images, 0.0) is images
  out = np.asarray(mixup.random_erasing(jax.random.PRNGKey(0), images, 1.0))
  for img in out:
    erased = np.any(img != 0, axis=-1)
    rows, cols = np.flatnonzero(erased.any(1)), np.flatnonzero(erased.any(0))
    assert rows.size and cols.size
    box = erased[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    assert box.all()  # one filled rectangle
    area = box.size / 256
    assert 0.02 * 0.5 <= area <= 1 / 3 * 1.5  # U(0.02, 1/3) of the image, up to rounding
