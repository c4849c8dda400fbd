"""BYOL regression loss and SaGe generation loss against hand computations."""

import jax.numpy as jnp
import numpy as np
import pytest

from sslx.losses import byol, sage


def test_regression_loss_values():
  a = jnp.asarray([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
  b = jnp.asarray([[5.0, 0.0], [0.0, -1.0], [0.0, 1.0]])
  # cos = 1, -1, 0 -> 0, 4, 2; mean 2; scale invariant.
  np.testing.assert_allclose(float(byol.regression_loss(a, b)), 2.0, rtol=1e-6)
  np.testing.assert_allclose(float(byol.regression_loss(7 * a, 0.1 * b)), 2.0, rtol=1e-6)


def test_byol_loss_is_the_sum_of_both_directions():
  rng = np.random.default_rng(0)
  q1, q2, z1, z2 = (jnp.asarray(rng.normal(size=(6, 5)), jnp.float32) for _ in range(4))
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  hand = np.mean(np.sum((unit(np.asarray(q1)) - unit(np.asarray(z2))) ** 2, -1)) + np.mean(
    np.sum((unit(np.asarray(q2)) - unit(np.asarray(z1))) ** 2, -1)
  )
  np.testing.assert_allclose(float(byol.byol_loss(q1, q2, z1, z2)), hand, rtol=1e-5)
  assert 0.0 <= hand <= 8.0


def test_regression_loss_shape_error():
  with pytest.raises(ValueError, match=r"\[B, D\]"):
    byol.regression_loss(jnp.ones((2, 3)), jnp.ones((2, 4)))


def test_generation_loss_weights_and_terms():
  rng = np.random.default_rng(1)
  x, xh = (jnp.asarray(rng.uniform(-1, 1, size=(2, 8, 8, 3)), jnp.float32) for _ in range(2))
  shapes = {"c3": (2, 4, 4, 6), "c4": (2, 2, 2, 8), "c5": (2, 1, 1, 10), "proj": (2, 5)}
  real = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
  fake = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
  total, terms = sage.generation_loss(x, xh, real, fake, sage.DEFAULT_WEIGHTS)
  mse = lambda a, b: np.mean((np.asarray(a) - np.asarray(b)) ** 2)  # noqa: E731
  hand = (
    mse(x, xh) / 10
    + mse(real["proj"], fake["proj"]) / 10
    + sum(mse(real[k], fake[k]) / 30 for k in ("c3", "c4", "c5"))
  )
  np.testing.assert_allclose(float(total), hand, rtol=1e-5)
  assert set(terms) == {"pixel", "c3", "c4", "c5", "proj"}
  np.testing.assert_allclose(float(terms["c4"]), mse(real["c4"], fake["c4"]), rtol=1e-5)


def test_generation_loss_ablations():
  x = jnp.zeros((1, 4, 4, 3))
  xh = jnp.ones((1, 4, 4, 3))
  total, terms = sage.generation_loss(x, xh, {}, {}, {"pixel": 0.1})  # MSE only
  np.testing.assert_allclose(float(total), 0.1)
  assert set(terms) == {"pixel"}
  feats = {"proj": jnp.ones((1, 2))}
  total, terms = sage.generation_loss(
    x, xh, feats, {"proj": jnp.zeros((1, 2))}, {"pixel": 0.0, "proj": 0.5}
  )  # no pixel MSE
  np.testing.assert_allclose(float(total), 0.5)
  assert set(terms) == {"proj"}
  with pytest.raises(ValueError, match="c3"):
    sage.generation_loss(x, xh, feats, feats, {"c3": 1.0})
