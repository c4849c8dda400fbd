"""DINO self-distillation loss, centre update and collapse diagnostics (pure functions).

Layout: logits are stacked per view, ``[views, B, K]``. The teacher sees the first T views (the global crops),
which are also the first T student views; the student sees all S >= T views (globals then locals).
Everything is computed in float32. Under jit on globally sharded arrays, means over B are global-batch means.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _check_logits(student_logits: Array | None, teacher_logits: Array, center: Array) -> None:
  if teacher_logits.ndim != 3:
    raise ValueError(
      f"teacher_logits must be [T, B, K] (views stacked first), got {teacher_logits.shape}; "
      "stack per-view logits with jnp.stack(..., axis=0)."
    )
  k = teacher_logits.shape[-1]
  if center.shape != (k,):
    raise ValueError(
      f"center must have shape [K] = [{k}], got {center.shape}; keep it as a flat vector "
      "initialised with jnp.zeros(K)."
    )
  if student_logits is None:
    return
  if student_logits.ndim != 3:
    raise ValueError(
      f"student_logits must be [S, B, K] (views stacked first), got {student_logits.shape}."
    )
  s, b, ks = student_logits.shape
  t, bt, _ = teacher_logits.shape
  if ks != k or b != bt:
    raise ValueError(
      f"student [S, B, K] = {student_logits.shape} and teacher [T, B, K] = "
      f"{teacher_logits.shape} must share B and K."
    )
  if t > s:
    raise ValueError(
      f"The teacher views must be the first T of the student views, but T={t} > S={s}; "
      "feed all crops (globals first) to the student."
    )


def _teacher_probs(teacher_logits: Array, center: Array, teacher_temp: Array | float) -> Array:
  """Centred, sharpened teacher distribution softmax((t - c) / tau_t), float32 [T, B, K]."""
  t = teacher_logits.astype(jnp.float32) - center.astype(jnp.float32)
  return jax.nn.softmax(t / jnp.asarray(teacher_temp, jnp.float32), axis=-1)


def dino_loss(
  student_logits: Array,
  teacher_logits: Array,
  center: Array,
  *,
  student_temp: float,
  teacher_temp: Array | float,
) -> Array:
  """Cross-view cross-entropy between the centred/sharpened teacher and the student.

  L = mean over pairs (q < T, v < S, v != q) of mean_b -sum_k p_t[q, b, k] log p_s[v, b, k], with
  p_t = softmax((t - center) / teacher_temp) (no gradient) and log p_s = log_softmax(s / student_temp).
  There are T * S - T pairs.

  Args:
    student_logits: float [S, B, K], all views (the first T are the teacher's views).
    teacher_logits: float [T, B, K], raw teacher head outputs (not centred).
    center: float [K] running centre.
    student_temp: student temperature (0.1 in DINO).
    teacher_temp: teacher temperature; a Python float or a traced scalar (schedules).

  Returns:
    float32 scalar loss.
  """
  _check_logits(student_logits, teacher_logits, center)
  s_views, t_views = student_logits.shape[0], teacher_logits.shape[0]
  batch = student_logits.shape[1]
  p_t = jax.lax.stop_gradient(_teacher_probs(teacher_logits, center, teacher_temp))
  log_p_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
  # ce[q, v] = batch mean of the cross-entropy between teacher view q and student view v.
  ce = -jnp.einsum("qbk,vbk->qv", p_t, log_p_s, precision=jax.lax.Precision.HIGHEST) / batch
  same_view = jnp.eye(t_views, s_views, dtype=bool)
  return jnp.sum(jnp.where(same_view, 0.0, ce)) / (t_views * s_views - t_views)


def update_center(center: Array, teacher_logits: Array, momentum: float = 0.9) -> Array:
  """EMA of the batch-mean teacher logits: ``momentum * c + (1 - momentum) * mean_{T,B}(t)``.

  Call after computing the loss of the same step. No gradient flows into the result.

  Args:
    center: float [K].
    teacher_logits: float [T, B, K] raw teacher outputs.
    momentum: centre momentum (0.9 in DINO).

  Returns:
    float32 [K] new centre.
  """
  _check_logits(None, teacher_logits, center)
  batch_mean = jnp.mean(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=(0, 1))
  return momentum * center.astype(jnp.float32) + (1.0 - momentum) * batch_mean


def teacher_diagnostics(
  teacher_logits: Array, center: Array, teacher_temp: Array | float
) -> dict[str, Array]:
  """Collapse diagnostics of the teacher distribution p_t = softmax((t - center) / teacher_temp).

  Args:
    teacher_logits: float [T, B, K].
    center: float [K].
    teacher_temp: teacher temperature (float or traced scalar).

  Returns:
    dict of float32 scalars (entropies in nats):
      'teacher_entropy': mean over T, B of H(p_t) (-> 0 when sharpened to one-hot, collapse by sharpening),
      'teacher_kl_uniform': log K - teacher_entropy = mean KL(p_t || uniform),
      'teacher_batch_entropy': H(mean over T, B of p_t) (-> 0 when every sample picks the same
        prototype, collapse to one dimension),
      'center_norm': ||center||_2.
  """
  _check_logits(None, teacher_logits, center)
  k = teacher_logits.shape[-1]
  t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) - center.astype(jnp.float32)
  log_p = jax.nn.log_softmax(t / jnp.asarray(teacher_temp, jnp.float32), axis=-1)
  p = jnp.exp(log_p)
  entropy = jnp.mean(-jnp.sum(p * log_p, axis=-1))
  mean_p = jnp.mean(p, axis=(0, 1))
  batch_entropy = -jnp.sum(
    jnp.where(mean_p > 0, mean_p * jnp.log(jnp.where(mean_p > 0, mean_p, 1.0)), 0.0)
  )
  return {
    "teacher_entropy": entropy,
    "teacher_kl_uniform": jnp.log(jnp.float32(k)) - entropy,
    "teacher_batch_entropy": batch_entropy,
    "center_norm": jnp.linalg.norm(center.astype(jnp.float32)),
  }
