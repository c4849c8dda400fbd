"""The training state: everything a step reads and writes, as one pytree."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TrainState:
  """Student params, EMA teacher params, optimiser and loss state, step and RNG.

  Attributes:
    step: number of optimiser steps taken (int32 scalar).
    params: student parameters (what the optimiser updates).
    teacher_params: EMA of the student parameters the teacher shares with it.
    opt_state: optax state.
    loss_state: method-specific running state, e.g. {'center': [K]} for DINO and
      BatchNorm statistics when a method has them.
    rng: a jax PRNG key; split inside every step so a resumed run draws the same
      augmentation and drop-path randomness as an uninterrupted one.
  """

  step: jax.Array
  params: Any
  teacher_params: Any
  opt_state: Any
  loss_state: Any
  rng: jax.Array

  if TYPE_CHECKING:  # added by flax.struct.dataclass, which the type check does not follow

    def replace(self, **changes: Any) -> TrainState: ...


def ema_update(teacher: Any, student: Any, momentum: jax.Array) -> Any:
  """teacher <- m * teacher + (1 - m) * student, leaf by leaf (in float32)."""
  return jax.tree.map(
    lambda t, s: (momentum * t + (1.0 - momentum) * s.astype(t.dtype)).astype(t.dtype),
    teacher,
    student,
  )


def tree_l2(tree: Any) -> jax.Array:
  """Global L2 norm of a pytree (float32)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros([], jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
