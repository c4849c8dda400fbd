"""MoCo v3 contrastive loss (Chen, Xie, He 2021), pure functions.

Official behaviour (facebookresearch/moco-v3 moco/builder.py; docs/fidelity.md, MoCo v3): queries q
and keys k are L2-normalised, logits = q k^T / T against the keys of the *whole global batch* (no
queue), cross-entropy with the matching key as the label, scaled by 2T; the symmetrised loss sums
both directions, ctr(q1, k2) + ctr(q2, k1). Under jit on globally sharded arrays the [B, B] logits
already span the global batch, so the loss does not depend on the device count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sslx.normalize import l2_normalize

Array = jax.Array


def infonce(q: Array, k: Array, temperature: float) -> Array:
  """One direction: mean_i CE(softmax_j(q_i . k_j / T), label i) * 2T.

  Args:
    q: float [B, D] predictor outputs of one view (gradient flows).
    k: float [B, D] momentum-encoder outputs of the other view (gradient stopped here).
    temperature: T (0.2 for ViTs, 1.0 for ResNets in the official recipes).

  Returns:
    float32 scalar.
  """
  if q.ndim != 2 or q.shape != k.shape:
    raise ValueError(f"q and k must both be [B, D], got {q.shape} and {k.shape}")
  qn = l2_normalize(q)
  kn = jax.lax.stop_gradient(l2_normalize(k))
  logits = jnp.einsum("nc,mc->nm", qn, kn, precision=jax.lax.Precision.HIGHEST) / temperature
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.diagonal(log_p)) * (2.0 * temperature)


def mocov3_loss(q1: Array, q2: Array, k1: Array, k2: Array, temperature: float) -> Array:
  """Symmetrised MoCo v3 loss ctr(q1, k2) + ctr(q2, k1) (views 1 and 2 of the same images)."""
  return infonce(q1, k2, temperature) + infonce(q2, k1, temperature)
