"""What the ViT methods with an EMA teacher (DINO, iBOT, MoCo v3) share with the trainer.

Each of them defines `network(teacher=...)` (an object with a `.backbone` ViT), `forward(params,
teacher_params, views, rng)` and `loss_from_outputs(outputs, loss_state, sched)`; this mixin
turns those into the trainer's `loss` and the kNN `features`. SERE (methods/sere.py) reuses
`forward` and `loss_from_outputs` directly, which is why they stay separate from `loss`.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax


class TeacherClsMethod:
  """`loss` = loss_from_outputs(forward(...)); `features` = the teacher backbone's [CLS]."""

  def loss(self, params: Any, teacher_params: Any, loss_state: Any,
           views: Mapping[str, jax.Array], rng: jax.Array,
           sched: Mapping[str, jax.Array]) -> tuple[jax.Array, tuple[Any, dict]]:
    """Total loss of one batch; returns (loss, (new_loss_state, metrics))."""
    return self.loss_from_outputs(self.forward(params, teacher_params, views, rng),
                                  loss_state, sched)

  def features(self, teacher_params: Any, images: jax.Array) -> jax.Array:
    """Teacher [CLS] features [B, D] of normalised float images (the DINO kNN protocol)."""
    backbone = self.network(teacher=True).backbone
    return backbone.apply({"params": teacher_params["backbone"]}, images, train=False)["cls"]
