"""iBOT patch loss / centre and MoCo v3 InfoNCE against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx.losses import ibot, mocov3


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_patch_loss_hand_case_with_an_unmasked_image():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(1, 3, 4, 5)).astype(np.float32)  # T=1, B=3, N=4, K=5
  t = rng.normal(size=(1, 3, 4, 5)).astype(np.float32)
  c = rng.normal(size=(5,)).astype(np.float32) * 0.1
  m = np.array([[[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]], bool)  # image 1 has no mask
  got = ibot.ibot_patch_loss(
    jnp.asarray(s),
    jnp.asarray(t),
    jnp.asarray(m),
    jnp.asarray(c),
    student_temp=0.1,
    teacher_temp=0.07,
  )
  p_t = _softmax((t - c) / 0.07)
  log_p_s = np.log(_softmax(s / 0.1))
  ce = -(p_t * log_p_s).sum(-1)[0]  # [B, N]
  per_image = [ce[0, [0, 2]].sum() / 2, 0.0, ce[2].sum() / 4]
  # The unmasked image counts in the batch mean, as in iBOT's release: divide by 3, not 2.
  np.testing.assert_allclose(got, np.mean(per_image), rtol=1e-5)


def test_patch_loss_is_zero_without_masks_and_has_no_teacher_gradient():
  s = jax.random.normal(jax.random.PRNGKey(0), (2, 2, 3, 4))
  t = jax.random.normal(jax.random.PRNGKey(1), (2, 2, 3, 4))
  c = jnp.zeros(4)
  none = jnp.zeros((2, 2, 3), bool)
  assert float(ibot.ibot_patch_loss(s, t, none, c, student_temp=0.1, teacher_temp=0.04)) == 0.0
  some = none.at[0, 0, 1].set(True)
  g_t = jax.grad(
    lambda t: ibot.ibot_patch_loss(s, t, some, c, student_temp=0.1, teacher_temp=0.04)
  )(t)
  assert float(jnp.abs(g_t).max()) == 0.0
  g_s = jax.grad(
    lambda s: ibot.ibot_patch_loss(s, t, some, c, student_temp=0.1, teacher_temp=0.04)
  )(s)
  # Only the masked position of the masked view gets a gradient.
  assert float(jnp.abs(g_s[0, 0, 1]).max()) > 0
  assert float(jnp.abs(g_s.at[0, 0, 1].set(0.0)).max()) == 0.0


def test_patch_center_averages_all_patches():
  t = jnp.arange(2 * 3 * 4 * 2, dtype=jnp.float32).reshape(2, 3, 4, 2)
  new = ibot.update_patch_center(jnp.ones(2), t, momentum=0.9)
  np.testing.assert_allclose(new, 0.9 + 0.1 * np.asarray(t).mean(axis=(0, 1, 2)), rtol=1e-6)


def test_patch_loss_shape_errors_are_clear():
  x = jnp.zeros((1, 2, 3, 4))
  with pytest.raises(ValueError, match="masks must be"):
    ibot.ibot_patch_loss(
      x, x, jnp.zeros((1, 2, 4), bool), jnp.zeros(4), student_temp=0.1, teacher_temp=0.04
    )


def test_infonce_hand_case_and_two_t_scale():
  rng = np.random.default_rng(1)
  q = rng.normal(size=(4, 3)).astype(np.float32)
  k = rng.normal(size=(4, 3)).astype(np.float32)
  qn = q / np.linalg.norm(q, axis=1, keepdims=True)
  kn = k / np.linalg.norm(k, axis=1, keepdims=True)
  logits = qn @ kn.T / 0.2
  want = -np.mean(np.log(np.diag(_softmax(logits)))) * 0.4
  np.testing.assert_allclose(mocov3.infonce(jnp.asarray(q), jnp.asarray(k), 0.2), want, rtol=1e-5)
  # q1 = q, q2 = k, k1 = q, k2 = k: ctr(q1, k2) + ctr(q2, k1) = ctr(q, k) + ctr(k, q).
  total = mocov3.mocov3_loss(jnp.asarray(q), jnp.asarray(k), jnp.asarray(q), jnp.asarray(k), 0.2)
  np.testing.assert_allclose(
    total, want + float(mocov3.infonce(jnp.asarray(k), jnp.asarray(q), 0.2)), rtol=1e-5
  )


def test_infonce_keys_get_no_gradient_and_matching_pairs_lower_the_loss():
  q = jax.random.normal(jax.random.PRNGKey(0), (8, 16))
  k = jax.random.normal(jax.random.PRNGKey(1), (8, 16))
  assert float(jnp.abs(jax.grad(lambda k: mocov3.infonce(q, k, 0.2))(k)).max()) == 0.0
  assert float(mocov3.infonce(q, q, 0.2)) < float(mocov3.infonce(q, k, 0.2))
