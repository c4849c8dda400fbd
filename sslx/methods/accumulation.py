"""How a method's loss state combines over the micro-batches of gradient accumulation.

With `config.optim.accum_steps = k > 1` the trainer splits each step's batch into k equal
micro-batches and averages their gradients before the one optimiser update and the one EMA
update of the step (sslx/train/trainer.py, `_accumulate`). The loss state (DINO's centre,
BatchNorm running statistics...) needs a rule of its own, and every method declares it as the
class attribute `loss_state_rule`:

* `MEAN`: every micro-batch starts from the step's loss state and the k states it returns are
  averaged (as start + mean of the increments, so a leaf no micro-batch changes stays bit-exact;
  integer counters take the mean increment, rounded down). For a state that is an EMA of a
  batch mean, m * s + (1 - m) * mean_j(batch mean_j), this is exactly the big-batch update:
  DINO's and iBOT's centres, which the official SERE trainer (`accum_iter`) also updates once
  per optimiser step from the teacher outputs of all micro-batches. The loss of each
  micro-batch sees the old state, as the big-batch loss does.
* `THREADED`: the state runs through the micro-batches in order, so it takes k updates per
  step, as PyTorch's BatchNorm running statistics do under accumulation (BYOL, SaGe).
"""

from __future__ import annotations

import enum


class LossStateRule(str, enum.Enum):
  """The combination rule a method names in its `loss_state_rule` class attribute."""

  MEAN = "mean"
  THREADED = "threaded"
