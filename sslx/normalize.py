"""The one L2 normalisation every loss, head and evaluation uses."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """``x / max(||x||_2, eps)`` along ``axis``, computed in float32.

  The semantics of PyTorch's ``F.normalize`` (which the official losses call): the norm is
  clamped at ``eps``, so an all-zero vector stays zero instead of becoming NaN.

  Args:
    x: any float array.
    axis: the axis whose vectors get unit length.
    eps: the norm's floor (DINOv2's KoLeo uses 1e-8; everything else torch's default 1e-12).
  Returns:
    float32 array of ``x``'s shape.
  """
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)
