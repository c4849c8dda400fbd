"""sslx.models.ops: the memory-lean GELU and LayerNorm give autodiff's values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
import pytest

from sslx.models import ops


def test_gelu_matches_jax_exact_gelu_and_its_gradient():
  x = jnp.concatenate([jnp.linspace(-12.0, 12.0, 2001), jnp.asarray([0.0, -40.0, 40.0])])
  np.testing.assert_allclose(ops.gelu(x), jax.nn.gelu(x, approximate=False), rtol=1e-6, atol=1e-7)
  grad = jax.vmap(jax.grad(ops.gelu))(x)
  want = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)
  assert float(grad[-2]) == 0.0 and float(grad[-1]) == 1.0  # saturated ends
  half = ops.gelu(x.astype(jnp.bfloat16))
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(half.astype(jnp.float32), jax.nn.gelu(x, approximate=False),
                             rtol=2e-2, atol=2e-2)


def test_gelu_stores_only_its_input():
  from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=g-import-not-at-top
  x = jnp.ones((4, 8), jnp.bfloat16)
  lean = saved_residuals(lambda v: ops.gelu(v).astype(jnp.float32).sum(), x)
  plain = saved_residuals(lambda v: jax.nn.gelu(v, approximate=False).astype(jnp.float32).sum(), x)
  assert len([r for r in lean if r[0].shape == (4, 8)]) == 1
  assert len([r for r in plain if r[0].shape == (4, 8)]) > 1


@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_layer_norm_matches_flax_values_and_gradients(offset):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(offset, 2.0, (3, 5, 48)), jnp.float32)
  params = {"params": {"scale": jnp.asarray(rng.normal(1.0, 0.3, 48), jnp.float32),
                       "bias": jnp.asarray(rng.normal(0.0, 0.3, 48), jnp.float32)}}
  ours, ref = ops.LayerNorm(epsilon=1e-6), nn.LayerNorm(epsilon=1e-6, use_fast_variance=False)
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
  w = jnp.asarray(rng.normal(size=(3, 5, 48)), jnp.float32)  # a non-trivial upstream gradient
  loss = lambda m: lambda p, v: jnp.sum(m.apply(p, v) * w)
  g_ours = jax.grad(loss(ours), argnums=(0, 1))(params, x)
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_layer_norm_has_flax_parameters_and_stores_no_normalised_copy():
  from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=g-import-not-at-top
  x = jnp.ones((2, 7, 16), jnp.float32)
  ours = ops.LayerNorm().init(jax.random.key(0), x)
  flax_params = nn.LayerNorm().init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, flax_params)
  res = saved_residuals(lambda v: ops.LayerNorm().apply(ours, v).sum(), x)
  assert [r[0].shape for r in res if r[0].shape == (2, 7, 16)] == [(2, 7, 16)]  # x itself only
