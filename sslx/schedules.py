"""Schedules as pure functions of the optimiser step (shared by methods and the trainer).

They reproduce the official DINO/iBOT ones value for value (docs/fidelity.md, Schedules): lr,
weight decay and teacher momentum change every iteration; the teacher temperature changes once per
epoch (a linspace over the warm-up epochs that includes both ends); the lr is scaled by global
batch / 256.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array | int], jax.Array]


def cosine_schedule(
  base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> Schedule:
  """DINO's `cosine_scheduler`, built from optax pieces.

  Args:
    base: value at the end of the warm-up (the peak for lr).
    final: value the cosine approaches at `total_steps` (may exceed `base`, as for
      weight decay 0.04 -> 0.4 or momentum 0.996 -> 1).
    total_steps: number of optimiser steps in the whole run.
    warmup_steps: linear warm-up length; value(i) = warmup_start + (base -
      warmup_start) * i / (warmup_steps - 1) for i < warmup_steps, i.e. a linspace
      that reaches `base` on its last warm-up step, as in the official code.
    warmup_start: value at step 0 of the warm-up.

  Returns:
    A function of the integer step returning a float32 scalar. Steps past
    `total_steps` hold the last cosine value.
  """
  decay_steps = max(total_steps - warmup_steps, 1)

  def cosine(step):
    step = jnp.minimum(step, decay_steps)
    return final + 0.5 * (base - final) * (1 + jnp.cos(jnp.pi * step / decay_steps))

  if warmup_steps <= 0:
    return lambda step: jnp.asarray(cosine(step), jnp.float32)
  warmup = optax.linear_schedule(warmup_start, base, max(warmup_steps - 1, 0))
  return optax.join_schedules([warmup, cosine], boundaries=[warmup_steps])


def epoch_linspace_schedule(
  warmup_value: float, value: float, warmup_epochs: int, steps_per_epoch: int, start_epoch: int = 0
) -> Schedule:
  """Per-epoch linear warm-up then constant (DINO/iBOT teacher temperatures).

  Epochs before `start_epoch` hold `warmup_value`; epoch start_epoch + e, e < warmup_epochs, gets
  linspace(warmup_value, value, warmup_epochs)[e] (numpy's linspace: both ends included, so the
  last warm-up epoch already has `value`); later epochs get `value`. `start_epoch` is iBOT's
  `mim_start_epoch`, which delays the patch temperature's warm-up until masked prediction starts.
  The value is constant within an epoch, as in the official per-epoch arrays.
  """

  def schedule(step):
    epoch = jnp.asarray(step) // steps_per_epoch - start_epoch
    if warmup_epochs <= 0:
      return jnp.where(epoch < 0, warmup_value, value).astype(jnp.float32)
    frac = jnp.maximum(epoch, 0) / max(warmup_epochs - 1, 1)
    warm = warmup_value + (value - warmup_value) * frac
    return jnp.where(epoch < warmup_epochs, warm, value).astype(jnp.float32)

  return schedule


def base_learning_rate(lr_per_256: float, global_batch_size: int) -> float:
  """Linear scaling rule used by DINO, iBOT and SERE: lr = lr_per_256 * batch / 256."""
  return lr_per_256 * global_batch_size / 256.0
