"""KoLeo as an add-on: spreads the student's [CLS] features within each global crop's batch.

DINOv2 adds `koleo_loss_weight` (0.1) times the sum, over the global crops, of the KoLeo loss of
the student backbone's normalised [CLS] tokens of that crop (never between two crops of one image).
It stacks on any method that exposes its forward pass (DINO, iBOT, MoCo v3), with or without SERE:
`--config.koleo.enabled=True [--config.koleo.weight=0.1]`.

One departure: DINOv2 computes it on each GPU's share of the batch; here it is over the global
batch (every device's examples), which is what a single-device run of the official code does and
does not change with the number of devices.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import jax

from sslx.losses.koleo import koleo_loss
from sslx.methods.base import AddOn


class WithKoLeo(AddOn):
  """The base method's loss + config.koleo.weight * sum over global crops of KoLeo([CLS])."""

  name: ClassVar[str] = "koleo"
  key_salt: ClassVar[int] = 0x6B01E0

  def loss_terms(
    self,
    params: Any,
    teacher_params: Any,
    outputs: Mapping[str, Any],
    loss_state: Any,
    views: Mapping[str, jax.Array],
    sched: Mapping[str, jax.Array],
  ) -> tuple[jax.Array, tuple[Any, dict]]:
    base_loss, (loss_state, metrics) = self.base.loss_terms(
      params, teacher_params, outputs, loss_state, views, sched
    )
    b, ng = views["global"].shape[:2]
    cls = outputs["student_global"]["cls"]  # [B * Ng, D], example axis outermost
    cls = cls.reshape(b, ng, cls.shape[-1])
    koleo = sum(koleo_loss(cls[:, v]) for v in range(ng))
    weight = float(self.config.koleo.weight)
    metrics = {**metrics, "loss_koleo": koleo, "loss_before_koleo": base_loss}
    return base_loss + weight * koleo, (loss_state, metrics)
