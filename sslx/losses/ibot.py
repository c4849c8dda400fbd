"""iBOT's masked-patch self-distillation loss and patch centre (pure functions).

The [CLS] part of iBOT is exactly DINO's cross-view loss (sslx/losses/dino.py). The patch part
(bytedance/ibot main_ibot.py iBOTLoss; docs/fidelity.md, iBOT) pairs each global view
with *itself*: the student sees the masked view, the teacher the unmasked one, and

    L_patch = mean_q mean_b [ sum_n m[q,b,n] CE(p_t[q,b,n], p_s[q,b,n]) / max(sum_n m[q,b,n], 1) ]

so an image without masked patches contributes 0 but still counts in the batch mean. The
patch centre is the EMA of the teacher's patch logits averaged over views, images and *all*
patches (not only masked ones), updated after the loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _check(student_patch: Array, teacher_patch: Array, masks: Array, center: Array) -> None:
  if student_patch.ndim != 4 or student_patch.shape != teacher_patch.shape:
    raise ValueError(
      f"student and teacher patch logits must both be [T, B, N, K]; got "
      f"{student_patch.shape} and {teacher_patch.shape}"
    )
  if masks.shape != student_patch.shape[:3]:
    raise ValueError(
      f"masks must be [T, B, N] = {list(student_patch.shape[:3])}, got "
      f"{list(masks.shape)}; flatten the patch grid row-major"
    )
  if center.shape != student_patch.shape[-1:]:
    raise ValueError(f"patch center must be [K] = [{student_patch.shape[-1]}], got {center.shape}")


def ibot_patch_loss(
  student_patch: Array,
  teacher_patch: Array,
  masks: Array,
  center: Array,
  *,
  student_temp: float,
  teacher_temp: Array | float,
) -> Array:
  """Masked-patch cross-entropy between the teacher (unmasked view) and student (masked view).

  Args:
    student_patch: float [T, B, N, K] student patch logits of the T masked global views.
    teacher_patch: float [T, B, N, K] raw teacher patch logits of the same, unmasked views.
    masks: bool [T, B, N], True where the student's patch was replaced by the mask token.
    center: float [K] patch centre.
    student_temp: 0.1 in iBOT.
    teacher_temp: patch teacher temperature (scheduled; traced scalar allowed).

  Returns:
    float32 scalar (0 when nothing is masked).
  """
  _check(student_patch, teacher_patch, masks, center)
  t = (teacher_patch.astype(jnp.float32) - center.astype(jnp.float32)) / jnp.asarray(
    teacher_temp, jnp.float32
  )
  p_t = jax.lax.stop_gradient(jax.nn.softmax(t, axis=-1))
  log_p_s = jax.nn.log_softmax(student_patch.astype(jnp.float32) / student_temp, axis=-1)
  ce = -jnp.sum(p_t * log_p_s, axis=-1)  # [T, B, N]
  m = masks.astype(jnp.float32)
  per_image = jnp.sum(ce * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)  # [T, B]
  return jnp.mean(per_image)


def update_patch_center(center: Array, teacher_patch: Array, momentum: float = 0.9) -> Array:
  """``momentum * c + (1 - momentum) * mean over (T, B, N) of the teacher patch logits`` [K]."""
  batch_mean = jnp.mean(jax.lax.stop_gradient(teacher_patch).astype(jnp.float32), axis=(0, 1, 2))
  return momentum * center.astype(jnp.float32) + (1.0 - momentum) * batch_mean
