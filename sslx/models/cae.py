"""CAE: context autoencoder (Chen et al., 2022), following Atten4Vis/CAE `models/modeling_cae*.py`.

  encoder    visible patches + CLS only (gathered by index, so its cost scales with the visible
             count), fixed 2-D sin-cos positions (CLS position 0), BEiT blocks with layer scale,
             final LN -> [B, 1 + Nv, D];
  regressor  a shared learned mask token at every masked position; each block cross-attends
             from the queries to [visible latents; current queries] (positions on Q and K, not V);
             the visible latents are never updated; final LN -> [B, Nm, Dd];
  decoder    self-attention over the predicted masked latents only (+ their positions), LN,
             Linear -> [B, Nm, out_dim] (pixels per patch or tokenizer logits).

The alignment target is the same encoder run on the *masked* patches as its visible set (plus
its own CLS, which is dropped); the method applies it with stop-gradient parameters
(docs/fidelity.md, CAE). When `decoder_embed_dim` != `embed_dim`, encoder outputs go through
Linear + LN (`encoder_to_regressor`) before the regressor and for the target, as the official code.

Token order everywhere is row-major over the patch grid; index tensors are int32 ``[B, K]``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sslx.models import beit, vit

Array = jax.Array


def split_by_mask(mask: Array, num_masked: int) -> tuple[Array, Array]:
  """Visible and masked patch indices of masks with exactly `num_masked` True per row.

  A stable argsort puts visible indices first, masked after, each ascending (the row-major
  order of torch's boolean indexing), so the shapes are static under jit.

  Args:
    mask: bool [B, N] (True = masked).
    num_masked: K, the masked count of every row (checked by the caller).

  Returns:
    (visible int32 [B, N - K], masked int32 [B, K]).
  """
  n = mask.shape[-1]
  if not 0 < num_masked < n:
    raise ValueError(
      f"num_masked={num_masked} must be in (0, {n}); set config.data.masks.num_masked."
    )
  order = jnp.argsort(mask.astype(jnp.int32), axis=-1, stable=True).astype(jnp.int32)
  return order[:, : n - num_masked], order[:, n - num_masked :]


def gather_tokens(x: Array, idx: Array) -> Array:
  """x [B, N, D], idx int [B, K] -> x[b, idx[b]] as [B, K, D]."""
  return jnp.take_along_axis(x, idx[..., None], axis=1)


def _rates(rate: float, depth: int) -> list[float]:
  return [float(r) for r in np.linspace(0.0, rate, depth)] if depth else []


def _blocks(
  module: nn.Module, x: Array, *, train: bool, rel_pos_grid: tuple[int, int] | None = None
) -> Array:
  """`module.depth` BEiT self-attention blocks, drop path rising linearly to
  `module.drop_path_rate` (the output before the final LayerNorm).

  Called from a compact `__call__`, so the blocks are `module`'s children ('block_i').
  """
  active = bool(train) and module.drop_path_rate > 0
  for i, rate in enumerate(_rates(module.drop_path_rate, module.depth)):
    x = beit.Block(
      module.num_heads,
      module.mlp_ratio,
      module.init_values,
      rate,
      module.dtype,
      rel_pos_grid,
      name=f"block_{i}",
    )(x, active)
  return x


def _blocks_and_norm(module: nn.Module, x: Array, *, train: bool) -> Array:
  """`_blocks`, then LayerNorm ('norm')."""
  return beit.layer_norm("norm")(_blocks(module, x, train=train))


class CAEEncoder(nn.Module):
  """ViT encoder of the visible patches (official `VisionTransformerEncoder`).

  Parameters: 'patch_embed' (conv), 'cls_token' [1, 1, D], 'block_i', 'norm'.

  `rel_pos_bias` (fine-tuning, as the official CAE / BEiT classification fine-tuning does by
  default): every block also learns a relative position bias for a `rel_pos_grid` x
  `rel_pos_grid` patch grid ('block_i/attn/relative_position_bias_table', zero at init, so a
  pretrained encoder computes the same features at the start); all patches must be encoded.
  """

  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  init_values: float = 0.1
  drop_path_rate: float = 0.1
  dtype: Any = jnp.float32
  rel_pos_bias: bool = False
  rel_pos_grid: int = 14

  @nn.compact
  def __call__(
    self, images: Array, keep_idx: Array | None = None, *, train: bool
  ) -> dict[str, Array]:
    """Encodes the patches `keep_idx` of each image (all of them when None).

    Args:
      images: float [B, H, W, C], H and W multiples of patch_size.
      keep_idx: int [B, K] row-major patch indices to encode, or None for all N patches.
      train: stochastic depth on (needs a 'dropout' rng when drop_path_rate > 0).

    Returns:
      'tokens' [B, 1 + K, D] after the final LN, 'cls' [B, D], 'patch' [B, K, D]; 'prenorm'
      [B, 1 + K, D], the last block's output before the final LN (fine-tuning's mean pooling).
    """
    if self.embed_dim % self.num_heads:
      raise ValueError(
        f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}; "
        "fix config.model.embed_dim / num_heads."
      )
    b, h, w, _ = images.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"image {h}x{w} is not a multiple of patch_size={p}.")
    d = self.embed_dim
    x = vit.PatchEmbed(
      d,
      p,
      dtype=self.dtype,
      kernel_init=beit.TRUNC_NORMAL_1SIGMA,
      bias_init=nn.initializers.zeros,
      name="patch_embed",
    )(images.astype(self.dtype))
    x = x.astype(jnp.float32).reshape(b, (h // p) * (w // p), d)
    pos = jnp.broadcast_to(jnp.asarray(beit.sincos_pos_embed(h // p, w // p, d)), x.shape)
    x = x + pos
    if keep_idx is not None:
      x = gather_tokens(x, keep_idx)
    cls = self.param("cls_token", beit.TRUNC_NORMAL_1SIGMA, (1, 1, d), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)  # CLS position is 0
    rel_grid = None
    if self.rel_pos_bias:
      if keep_idx is not None:
        raise ValueError("relative position bias is for fine-tuning on all patches: no keep_idx")
      rel_grid = (self.rel_pos_grid, self.rel_pos_grid)
    prenorm = _blocks(self, x, train=train, rel_pos_grid=rel_grid)
    x = beit.layer_norm("norm")(prenorm)
    return {"tokens": x, "cls": x[:, 0], "patch": x[:, 1:], "prenorm": prenorm}


class LatentRegressor(nn.Module):
  """Masked-latent predictor: mask queries cross-attend to the fixed visible latents."""

  num_heads: int = 12
  depth: int = 4
  mlp_ratio: float = 4.0
  init_values: float = 0.1
  drop_path_rate: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_vis: Array, pos_vis: Array, pos_mask: Array, *, train: bool) -> Array:
    """x_vis, pos_vis [B, Nv, D]; pos_mask [B, Nm, D] -> predicted masked latents [B, Nm, D]."""
    d = x_vis.shape[-1]
    token = self.param("mask_token", beit.TRUNC_NORMAL_1SIGMA, (1, 1, d), jnp.float32)
    x = jnp.broadcast_to(token, pos_mask.shape)
    active = bool(train) and self.drop_path_rate > 0
    for i, rate in enumerate(_rates(self.drop_path_rate, self.depth)):
      x = beit.RegressorBlock(
        self.num_heads, self.mlp_ratio, self.init_values, rate, self.dtype, name=f"block_{i}"
      )(x, x_vis, pos_mask, pos_vis, active)
    return beit.layer_norm("norm")(x)


class Decoder(nn.Module):
  """Self-attention over masked tokens only, then LN and a Linear head to `out_dim`."""

  out_dim: int
  num_heads: int = 12
  depth: int = 4
  mlp_ratio: float = 4.0
  init_values: float = 0.1
  drop_path_rate: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, pos: Array, *, train: bool) -> Array:
    """x, pos [B, T, D] -> [B, T, out_dim] float32 (positions added once, at the input)."""
    x = _blocks_and_norm(self, x + pos, train=train)
    return beit.dense(self.out_dim, self.dtype, "head")(x).astype(jnp.float32)


class CAE(nn.Module):
  """Encoder + (optional encoder_to_regressor) + regressor + decoder.

  Parameter groups: 'encoder', 'encoder_to_regressor' (only when decoder_embed_dim !=
  embed_dim), 'regressor' (includes 'mask_token'), 'decoder'.
  """

  out_dim: int
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  init_values: float = 0.1
  drop_path_rate: float = 0.1
  decoder_embed_dim: int = 0  # 0 = embed_dim
  decoder_num_heads: int = 0  # 0 = num_heads
  regressor_depth: int = 4
  decoder_depth: int = 4
  dtype: Any = jnp.float32

  def setup(self):
    dd = self.decoder_embed_dim or self.embed_dim
    heads = self.decoder_num_heads or self.num_heads
    common = dict(
      mlp_ratio=self.mlp_ratio,
      init_values=self.init_values,
      drop_path_rate=self.drop_path_rate,
      dtype=self.dtype,
    )
    self.encoder = CAEEncoder(self.patch_size, self.embed_dim, self.depth, self.num_heads, **common)
    if dd != self.embed_dim:
      self.to_regressor = beit.dense(dd, self.dtype, "encoder_to_regressor")
      self.to_regressor_norm = beit.layer_norm("encoder_to_regressor_norm")
    self.regressor = LatentRegressor(heads, self.regressor_depth, **common)
    self.decoder = Decoder(self.out_dim, heads, self.decoder_depth, **common)

  def _project(self, x: Array) -> Array:
    if (self.decoder_embed_dim or self.embed_dim) == self.embed_dim:
      return x
    return self.to_regressor_norm(self.to_regressor(x).astype(jnp.float32))

  def _positions(self, images: Array, idx: Array | None) -> Array:
    _, h, w, _ = images.shape
    p = self.patch_size
    pos = jnp.asarray(
      beit.sincos_pos_embed(h // p, w // p, self.decoder_embed_dim or self.embed_dim)
    )
    pos = jnp.broadcast_to(pos, (images.shape[0],) + pos.shape)
    return pos if idx is None else gather_tokens(pos, idx)

  def encode(self, images: Array, keep_idx: Array | None = None, *, train: bool = False) -> dict:
    """The encoder alone (see CAEEncoder); for features and probes."""
    return self.encoder(images, keep_idx, train=train)

  def __call__(self, images: Array, vis_idx: Array, mask_idx: Array, *, train: bool) -> dict:
    """The pretraining forward pass.

    Args:
      images: float [B, H, W, C].
      vis_idx: int [B, Nv] visible patch indices; mask_idx: int [B, Nm] masked ones.

    Returns:
      'latent_pred' [B, Nm, Dd] (regressor output), 'pred' [B, Nm, out_dim] (decoder output),
      'encoded' [B, 1 + Nv, D] (encoder tokens incl. CLS).
    """
    enc = self.encoder(images, vis_idx, train=train)["tokens"]
    x_vis = self._project(enc[:, 1:])  # the CLS is not used by the regressor or any loss
    pos_vis, pos_mask = self._positions(images, vis_idx), self._positions(images, mask_idx)
    latent = self.regressor(x_vis, pos_vis, pos_mask, train=train)
    pred = self.decoder(latent, pos_mask, train=train)
    return {"latent_pred": latent, "pred": pred, "encoded": enc}

  def align_target(self, images: Array, mask_idx: Array, *, train: bool) -> Array:
    """Encoder on the masked patches (+ its own CLS, dropped), projected -> [B, Nm, Dd].

    Call it with stop-gradient parameters; `train=True` keeps drop path active as the official
    alignment encoder (train mode) does.
    """
    return self._project(self.encoder(images, mask_idx, train=train)["patch"])

  def reconstruct_all(self, images: Array) -> Array:
    """Paper Fig. 4 check: all patches -> encoder -> (no regressor) -> decoder: [B, N, out_dim]."""
    x = self._project(self.encoder(images, None, train=False)["patch"])
    return self.decoder(x, self._positions(images, None), train=False)
