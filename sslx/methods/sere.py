"""SERE (Li et al.): spatial and channel self-relation losses, as an add-on to any ViT method.

`WithSere(base, config)` wraps a method that exposes `forward` (returning the
student's and teacher's backbone outputs, 'prenorm' tokens included) and
`loss_from_outputs`, and adds

    L = L_base * (4 - alpha - beta) / 2 + alpha * L_spatial + beta * L_channel

(the released formula; docs/fidelity.md, SERE). Relations come from the last block's tokens before
the final LayerNorm, without CLS; student = predictor(projection(x)), teacher = projection(x) with
the EMA weights; global and local crops have separate heads; BatchNorm uses the current global
batch for student and teacher (the release never puts these heads in eval mode). The view pairs,
the region alignment and the handling of non-overlapping pairs (kept in the mean as the constant
log S^2, as the release does) live in sslx/losses/sere.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from sslx import errors
from sslx.losses import sere as sere_losses
from sslx.methods.accumulation import LossStateRule
from sslx.models import heads


class SereConfigError(errors.UserError):
  """An impossible SERE configuration; raised before anything compiles."""


def token_grid(image_size: int, patch_size: int) -> int:
  return image_size // patch_size


def resolve_grids(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(global-global, global-local) sampling grid sides.

  0 in the config derives them from the token grids as in the ViT-S/16 recipe:
  13 = 14 - 1 for 224/16 global crops and 6 = 6 for 96/16 local crops.
  """
  sc, dc, patch = config.sere, config.data, config.model.patch_size
  g_side = token_grid(dc.global_crops.size, patch)
  l_side = token_grid(dc.local_crops.size, patch)
  grid_gg = sc.grid_gg or max(g_side - 1, 2)
  grid_lg = sc.grid_lg or max(l_side, 2)
  return grid_gg, grid_lg


def check_backbone(config: ml_collections.ConfigDict) -> None:
  """SERE needs a backbone with patch tokens (a ViT)."""
  if config.model.get("arch", "vit") != "vit":
    raise SereConfigError(
        f"SERE needs patch tokens, but config.model.arch={config.model.arch!r} has none; use a "
        "ViT backbone or set --config.sere.enabled=False")


def validate(config: ml_collections.ConfigDict, num_heads: int, embed_dim: int) -> None:
  """Rejects SERE settings that cannot work, with the fix in the message."""
  sc = config.sere
  check_backbone(config)
  grid_gg, grid_lg = resolve_grids(config)
  for name, value in (("grid_gg", grid_gg), ("grid_lg", grid_lg)):
    if value < 2:
      raise SereConfigError(f"config.sere.{name}={value}: a sampling grid needs at least 2x2 points")
  g_side = token_grid(config.data.global_crops.size, config.model.patch_size)
  if grid_gg > 4 * g_side:
    raise SereConfigError(
        f"config.sere.grid_gg={grid_gg} is far finer than the {g_side}x{g_side} token grid of the "
        f"global crops; use at most {g_side} (0 derives it)")
  if config.data.local_crops.number:
    l_side = token_grid(config.data.local_crops.size, config.model.patch_size)
    if grid_lg > 4 * l_side:
      raise SereConfigError(
          f"config.sere.grid_lg={grid_lg} is far finer than the {l_side}x{l_side} token grid of "
          f"the local crops; use at most {l_side} (0 derives it)")
  m = sc.num_heads or num_heads
  if embed_dim % m:
    raise SereConfigError(f"config.sere.num_heads={m} does not divide the embedding width {embed_dim}")
  if sc.alpha < 0 or sc.beta < 0 or sc.alpha + sc.beta > 4:
    raise SereConfigError("config.sere.alpha and beta must be >= 0 with alpha + beta <= 4")
  if sc.temps_on not in ("teacher", "student"):
    raise SereConfigError("config.sere.temps_on must be 'teacher' (released code) or 'student' (paper)")


BASE_HOOKS = ("optimizer", "eval_params", "check_batch")


@dataclasses.dataclass(frozen=True)
class WithSere:
  """A base method plus the SERE losses; the trainer sees an ordinary method."""
  base: Any
  config: ml_collections.ConfigDict

  def __getattr__(self, name: str) -> Any:
    # The trainer's optional hooks exist here exactly when the base method has them: SERE adds
    # heads and loss terms but keeps the base's optimiser, evaluation parameters and batch checks
    # (dropping them would silently train another recipe).
    if name in BASE_HOOKS:
      return getattr(self.base, name)
    raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

  @property
  def loss_state_rule(self) -> LossStateRule:
    """The base method's rule: SERE adds no loss state (its heads' BatchNorm keeps no running
    statistics). Under gradient accumulation that BatchNorm normalises each micro-batch with its
    own statistics, as the official trainer's `accum_iter` does, so DINO+SERE and iBOT+SERE
    steps are not the big-batch step unless every micro-batch has the same statistics."""
    return self.base.loss_state_rule

  def _dims(self) -> tuple[int, int]:
    backbone = self.base.network().backbone
    return backbone.num_heads, backbone.embed_dim

  def init(self, rng: jax.Array, image_shape: tuple[int, int, int]) -> tuple[Any, Any]:
    check_backbone(self.config)
    num_heads, dim = self._dims()
    validate(self.config, num_heads, dim)
    r_base, r_global, r_local = jax.random.split(rng, 3)
    params, loss_state = self.base.init(r_base, image_shape)
    dummy = jnp.zeros((2, 4, dim), jnp.float32)
    hs = heads.SereHeads()
    params = dict(params)
    params["sere_global"] = hs.init({"params": r_global}, dummy, student=True)["params"]
    params["sere_local"] = hs.init({"params": r_local}, dummy, student=True)["params"]
    return params, loss_state

  def teacher_params(self, params: Any) -> Any:
    return self.base.teacher_params(params)

  def schedules(self, steps_per_epoch: int, total_steps: int) -> dict[str, Any]:
    return self.base.schedules(steps_per_epoch, total_steps)

  def features(self, teacher_params: Any, images: jax.Array) -> jax.Array:
    return self.base.features(teacher_params, images)

  def _heads(self, params, tokens, views: int, *, student: bool):
    """Applies one crop kind's heads to [B*V, N, C] tokens -> two [V, B, N, C] arrays."""
    out, _ = heads.SereHeads().apply({"params": params}, tokens, student=student,
                                     mutable=["batch_stats"])
    return tuple(jnp.swapaxes(x.reshape(-1, views, *x.shape[1:]), 0, 1) for x in out)

  def loss(self, params: Any, teacher_params: Any, loss_state: Any, views: Mapping[str, jax.Array],
           rng: jax.Array, sched: Mapping[str, jax.Array]) -> tuple[jax.Array, tuple[Any, dict]]:
    sc = self.config.sere
    num_heads, _ = self._dims()
    grid_gg, grid_lg = resolve_grids(self.config)
    outputs = self.base.forward(params, teacher_params, views, rng)
    base_loss, (loss_state, metrics) = self.base.loss_from_outputs(outputs, loss_state, sched)

    ng, nl = views["global"].shape[1], views["local"].shape[1]
    tokens = lambda out: out["prenorm"][:, 1:]  # noqa: E731  (drop CLS)
    s_sp, s_ch = self._heads(params["sere_global"], tokens(outputs["student_global"]), ng,
                             student=True)
    t_sp, t_ch = jax.lax.stop_gradient(self._heads(
        teacher_params["sere_global"], tokens(outputs["teacher_global"]), ng, student=False))
    l_sp = l_ch = None
    if nl:
      l_sp, l_ch = self._heads(params["sere_local"], tokens(outputs["student_local"]), nl,
                               student=True)
    spatial, m_sp = sere_losses.sere_spatial_loss(
        s_sp, t_sp, l_sp, views["gg_rects"], views["gg_valid"],
        views["lg_rects"] if nl else None, views["lg_valid"] if nl else None,
        num_heads=sc.num_heads or num_heads, grid_gg=grid_gg, grid_lg=grid_lg,
        temp=sc.spatial_temp, other_temp=sc.other_temp, temps_on=sc.temps_on)
    channel, m_ch = sere_losses.sere_channel_loss(
        s_ch, t_ch, l_ch, temp=sc.channel_temp, other_temp=sc.other_temp, temps_on=sc.temps_on)
    total = base_loss * (4.0 - sc.alpha - sc.beta) / 2.0 + sc.alpha * spatial + sc.beta * channel
    metrics = {**metrics, **{f"sere/{k}": v for k, v in {**m_sp, **m_ch}.items()},
               "loss_base": base_loss, "loss_spatial": spatial, "loss_channel": channel}
    return total, (loss_state, metrics)

