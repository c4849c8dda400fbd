"""On-device photometric augmentation: ranges, identities, each operation, per-image draws."""

import colorsys
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sslx.data import augment

OFF = dict(blur_prob=0.0, solarize_prob=0.0, color_jitter_prob=0.0, grayscale_prob=0.0)


def _images(n=4, size=12, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), np.uint8))


_photometric = jax.jit(
  augment.photometric,
  static_argnames=(
    'blur_prob',
    'solarize_prob',
    'color_jitter_prob',
    'grayscale_prob',
    'brightness',
    'contrast',
    'saturation',
    'hue',
    'blur_sigma',
  ),
)


def _run(images, seed=0, **kwargs):
  return np.asarray(_photometric(jax.random.key(seed), images, **{**OFF, **kwargs}))


def test_all_off_is_identity():
  images = _images()
  out = _run(images)
  assert out.dtype == np.float32 and out.shape == images.shape
  np.testing.assert_allclose(out, np.asarray(images) / 255.0, atol=1e-7)


def test_full_recipe_range_shape_and_per_image_draws():
  same = jnp.broadcast_to(_images(1, 16), (6, 16, 16, 3))
  out = _run(same, blur_prob=0.5, solarize_prob=0.2, color_jitter_prob=0.8, grayscale_prob=0.2)
  assert out.shape == (6, 16, 16, 3) and out.dtype == np.float32
  assert out.min() >= 0.0 and out.max() <= 1.0
  distinct = {out[i].tobytes() for i in range(6)}
  assert len(distinct) >= 4  # identical inputs, independent random draws
  again = _run(same, blur_prob=0.5, solarize_prob=0.2, color_jitter_prob=0.8, grayscale_prob=0.2)
  np.testing.assert_array_equal(out, again)


def test_jitter_with_zero_strength_is_identity():
  images = _images()
  out = _run(images, color_jitter_prob=1.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
  np.testing.assert_allclose(out, np.asarray(images) / 255.0, atol=1e-7)
  # A vanishing hue shift goes through the HSV round trip and must come back unchanged.
  out = _run(images, color_jitter_prob=1.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=1e-9)
  np.testing.assert_allclose(out, np.asarray(images) / 255.0, atol=1e-5)


def test_brightness_scales_each_image_by_one_factor():
  images = jnp.asarray(np.random.default_rng(1).integers(60, 150, (8, 10, 10, 3), np.uint8))
  out = _run(images, color_jitter_prob=1.0, brightness=0.4, contrast=0.0, saturation=0.0, hue=0.0)
  ratio = out / (np.asarray(images) / 255.0)
  per_image = ratio.reshape(8, -1)
  np.testing.assert_allclose(
    per_image, np.broadcast_to(per_image[:, :1], per_image.shape), rtol=1e-5
  )
  assert np.all((per_image[:, 0] >= 0.6 - 1e-6) & (per_image[:, 0] <= 1.4 + 1e-6))
  assert np.ptp(per_image[:, 0]) > 0.05


def test_contrast_and_saturation_blend_targets():
  x = jnp.asarray(np.random.default_rng(2).uniform(0.3, 0.7, (10, 10, 3)), jnp.float32)
  grey_mean = float(jnp.mean(augment.grayscale(x)))
  assert float(jnp.mean(augment.grayscale(augment.adjust_contrast(x, 1.3)))) == pytest.approx(
    grey_mean, abs=1e-5
  )
  np.testing.assert_allclose(
    augment.adjust_contrast(x, 0.0), np.full(x.shape, grey_mean), atol=1e-6
  )
  desaturated = np.asarray(augment.adjust_saturation(x, 0.0))
  np.testing.assert_allclose(desaturated[..., 0], desaturated[..., 2], atol=1e-6)


def test_hsv_matches_colorsys_and_hue_shift():
  rgb = np.random.default_rng(3).random((200, 3)).astype(np.float32)
  hsv = np.asarray(augment.rgb_to_hsv(jnp.asarray(rgb)))
  np.testing.assert_allclose(hsv, [colorsys.rgb_to_hsv(*p) for p in rgb], atol=1e-5)
  np.testing.assert_allclose(augment.hsv_to_rgb(jnp.asarray(hsv)), rgb, atol=1e-5)
  red = jnp.asarray([[[1.0, 0.0, 0.0]]])
  np.testing.assert_allclose(augment.adjust_hue(red, 1.0 / 3.0), [[[0.0, 1.0, 0.0]]], atol=1e-5)


def test_grayscale_gives_equal_channels_with_601_weights():
  images = _images()
  out = _run(images, grayscale_prob=1.0)
  np.testing.assert_array_equal(out[..., 0], out[..., 1])
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  expected = (np.asarray(images, np.float32) / 255.0) @ np.array([0.299, 0.587, 0.114])
  np.testing.assert_allclose(out[..., 0], expected, atol=1e-6)


def test_solarize_inverts_from_128():
  ramp = jnp.asarray(np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1))
  out = _run(ramp, solarize_prob=1.0)[0, ..., 0].reshape(-1) * 255.0
  values = np.arange(256)
  np.testing.assert_allclose(out, np.where(values >= 128, 255 - values, values), atol=1e-4)


def test_blur_keeps_constants_and_smooths_noise():
  constant = jnp.full((3, 16, 16, 3), 93, jnp.uint8)
  np.testing.assert_allclose(_run(constant, blur_prob=1.0), 93 / 255.0, atol=1e-6)
  noise = _images(2, 16)
  blurred = _run(noise, blur_prob=1.0)
  assert blurred.std() < 0.8 * (np.asarray(noise) / 255.0).std()


@pytest.mark.parametrize('sigma', [0.1, 0.3, 0.45, 0.8, 1.37, 1.95, 2.0])
def test_blur_is_pil_gaussian_blur(sigma):
  """What DINO, iBOT, SERE, MoCo v3 and BYOL/SaGe call: PIL's ImageFilter.GaussianBlur(sigma)
  (three box passes per axis in 24-bit fixed point, rounded to uint8 after each). Equal except
  where the box radius, which C computes partly in double and XLA in float32, differs in its last
  bits and moves a fixed-point weight (at sigma 0.3: one grey level on 1.4% of the values)."""
  from PIL import Image, ImageFilter  # pylint: disable=g-import-not-at-top
  from skimage import data as skdata  # pylint: disable=g-import-not-at-top

  photo = skdata.astronaut()[100:164, 180:260]  # 64 x 80, edges and texture
  noise = np.asarray(_images(1, 48, seed=3)[0])
  for image in (photo, noise):
    image = np.ascontiguousarray(image)
    want = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(sigma)))
    got = _run(jnp.asarray(image[None]), blur_prob=1.0, blur_sigma=(sigma, sigma))[0]
    diff = np.abs(np.round(got * 255.0) - want)
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.02, (diff.max(), (diff > 0).mean())
  # Where a sampled Gaussian kernel is nearly the identity (sigma < 0.5), PIL still blurs edges.
  if sigma >= 0.3:
    assert np.abs(want.astype(float) - noise).mean() > 1.0


def test_normalize():
  x = jnp.ones((2, 3)) * jnp.asarray(augment.IMAGENET_MEAN)
  np.testing.assert_allclose(augment.normalize(x), 0.0, atol=1e-7)
  np.testing.assert_allclose(augment.normalize(jnp.zeros((1, 3)), (0.5,) * 3, (0.5,) * 3), -1.0)


def test_augment_multicrop_per_view_probabilities():
  b, g, l = 3, 12, 8
  rng = np.random.default_rng(4)
  global_crops = jnp.asarray(rng.integers(0, 256, (b, 2, g, g, 3), np.uint8))
  local_crops = jnp.asarray(rng.integers(0, 256, (b, 4, l, l, 3), np.uint8))
  cfg = ml_collections.ConfigDict(
    dict(
      color_jitter_prob=0.0,
      brightness=0.4,
      contrast=0.4,
      saturation=0.2,
      hue=0.1,
      grayscale_prob=0.0,
      blur_probs=(1.0, 0.0, 0.0),
      solarize_probs=(0.0, 1.0, 0.0),
      blur_sigma=(0.1, 2.0),
      mean=augment.IMAGENET_MEAN,
      std=augment.IMAGENET_STD,
    )
  )
  fn = jax.jit(functools.partial(augment.augment_multicrop, cfg=cfg))
  globals_out, locals_out = fn(jax.random.key(0), global_crops, local_crops)
  assert globals_out.shape == (b, 2, g, g, 3) and globals_out.dtype == jnp.float32
  assert locals_out.shape == (b, 4, l, l, 3) and locals_out.dtype == jnp.float32
  plain = lambda x: np.asarray(augment.normalize(jnp.asarray(x) / 255.0))  # noqa: E731
  raw_g = np.asarray(global_crops) / 255.0
  solarized = np.where(raw_g[:, 1] >= 128 / 255, 1 - raw_g[:, 1], raw_g[:, 1])
  np.testing.assert_allclose(
    globals_out[:, 1], np.asarray(augment.normalize(solarized)), atol=1e-5
  )  # view 2: solarize only
  np.testing.assert_allclose(locals_out, plain(local_crops), atol=1e-5)  # locals untouched
  view1 = np.asarray(globals_out[:, 0])
  assert np.abs(view1 - plain(global_crops[:, 0])).max() > 0.1  # view 1: always blurred
  assert view1.std() < plain(global_crops[:, 0]).std()

  no_locals = jnp.zeros((b, 0, l, l, 3), jnp.uint8)
  globals_again, empty = fn(jax.random.key(0), global_crops, no_locals)
  assert empty.shape == (b, 0, l, l, 3)
  np.testing.assert_allclose(globals_again, globals_out, atol=1e-6)


def test_augment_multicrop_defaults_and_bad_shapes():
  crops = _images(2 * 2, 8).reshape(2, 2, 8, 8, 3)
  fn = jax.jit(functools.partial(augment.augment_multicrop, cfg=None))
  globals_out, _ = fn(jax.random.key(1), crops, crops[:, :1])
  assert globals_out.shape == (2, 2, 8, 8, 3)
  assert np.isfinite(np.asarray(globals_out)).all()
  with pytest.raises(ValueError, match=r'\[B, N, S, S, 3\]'):
    augment.augment_multicrop(jax.random.key(1), crops[0], crops, None)


def test_color_jitter_applies_each_images_order_with_hue_once():
  """The batched jitter (hue computed once, cheap steps in two slot loops) gives each image its
  own steps in its own random order, as applying them one by one does."""
  x = jnp.asarray(np.random.default_rng(4).random((12, 8, 8, 3)), jnp.float32)
  keys = jax.random.split(jax.random.key(7), 12)
  strengths = (0.4, 0.4, 0.2, 0.1)
  got = jax.jit(jax.vmap(lambda k, img: augment._color_jitter(k, img, *strengths)))(keys, x)
  ops = (augment.adjust_brightness, augment.adjust_contrast, augment.adjust_saturation)
  lows = np.float32([0.6, 0.6, 0.8, -0.1])
  highs = np.float32([1.4, 1.4, 1.2, 0.1])
  for key, img, out in zip(keys, x, np.asarray(got)):
    k_perm, k_factor = jax.random.split(key)
    factors = jax.random.uniform(k_factor, (4,), minval=lows, maxval=highs)
    want = img
    for op in np.argsort(np.asarray(jax.random.uniform(k_perm, (4,)))):
      want = augment.adjust_hue(want, factors[3]) if op == 3 else ops[op](want, factors[op])
    np.testing.assert_allclose(out, want, atol=2e-6)
