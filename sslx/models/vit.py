"""Vision Transformer backbone (DINO flavour) in Flax linen.

Conventions:
  * Images are channels-last float arrays ``[B, H, W, C]``; H and W must be multiples of ``patch_size``.
  * Token order is ``[CLS, patch_(0,0), patch_(0,1), ..., patch_(h-1,w-1)]`` (row-major patch grid).
  * Parameters, LayerNorm and softmax are float32; Dense/conv matmuls run in ``dtype``; the residual stream
    and all outputs are float32.
  * Stochastic depth draws from the ``'dropout'`` rng collection and is active only when ``train=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.extend.backend  # noqa: F401  (jax.extend.backend.get_backend)
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Array = jax.Array
DType = Any

# DINO's trunc_normal_(std=.02) truncates at +-2 in absolute units, i.e. +-100 sigma: effectively a plain
# normal. Flax's bounds are in sigma units, so widen them to reproduce that distribution.
_TRUNC_NORMAL_02 = nn.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)
# DINO leaves the patch-embedding conv at PyTorch's default init: U(+-1/sqrt(fan_in)), bias too.
_TORCH_DEFAULT_KERNEL = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
_XAVIER = nn.initializers.xavier_uniform()

INITS = ("dino", "mocov3")


def _torch_default_bias(fan_in: int):
  """PyTorch's default conv/linear bias: U(+-1/sqrt(fan_in))."""
  bound = float(1.0 / np.sqrt(fan_in))
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _xavier_uniform(
  key: Array, shape: tuple[int, ...], dtype: Any, fan_in: int, fan_out: int
) -> Array:
  bound = float(np.sqrt(6.0 / (fan_in + fan_out)))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _qkv_xavier(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
  """MoCo v3's fused-qkv init: xavier-uniform of q, k and v as three (D -> D) maps."""
  return _xavier_uniform(key, shape, dtype, shape[0], shape[1] // 3)


def _dense_init(init_scheme: str, name: str):
  """Kernel init of a block's Linear: DINO's trunc_normal(.02) or MoCo v3's xavier-uniform."""
  if init_scheme == "mocov3":
    return _qkv_xavier if name == "qkv" else _XAVIER
  return _TRUNC_NORMAL_02


def _patch_xavier(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
  """MoCo v3's patch-embedding init: xavier-uniform of the conv seen as a (p*p*C -> D) linear map.

  Flax's xavier_uniform would count the receptive field in fan_out too (p*p*D), which is smaller.
  """
  return _xavier_uniform(key, shape, dtype, int(np.prod(shape[:-1])), int(shape[-1]))


VIT_VARIANTS: dict[str, dict[str, int]] = {
  "tiny": dict(embed_dim=192, depth=12, num_heads=3),
  "small": dict(embed_dim=384, depth=12, num_heads=6),
  "base": dict(embed_dim=768, depth=12, num_heads=12),
  "large": dict(embed_dim=1024, depth=24, num_heads=16),
}
_VARIANT_ALIASES = {"t": "tiny", "s": "small", "b": "base", "l": "large"}


def sincos_2d(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
  """Fixed 2-D sin-cos patch positions [grid_h * grid_w, dim] in MoCo v3's (and CAE's) layout.

  Row-major patches; channels are [sin(y w), cos(y w), sin(x w), cos(x w)] with
  w_k = temperature^(-k / (dim/4)), y the row and x the column index. (facebookresearch/moco-v3
  vits.py, build_2d_sincos_position_embedding, names its first half `out_w`, but its
  `torch.meshgrid(grid_w, grid_h)` indexes 'ij', so on square grids that half follows the row.)
  """
  if dim % 4:
    raise ValueError(f"sin-cos position embeddings need embed_dim divisible by 4, got {dim}.")
  q = dim // 4
  omega = 1.0 / temperature ** (np.arange(q, dtype=np.float64) / q)
  ys, xs = np.meshgrid(
    np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij"
  )
  out_x = xs.reshape(-1, 1) * omega
  out_y = ys.reshape(-1, 1) * omega
  return np.concatenate(
    [np.sin(out_y), np.cos(out_y), np.sin(out_x), np.cos(out_x)], axis=1
  ).astype(np.float32)


def vit_kwargs(variant: str) -> dict[str, int]:
  """Returns ``ViT`` keyword arguments (embed_dim, depth, num_heads) for a named size.

  Args:
    variant: 'tiny' | 'small' | 'base' | 'large' or the letters 'T' | 'S' | 'B' | 'L' (case-insensitive).

  Returns:
    A fresh dict, e.g. ``{'embed_dim': 384, 'depth': 12, 'num_heads': 6}`` for 'small'.
  """
  if not isinstance(variant, str):
    raise TypeError(f"ViT variant must be a string such as 'small' or 'S', got {variant!r}.")
  key = variant.strip().lower()
  key = _VARIANT_ALIASES.get(key, key)
  if key not in VIT_VARIANTS:
    choices = ", ".join(f"'{k}'" for k in VIT_VARIANTS) + " (or 'T', 'S', 'B', 'L')"
    raise ValueError(f"Unknown ViT variant {variant!r}; use one of {choices}.")
  return dict(VIT_VARIANTS[key])


def vit_flops_per_image(
  img_size: int | tuple[int, int],
  patch_size: int,
  embed_dim: int,
  depth: int,
  mlp_ratio: float = 4.0,
  in_chans: int = 3,
) -> int:
  """Analytic forward FLOPs (2 per multiply-add) of one image through the ViT trunk.

  Counts the patch embedding, qkv/proj, attention score and value matmuls and the MLP; ignores
  LayerNorm, softmax, GELU and additions. Multiply by ~3 for forward+backward.

  Args:
    img_size: side (square) or (height, width) in pixels.
    patch_size: patch side in pixels.
    embed_dim: token width D.
    depth: number of blocks.
    mlp_ratio: MLP hidden width / D.
    in_chans: image channels.

  Returns:
    FLOPs as a Python int.
  """
  h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
  n_patch = (h // patch_size) * (w // patch_size)
  tokens = n_patch + 1
  d = embed_dim
  hidden = int(d * mlp_ratio)
  embed = 2 * n_patch * (patch_size * patch_size * in_chans) * d
  per_block = (
    2 * tokens * d * 3 * d  # qkv
    + 2 * tokens * tokens * d * 2  # scores and weighted values
    + 2 * tokens * d * d  # output projection
    + 2 * tokens * d * hidden * 2
  )  # MLP
  return int(embed + depth * per_block)


def _cubic_weight(x: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys cubic convolution kernel (PyTorch's bicubic uses a = -0.75)."""
  x = np.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
  return np.where(x <= 1.0, near, np.where(x < 2.0, far, 0.0))


def bicubic_resize_matrix(src: int, dst: int, scale_factor: float | None = None) -> np.ndarray:
  """1-D resize matrix reproducing ``torch.nn.functional.interpolate(mode='bicubic', align_corners=False)``.

  Output sample ``i`` reads source coordinate ``(i + 0.5) / scale_factor - 0.5`` (not clamped), takes the
  four neighbours ``floor - 1 .. floor + 2`` with clamped (edge-replicated) indices and Keys weights, a = -0.75.

  Args:
    src: input length.
    dst: output length.
    scale_factor: the factor handed to torch; defaults to ``dst / src`` (DINO passes ``(dst + 0.1) / src``).

  Returns:
    float64 array ``[dst, src]``; ``out = M @ in``. Rows sum to 1.
  """
  scale = dst / src if scale_factor is None else scale_factor
  coord = (np.arange(dst, dtype=np.float64) + 0.5) / scale - 0.5
  base = np.floor(coord)
  frac = coord - base
  mat = np.zeros((dst, src), dtype=np.float64)
  rows = np.arange(dst)
  for offset in (-1, 0, 1, 2):
    idx = np.clip(base.astype(np.int64) + offset, 0, src - 1)
    # np.add.at accumulates the weights that edge clamping folds onto the same source index.
    np.add.at(mat, (rows, idx), _cubic_weight(frac - offset))
  return mat


def interpolate_pos_grid(grid: Array, out_hw: tuple[int, int]) -> Array:
  """Resizes a square position-embedding grid as DINO's ViT does, which jax.image.resize cannot.

  DINO calls torch bicubic with ``scale_factor = (n + 0.1) / N`` so that the floor of the output size is
  ``n``; the factor (not n / N) sets the sampling positions. Each axis uses its own target size, so
  non-square crops get the right rows and columns.

  Args:
    grid: float ``[N, N, D]`` trained grid.
    out_hw: target ``(h, w)`` patch counts (static).

  Returns:
    float32 ``[h, w, D]``; ``grid`` itself (cast) when ``(h, w) == (N, N)``.
  """
  n_h, n_w = grid.shape[0], grid.shape[1]
  h, w = out_hw
  if (h, w) == (n_h, n_w):
    return grid.astype(jnp.float32)
  rows = jnp.asarray(bicubic_resize_matrix(n_h, h, (h + 0.1) / n_h), jnp.float32)
  cols = jnp.asarray(bicubic_resize_matrix(n_w, w, (w + 0.1) / n_w), jnp.float32)
  return jnp.einsum(
    "hi,wj,ijd->hwd", rows, cols, grid.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
  )


class PatchEmbed(nn.Module):
  """Non-overlapping p x p patches to D features: the stride-p convolution of every ViT, as one
  matrix product.

  Same parameters as `nn.Conv(features, (p, p), strides=(p, p), padding='VALID')` (a 'kernel'
  [p, p, C, D] and a 'bias' [D], drawn from the same RNG streams, so initialisations and
  checkpoints are unchanged) and the same result up to summation order. On CPUs XLA runs the
  convolution's weight gradient through channel-major transposes of the whole batch of images,
  which cost more than the product itself in the Fashion-MNIST step (experiments/bench/RESULTS.md);
  as a product of [B * h * w, p * p * C] patches with the [p * p * C, D] kernel it needs none.
  """

  features: int
  patch_size: int
  dtype: DType = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, images: Array) -> Array:
    """images [B, H, W, C] with H, W multiples of p -> [B, H/p, W/p, D] in `dtype`."""
    p = self.patch_size
    b, h, w, c = images.shape
    kernel = self.param("kernel", self.kernel_init, (p, p, c, self.features), jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
    patches = images.astype(self.dtype).reshape(b, h // p, p, w // p, p, c)
    out = jnp.einsum("bhpwqc,pqcd->bhwd", patches, kernel.astype(self.dtype))
    return out + bias.astype(self.dtype)


class DropPath(nn.Module):
  """Per-sample stochastic depth: zeroes a sample's residual branch with probability ``rate``.

  ``rate`` may be a traced scalar (it is scanned over depth under ``nn.scan``).
  """

  @nn.compact
  def __call__(self, x: Array, rate: Array | float, train: bool) -> Array:
    """x: [B, ...] float32. Returns x (eval) or x * keep_mask / (1 - rate) (train)."""
    if not train or (isinstance(rate, (int, float)) and rate == 0):
      return x
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    # keep == 1 (rate 0) must be the identity, and never divides by zero.
    return jnp.where(mask, x / jnp.maximum(keep, 1e-12), 0.0).astype(x.dtype)


ATTENTION_KERNELS = ("auto", "xla", "cudnn")


def _cudnn_flash_attention_available() -> bool:
  """A CUDA GPU of compute capability >= 8.0 (cuDNN's fused kernel needs Ampere or later)."""
  try:
    if jax.default_backend() != "gpu":
      return False
    # The same checks as jax's own cuDNN attention (platform_version names CUDA, not ROCm).
    if "cuda" not in str(jax.extend.backend.get_backend().platform_version).lower():
      return False
    return float(getattr(jax.devices()[0], "compute_capability", 0)) >= 8.0
  except Exception:  # pylint: disable=broad-except  # unknown device: the explicit path is safe
    return False


def attention_kernel(attention: str, dtype: DType) -> str:
  """'xla' or 'cudnn' for a ViT's ``attention`` setting; 'auto' takes cuDNN's fused kernel on a CUDA
  GPU (Ampere or later) with 16-bit matmuls (27% faster DINO ViT-S/16 steps on an H100,
  experiments/bench/RESULTS.md), the explicit path everywhere else."""
  if attention != "auto":
    return attention
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if half and _cudnn_flash_attention_available() else "xla"


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (bias on, as DINO's vit_* factories).

  ``attention``: 'xla' (explicit einsums and a float32 softmax), 'cudnn' (cuDNN's fused flash
  kernel, GPUs with 16-bit matmuls only; it never writes the [B, heads, T, T] scores to memory)
  or 'auto' (see `attention_kernel`).
  The fused kernel does not give the attention matrix, so ``need_weights`` takes the explicit path.
  """

  num_heads: int
  dtype: DType = jnp.float32
  attention: str = "xla"
  need_weights: bool = False
  init_scheme: str = "dino"

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array | None]:
    """x: [B, T, D] float32. Returns (out [B, T, D] float32, attention [B, heads, T, T] float32,
    or None from the fused kernel)."""
    b, t, d = x.shape
    head_dim = d // self.num_heads
    dense = lambda feat, name: nn.Dense(
      feat,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=_dense_init(self.init_scheme, name),
      bias_init=nn.initializers.zeros,
      name=name,
    )
    qkv = dense(3 * d, "qkv")(x).reshape(b, t, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if attention_kernel(self.attention, self.dtype) == "cudnn" and not self.need_weights:
      # cuDNN trains only even sequence lengths (197 = 1 + 14^2 is odd): pad one token and
      # mask it out as a key; the padded query row is dropped.
      pad = t % 2
      if pad:
        q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
      out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=head_dim**-0.5,
        implementation="cudnn",
        key_value_seq_lengths=jnp.full((b,), t, jnp.int32) if pad else None,
      )
      return dense(d, "proj")(out[:, :t].reshape(b, t, d)).astype(jnp.float32), None
    logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=jnp.float32)
    attn = jax.nn.softmax(logits * head_dim**-0.5, axis=-1)
    out = jnp.einsum("bhqk,bkhc->bqhc", attn.astype(self.dtype), v).reshape(b, t, d)
    return dense(d, "proj")(out).astype(jnp.float32), attn


def gelu_exact(x: Array) -> Array:
  """torch's nn.GELU(): the exact erf form, written as torch computes it, x/2 (1 + erf(x/sqrt 2)).

  The same function as jax.nn.gelu(approximate=False) (within 1e-6), which goes through erfc:
  XLA's CPU backend evaluates erfc 3-4x slower than erf, and the exact GELU of the demo's step
  (experiments/bench/RESULTS.md, issue 22) cost more than its matrix products.
  """
  return x * 0.5 * (1.0 + jax.lax.erf(x * 0.7071067811865476))


_GELU = gelu_exact  # torch nn.GELU: the exact erf form
_GELU_RECOMPUTED = jax.checkpoint(_GELU)
_REMAT_LAYER_NORM = nn.remat(nn.LayerNorm)


class Block(nn.Module):
  """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x))).

  ``train`` (enables stochastic depth) is an attribute, not a call argument, so that the block body stays
  static under ``nn.scan``.
  """

  num_heads: int
  mlp_ratio: float = 4.0
  layer_norm_eps: float = 1e-6
  dtype: DType = jnp.float32
  train: bool = False
  attention: str = "xla"
  need_weights: bool = False
  recompute_elementwise: bool = False
  init_scheme: str = "dino"

  @nn.compact
  def __call__(self, x: Array, drop_rate: Array | float) -> tuple[Array, Array | None]:
    """x: [B, T, D] float32; drop_rate: scalar. Returns (x [B, T, D] float32, attention [B, h, T, T])."""
    d = x.shape[-1]
    # recompute_elementwise: the backward pass recomputes LayerNorm and GELU from their inputs
    # instead of reading the intermediates autodiff would save (GELU alone keeps four
    # [B, T, 4D] tensors); matrix products are never recomputed.
    layer_norm = _REMAT_LAYER_NORM if self.recompute_elementwise else nn.LayerNorm
    norm = lambda name: layer_norm(
      epsilon=self.layer_norm_eps, dtype=jnp.float32, param_dtype=jnp.float32, name=name
    )
    gelu = _GELU_RECOMPUTED if self.recompute_elementwise else _GELU
    dense = lambda feat, name: nn.Dense(
      feat,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=_dense_init(self.init_scheme, name),
      bias_init=nn.initializers.zeros,
      name=name,
    )
    branch, attn = Attention(
      self.num_heads,
      dtype=self.dtype,
      attention=self.attention,
      need_weights=self.need_weights,
      init_scheme=self.init_scheme,
      name="attn",
    )(norm("norm1")(x))
    x = x + DropPath(name="drop_path1")(branch, drop_rate, self.train)
    h = dense(int(d * self.mlp_ratio), "fc1")(norm("norm2")(x))
    h = gelu(h)
    h = dense(d, "fc2")(h).astype(jnp.float32)
    x = x + DropPath(name="drop_path2")(h, drop_rate, self.train)
    return x, attn


class _ScanBody(nn.Module):
  """Adapter giving ``Block`` the (carry, xs) -> (carry, ys) shape nn.scan expects."""

  num_heads: int
  mlp_ratio: float
  layer_norm_eps: float
  dtype: DType
  train: bool
  attention: str
  recompute_elementwise: bool
  init_scheme: str
  collect_cls: bool = False

  @nn.compact
  def __call__(self, x: Array, drop_rate: Array) -> tuple[Array, Array | None]:
    x, _ = Block(
      self.num_heads,
      self.mlp_ratio,
      self.layer_norm_eps,
      self.dtype,
      self.train,
      self.attention,
      recompute_elementwise=self.recompute_elementwise,
      init_scheme=self.init_scheme,
      name="block",
    )(x, drop_rate)
    # Each block's [CLS] as a scan output, only when asked (the DINO linear protocol).
    return x, (x[:, 0] if self.collect_cls else None)


class ViT(nn.Module):
  """DINO-style Vision Transformer.

  Attributes:
    patch_size: patch side in pixels.
    embed_dim: token width D.
    depth: number of transformer blocks.
    num_heads: attention heads (must divide D).
    mlp_ratio: MLP hidden width / D.
    drop_path_rate: stochastic-depth rate of the last block; block i uses rate * i / (depth - 1).
    layer_norm_eps: LayerNorm epsilon (1e-6 as DINO's vit_* factories).
    pos_grid: side of the trained position-embedding grid (img_size // patch_size, 14 for 224/16).
    dtype: compute dtype of Dense/conv matmuls (e.g. jnp.bfloat16 on accelerators).
    use_mask_token: create a learned [D] mask token (iBOT) used when a mask is passed.
    pos_embed: 'learned' (DINO/iBOT: a trained [1 + pos_grid**2, D] table, interpolated to other
      grids) or 'sincos' (MoCo v3: fixed 2-D sin-cos at the actual grid, zero for CLS, no param).
    init_scheme: 'dino' (DINO/iBOT: Linear kernels trunc_normal(.02) with zero biases, the patch
      conv at PyTorch's default U(+-1/sqrt(fan_in)) for kernel and bias, CLS and positions
      trunc_normal(.02)) or 'mocov3' (MoCo v3: xavier-uniform Linears, the fused qkv as three
      D -> D maps, zero biases; patch conv xavier-uniform +-sqrt(6 / (3 p^2 + D)) with a zero
      bias, used with its frozen random patch embedding; CLS N(0, 1e-6^2)).
    attention: 'auto', 'xla' (explicit) or 'cudnn' (fused flash attention on GPUs); see `Attention`.
    recompute_elementwise: the backward pass recomputes each block's LayerNorms and GELU from
      their inputs rather than saving their intermediates (less activation memory and traffic,
      a little more elementwise work; matrix products are not recomputed).
    scan_blocks: run the first depth-1 blocks with nn.scan (params stacked under 'blocks', leading axis
      depth-1); the last block is always named f'block_{depth-1}'. Without scan blocks are 'block_i'.

  Parameter names: 'patch_embed' (conv), 'cls_token' [1, 1, D], 'pos_embed' [1, 1 + pos_grid**2, D]
  (learned only),
  'mask_token' [D] (if use_mask_token), blocks as above, 'norm' (final LayerNorm).
  """

  patch_size: int = 16
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  layer_norm_eps: float = 1e-6
  pos_grid: int = 14
  dtype: DType = jnp.float32
  use_mask_token: bool = False
  scan_blocks: bool = False
  pos_embed: str = "learned"
  init_scheme: str = "dino"
  attention: str = "xla"
  recompute_elementwise: bool = False

  def _check_config(self) -> None:
    if self.embed_dim % self.num_heads:
      raise ValueError(
        f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}; "
        "pick num_heads dividing embed_dim (e.g. from vit_kwargs)."
      )
    if self.depth < 1:
      raise ValueError(f"depth must be >= 1, got {self.depth}.")
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}.")
    if self.pos_embed not in ("learned", "sincos"):
      raise ValueError(f"pos_embed={self.pos_embed!r}; valid: 'learned', 'sincos'.")
    if self.attention not in ATTENTION_KERNELS:
      raise ValueError(f"attention={self.attention!r}; valid: {', '.join(ATTENTION_KERNELS)}.")
    if self.init_scheme not in INITS:
      raise ValueError(f"init_scheme={self.init_scheme!r}; valid: {', '.join(INITS)}.")

  def _check_inputs(self, images: Array, mask: Array | None) -> tuple[int, int]:
    if images.ndim != 4:
      raise ValueError(
        f"ViT expects channels-last images [B, H, W, C], got shape {images.shape}; "
        "add a batch axis or transpose NCHW to NHWC."
      )
    _, height, width, _ = images.shape
    if height % self.patch_size or width % self.patch_size:
      raise ValueError(
        f"Image size {height}x{width} is not a multiple of patch_size={self.patch_size}; "
        "crop or resize to a multiple of the patch size."
      )
    grid = (height // self.patch_size, width // self.patch_size)
    if mask is not None:
      if not self.use_mask_token:
        raise ValueError(
          "A mask was passed but this ViT has no mask token; build it with "
          "use_mask_token=True (iBOT) or pass mask=None."
        )
      expected = (images.shape[0],) + grid
      if tuple(mask.shape) != expected:
        raise ValueError(
          f"mask must have shape [B, h, w] = {list(expected)} for images "
          f"{list(images.shape)}, got {list(mask.shape)}."
        )
    return grid

  @nn.compact
  def __call__(
    self,
    images: Array,
    *,
    train: bool,
    mask: Array | None = None,
    return_attention: bool = False,
    n_last_blocks: int = 0,
  ) -> dict[str, Array]:
    """Encodes a batch of images.

    Args:
      images: float [B, H, W, C], H and W multiples of patch_size.
      train: enables stochastic depth (needs a 'dropout' rng when drop_path_rate > 0).
      mask: optional bool [B, H/p, W/p]; True marks patches replaced by the mask token (iBOT).
      return_attention: also return the last block's attention.
      n_last_blocks: also return the [CLS] token after each of the last n blocks, each through
        the final LayerNorm (DINO's `get_intermediate_layers`, for its linear protocol).

    Returns:
      dict of float32 arrays: 'cls' [B, D] and 'patch' [B, N, D] after the final LayerNorm;
      'prenorm' [B, 1 + N, D], the last block's output before it; with return_attention, 'attention'
      [B, heads, 1 + N, 1 + N] (softmax rows sum to 1); with n_last_blocks, 'block_cls'
      [B, n, D], oldest block first (its last row equals 'cls'). N = (H/p) * (W/p).
    """
    if not 0 <= n_last_blocks <= self.depth:
      raise ValueError(f"n_last_blocks={n_last_blocks} must be in [0, depth={self.depth}].")
    self._check_config()
    grid_h, grid_w = self._check_inputs(images, mask)
    d = self.embed_dim

    moco = self.init_scheme == "mocov3"
    fan_in = self.patch_size * self.patch_size * images.shape[-1]
    x = PatchEmbed(
      d,
      self.patch_size,
      dtype=self.dtype,
      kernel_init=_patch_xavier if moco else _TORCH_DEFAULT_KERNEL,
      bias_init=nn.initializers.zeros if moco else _torch_default_bias(fan_in),
      name="patch_embed",
    )(images.astype(self.dtype))
    x = x.astype(jnp.float32).reshape(x.shape[0], grid_h * grid_w, d)

    if self.use_mask_token:
      mask_token = self.param("mask_token", nn.initializers.zeros, (d,), jnp.float32)
      if mask is not None:
        flat = jnp.asarray(mask, bool).reshape(x.shape[0], grid_h * grid_w, 1)
        x = jnp.where(flat, mask_token, x)

    cls_token = self.param(
      "cls_token",
      nn.initializers.normal(1e-6) if moco else _TRUNC_NORMAL_02,
      (1, 1, d),
      jnp.float32,
    )
    if self.pos_embed == "sincos":
      pos = jnp.asarray(
        np.concatenate([np.zeros((1, d), np.float32), sincos_2d(grid_h, grid_w, d)])
      )[None]
    else:
      table = self.param("pos_embed", _TRUNC_NORMAL_02, (1, 1 + self.pos_grid**2, d), jnp.float32)
      patch_pos = interpolate_pos_grid(
        table[0, 1:].reshape(self.pos_grid, self.pos_grid, d), (grid_h, grid_w)
      ).reshape(1, grid_h * grid_w, d)
      pos = jnp.concatenate([table[:, :1], patch_pos], axis=1)
    x = jnp.concatenate([jnp.broadcast_to(cls_token, (x.shape[0], 1, d)), x], axis=1)
    x = x + pos

    rates = np.linspace(0.0, self.drop_path_rate, self.depth, dtype=np.float32)
    # With a zero rate no 'dropout' rng is needed, even in train mode.
    drop_active = bool(train) and self.drop_path_rate > 0
    block_args = (
      self.num_heads,
      self.mlp_ratio,
      self.layer_norm_eps,
      self.dtype,
      drop_active,
      self.attention,
    )
    recompute = dict(recompute_elementwise=self.recompute_elementwise, init_scheme=self.init_scheme)
    block_cls: list[Array] = []  # [CLS] after each of the first depth - 1 blocks, if asked
    collect = n_last_blocks > 1
    if self.scan_blocks and self.depth > 1:
      scanned = nn.scan(
        _ScanBody,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=0,
        length=self.depth - 1,
      )
      x, per_block = scanned(*block_args, **recompute, collect_cls=collect, name="blocks")(
        x, jnp.asarray(rates[:-1])
      )
      if collect:
        block_cls = list(per_block)
    else:
      for i in range(self.depth - 1):
        x, _ = Block(*block_args, **recompute, name=f"block_{i}")(x, float(rates[i]))
        if collect:
          block_cls.append(x[:, 0])
    x, attn = Block(
      *block_args, need_weights=return_attention, **recompute, name=f"block_{self.depth - 1}"
    )(x, float(rates[-1]))

    norm = nn.LayerNorm(
      epsilon=self.layer_norm_eps, dtype=jnp.float32, param_dtype=jnp.float32, name="norm"
    )
    normed = norm(x)
    out = {"cls": normed[:, 0], "patch": normed[:, 1:], "prenorm": x}
    if n_last_blocks:
      # LayerNorm is per token, so normalising the [CLS] alone equals DINO's norm(x)[:, 0].
      earlier = [norm(c) for c in block_cls[len(block_cls) - (n_last_blocks - 1) :]]
      out["block_cls"] = jnp.stack([*earlier, out["cls"]], axis=1)
    if return_attention:
      out["attention"] = attn.astype(jnp.float32)
    return out
