"""KoLeo: the Kozachenko-Leonenko differential-entropy regulariser (Sablayrolles et al., 2019),
as DINOv2 applies it to the student's [CLS] features."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sslx.normalize import l2_normalize


def koleo_loss(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  """-mean_i log(||x_i - x_nn(i)|| + eps) over the L2-normalised rows of x [B, D].

  As DINOv2's `KoLeoLoss`: rows normalised with norm floor `eps`; each row's nearest neighbour is
  the other row of largest inner product (itself excluded); the distance is torch's
  `PairwiseDistance(p=2, eps)`, i.e. ||x_i - x_nn + eps||, in float32. The neighbour choice is not
  differentiated (an argmax), the distance is. B must be >= 2.
  """
  x = l2_normalize(x, eps=eps)
  dots = x @ x.T
  n = x.shape[0]
  dots = jnp.where(jnp.eye(n, dtype=bool), -1.0, dots)
  nearest = jnp.argmax(jax.lax.stop_gradient(dots), axis=1)
  distances = jnp.linalg.norm(x - x[nearest] + eps, axis=-1)
  return -jnp.mean(jnp.log(distances + eps))
