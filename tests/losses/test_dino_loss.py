"""Tests for sslx.losses.dino against an independent numpy computation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx.losses.dino import dino_loss, teacher_diagnostics, update_center

T, S, B, K = 2, 4, 3, 5
TAU_S, TAU_T = 0.1, 0.04


def _case(seed=0):
  rng = np.random.default_rng(seed)
  student = rng.normal(size=(S, B, K)).astype(np.float32)
  teacher = rng.normal(size=(T, B, K)).astype(np.float32)
  center = rng.normal(size=(K,)).astype(np.float32) * 0.1
  return student, teacher, center


def _np_loss(student, teacher, center, tau_s, tau_t, skip_same_view=True):
  """Loop over (teacher view, student view, sample) with explicit softmaxes in float64."""
  total, pairs = 0.0, 0
  for q in range(teacher.shape[0]):
    for v in range(student.shape[0]):
      if skip_same_view and v == q:
        continue
      per_sample = []
      for b in range(student.shape[1]):
        t = (teacher[q, b].astype(np.float64) - center) / tau_t
        p_t = np.exp(t - t.max())
        p_t /= p_t.sum()
        s = student[v, b].astype(np.float64) / tau_s
        log_p_s = s - (s.max() + np.log(np.exp(s - s.max()).sum()))
        per_sample.append(-(p_t * log_p_s).sum())
      total += np.mean(per_sample)
      pairs += 1
  return total / pairs, pairs


def test_loss_matches_numpy_reference():
  student, teacher, center = _case()
  got = dino_loss(
    jnp.asarray(student),
    jnp.asarray(teacher),
    jnp.asarray(center),
    student_temp=TAU_S,
    teacher_temp=TAU_T,
  )
  ref, pairs = _np_loss(student, teacher, center, TAU_S, TAU_T)
  assert pairs == T * S - T == 6
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)
  with_same, _ = _np_loss(student, teacher, center, TAU_S, TAU_T, skip_same_view=False)
  assert abs(with_same - ref) > 1e-3  # the check above can tell the two pairings apart


def test_excluded_pairs_are_exactly_same_view():
  student, teacher, center = _case(1)
  grad = jax.grad(
    lambda s: dino_loss(
      s, jnp.asarray(teacher), jnp.asarray(center), student_temp=TAU_S, teacher_temp=TAU_T
    )
  )(jnp.asarray(student))
  # d/ds_v = (n_partners * p_s - sum of partner p_t) / (tau_s * B * pairs), partners = teacher views q != v:
  # global student view 0 meets only teacher view 1 (and vice versa); each local view meets both.
  for v in range(S):
    partners = [q for q in range(T) if q != v]
    p_t = np.asarray(jax.nn.softmax((teacher[partners] - center) / TAU_T, axis=-1)).sum(0)
    p_s = np.asarray(jax.nn.softmax(student[v] / TAU_S, axis=-1))
    expected = (len(partners) * p_s - p_t) / (TAU_S * B * (T * S - T))
    np.testing.assert_allclose(grad[v], expected, rtol=1e-4, atol=1e-6)


def test_no_gradient_to_teacher_or_center():
  student, teacher, center = _case(2)
  g_t, g_c = jax.grad(
    lambda t, c: dino_loss(jnp.asarray(student), t, c, student_temp=TAU_S, teacher_temp=TAU_T),
    argnums=(0, 1),
  )(jnp.asarray(teacher), jnp.asarray(center))
  np.testing.assert_array_equal(g_t, 0.0)
  np.testing.assert_array_equal(g_c, 0.0)


def test_traced_teacher_temperature_and_bf16_inputs():
  student, teacher, center = _case(3)
  jitted = jax.jit(lambda s, t, c, tt: dino_loss(s, t, c, student_temp=TAU_S, teacher_temp=tt))
  got = jitted(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(center), jnp.float32(0.07))
  ref, _ = _np_loss(student, teacher, center, TAU_S, 0.07)
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)
  low = dino_loss(
    jnp.asarray(student, jnp.bfloat16),
    jnp.asarray(teacher, jnp.bfloat16),
    jnp.asarray(center),
    student_temp=TAU_S,
    teacher_temp=0.07,
  )
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(float(low), ref, rtol=0.05)


def test_shape_errors():
  student, teacher, center = _case()
  with pytest.raises(ValueError, match="first T"):
    dino_loss(
      jnp.asarray(student[:1]),
      jnp.asarray(teacher),
      jnp.asarray(center),
      student_temp=0.1,
      teacher_temp=0.04,
    )
  with pytest.raises(ValueError, match=r"\[K\]"):
    dino_loss(
      jnp.asarray(student),
      jnp.asarray(teacher),
      jnp.zeros((1, K)),
      student_temp=0.1,
      teacher_temp=0.04,
    )
  with pytest.raises(ValueError, match=r"\[T, B, K\]"):
    update_center(jnp.asarray(center), jnp.asarray(teacher[0]))


def test_update_center_hand_numbers():
  center = jnp.array([1.0, 0.0])
  teacher = jnp.array([[[2.0, 4.0], [0.0, 2.0]], [[4.0, 8.0], [2.0, 2.0]]])  # T=2, B=2: mean [2, 4]
  np.testing.assert_allclose(
    update_center(center, teacher), [0.9 * 1 + 0.1 * 2, 0.1 * 4], atol=1e-6
  )
  np.testing.assert_allclose(update_center(center, teacher, momentum=0.5), [1.5, 2.0], atol=1e-6)
  grad = jax.grad(lambda t: update_center(center, t).sum())(teacher)
  np.testing.assert_array_equal(grad, 0.0)


def test_diagnostics_uniform_teacher():
  k = 7
  d = teacher_diagnostics(jnp.full((2, 4, k), 3.0), jnp.zeros(k), 0.04)
  np.testing.assert_allclose(d["teacher_entropy"], math.log(k), rtol=1e-6)
  np.testing.assert_allclose(d["teacher_kl_uniform"], 0.0, atol=1e-6)
  np.testing.assert_allclose(d["teacher_batch_entropy"], math.log(k), rtol=1e-6)
  assert float(d["center_norm"]) == 0.0


def test_diagnostics_collapse_signals_and_hand_values():
  k = 4
  # Every sample sharply picks prototype 2: per-sample and batch entropy both near 0.
  logits = jnp.zeros((2, 3, k)).at[..., 2].set(10.0)
  d = teacher_diagnostics(logits, jnp.array([3.0, 4.0, 0.0, 0.0]), 0.04)
  assert float(d["teacher_entropy"]) < 1e-3 and float(d["teacher_batch_entropy"]) < 1e-3
  np.testing.assert_allclose(d["teacher_kl_uniform"], math.log(k), atol=1e-3)
  np.testing.assert_allclose(d["center_norm"], 5.0, rtol=1e-6)
  # Each sample one-hot on a different prototype: entropy 0 but batch entropy log 4 (not collapsed).
  spread = jnp.tile(10.0 * jnp.eye(k)[None], (1, 1, 1))  # T=1, B=4
  d = teacher_diagnostics(spread, jnp.zeros(k), 0.01)
  assert float(d["teacher_entropy"]) < 1e-3
  np.testing.assert_allclose(d["teacher_batch_entropy"], math.log(k), rtol=1e-4)
  # Independent numpy check on random logits.
  rng = np.random.default_rng(0)
  t, c = rng.normal(size=(2, 3, k)), rng.normal(size=k)
  p = np.exp((t - c) / 0.5)
  p /= p.sum(-1, keepdims=True)
  d = teacher_diagnostics(jnp.asarray(t, jnp.float32), jnp.asarray(c, jnp.float32), 0.5)
  np.testing.assert_allclose(d["teacher_entropy"], np.mean(-(p * np.log(p)).sum(-1)), rtol=1e-5)
  m = p.mean((0, 1))
  np.testing.assert_allclose(d["teacher_batch_entropy"], -(m * np.log(m)).sum(), rtol=1e-5)
