"""What the ViT methods with an EMA teacher (DINO, iBOT, MoCo v3) share.

Each defines `network(teacher=...)` (an object with a `.backbone` ViT), `forward` and
`loss_terms` (sslx/methods/base.py); this base turns them into the interface's `loss`, and gives
the evaluation pieces every such method has: the teacher backbone's [CLS] as the feature, its
[CLS; patches] as tokens, the timm-layout export and the last block's attention.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sslx.errors import UserError
from sslx.methods.base import Forward, Method
from sslx.models import torch_layout, vit


def fixed_positions(table: np.ndarray) -> np.ndarray:
  """[N, D] patch positions -> timm's [1, 1 + N, D] table with the zero CLS position."""
  return np.concatenate([np.zeros((1, table.shape[1]), np.float32), table])[None]


class TeacherClsMethod(Method):
  """`loss` = loss_terms(forward(...)); evaluation on the teacher's ViT backbone."""

  supports_addons: ClassVar[bool] = True

  def loss(
    self,
    params: Any,
    teacher_params: Any,
    loss_state: Any,
    views: Mapping[str, jax.Array],
    rng: jax.Array,
    sched: Mapping[str, jax.Array],
  ) -> tuple[jax.Array, tuple[Any, dict]]:
    """Total loss of one batch; returns (loss, (new_loss_state, metrics))."""
    outputs = self.forward(params, teacher_params, views, rng)
    return self.loss_terms(params, teacher_params, outputs, loss_state, views, sched)

  def _backbone(self):
    return self.network(teacher=True).backbone

  def features(self, eval_params: Any, images: jax.Array) -> jax.Array:
    """Teacher [CLS] features [B, D] of normalised float images (the DINO kNN protocol)."""
    return self._backbone().apply({"params": eval_params["backbone"]}, images, train=False)["cls"]

  def tokens(self, eval_params: Any, images: jax.Array) -> jax.Array:
    """The teacher backbone's [CLS; patches] [B, 1 + N, D] (attentive probe)."""
    out = self._backbone().apply({"params": eval_params["backbone"]}, images, train=False)
    return jnp.concatenate([out["cls"][:, None], out["patch"]], axis=1)

  def export_backbone(
    self, params: Any, loss_state: Any, weights: str
  ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """timm / DINO `VisionTransformer` names; fixed sin-cos positions written out."""
    del loss_state, weights
    m = self._backbone()
    pos = (
      fixed_positions(vit.sincos_2d(m.pos_grid, m.pos_grid, m.embed_dim))
      if m.pos_embed == "sincos"
      else None
    )
    sd = torch_layout.vit_to_torch(params["backbone"], pos_embed=pos)
    kwargs = dict(
      img_size=m.pos_grid * m.patch_size,
      patch_size=m.patch_size,
      in_chans=int(sd["patch_embed.proj.weight"].shape[1]),
      embed_dim=m.embed_dim,
      depth=m.depth,
      num_heads=m.num_heads,
      mlp_ratio=m.mlp_ratio,
      qkv_bias=True,
      num_classes=0,
    )
    return sd, {"architecture": "vit", "timm_kwargs": json.dumps(kwargs)}

  def import_backbone(
    self, params: Any, loss_state: Any, state_dict: Mapping[str, np.ndarray]
  ) -> tuple[Any, Any]:
    """The ViT from timm / DINO names; a learned grid of another size is resized (logged)."""
    like = params["backbone"]
    sd, note = torch_layout.fit_pos_embed(state_dict, like)
    if note:
      logging.info("init_from: %s", note)
    pos = None
    side = torch_layout.pos_grid_of(sd)
    if "pos_embed" not in like and side is not None:
      # Fixed sin-cos positions are computed at the input's grid: compare at the file's grid.
      pos = fixed_positions(vit.sincos_2d(side, side, self._backbone().embed_dim))
    backbone = torch_layout.vit_from_torch(sd, like, pos_embed=pos)
    return {**params, "backbone": backbone}, loss_state

  def block_features(
    self, eval_params: Any, images: jax.Array, n_last_blocks: int, avgpool: bool
  ) -> jax.Array:
    """DINO eval_linear's feature from the teacher backbone (docs/fidelity.md, DINO).

    [CLS] of the last n blocks concatenated (oldest first); with `avgpool` the last block's mean
    patch token follows. For n = 1 the two are interleaved per channel ([c0, p0, c1, p1, ...]),
    the order DINO's code produces (it can combine the pool only with n = 1), so its published
    linear heads would apply; for n > 1 the pool is appended.
    """
    backbone = self._backbone()
    if not 1 <= n_last_blocks <= backbone.depth:
      raise UserError(
        f"config.probe.dino.n_last_blocks={n_last_blocks} must be in [1, {backbone.depth}] "
        "(the backbone's depth)"
      )
    out = backbone.apply(
      {"params": eval_params["backbone"]}, images, train=False, n_last_blocks=n_last_blocks
    )
    cls = out["block_cls"]
    b = cls.shape[0]
    if not avgpool:
      return cls.reshape(b, -1)
    pool = jnp.mean(out["patch"], axis=1)
    if n_last_blocks == 1:
      return jnp.stack([cls[:, 0], pool], axis=-1).reshape(b, -1)
    return jnp.concatenate([cls.reshape(b, -1), pool], axis=-1)

  def attention(self) -> tuple[Forward, int]:
    backbone = self._backbone()

    def forward(params, images):
      return backbone.apply(
        {"params": params["backbone"]}, images, train=False, return_attention=True
      )["attention"]

    return forward, backbone.patch_size
