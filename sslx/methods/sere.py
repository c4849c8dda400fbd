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

from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from sslx import errors
from sslx.losses import sere as sere_losses
from sslx.methods.base import OVERLAP_KEYS, AddOn, Method
from sslx.models import heads
from sslx.models.build import build_backbone


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
      "ViT backbone or set --config.sere.enabled=False"
    )


def validate(config: ml_collections.ConfigDict, num_heads: int, embed_dim: int) -> None:
  """Rejects SERE settings that cannot work, with the fix in the message."""
  sc = config.sere
  check_backbone(config)
  grid_gg, grid_lg = resolve_grids(config)
  for name, value in (("grid_gg", grid_gg), ("grid_lg", grid_lg)):
    if value < 2:
      raise SereConfigError(
        f"config.sere.{name}={value}: a sampling grid needs at least 2x2 points"
      )
  g_side = token_grid(config.data.global_crops.size, config.model.patch_size)
  if grid_gg > 4 * g_side:
    raise SereConfigError(
      f"config.sere.grid_gg={grid_gg} is far finer than the {g_side}x{g_side} token grid of the "
      f"global crops; use at most {g_side} (0 derives it)"
    )
  if config.data.local_crops.number:
    l_side = token_grid(config.data.local_crops.size, config.model.patch_size)
    if grid_lg > 4 * l_side:
      raise SereConfigError(
        f"config.sere.grid_lg={grid_lg} is far finer than the {l_side}x{l_side} token grid of "
        f"the local crops; use at most {l_side} (0 derives it)"
      )
  m = sc.num_heads or num_heads
  if embed_dim % m:
    raise SereConfigError(
      f"config.sere.num_heads={m} does not divide the embedding width {embed_dim}"
    )
  if sc.alpha < 0 or sc.beta < 0 or sc.alpha + sc.beta > 4:
    raise SereConfigError("config.sere.alpha and beta must be >= 0 with alpha + beta <= 4")
  if sc.temps_on not in ("teacher", "student"):
    raise SereConfigError(
      "config.sere.temps_on must be 'teacher' (released code) or 'student' (paper)"
    )


class WithSere(AddOn):
  """A base method plus the SERE losses (an add-on: sslx/methods/base.py).

  SERE adds no loss state (its heads' BatchNorm keeps no running statistics), so the base's
  accumulation rule stands. Under gradient accumulation that BatchNorm normalises each micro-batch
  with its own statistics, as the official trainer's `accum_iter` does, so DINO+SERE and iBOT+SERE
  steps are not the big-batch step unless every micro-batch has the same statistics.
  """

  name: ClassVar[str] = "sere"
  key_salt: ClassVar[int] = 0x5E4E
  extra_batch_keys: ClassVar[frozenset[str]] = OVERLAP_KEYS

  def __init__(self, base: Method, config: ml_collections.ConfigDict):
    check_backbone(config)
    super().__init__(base, config)

  def _dims(self) -> tuple[int, int]:
    backbone = build_backbone(self.config.model)
    return backbone.num_heads, backbone.embed_dim

  def init_own(self, rng: jax.Array, base_params: Any) -> dict[str, Any]:
    """The global- and local-crop projection/predictor heads."""
    del base_params
    num_heads, dim = self._dims()
    validate(self.config, num_heads, dim)
    r_global, r_local = jax.random.split(rng)
    dummy = jnp.zeros((2, 4, dim), jnp.float32)
    hs = heads.SereHeads()
    return {
      "sere_global": hs.init({"params": r_global}, dummy, student=True)["params"],
      "sere_local": hs.init({"params": r_local}, dummy, student=True)["params"],
    }

  def _heads(self, params, tokens, views: int, *, student: bool):
    """Applies one crop kind's heads to [B*V, N, C] tokens -> two [V, B, N, C] arrays."""
    out, _ = heads.SereHeads().apply(
      {"params": params}, tokens, student=student, mutable=["batch_stats"]
    )
    return tuple(jnp.swapaxes(x.reshape(-1, views, *x.shape[1:]), 0, 1) for x in out)

  def loss_terms(
    self,
    params: Any,
    teacher_params: Any,
    outputs: Mapping[str, Any],
    loss_state: Any,
    views: Mapping[str, jax.Array],
    sched: Mapping[str, jax.Array],
  ) -> tuple[jax.Array, tuple[Any, dict]]:
    """L = L_base (4 - alpha - beta) / 2 + alpha L_spatial + beta L_channel."""
    sc = self.config.sere
    num_heads, _ = self._dims()
    grid_gg, grid_lg = resolve_grids(self.config)
    base_loss, (loss_state, metrics) = self.base.loss_terms(
      params, teacher_params, outputs, loss_state, views, sched
    )

    ng, nl = views["global"].shape[1], views["local"].shape[1]
    tokens = lambda out: out["prenorm"][:, 1:]  # noqa: E731  (drop CLS)
    s_sp, s_ch = self._heads(
      params["sere_global"], tokens(outputs["student_global"]), ng, student=True
    )
    t_sp, t_ch = jax.lax.stop_gradient(
      self._heads(
        teacher_params["sere_global"], tokens(outputs["teacher_global"]), ng, student=False
      )
    )
    l_sp = l_ch = None
    if nl:
      l_sp, l_ch = self._heads(
        params["sere_local"], tokens(outputs["student_local"]), nl, student=True
      )
    spatial, m_sp = sere_losses.sere_spatial_loss(
      s_sp,
      t_sp,
      l_sp,
      views["gg_rects"],
      views["gg_valid"],
      views["lg_rects"] if nl else None,
      views["lg_valid"] if nl else None,
      num_heads=sc.num_heads or num_heads,
      grid_gg=grid_gg,
      grid_lg=grid_lg,
      temp=sc.spatial_temp,
      other_temp=sc.other_temp,
      temps_on=sc.temps_on,
    )
    channel, m_ch = sere_losses.sere_channel_loss(
      s_ch, t_ch, l_ch, temp=sc.channel_temp, other_temp=sc.other_temp, temps_on=sc.temps_on
    )
    total = base_loss * (4.0 - sc.alpha - sc.beta) / 2.0 + sc.alpha * spatial + sc.beta * channel
    metrics = {
      **metrics,
      **{f"sere/{k}": v for k, v in {**m_sp, **m_ch}.items()},
      "loss_base": base_loss,
      "loss_spatial": spatial,
      "loss_channel": channel,
    }
    return total, (loss_state, metrics)
