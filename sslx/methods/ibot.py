"""iBOT (Zhou et al., 2022): DINO's [CLS] self-distillation plus masked-patch self-distillation.

Official behaviour followed (bytedance/ibot main_ibot.py, MCG-NKU/SERE main_sere.py;
docs/fidelity.md, iBOT): the pipeline draws block masks for the global crops
(sslx/data/masks.py); only the student's two global crops are masked (the mask token replaces
patch embeddings before [CLS] and positions), local crops and the teacher never are; the head's
MLP runs on every token, [CLS] -> 'last_layer', patches -> 'last_layer2' or the same layer when
shared; L = λ1 L_cls + λ2 L_patch
with separate centres and per-epoch teacher temperatures. The teacher tracks every student
parameter except the mask token (it exists only in the student).

With masking off (config.data.masks.scheme='none', or all-False masks) the patch loss is exactly 0
and iBOT is DINO with the iBOT head (tested).
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
from sslx.losses import ibot as ibot_losses
from sslx.methods.accumulation import LossStateRule
from sslx.methods.teacher_cls import TeacherClsMethod
from sslx.models import heads
from sslx.models.build import build_backbone, compute_dtype
from sslx.schedules import epoch_linspace_schedule


class IbotNet(nn.Module):
  """A ViT and an iBOT head on its normalised [CLS] and (optionally) patch tokens."""

  backbone: nn.Module
  head: nn.Module

  def __call__(
    self,
    images: jax.Array,
    *,
    train: bool,
    mask: jax.Array | None = None,
    patch_logits: bool = True,
  ):
    out = self.backbone(images, train=train, mask=mask)
    cls, patch = self.head(out["cls"], out["patch"] if patch_logits else None)
    return out, cls, patch


def drop_mask_token(params: Any) -> Any:
  """The student's parameters without the backbone's mask token (what the teacher tracks)."""
  params = dict(params)
  params["backbone"] = {k: v for k, v in params["backbone"].items() if k != "mask_token"}
  return params


@dataclasses.dataclass(frozen=True)
class Ibot(TeacherClsMethod):
  """iBOT as the trainer sees it; `config` is the whole run config.

  Gradient accumulation reproduces the big-batch step as for DINO: both losses are
  per-example means, and both centres take one update from the whole batch (`LossStateRule.MEAN`;
  the official SERE trainer's `accum_iter` sums the teacher outputs of all micro-batches and
  updates the centres once per optimiser step, with the same result).
  """

  config: ml_collections.ConfigDict
  loss_state_rule: ClassVar[LossStateRule] = LossStateRule.MEAN

  def network(self, *, teacher: bool = False) -> IbotNet:
    c = self.config
    head = heads.IBOTHead(
      out_dim=c.head.out_dim,
      patch_out_dim=c.head.patch_out_dim,
      hidden_dim=c.head.hidden_dim,
      bottleneck_dim=c.head.bottleneck_dim,
      use_bn=c.head.use_bn,
      norm_last_layer=c.head.norm_last_layer,
      shared_head=c.head.shared_head,
      dtype=compute_dtype(c.model.dtype),
    )
    return IbotNet(build_backbone(c.model, drop_path=not teacher, mask_token=not teacher), head)

  def init(self, rng: jax.Array, image_shape: tuple[int, int, int]) -> tuple[Any, Any]:
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    params = self.network().init({"params": rng}, dummy, train=False)["params"]
    hc = self.config.head
    return params, {
      "center": jnp.zeros([hc.out_dim], jnp.float32),
      "center_patch": jnp.zeros([hc.patch_out_dim], jnp.float32),
    }

  def teacher_params(self, params: Any) -> Any:
    return drop_mask_token(params)

  def schedules(self, steps_per_epoch: int, total_steps: int) -> dict[str, Any]:
    del total_steps
    lc = self.config.loss
    return {
      "teacher_temp": epoch_linspace_schedule(
        lc.warmup_teacher_temp, lc.teacher_temp, lc.warmup_teacher_temp_epochs, steps_per_epoch
      ),
      # mim_start_epoch delays the patch temperature's warm-up (iBOT's loss; its trainer passes
      # the loader's pred_start_epoch, config.data.masks.pred_start_epoch, as this value).
      "teacher_patch_temp": epoch_linspace_schedule(
        lc.warmup_teacher_patch_temp,
        lc.teacher_patch_temp,
        lc.warmup_teacher_temp_epochs,
        steps_per_epoch,
        start_epoch=int(lc.get("mim_start_epoch", 0)),
      ),
    }

  def forward(
    self, params: Any, teacher_params: Any, views: Mapping[str, jax.Array], rng: jax.Array
  ) -> dict[str, Any]:
    """Student on all crops (globals masked), teacher on the unmasked globals.

    Returns 'student_logits' [Ng+Nl, B, K], 'teacher_logits' [Ng, B, K], 'student_patch' and
    'teacher_patch' [Ng, B, N, Kp], 'masks' bool [Ng, B, N], and the backbone outputs
    'student_global' (of the masked views, which SERE's student relations use),
    'student_local', 'teacher_global' ([B*N views, ...] dicts).
    """
    g, l = views["global"], views["local"]
    b, ng = g.shape[:2]
    nl = l.shape[1]
    grid = (g.shape[2] // self.config.model.patch_size, g.shape[3] // self.config.model.patch_size)
    masks = views.get("global_masks")
    if masks is None:
      masks = jnp.zeros((b, ng, *grid), bool)
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731  (example axis outermost)
    by_view = lambda y, n: jnp.swapaxes(y.reshape(b, n, *y.shape[1:]), 0, 1)  # noqa: E731
    student, teacher = self.network(), self.network(teacher=True)
    r_global, r_local = jax.random.split(rng)
    s_out_g, s_cls_g, s_patch_g = student.apply(
      {"params": params}, flat(g), train=True, mask=flat(masks), rngs={"dropout": r_global}
    )
    logits = [by_view(s_cls_g, ng)]
    s_out_l = None
    if nl:
      s_out_l, s_cls_l, _ = student.apply(
        {"params": params}, flat(l), train=True, patch_logits=False, rngs={"dropout": r_local}
      )
      logits.append(by_view(s_cls_l, nl))
    t_out_g, t_cls_g, t_patch_g = jax.lax.stop_gradient(
      teacher.apply({"params": teacher_params}, flat(g), train=False)
    )
    return {
      "student_logits": jnp.concatenate(logits, axis=0),
      "teacher_logits": by_view(t_cls_g, ng),
      "student_patch": by_view(s_patch_g, ng),
      "teacher_patch": by_view(t_patch_g, ng),
      "masks": jnp.swapaxes(masks.reshape(b, ng, -1), 0, 1),
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
    t_cls, t_patch = outputs["teacher_logits"], outputs["teacher_patch"]
    l_cls = dino_losses.dino_loss(
      outputs["student_logits"],
      t_cls,
      loss_state["center"],
      student_temp=lc.student_temp,
      teacher_temp=sched["teacher_temp"],
    )
    l_patch = ibot_losses.ibot_patch_loss(
      outputs["student_patch"],
      t_patch,
      outputs["masks"],
      loss_state["center_patch"],
      student_temp=lc.student_temp,
      teacher_temp=sched["teacher_patch_temp"],
    )
    loss = lc.lambda1 * l_cls + lc.lambda2 * l_patch
    new_state = {
      **loss_state,
      "center": dino_losses.update_center(loss_state["center"], t_cls, lc.center_momentum),
      "center_patch": ibot_losses.update_patch_center(
        loss_state["center_patch"], t_patch, lc.center_momentum_patch
      ),
    }
    metrics = {
      "loss_cls": l_cls,
      "loss_patch": l_patch,
      "teacher_temp": sched["teacher_temp"],
      "teacher_patch_temp": sched["teacher_patch_temp"],
      "masked_fraction": jnp.mean(outputs["masks"].astype(jnp.float32)),
    }
    metrics.update(
      dino_losses.teacher_diagnostics(t_cls, loss_state["center"], sched["teacher_temp"])
    )
    return loss, (new_state, metrics)
