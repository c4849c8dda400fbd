"""DINO: self-distillation with a centred, sharpened EMA teacher (Caron et al., 2021).

A method is what the trainer needs and nothing more: how to build its networks,
its initial parameters and loss state, the loss of one augmented multi-crop
batch, which schedules it keeps, and a feature function for evaluation. The
trainer owns the optimiser, the EMA update, sharding, checkpoints and logging.

Official behaviour followed (facebookresearch/dino main_dino.py; docs/fidelity.md, DINO): the
student sees all crops, the teacher (no drop path) only the global ones, every teacher view is
paired with every *other* student view, and the centre is updated after the loss with the
global-batch mean of the raw teacher outputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from sslx.losses import dino as dino_losses
from sslx.methods.accumulation import LossStateRule
from sslx.methods.teacher_cls import TeacherClsMethod
from sslx.models import heads, torch_layout
from sslx.models.build import build_backbone, compute_dtype
from sslx.schedules import epoch_linspace_schedule


class BackboneWithHead(nn.Module):
  """A ViT and a DINO head applied to its CLS token."""

  backbone: nn.Module
  head: nn.Module

  def __call__(self, images: jax.Array, *, train: bool) -> tuple[dict[str, jax.Array], jax.Array]:
    out = self.backbone(images, train=train)
    return out, self.head(out["cls"])


@dataclasses.dataclass(frozen=True)
class Dino(TeacherClsMethod):
  """DINO as the trainer sees it; `config` is the whole run config.

  Gradient accumulation (config.optim.accum_steps = k) reproduces the big-batch step: the loss
  is a per-example mean, every micro-batch is scored against the step's centre, and the centre
  update is the mean of the k updates from that same centre (`LossStateRule.MEAN`), i.e.
  m c + (1 - m) mean(teacher outputs of the whole batch). With head.use_bn=True the head's
  BatchNorm statistics would be per micro-batch instead.
  """

  config: ml_collections.ConfigDict
  loss_state_rule: ClassVar[LossStateRule] = LossStateRule.MEAN

  # ---- networks -------------------------------------------------------------
  def network(self, *, teacher: bool = False) -> BackboneWithHead:
    c = self.config
    head = heads.DINOHead(
      out_dim=c.head.out_dim,
      hidden_dim=c.head.hidden_dim,
      bottleneck_dim=c.head.bottleneck_dim,
      use_bn=c.head.use_bn,
      norm_last_layer=c.head.norm_last_layer,
      dtype=compute_dtype(c.model.dtype),
    )
    return BackboneWithHead(build_backbone(c.model, drop_path=not teacher), head)

  def init(self, rng: jax.Array, image_shape: tuple[int, int, int]) -> tuple[Any, Any]:
    """Returns (params, loss_state) for one global crop shape (H, W, C)."""
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    params = self.network().init({"params": rng}, dummy, train=False)["params"]
    return params, {"center": jnp.zeros([self.config.head.out_dim], jnp.float32)}

  def teacher_params(self, params: Any) -> Any:
    """The part of the student the EMA teacher tracks (all of it for DINO)."""
    return params

  def import_head(self, params: Any, head_state_dict: Mapping[str, Any]) -> Any:
    """DINO's released head (`head.` of a checkpoint's student or teacher)."""
    head = torch_layout.dino_head_from_torch(head_state_dict, params["head"])
    return {**params, "head": head}

  # ---- schedules --------------------------------------------------------------
  def schedules(self, steps_per_epoch: int, total_steps: int) -> dict[str, Any]:
    del total_steps
    lc = self.config.loss
    return {
      "teacher_temp": epoch_linspace_schedule(
        lc.warmup_teacher_temp, lc.teacher_temp, lc.warmup_teacher_temp_epochs, steps_per_epoch
      )
    }

  # ---- forward and loss -------------------------------------------------------
  def forward(
    self, params: Any, teacher_params: Any, views: Mapping[str, jax.Array], rng: jax.Array
  ) -> dict[str, Any]:
    """Runs student (all crops) and teacher (global crops) networks.

    Args:
      views: 'global' [B, Ng, H, W, C] and 'local' [B, Nl, h, w, C] float crops,
        already augmented and normalised.

    Returns:
      'student_logits' [Ng+Nl, B, K], 'teacher_logits' [Ng, B, K] (no gradient),
      and the backbone outputs of each pass for add-ons such as SERE
      ('student_global', 'student_local', 'teacher_global': dicts of [B*N, ...]).
    """
    g, l = views["global"], views["local"]
    b, ng = g.shape[:2]
    nl = l.shape[1]
    student = self.network()
    teacher = self.network(teacher=True)
    # Keep the example axis outermost so the flattened batch stays sharded on it.
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
    by_view = lambda y, n: jnp.swapaxes(y.reshape(b, n, *y.shape[1:]), 0, 1)  # noqa: E731
    r_global, r_local = jax.random.split(rng)
    s_out_g, s_log_g = student.apply(
      {"params": params}, flat(g), train=True, rngs={"dropout": r_global}
    )
    logits = [by_view(s_log_g, ng)]
    s_out_l = None
    if nl:
      s_out_l, s_log_l = student.apply(
        {"params": params}, flat(l), train=True, rngs={"dropout": r_local}
      )
      logits.append(by_view(s_log_l, nl))
    t_out_g, t_log_g = teacher.apply({"params": teacher_params}, flat(g), train=False)
    t_out_g, t_log_g = jax.lax.stop_gradient((t_out_g, t_log_g))
    return {
      "student_logits": jnp.concatenate(logits, axis=0),
      "teacher_logits": by_view(t_log_g, ng),
      "student_global": s_out_g,
      "student_local": s_out_l,
      "teacher_global": t_out_g,
    }

  def loss_terms(
    self,
    params: Any,
    teacher_params: Any,
    outputs: Mapping[str, Any],
    loss_state: Any,
    views: Mapping[str, jax.Array],
    sched: Mapping[str, jax.Array],
  ) -> tuple[jax.Array, tuple[Any, dict]]:
    lc = self.config.loss
    s, t = outputs["student_logits"], outputs["teacher_logits"]
    center = loss_state["center"]
    loss = dino_losses.dino_loss(
      s, t, center, student_temp=lc.student_temp, teacher_temp=sched["teacher_temp"]
    )
    new_center = dino_losses.update_center(center, t, lc.center_momentum)
    metrics = {"loss_dino": loss, "teacher_temp": sched["teacher_temp"]}
    metrics.update(dino_losses.teacher_diagnostics(t, center, sched["teacher_temp"]))
    return loss, ({**loss_state, "center": new_center}, metrics)
