"""CAE losses: patch order, per-patch normalisation, a hand-checked total, stop-gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx.losses import cae as L


def test_patchify_order_and_round_trip():
  x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
  p = L.patchify(x, 2)
  assert p.shape == (2, 6, 12)
  # Patch 1 is row 0, column 1 (row-major); inside it (ph, pw, c) order.
  np.testing.assert_array_equal(p[0, 1], np.asarray(x[0, 0:2, 2:4, :]).reshape(-1))
  np.testing.assert_array_equal(L.unpatchify(p, (2, 3), 2, 3), x)
  with pytest.raises(ValueError, match="do not tile"):
    L.patchify(x, 4)


def test_hand_checked_total_loss():
  # Target patch [1, 3]: mean 2, var 1 -> normalised [-1, 1] / sqrt(1 + 1e-6).
  pred = jnp.asarray([[[0.0, 0.0]]])
  target = jnp.asarray([[[1.0, 3.0]]])
  recon = L.pixel_loss(pred, target)
  assert float(recon) == pytest.approx(1.0 / (1.0 + 1e-6), rel=1e-6)
  align = L.alignment_loss(jnp.asarray([[[1.0, 2.0]]]), jnp.zeros((1, 1, 2)))
  assert float(align) == pytest.approx(2.5)  # (1 + 4) / 2
  assert float(L.cae_loss(recon, align, 2.0)) == pytest.approx(1.0 + 5.0, rel=1e-6)


def test_token_loss_is_the_mean_cross_entropy():
  logits = jnp.log(jnp.asarray([[[1.0, 3.0], [2.0, 2.0]]]))  # softmax [.25, .75], [.5, .5]
  ids = jnp.asarray([[1, 0]])
  assert float(L.token_loss(logits, ids)) == pytest.approx(
    -(np.log(0.75) + np.log(0.5)) / 2, rel=1e-6
  )


def test_targets_receive_no_gradient():
  pred = jnp.asarray([[[0.3, -0.2, 0.5]]])
  target = jnp.asarray([[[1.0, 2.0, 4.0]]])
  g_pred, g_target = jax.grad(
    lambda p, t: L.alignment_loss(p, t) + L.pixel_loss(p, t), argnums=(0, 1)
  )(pred, target)
  assert np.all(np.asarray(g_target) == 0.0)
  assert np.any(np.asarray(g_pred) != 0.0)
