"""BYOL's regression loss (pure functions, float32).

Per pair: 2 - 2 cos(q, z) = || q/|q| - z/|z| ||^2, averaged over the batch; BYOL
symmetrises by swapping the views and *sums* the two directions, so the total lies in
[0, 8] (deepmind-research/byol `regression_loss`; OpenSelfSup LatentPredictHead with
size_average=True, as SaGe uses it; docs/fidelity.md, BYOL). Under jit on
globally sharded arrays the batch mean is the global-batch mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sslx.normalize import l2_normalize

Array = jax.Array


def regression_loss(prediction: Array, target: Array) -> Array:
  """mean over the batch of 2 - 2 cos(prediction, target); [B, D], [B, D] -> scalar.

  No gradient is stopped here: the caller passes an already stop-gradient target.
  """
  if prediction.shape != target.shape or prediction.ndim != 2:
    raise ValueError(
      f"prediction and target must both be [B, D], got {prediction.shape} and {target.shape}"
    )
  cos = jnp.sum(l2_normalize(prediction) * l2_normalize(target), axis=-1)
  return jnp.mean(2.0 - 2.0 * cos)


def byol_loss(pred1: Array, pred2: Array, target1: Array, target2: Array) -> Array:
  """Symmetric BYOL loss: l(q1, z2) + l(q2, z1), with q_i the online prediction of view i
  and z_i the target projection of view i. All [B, D]; returns a scalar in [0, 8]."""
  return regression_loss(pred1, target2) + regression_loss(pred2, target1)
