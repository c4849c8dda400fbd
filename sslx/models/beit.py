"""BEiT-style transformer pieces used by CAE (Atten4Vis/CAE `models/modeling_cae_helper.py`).

What differs from sslx/models/vit.py (DINO flavour), and why these live apart:
  * attention has learned q and v biases but **no k bias** (BEiT), a fused bias-free qkv Linear;
  * blocks carry layer scale gamma_1, gamma_2 (init `init_values`, 0.1 for CAE base);
  * every Linear is xavier_uniform with zero bias: CAE's top-level `apply(_init_weights)`
    overwrites the BEiT truncated-normal + 1/sqrt(2*layer) rescale (docs/fidelity.md,
    Initialisation);
  * positions are fixed 2-D sin-cos embeddings (`sincos_pos_embed`);
  * the cross-attention block of CAE's regressor (`RegressorBlock`) is post-norm.

Shapes: tokens are float32 ``[B, T, D]``; matmuls run in ``dtype``; LayerNorm eps is 1e-6.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sslx.models.vit import DropPath, gelu_exact, sincos_2d

Array = jax.Array
XAVIER = nn.initializers.xavier_uniform()
# torch trunc_normal_(std=.02, a=-.02, b=.02) = N(0, .02^2) cut at +-1 sigma (so its std is
# 0.0108). jax's initializer draws N(0, 1) cut at [lower, upper] and multiplies by stddev.
TRUNC_NORMAL_1SIGMA = nn.initializers.truncated_normal(stddev=0.02, lower=-1.0, upper=1.0)


def sincos_pos_embed(
  grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0
) -> np.ndarray:
  """CAE's fixed 2-D sin-cos position embeddings, row-major over the patch grid.

  For token (r, c) the embedding is [sin(r w), cos(r w), sin(c w), cos(c w)] with
  w_k = temperature^(-k / (dim/4)), k < dim/4. The official code's meshgrid('ij') over (w, h)
  makes the first half depend on the row index; kept for weight compatibility.
  This is MoCo v3's table too, so it is `vit.sincos_2d`.

  Returns:
    float32 [grid_h * grid_w, dim] (no CLS row; CAE's CLS position is all zeros).
  """
  if dim % 4:
    raise ValueError(
      f"embed_dim={dim} must be divisible by 4 for 2-D sin-cos positions; "
      "set config.model.embed_dim to a multiple of 4."
    )
  return sincos_2d(grid_h, grid_w, dim, temperature)


def dense(features: int, dtype: Any, name: str, use_bias: bool = True) -> nn.Dense:
  """A CAE Linear: xavier-uniform kernel, zero bias, float32 parameters, `dtype` matmul."""
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=XAVIER,
    bias_init=nn.initializers.zeros,
    name=name,
  )


def layer_norm(name: str) -> nn.LayerNorm:
  """LayerNorm with eps 1e-6 in float32 (the official norm_layer)."""
  return nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


def _split_heads(x: Array, num_heads: int) -> Array:
  return x.reshape(x.shape[0], x.shape[1], num_heads, x.shape[2] // num_heads)


def attention_weights(q: Array, k: Array, num_heads: int, bias: Array | None = None) -> Array:
  """softmax(q k^T / sqrt(d_h) + bias) per head, float32.

  q [B, Tq, D], k [B, Tk, D], bias [h, Tq, Tk] or None -> [B, h, Tq, Tk].
  """
  logits = jnp.einsum(
    "bqhc,bkhc->bhqk",
    _split_heads(q, num_heads),
    _split_heads(k, num_heads),
    preferred_element_type=jnp.float32,
  )
  logits = logits * (q.shape[-1] // num_heads) ** -0.5
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  return jax.nn.softmax(logits, axis=-1)


def relative_position_index(grid_h: int, grid_w: int) -> np.ndarray:
  """BEiT's relative position index of a [CLS] + grid_h x grid_w token sequence.

  Patch pairs index the table by their row and column offsets, (dr + h - 1) * (2w - 1) +
  (dc + w - 1); the three rows after those (2h - 1)(2w - 1) are [CLS] -> patch, patch -> [CLS]
  and [CLS] -> [CLS]. Row-major patches, [CLS] first.

  Returns:
    int32 [1 + h w, 1 + h w] into a table of `relative_position_table_size(h, w)` rows.
  """
  grid_r, grid_c = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  rows, cols = grid_r.reshape(-1), grid_c.reshape(-1)
  dr = rows[:, None] - rows[None, :] + grid_h - 1
  dc = cols[:, None] - cols[None, :] + grid_w - 1
  size = relative_position_table_size(grid_h, grid_w)
  index = np.zeros((grid_h * grid_w + 1,) * 2, np.int32)
  index[1:, 1:] = dr * (2 * grid_w - 1) + dc
  index[0, :] = size - 3
  index[:, 0] = size - 2
  index[0, 0] = size - 1
  return index


def relative_position_table_size(grid_h: int, grid_w: int) -> int:
  """Rows of BEiT's relative position bias table: every offset, plus three for [CLS] pairs."""
  return (2 * grid_h - 1) * (2 * grid_w - 1) + 3


def mix_values(attn: Array, v: Array) -> Array:
  """attn [B, h, Tq, Tk] applied to v [B, Tk, D] -> [B, Tq, D]."""
  b, tq = attn.shape[0], attn.shape[2]
  return jnp.einsum(
    "bhqk,bkhc->bqhc", attn.astype(v.dtype), _split_heads(v, attn.shape[1])
  ).reshape(b, tq, v.shape[-1])


def attend(q: Array, k: Array, v: Array, num_heads: int) -> Array:
  """Multi-head softmax(q k^T / sqrt(d_h)) v. q [B, Tq, D], k and v [B, Tk, D] -> [B, Tq, D]."""
  return mix_values(attention_weights(q, k, num_heads), v)


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2 (torch nn.GELU default)."""

  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    h = gelu_exact(dense(int(d * self.mlp_ratio), self.dtype, "fc1")(x))
    return dense(d, self.dtype, "fc2")(h).astype(jnp.float32)


class SelfAttention(nn.Module):
  """BEiT attention: bias-free fused qkv plus learned q_bias and v_bias (k bias fixed at 0).

  With `rel_pos_grid` = (h, w) it also learns BEiT's relative position bias,
  'relative_position_bias_table' [(2h - 1)(2w - 1) + 3, heads], zero at init, added to the
  attention logits (`relative_position_index`); the input must then be [CLS] + h x w patches.

  The softmax weights [B, heads, T, T] are sown as 'intermediates'/'attention' (kept only when
  that collection is mutable, e.g. for `--mode=attention`; otherwise free)."""

  num_heads: int
  dtype: Any = jnp.float32
  rel_pos_grid: tuple[int, int] | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    q_bias = self.param("q_bias", nn.initializers.zeros, (d,), jnp.float32)
    v_bias = self.param("v_bias", nn.initializers.zeros, (d,), jnp.float32)
    qkv = dense(3 * d, self.dtype, "qkv", use_bias=False)(x)
    qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    bias = None
    if self.rel_pos_grid is not None:
      h, w = self.rel_pos_grid
      if x.shape[1] != 1 + h * w:
        raise ValueError(
          f"relative position bias for a {h}x{w} grid needs 1 + {h * w} tokens, got "
          f"{x.shape[1]}; set config.model.pos_grid to the image size / patch size."
        )
      table = self.param(
        "relative_position_bias_table",
        nn.initializers.zeros,
        (relative_position_table_size(h, w), self.num_heads),
        jnp.float32,
      )
      bias = jnp.transpose(table[relative_position_index(h, w)], (2, 0, 1))
    attn = attention_weights(q, k, self.num_heads, bias)
    self.sow("intermediates", "attention", attn)
    return dense(d, self.dtype, "proj")(mix_values(attn, v)).astype(jnp.float32)


class CrossAttention(nn.Module):
  """CAE cross-attention: separate bias-free q/k/v Linears, learned q_bias and v_bias, no k bias."""

  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q_in: Array, k_in: Array, v_in: Array) -> Array:
    """q_in [B, Tq, D], k_in and v_in [B, Tk, D] -> [B, Tq, D] float32."""
    d = q_in.shape[-1]
    q_bias = self.param("q_bias", nn.initializers.zeros, (d,), jnp.float32)
    v_bias = self.param("v_bias", nn.initializers.zeros, (d,), jnp.float32)
    q = dense(d, self.dtype, "q", use_bias=False)(q_in) + q_bias.astype(self.dtype)
    k = dense(d, self.dtype, "k", use_bias=False)(k_in)
    v = dense(d, self.dtype, "v", use_bias=False)(v_in) + v_bias.astype(self.dtype)
    return dense(d, self.dtype, "proj")(attend(q, k, v, self.num_heads)).astype(jnp.float32)


def _gamma(module: nn.Module, name: str, d: int, init_values: float) -> Array:
  if init_values > 0:
    return module.param(name, nn.initializers.constant(init_values), (d,), jnp.float32)
  return jnp.ones((d,), jnp.float32)  # no layer scale (the official fixed ones)


class Block(nn.Module):
  """Pre-norm BEiT block with layer scale: x + dp(g1 * attn(LN1 x)); x + dp(g2 * mlp(LN2 x)).

  `rel_pos_grid`: see SelfAttention (BEiT's relative position bias; fine-tuning only here)."""

  num_heads: int
  mlp_ratio: float = 4.0
  init_values: float = 0.1
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  rel_pos_grid: tuple[int, int] | None = None

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    d = x.shape[-1]
    g1, g2 = (
      _gamma(self, "gamma_1", d, self.init_values),
      _gamma(self, "gamma_2", d, self.init_values),
    )
    dp = DropPath(name="drop_path")
    h = SelfAttention(self.num_heads, self.dtype, self.rel_pos_grid, name="attn")(
      layer_norm("norm1")(x)
    )
    x = x + dp(g1 * h, self.drop_path, train)
    h = Mlp(self.mlp_ratio, self.dtype, name="mlp")(layer_norm("norm2")(x))
    return x + dp(g2 * h, self.drop_path, train)


class RegressorBlock(nn.Module):
  """CAE's latent contextual regressor block (docs/fidelity.md, CAE).

  With x_q the current mask-query states, kv = [x_vis; x_q] and p_kv = [p_vis; p_q]:
    x = x_q + dp(g1 * CrossAttn(LN_q(x_q + p_q), LN_k(kv + p_kv), LN_v(kv)))   (no positions on V)
    x = LN2(x)                                                                 (post-norm)
    x = x + dp(g2 * MLP(x))
  The visible latents are an input only; the block returns the updated queries.
  """

  num_heads: int
  mlp_ratio: float = 4.0
  init_values: float = 0.1
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_q: Array, x_vis: Array, pos_q: Array, pos_vis: Array, train: bool) -> Array:
    """x_q, pos_q [B, Nm, D]; x_vis, pos_vis [B, Nv, D] -> new x_q [B, Nm, D]."""
    d = x_q.shape[-1]
    g1, g2 = (
      _gamma(self, "gamma_1", d, self.init_values),
      _gamma(self, "gamma_2", d, self.init_values),
    )
    dp = DropPath(name="drop_path")
    kv = jnp.concatenate([x_vis, x_q], axis=1)
    pos_kv = jnp.concatenate([pos_vis, pos_q], axis=1)
    h = CrossAttention(self.num_heads, self.dtype, name="cross_attn")(
      layer_norm("norm_q")(x_q + pos_q), layer_norm("norm_k")(kv + pos_kv), layer_norm("norm_v")(kv)
    )
    x = layer_norm("norm2")(x_q + dp(g1 * h, self.drop_path, train))
    h = Mlp(self.mlp_ratio, self.dtype, name="mlp")(x)
    return x + dp(g2 * h, self.drop_path, train)
