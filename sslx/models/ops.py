"""Elementwise ops whose gradients keep less in memory than autodiff's default.

On an accelerator the transformer's elementwise work is memory-bound (experiments/bench/RESULTS.md:
55% of an H100 DINO step), so what the forward pass stores for the backward pass costs time as
well as memory.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

Array = jax.Array

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@jax.custom_vjp
def gelu(x: Array) -> Array:
    """Exact (erf) GELU, torch ``nn.GELU()``'s default: x * Phi(x), computed in float32.

    Autodiff of ``jax.nn.gelu(approximate=False)`` stores four activation-sized tensors per call
    (its erfc, exp, product and a copy); this stores only ``x`` and recomputes the derivative
    Phi(x) + x * phi(x) in the backward pass.

    Args:
      x: any float array.
    Returns:
      Same shape and dtype as ``x``.
    """
    return _gelu(x)


def _gelu(x: Array) -> Array:
    # erfc(-z) rather than 1 + erf(z): no cancellation for very negative x (jax.nn.gelu's form).
    return 0.5 * x * jax.lax.erfc(-x * _INV_SQRT2).astype(x.dtype)


def _gelu_fwd(x: Array) -> tuple[Array, Array]:
    return _gelu(x), x


def _gelu_bwd(x: Array, g: Array) -> tuple[Array]:
    cdf = 0.5 * jax.lax.erfc(-x * _INV_SQRT2)
    pdf = jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return ((g * (cdf + x * pdf)).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
    """LayerNorm over the last axis in float32: (x - mean) / sqrt(var + eps) * scale + bias.

    The variance is the two-pass one (torch's). Autodiff of a LayerNorm stores about three
    float32 activation-sized tensors ((x - mean), its normalised form and the scaled product);
    this stores ``x`` and two numbers per row (mean and 1/std) and recomputes the rest.

    Args:
      x: float [..., D]; scale, bias: float32 [D]; eps: added to the variance.
    Returns:
      float32 [..., D].
    """
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_stats(x32: Array, eps: float) -> tuple[Array, Array]:
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return mean, jax.lax.rsqrt(var + eps)


def _layer_norm_fwd(x: Array, scale: Array, bias: Array, eps: float):
    x32 = x.astype(jnp.float32)
    mean, rstd = _layer_norm_stats(x32, eps)
    out = (x32 - mean) * rstd * scale + bias
    return out, (x, mean, rstd, scale)


def _layer_norm_bwd(eps: float, res, g: Array):
    del eps
    x, mean, rstd, scale = res
    xhat = (x.astype(jnp.float32) - mean) * rstd
    g = g.astype(jnp.float32)
    batch_axes = tuple(range(g.ndim - 1))
    d_scale = jnp.sum(g * xhat, axis=batch_axes)
    d_bias = jnp.sum(g, axis=batch_axes)
    gx = g * scale
    dx = rstd * (gx - jnp.mean(gx, axis=-1, keepdims=True)
                 - xhat * jnp.mean(gx * xhat, axis=-1, keepdims=True))
    return dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(scale.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
    """``layer_norm`` with flax.linen.LayerNorm's parameters ('scale' ones, 'bias' zeros, float32
    [D]), so checkpoints and parameter trees are the same as with ``nn.LayerNorm``."""

    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: float [..., D]. Returns float32 [..., D]."""
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
        return layer_norm(x, scale, bias, self.epsilon)
