"""EMA teacher update and norms."""

import jax.numpy as jnp
import numpy as np
import pytest

from sslx.schedules import cosine_schedule
from sslx.train.state import ema_update, tree_l2


def test_ema_update_is_the_dino_formula():
  teacher = {"w": jnp.array([1.0, 2.0]), "b": jnp.array([0.0])}
  student = {"w": jnp.array([3.0, 6.0]), "b": jnp.array([1.0])}
  out = ema_update(teacher, student, jnp.float32(0.9))
  np.testing.assert_allclose(out["w"], [1.2, 2.4], rtol=1e-6)
  np.testing.assert_allclose(out["b"], [0.1], rtol=1e-6)


def test_ema_with_momentum_one_freezes_the_teacher():
  teacher = {"w": jnp.array([1.0, 2.0])}
  out = ema_update(teacher, {"w": jnp.array([5.0, 5.0])}, jnp.float32(1.0))
  np.testing.assert_array_equal(out["w"], teacher["w"])


def test_momentum_at_given_steps():
  # Teacher momentum 0.996 -> 1 over 1000 steps, per iteration, as DINO's.
  m = cosine_schedule(0.996, 1.0, 1000)
  assert float(m(0)) == pytest.approx(0.996)
  assert float(m(250)) == pytest.approx(1 - 0.004 * (1 + np.cos(np.pi / 4)) / 2, abs=1e-7)
  assert float(m(999)) == pytest.approx(1.0, abs=1e-6)


def test_tree_l2():
  assert float(tree_l2({"a": jnp.array([3.0]), "b": jnp.array([4.0])})) == pytest.approx(5.0)
