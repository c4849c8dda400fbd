"""SaGe's generation loss (pure functions, float32).

For one view x (normalised to [-1, 1]) and its reconstruction x_hat, with E the frozen
evaluator's outputs ('c3', 'c4', 'c5' stage maps and 'proj', the projector output):

  L_G = w_pixel * MSE(x, x_hat) + sum_l w_l * MSE(E_l(x), E_l(x_hat))

MSE is the plain mean over every element (no L2 normalisation, no per-level scaling
beyond the weights), as `sunsmarterjie/SaGe:SaGe.py:117-142` computes it; the released
weights are pixel 1/10, proj 1/10, c5 c4 c3 1/30 each (docs/fidelity.md, SaGe), and the
method sums L_G over both views. c2 is not used.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

Array = jax.Array

LEVELS = ("c3", "c4", "c5", "proj")
DEFAULT_WEIGHTS = {"pixel": 0.1, "proj": 0.1, "c5": 1 / 30, "c4": 1 / 30, "c3": 1 / 30}


def mse(a: Array, b: Array) -> Array:
  """Mean over all elements of (a - b)^2 in float32; shapes must match."""
  if a.shape != b.shape:
    raise ValueError(f"MSE of arrays with different shapes {a.shape} and {b.shape}")
  return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))


def generation_loss(
  image: Array,
  recon: Array,
  real_feats: Mapping[str, Array],
  recon_feats: Mapping[str, Array],
  weights: Mapping[str, float],
) -> tuple[Array, dict[str, Array]]:
  """SaGe's L_G for one view.

  Args:
    image: the normalised view [B, H, W, 3] (the reconstruction target; no gradient needed).
    recon: the decoder's output [B, H, W, 3] in [-1, 1].
    real_feats, recon_feats: evaluator outputs of image and recon by level name; levels whose
      weight is 0 (or missing from `weights`) may be absent. real_feats should carry no gradient.
    weights: 'pixel' and per-level weights.

  Returns:
    (weighted sum, {'pixel': ..., level: ...} unweighted terms that were computed).
  """
  terms = {}
  total = jnp.zeros([], jnp.float32)
  if weights.get("pixel", 0.0):
    terms["pixel"] = mse(image, recon)
    total = total + weights["pixel"] * terms["pixel"]
  for level in LEVELS:
    if weights.get(level, 0.0):
      if level not in real_feats or level not in recon_feats:
        raise ValueError(
          f"weight for evaluator level {level!r} is non-zero but the features lack it"
        )
      terms[level] = mse(real_feats[level], recon_feats[level])
      total = total + weights[level] * terms[level]
  return total, terms
