"""Fine-tuning's batch regularisers on the device: label smoothing, mixup / cutmix, random erasing.

Pure, jittable JAX functions with timm's semantics, which the BEiT, MAE, CAE and SERE fine-tuning
recipes use (`timm.data.Mixup` in 'batch' mode, `timm.data.RandomErasing` in 'pixel' mode):

* Mixup / cutmix draw ONE lambda per batch from Beta(alpha, alpha); with both enabled, cutmix is
  chosen with probability `switch_prob`, and any mixing at all happens with probability `prob`.
  Each image is mixed with the image at the mirrored batch position (the batch reversed). Cutmix
  pastes a box of side sqrt(1 - lambda) times the image side, centred on a uniform pixel and
  clipped at the borders, and then corrects lambda to the share of pixels that were kept.
* Targets: the one-hot labels smoothed to on = 1 - s + s / K, off = s / K (`optax.smooth_labels`),
  then mixed with the same lambda as the images: label smoothing is folded into the targets.
* Random erasing (before mixing, on normalised images): with probability `prob` per image, a box
  of area U(0.02, 1/3) of the image and aspect ratio log-uniform in (0.3, 1 / 0.3) is filled with
  N(0, 1) noise; up to ten boxes are drawn and the first one that fits is used (none fits: no
  erasing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """int [B] -> float32 [B, K] targets: 1 - smoothing + smoothing / K on the label, smoothing / K
  elsewhere."""
  return optax.smooth_labels(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32), smoothing)


def batch_mix_params(
  rng: jax.Array,
  *,
  mixup_alpha: float,
  cutmix_alpha: float,
  prob: float = 1.0,
  switch_prob: float = 0.5,
) -> tuple[jax.Array, jax.Array]:
  """One batch's (lambda float32 [], use_cutmix bool []); lambda = 1 when no mixing is drawn.

  Args:
    mixup_alpha, cutmix_alpha: Beta parameters; 0 disables that kind (both 0: never mixes).
    prob: probability of mixing this batch at all.
    switch_prob: with both kinds enabled, the probability of cutmix rather than mixup.
  """
  k_u, k_beta = jax.random.split(rng)
  # One draw for both coin flips: every separate random call costs compile time on CPUs.
  u = jax.random.uniform(k_u, (2,))
  one = jnp.ones([], jnp.float32)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return one, jnp.zeros([], bool)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = u[1] < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  # One Beta draw with the chosen kind's alpha (one gamma sampler to compile, not two).
  alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
  lam = jax.random.beta(k_beta, alpha, alpha)
  apply = u[0] < prob
  lam = jnp.where(apply, lam, 1.0).astype(jnp.float32)
  return lam, use_cutmix & apply


def cutmix_box(
  rng: jax.Array, height: int, width: int, lam: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """The pasted box and the corrected lambda.

  Returns:
    (box int32 [4] = (y0, y1, x0, x1), rows y0 <= y < y1 and columns x0 <= x < x1;
    lambda float32 [] = 1 - box area / image area).
  """
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  u = jax.random.uniform(rng, (2,))
  # Uniform integer centre in 0 .. side - 1 (numpy's randint(0, side)).
  cy = jnp.minimum(jnp.floor(u[0] * height).astype(jnp.int32), height - 1)
  cx = jnp.minimum(jnp.floor(u[1] * width).astype(jnp.int32), width - 1)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  kept = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / float(height * width)
  return jnp.stack([y0, y1, x0, x1]), kept


def box_mask(box: jax.Array, height: int, width: int) -> jax.Array:
  """bool [H, W]: True inside box (y0, y1, x0, x1)."""
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  return (rows >= box[0]) & (rows < box[1]) & (cols >= box[2]) & (cols < box[3])


def mix_images_and_targets(
  images: jax.Array,
  targets: jax.Array,
  lam: jax.Array,
  use_cutmix: jax.Array,
  box: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mixes each example with the one at the mirrored batch position.

  Args:
    images: float [B, H, W, C]; targets: float [B, K]; lam: the drawn lambda; use_cutmix: bool;
    box: the cutmix box (y0, y1, x0, x1) (ignored for mixup).
  Returns:
    (images, targets, lambda used for the targets: the corrected one for cutmix).
  """
  h, w = images.shape[1:3]
  other = jnp.flip(images, axis=0)
  inside = box_mask(box, h, w)[None, :, :, None]
  cut = jnp.where(inside, other, images)
  kept = 1.0 - jnp.sum(inside).astype(jnp.float32) / float(h * w)
  blended = lam * images + (1.0 - lam) * other
  out = jnp.where(use_cutmix, cut, blended)
  lam = jnp.where(use_cutmix, kept, lam)
  mixed = lam * targets + (1.0 - lam) * jnp.flip(targets, axis=0)
  return out, mixed, lam


def mixup_cutmix(
  rng: jax.Array,
  images: jax.Array,
  labels: jax.Array,
  num_classes: int,
  *,
  mixup_alpha: float,
  cutmix_alpha: float,
  prob: float = 1.0,
  switch_prob: float = 0.5,
  smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """timm's `Mixup` (batch mode) with label smoothing folded into the targets.

  Args:
    images: float [B, H, W, C] (normalised); labels: int [B].
  Returns:
    (images float [B, H, W, C], soft targets float32 [B, K] (rows sum to 1), lambda []).
  """
  k_params, k_box = jax.random.split(rng)
  lam, use_cutmix = batch_mix_params(
    k_params, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob
  )
  box, _ = cutmix_box(k_box, images.shape[1], images.shape[2], lam)
  targets = smooth_one_hot(labels, num_classes, smoothing)
  return mix_images_and_targets(images, targets, lam, use_cutmix, box)


def random_erasing(
  rng: jax.Array,
  images: jax.Array,
  prob: float,
  *,
  area: tuple[float, float] = (0.02, 1.0 / 3.0),
  aspect: tuple[float, float] = (0.3, 1.0 / 0.3),
  attempts: int = 10,
) -> jax.Array:
  """timm's RandomErasing in 'pixel' mode, one box at most per image, on normalised float images
  [B, H, W, C]."""
  if prob <= 0:
    return images
  b, h, w, c = images.shape
  k_u, k_noise = jax.random.split(rng)
  # One uniform draw for everything but the noise (each random call costs compile time):
  # [area fraction x attempts | log aspect x attempts | top | left | erase?].
  u = jax.random.uniform(k_u, (b, 2 * attempts + 3))
  target = (area[0] + (area[1] - area[0]) * u[:, :attempts]) * (h * w)
  log_lo, log_hi = jnp.log(aspect[0]), jnp.log(aspect[1])
  ratio = jnp.exp(log_lo + (log_hi - log_lo) * u[:, attempts : 2 * attempts])
  eh = jnp.round(jnp.sqrt(target * ratio)).astype(jnp.int32)
  ew = jnp.round(jnp.sqrt(target / ratio)).astype(jnp.int32)
  fits = (eh < h) & (ew < w)
  first = jnp.argmax(fits, axis=1)  # the first attempt that fits (0 if none does)
  eh = jnp.take_along_axis(eh, first[:, None], axis=1)[:, 0]
  ew = jnp.take_along_axis(ew, first[:, None], axis=1)[:, 0]
  # top uniform in 0 .. h - eh inclusive (Python's random.randint), left likewise.
  top = jnp.floor(u[:, -3] * (h - eh + 1)).astype(jnp.int32)
  left = jnp.floor(u[:, -2] * (w - ew + 1)).astype(jnp.int32)
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  inside = (
    (rows >= top[:, None, None])
    & (rows < (top + eh)[:, None, None])
    & (cols >= left[:, None, None])
    & (cols < (left + ew)[:, None, None])
  )
  erase = (u[:, -1] < prob) & jnp.any(fits, axis=1)
  mask = (inside & erase[:, None, None])[..., None]
  noise = jax.random.normal(k_noise, (b, h, w, c), images.dtype)
  return jnp.where(mask, noise, images)
