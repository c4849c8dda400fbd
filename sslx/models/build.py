"""Builders shared by methods, evaluations and export: the config's ViT and its compute dtype."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from sslx.models import cae, vit

# config.model.arch values: the DINO-style ViT (sslx/models/vit.py) and CAE's BEiT-style encoder
# (sslx/models/cae.py CAEEncoder: layer scale, q/v biases, fixed sin-cos positions), which only
# fine-tuning builds from config.model (the CAE method builds its whole network itself).
ARCHS = ("vit", "cae")


def compute_dtype(name: str):
  """'float32' | 'bfloat16' | 'float16' -> jnp dtype, with a clear error otherwise."""
  table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
  if name not in table:
    raise ValueError(f"config.model.dtype={name!r}; valid: {sorted(table)}")
  return table[name]


def build_backbone(
  model_cfg: ml_collections.ConfigDict, *, drop_path: bool = True, mask_token: bool = False
) -> vit.ViT:
  """The ViT described by `config.model` (variant, patch size, dtype...).

  Args:
    drop_path: False for teachers (no stochastic depth).
    mask_token: give the ViT iBOT's learned mask token (students of masked methods).
  """
  if model_cfg.get("arch", "vit") != "vit":
    raise ValueError(
      f"config.model.arch={model_cfg.arch!r}: this method needs a 'vit' backbone ('cae' "
      "encoders are built by build_cae_encoder, for fine-tuning)"
    )
  kwargs = _size_kwargs(model_cfg)
  return vit.ViT(
    patch_size=model_cfg.patch_size,
    drop_path_rate=model_cfg.drop_path_rate if drop_path else 0.0,
    pos_grid=model_cfg.pos_grid,
    dtype=compute_dtype(model_cfg.dtype),
    scan_blocks=model_cfg.get("scan_blocks", False),
    pos_embed=model_cfg.get("pos_embed", "learned"),
    init_scheme=model_cfg.get("init_scheme", "dino"),
    attention=model_cfg.get("attention", "auto"),
    recompute_elementwise=model_cfg.get("recompute_elementwise", False),
    use_mask_token=mask_token,
    **kwargs,
  )


def _size_kwargs(model_cfg: ml_collections.ConfigDict) -> dict:
  """embed_dim / depth / num_heads / mlp_ratio of config.model.variant, overridden where set."""
  kwargs: dict = dict(vit.vit_kwargs(model_cfg.variant))
  for key in ("embed_dim", "depth", "num_heads", "mlp_ratio"):
    if model_cfg.get(key):
      kwargs[key] = model_cfg[key]
  return kwargs


def build_cae_encoder(
  model_cfg: ml_collections.ConfigDict, *, drop_path: bool = True
) -> cae.CAEEncoder:
  """CAE's encoder described by a fine-tuning `config.model` (arch='cae').

  Size as `build_backbone` (variant, embed_dim...); `init_values` is the layer-scale init of a
  fresh encoder (0: none, and then a file with layer scale does not fit); `rel_pos_bias` adds
  BEiT's relative position bias on the `pos_grid` x `pos_grid` patch grid.

  Args:
    drop_path: False for evaluation copies (no stochastic depth).
  """
  return cae.CAEEncoder(
    patch_size=model_cfg.patch_size,
    init_values=float(model_cfg.get("init_values", 0.1)),
    drop_path_rate=model_cfg.drop_path_rate if drop_path else 0.0,
    dtype=compute_dtype(model_cfg.dtype),
    rel_pos_bias=bool(model_cfg.get("rel_pos_bias", False)),
    rel_pos_grid=model_cfg.pos_grid,
    **_size_kwargs(model_cfg),
  )
