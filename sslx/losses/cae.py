"""CAE losses (docs/fidelity.md, CAE): pure functions of arrays.

  loss = reconstruction + align_weight * MSE(latent_pred, stop_grad(latent_target))

* Token targets (official, Atten4Vis/CAE `engine_for_pretraining.py`): cross-entropy of the
  decoder logits against the tokenizer ids of the masked patches, averaged over all B * Nm tokens.
* Pixel targets (PaddlePaddle/VIMER CAE `--target_mode rgb`, default `--normalized_pixel
  layernorm`): each patch flattened in (ph, pw, c) order and normalised by its own mean and
  biased variance, (x - mean) / sqrt(var + 1e-6), as a LayerNorm without affine does (MAE's
  norm_pix_loss and VIMER's `patch` mode use the unbiased variance instead: targets sqrt(n/(n-1))
  larger); MSE averaged over all elements of the masked patches.
* Alignment: MSE averaged over all elements; the weight is 2 in the official scripts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C], row-major patches, (ph, pw, c) inside a patch."""
  b, h, w, c = images.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f"images {h}x{w} do not tile into {p}-px patches.")
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(
  patches: jax.Array, grid: tuple[int, int], patch_size: int, channels: int
) -> jax.Array:
  """Inverse of `patchify`: [B, gh*gw, p*p*C] -> [B, gh*p, gw*p, C]."""
  b = patches.shape[0]
  gh, gw = grid
  p = patch_size
  x = patches.reshape(b, gh, gw, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * p, gw * p, channels)


def normalize_patches(patches: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Per-patch (x - mean) / sqrt(var + eps) over the last axis (biased variance)."""
  patches = patches.astype(jnp.float32)
  mean = jnp.mean(patches, axis=-1, keepdims=True)
  var = jnp.var(patches, axis=-1, keepdims=True)
  return (patches - mean) / jnp.sqrt(var + eps)


def pixel_loss(pred: jax.Array, target_patches: jax.Array, eps: float = 1e-6) -> jax.Array:
  """MSE of predictions [B, Nm, P] against per-patch-normalised target patches [B, Nm, P]."""
  target = jax.lax.stop_gradient(normalize_patches(target_patches, eps))
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target))


def token_loss(logits: jax.Array, ids: jax.Array) -> jax.Array:
  """Mean cross-entropy of logits [B, Nm, V] against int ids [B, Nm]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, ids[..., None].astype(jnp.int32), axis=-1))


def alignment_loss(latent_pred: jax.Array, latent_target: jax.Array) -> jax.Array:
  """Element-mean MSE; the target is stop-gradient (it comes from the current encoder)."""
  target = jax.lax.stop_gradient(latent_target.astype(jnp.float32))
  return jnp.mean(jnp.square(latent_pred.astype(jnp.float32) - target))


def cae_loss(recon: jax.Array, align: jax.Array, align_weight: float = 2.0) -> jax.Array:
  """Total CAE loss: recon + align_weight * align."""
  return recon + align_weight * align
