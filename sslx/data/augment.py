"""On-device photometric augmentation (pure JAX, batched, jittable).

The DINO / BYOL recipe on already cropped and flipped views: colour jitter (p = 0.8) -> grayscale
(p = 0.2) -> Gaussian blur -> solarize -> normalise. Every image draws its own decisions and
factors from its own key, so images of a batch are independent.

Choices, so they can be compared with torchvision/PIL:
  * Colour jitter follows torchvision ColorJitter on float images: brightness factor b ~ U(1-B, 1+B)
    scales the image; contrast c blends with the mean of the image's grey level; saturation s blends
    with the per-pixel grey image; hue h ~ U(-H, H) shifts H in HSV. Each step clips to [0, 1].
    The order of the four steps is a random permutation per image, as torchvision draws one per call:
    we draw it as the argsort of 4 uniforms; under vmap a slot computes each step and keeps the
    image's, with the costly hue step computed once (`_color_jitter`).
  * Grey level uses ITU-R 601-2 luma weights (0.299, 0.587, 0.114), as PIL's convert('L').
  * Blur: PIL's GaussianBlur(radius=sigma), sigma ~ U(blur_sigma) per image, which is what the
    official recipes call: three passes of an "extended" box blur per axis whose variance together is
    exactly sigma^2 (Pillow's BoxBlur.c: box radius r = l + a, weight 1 on the 2l + 1 central taps
    and a on the two next ones, over 2r + 1), the border pixel extended, computed as PIL does in
    24-bit fixed point on uint8 grey levels, rounded after every pass. A sampled Gaussian kernel
    would be nearly the identity for sigma < 0.5, where PIL still blurs edges, and the
    Fashion-MNIST presets draw sigma from (0.1, 0.5) (docs/fidelity.md, Crops and augmentation).
  * Solarize inverts values >= 128/255, which matches PIL's ImageOps.solarize(threshold=128) on uint8.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sslx.config_blocks import IMAGENET_MEAN, IMAGENET_STD

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
SOLARIZE_THRESHOLD = 128.0 / 255.0


def to_float(images: jax.Array) -> jax.Array:
  """uint8 [..., 3] -> float32 in [0, 1]; float input is taken to be in [0, 1] already."""
  if jnp.issubdtype(images.dtype, jnp.integer):
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def grayscale(x: jax.Array) -> jax.Array:
  """Luma of float [..., 3] -> [..., 1] (ITU-R 601-2)."""
  return jnp.tensordot(x, jnp.asarray(LUMA_WEIGHTS, x.dtype), axes=([-1], [0]))[..., None]


def adjust_brightness(x: jax.Array, factor: jax.Array) -> jax.Array:
  """One image float [H, W, 3]: x * factor, clipped to [0, 1]."""
  return jnp.clip(x * factor, 0.0, 1.0)


def adjust_contrast(x: jax.Array, factor: jax.Array) -> jax.Array:
  """One image: blend with the image's mean grey level."""
  mean = jnp.mean(grayscale(x))
  return jnp.clip(factor * x + (1.0 - factor) * mean, 0.0, 1.0)


def adjust_saturation(x: jax.Array, factor: jax.Array) -> jax.Array:
  """One image: blend with its per-pixel grey version."""
  return jnp.clip(factor * x + (1.0 - factor) * grayscale(x), 0.0, 1.0)


def rgb_to_hsv(x: jax.Array) -> jax.Array:
  """float [..., 3] RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of a turn)."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  maxc = jnp.max(x, axis=-1)
  minc = jnp.min(x, axis=-1)
  delta = maxc - minc
  safe_delta = jnp.where(delta > 0, delta, 1.0)
  safe_max = jnp.where(maxc > 0, maxc, 1.0)
  s = jnp.where(maxc > 0, delta / safe_max, 0.0)
  rc, gc, bc = ((maxc - c) / safe_delta for c in (r, g, b))
  h = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
  h = jnp.where(delta > 0, jnp.mod(h / 6.0, 1.0), 0.0)
  return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(x: jax.Array) -> jax.Array:
  """float [..., 3] HSV in [0, 1] -> RGB in [0, 1]."""
  h, s, v = x[..., 0], x[..., 1], x[..., 2]
  h6 = jnp.mod(h, 1.0) * 6.0
  sector = jnp.floor(h6)
  f = h6 - sector
  p = v * (1.0 - s)
  q = v * (1.0 - s * f)
  t = v * (1.0 - s * (1.0 - f))
  sector = sector.astype(jnp.int32) % 6

  def pick(*choices: jax.Array) -> jax.Array:  # choices[sector], as selects (a gather is slower)
    out = choices[5]
    for i in range(4, -1, -1):
      out = jnp.where(sector == i, choices[i], out)
    return out

  return jnp.stack(
    [pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)], axis=-1
  )


def adjust_hue(x: jax.Array, shift: jax.Array) -> jax.Array:
  """One image: rotate hue by ``shift`` turns (in [-0.5, 0.5])."""
  hsv = rgb_to_hsv(x)
  hsv = hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + shift, 1.0))
  return jnp.clip(hsv_to_rgb(hsv), 0.0, 1.0)


def _color_jitter(
  key: jax.Array,
  x: jax.Array,
  brightness: float,
  contrast: float,
  saturation: float,
  hue: float,
) -> jax.Array:
  """torchvision's ColorJitter on one image: the enabled steps in a random order, each with its
  own factor.

  Under vmap every image has its own order, so a step slot computes each candidate step and
  keeps the image's. The hue step (an HSV round trip) costs several times the other three
  together, so it is computed once: the cheap steps that come before it in the image's order
  run in the first pass of slots (later slots leave the image as it is), then hue, then the
  cheap steps after it in a second pass. Each image goes through the same steps in the same
  order as with one slot loop over all four.
  """
  # Like torchvision, a strength of 0 drops that step (and spares an HSV round trip for hue=0).
  steps = [
    (op, lo, hi)
    for op, lo, hi, strength in (
      (adjust_brightness, max(0.0, 1.0 - brightness), 1.0 + brightness, brightness),
      (adjust_contrast, max(0.0, 1.0 - contrast), 1.0 + contrast, contrast),
      (adjust_saturation, max(0.0, 1.0 - saturation), 1.0 + saturation, saturation),
      (adjust_hue, -hue, hue, hue),
    )
    if strength > 0
  ]
  if not steps:
    return x
  ops = tuple(op for op, _, _ in steps)
  n = len(ops)
  k_perm, k_factor = jax.random.split(key)
  lows = jnp.asarray([lo for _, lo, _ in steps], jnp.float32)
  highs = jnp.asarray([hi for _, _, hi in steps], jnp.float32)
  factors = jax.random.uniform(k_factor, (n,), minval=lows, maxval=highs)
  # argsort of iid uniforms is a uniform random permutation, and compiles much faster than
  # jax.random.permutation.
  order = jnp.argsort(jax.random.uniform(k_perm, (n,)))
  has_hue = hue > 0
  cheap = ops[:-1] if has_hue else ops
  # The slot of the hue step (n when there is none: every slot is in the first pass).
  hue_slot = jnp.argmax(order == n - 1) if has_hue else n

  def slot(k: jax.Array, img: jax.Array, first: bool) -> jax.Array:
    op = order[k]
    active = k < hue_slot if first else k > hue_slot
    out = img
    for i, f in enumerate(cheap):
      out = jnp.where(active & (op == i), f(img, factors[i]), out)
    return out

  # Loops rather than unrolled slots: the body is compiled once, and each slot's image is
  # materialised (fused into the next slot's candidates it would be recomputed for each).
  x = jax.lax.fori_loop(0, n, lambda k, img: slot(k, img, True), x)
  if has_hue:
    x = ops[-1](x, factors[n - 1])
    x = jax.lax.fori_loop(1, n, lambda k, img: slot(k, img, False), x)
  return x


BLUR_PASSES = 3  # Pillow's ImageFilter.GaussianBlur


def pil_box_radius(sigma: Any, passes: int = BLUR_PASSES) -> tuple[Any, Any]:
  """(l, a): integer part and fractional extension of the box radius of each of ``passes`` box
  blurs that together have variance sigma^2, as Pillow's _gaussian_blur_radius computes them.

  Works on Python floats and on jax arrays.
  """
  xp = jnp if isinstance(sigma, jax.Array) else math
  s2 = sigma * sigma / passes
  length = xp.sqrt(12.0 * s2 + 1.0)
  l = xp.floor((length - 1.0) / 2.0)
  a = (2 * l + 1) * (l * (l + 1) - 3 * s2) / (6 * (s2 - (l + 1) * (l + 1)))
  return l, a


def blur_reach(sigma_max: float) -> int:
  """Taps each side of one box pass for any sigma <= sigma_max (l + 1)."""
  return int(pil_box_radius(float(sigma_max))[0]) + 1


def _box_weights(sigma: jax.Array, reach: int) -> jax.Array:
  """One extended box pass on taps -reach..reach in PIL's 24-bit fixed point: uint32 weights
  floor(2^24 / (2r + 1)) inside l and half the remainder at l + 1 (they sum to about 2^24)."""
  l, a = pil_box_radius(sigma)
  inner = jnp.floor(float(1 << 24) / (2 * (l + a) + 1))
  edge = jnp.floor((float(1 << 24) - (2 * l + 1) * inner) / 2)
  dist = jnp.abs(jnp.arange(-reach, reach + 1, dtype=jnp.float32))
  return jnp.where(dist <= l, inner, jnp.where(dist == l + 1, edge, 0.0)).astype(jnp.uint32)


def _gaussian_blur(x: jax.Array, sigma: jax.Array, reach: int) -> jax.Array:
  """One image float [H, W, C] in [0, 1]: PIL's GaussianBlur(sigma) (the same grey levels except
  where the float32 box radius differs from C's in its last bits; at most one level on a few
  percent of the values at some sigmas; tests/data/test_augment.py).

  BLUR_PASSES box passes along rows, then as many along columns, each on uint8 grey levels in
  PIL's integer arithmetic (uint32 sums of weight x level, then (sum + 2^23) >> 24). The rounding
  after every pass is part of what PIL does: at small sigma it leaves smooth regions unchanged.
  """
  weights = _box_weights(sigma, reach)
  taps = range(2 * reach + 1)
  h, w = x.shape[:2]
  half, shift = jnp.uint32(1 << 23), jnp.uint32(24)
  levels = jnp.floor(jnp.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(jnp.uint32)
  for axis, size in ((1, w), (0, h)):  # along rows first, as PIL
    for _ in range(BLUR_PASSES):
      pad = [(0, 0)] * 3
      pad[axis] = (reach, reach)
      padded = jnp.pad(levels, pad, mode='edge')
      acc = sum(weights[i] * jax.lax.slice_in_dim(padded, i, i + size, axis=axis) for i in taps)
      levels = (acc + half) >> shift
  return levels.astype(jnp.float32) / 255.0


def _is_zero(p: Any) -> bool:
  return isinstance(p, (int, float)) and p <= 0


def photometric(
  rng: jax.Array,
  images: jax.Array,
  *,
  blur_prob: float | jax.Array,
  solarize_prob: float | jax.Array,
  color_jitter_prob: float = 0.8,
  brightness: float = 0.4,
  contrast: float = 0.4,
  saturation: float = 0.2,
  hue: float = 0.1,
  grayscale_prob: float = 0.2,
  blur_sigma: Sequence[float] = (0.1, 2.0),
) -> jax.Array:
  """Random colour jitter, grayscale, Gaussian blur and solarize, independently per image.

  Args:
    rng: a PRNG key.
    images: uint8 [N, H, W, 3] (or float in [0, 1]).
    blur_prob, solarize_prob: probability per image, a scalar or an array [N] (one per image).
    color_jitter_prob, grayscale_prob: scalar probabilities. Any Python 0 skips that computation.
    brightness, contrast, saturation, hue: jitter strengths (torchvision ColorJitter arguments);
      Python floats; 0 leaves that step out.
    blur_sigma: (min, max) of the blur's sigma in pixels (PIL's radius); Python floats (the
      largest fixes the kernel's reach).
  Returns:
    float32 [N, H, W, 3] in [0, 1].
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'photometric expects images [N, H, W, 3], got shape {images.shape}.')
  sigma_lo, sigma_hi = float(blur_sigma[0]), float(blur_sigma[1])
  if not 0 < sigma_lo <= sigma_hi:
    raise ValueError(f'blur_sigma must satisfy 0 < min <= max, got {blur_sigma}.')
  reach = blur_reach(sigma_hi)
  x = to_float(images)
  if images.shape[0] == 0:
    return x

  n = images.shape[0]
  blur_p = (
    blur_prob
    if _is_zero(blur_prob)
    else jnp.broadcast_to(jnp.asarray(blur_prob, jnp.float32), (n,))
  )
  solarize_p = (
    solarize_prob
    if _is_zero(solarize_prob)
    else jnp.broadcast_to(jnp.asarray(solarize_prob, jnp.float32), (n,))
  )

  def one(key: jax.Array, img: jax.Array, blur_prob: Any, solarize_prob: Any) -> jax.Array:
    keys = jax.random.split(key, 7)
    if not _is_zero(color_jitter_prob):
      jittered = _color_jitter(keys[0], img, brightness, contrast, saturation, hue)
      img = jnp.where(jax.random.bernoulli(keys[1], color_jitter_prob), jittered, img)
    if not _is_zero(grayscale_prob):
      grey = jnp.broadcast_to(grayscale(img), img.shape)
      img = jnp.where(jax.random.bernoulli(keys[2], grayscale_prob), grey, img)
    if not _is_zero(blur_prob):
      sigma = jax.random.uniform(keys[3], (), minval=sigma_lo, maxval=sigma_hi)
      img = jnp.where(
        jax.random.bernoulli(keys[4], blur_prob), _gaussian_blur(img, sigma, reach), img
      )
    if not _is_zero(solarize_prob):
      solarized = jnp.where(img >= SOLARIZE_THRESHOLD, 1.0 - img, img)
      img = jnp.where(jax.random.bernoulli(keys[5], solarize_prob), solarized, img)
    return img

  axes = (0, 0, None if _is_zero(blur_p) else 0, None if _is_zero(solarize_p) else 0)
  return jax.vmap(one, in_axes=axes)(jax.random.split(rng, n), x, blur_p, solarize_p)


def normalize(
  x: jax.Array, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> jax.Array:
  """(x - mean) / std over the last (channel) axis, float32."""
  return (x.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _get(cfg: Any, key: str, default: Any) -> Any:
  if cfg is None:
    return default
  if hasattr(cfg, 'get'):
    value = cfg.get(key, default)
    return default if value is None else value
  return getattr(cfg, key, default)


def augment_multicrop(
  rng: jax.Array, global_crops: jax.Array, local_crops: jax.Array, cfg: Any = None
) -> tuple[jax.Array, jax.Array]:
  """DINO per-view photometric augmentation and normalisation of a multi-crop batch.

  Global view 0 uses (blur_probs[0], solarize_probs[0]), every further global view uses index 1,
  local views index 2. Defaults (cfg None or a key missing) are DINO's: blur (1.0, 0.1, 0.5),
  solarize (0, 0.2, 0), jitter 0.8 of (0.4, 0.4, 0.2, 0.1), grayscale 0.2, sigma (0.1, 2.0),
  ImageNet mean/std.

  Args:
    rng: a PRNG key.
    global_crops: uint8 [B, Ng, G, G, 3].
    local_crops: uint8 [B, Nl, L, L, 3] (Nl may be 0).
    cfg: ``config.augment`` (ConfigDict or mapping) with keys color_jitter_prob, brightness, contrast,
      saturation, hue, grayscale_prob, blur_probs, solarize_probs, blur_sigma, mean, std.
  Returns:
    (globals float32 [B, Ng, G, G, 3], locals float32 [B, Nl, L, L, 3]), normalised.
  """
  for name, crops in (('global_crops', global_crops), ('local_crops', local_crops)):
    if crops.ndim != 5 or crops.shape[-1] != 3:
      raise ValueError(f'{name} must be [B, N, S, S, 3], got shape {crops.shape}.')
  common = dict(
    color_jitter_prob=_get(cfg, 'color_jitter_prob', 0.8),
    brightness=float(_get(cfg, 'brightness', 0.4)),
    contrast=float(_get(cfg, 'contrast', 0.4)),
    saturation=float(_get(cfg, 'saturation', 0.2)),
    hue=float(_get(cfg, 'hue', 0.1)),
    grayscale_prob=_get(cfg, 'grayscale_prob', 0.2),
    blur_sigma=tuple(_get(cfg, 'blur_sigma', (0.1, 2.0))),
  )
  blur_probs = tuple(_get(cfg, 'blur_probs', (1.0, 0.1, 0.5)))
  solarize_probs = tuple(_get(cfg, 'solarize_probs', (0.0, 0.2, 0.0)))
  if len(blur_probs) != 3 or len(solarize_probs) != 3:
    raise ValueError(
      'config.augment.blur_probs and solarize_probs need 3 entries '
      '(global view 1, global view 2, local views).'
    )
  mean = tuple(_get(cfg, 'mean', IMAGENET_MEAN))
  std = tuple(_get(cfg, 'std', IMAGENET_STD))

  b, ng = global_crops.shape[:2]
  k_global, k_local = jax.random.split(rng)
  # All global views in one call (view-major), with per-image probabilities: one compiled copy.
  view_row = jnp.minimum(jnp.arange(ng), 1)
  per_view = lambda probs: jnp.repeat(jnp.asarray(probs[:2], jnp.float32)[view_row], b)
  flat = jnp.swapaxes(global_crops, 0, 1).reshape((ng * b,) + global_crops.shape[2:])
  globals_flat = photometric(
    k_global, flat, blur_prob=per_view(blur_probs), solarize_prob=per_view(solarize_probs), **common
  )
  globals_out = jnp.swapaxes(
    normalize(globals_flat, mean, std).reshape((ng, b) + global_crops.shape[2:]), 0, 1
  )

  b, nl = local_crops.shape[:2]
  flat = local_crops.reshape((b * nl,) + local_crops.shape[2:])
  locals_flat = photometric(
    k_local, flat, blur_prob=blur_probs[2], solarize_prob=solarize_probs[2], **common
  )
  locals_out = normalize(locals_flat, mean, std).reshape(local_crops.shape)
  return globals_out, locals_out
