"""Projection heads (Flax linen).

The last, weight-normalised layer of every head lives in a submodule named ``'last_layer'``: the optimizer
freezes params whose path contains that name during the first epoch(s), as DINO does.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from sslx.models.vit import gelu_exact
from sslx.normalize import l2_normalize

Array = jax.Array
DType = Any

# Effectively a plain normal (see vit.py): DINO truncates at +-2 absolute, i.e. +-100 sigma for std 0.02.
_TRUNC_NORMAL_02 = nn.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)
# Every BatchNorm in sslx passes use_fast_variance=False: torch takes the variance as the mean
# of (x - mean)^2, while Flax's default E[x^2] - E[x]^2 cancels catastrophically in float32 once
# |mean| >> std (SERE normalises ViT tokens, whose residual stream carries large per-channel
# offsets). tests/models/test_batchnorm_variance.py.

# DINO builds the last layer after applying its init, so its direction keeps PyTorch's Linear default.
_TORCH_DEFAULT_KERNEL = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class WeightNormDense(nn.Module):
  """Bias-free Linear whose weight is ``g * v / ||v||`` with the norm taken per output unit.

  Params: 'kernel' (v) [in, out] and, unless ``fixed_scale``, 'g' [out] initialised to 1. With
  ``fixed_scale`` the magnitude is the constant 1 and no 'g' parameter exists.
  """

  features: int
  fixed_scale: bool = True
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [..., in]. Returns float32 [..., features]."""
    v = self.param("kernel", _TORCH_DEFAULT_KERNEL, (x.shape[-1], self.features), jnp.float32)
    # x (g v / ||v||) computed as (x v) g / ||v||: the same product with the per-unit scale on the
    # [..., out] result. Normalising the [in, out] weight first let XLA's CPU backend fuse the
    # norm's reduction into the matrix product of the teacher's 65536-wide layer, which then took
    # about 40% of a ViT-S/16 step (issue 22, experiments/bench/RESULTS.md).
    scale = 1.0 / jnp.linalg.norm(v, axis=0)
    if not self.fixed_scale:
      scale = scale * self.param("g", nn.initializers.ones, (self.features,), jnp.float32)
    out = jnp.einsum(
      "...i,io->...o",
      x.astype(self.dtype),
      v.astype(self.dtype),
      preferred_element_type=jnp.float32,
    )
    return out.astype(jnp.float32) * scale


def _bottleneck_mlp(head: DINOHead, x: Array, train: bool | None) -> Array:
  """The MLP + L2 normalisation shared by DINOHead and IBOTHead, built inside ``head``'s scope.

  Submodules are named 'mlp_i' (and 'bn_i') in both heads, so a DINO head's parameters are
  exactly an iBOT head's minus 'last_layer2'.
  """
  dense = lambda feat, name: nn.Dense(
    feat,
    dtype=head.dtype,
    param_dtype=jnp.float32,  # noqa: E731
    kernel_init=_TRUNC_NORMAL_02,
    bias_init=nn.initializers.zeros,
    name=name,
    parent=head,
  )
  h = x.astype(jnp.float32)
  for i in range(head.num_layers - 1):
    h = dense(head.hidden_dim, f"mlp_{i}")(h).astype(jnp.float32)
    if head.use_bn:
      # torch BatchNorm1d defaults: momentum 0.1 (flax keeps 0.9 of the old value), eps 1e-5.
      h = nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        use_fast_variance=False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        axis_name=head.bn_axis_name,
        name=f"bn_{i}",
        parent=head,
      )(h)
    h = gelu_exact(h)
  h = dense(head.bottleneck_dim, f"mlp_{head.num_layers - 1}")(h)
  return l2_normalize(h)


class DINOHead(nn.Module):
  """DINO projection head: MLP -> L2-normalise -> weight-normalised Linear to ``out_dim`` logits.

  MLP for num_layers >= 2: Dense(hidden) [BN] GELU, (num_layers - 2) x (Dense(hidden) [BN] GELU),
  Dense(bottleneck); for num_layers == 1: Dense(bottleneck). GELU is the exact erf form (torch default).

  Attributes:
    out_dim: number of prototypes K.
    hidden_dim: MLP hidden width.
    bottleneck_dim: width of the L2-normalised bottleneck.
    num_layers: MLP depth (>= 1).
    use_bn: BatchNorm after each hidden Dense; needs the mutable 'batch_stats' collection in training.
      Under jit on globally sharded arrays BatchNorm already sees the global batch; only inside
      shard_map/pmap set ``bn_axis_name`` to the data axis to get cross-device statistics.
    norm_last_layer: fix the last layer's magnitude at 1 (no 'g' param); otherwise 'g' is learned.
    dtype: compute dtype of the Dense matmuls; params, normalisation and outputs are float32.
    bn_axis_name: axis name for cross-device BatchNorm statistics (see use_bn).
  """

  out_dim: int
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  num_layers: int = 3
  use_bn: bool = False
  norm_last_layer: bool = True
  dtype: DType = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: Array, *, train: bool | None = None) -> Array:
    """Maps features to prototype logits.

    Args:
      x: float [..., D] backbone features (e.g. CLS tokens [B, D], or [B, N, D] for all tokens).
      train: BatchNorm mode; required when use_bn (batch statistics when True), ignored otherwise.

    Returns:
      float32 logits [..., out_dim].
    """
    if self.num_layers < 1:
      raise ValueError(f"DINOHead num_layers must be >= 1, got {self.num_layers}.")
    if self.use_bn and train is None:
      raise ValueError(
        "DINOHead(use_bn=True) needs train=True/False to pick batch or running "
        "BatchNorm statistics; pass train explicitly."
      )
    h = _bottleneck_mlp(self, x, train)
    return WeightNormDense(
      self.out_dim, fixed_scale=self.norm_last_layer, dtype=self.dtype, name="last_layer"
    )(h)


class IBOTHead(nn.Module):
  """iBOT head: DINO's MLP on every token, then 'last_layer' on CLS and 'last_layer2' on patches.

  With ``shared_head`` (the SERE/iBOT README recipes) the patch tokens go through the same
  'last_layer' and ``patch_out_dim`` must equal ``out_dim`` (bytedance/ibot models/head.py).
  Attributes as DINOHead, plus patch_out_dim and shared_head.
  """

  out_dim: int
  patch_out_dim: int
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  num_layers: int = 3
  use_bn: bool = False
  norm_last_layer: bool = True
  shared_head: bool = True
  dtype: DType = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(
    self, cls: Array, patches: Array | None = None, *, train: bool | None = None
  ) -> tuple[Array, Array | None]:
    """cls [B, D], patches [B, N, D] or None -> (cls logits [B, K], patch logits [B, N, Kp] or None)."""
    if self.num_layers < 1:
      raise ValueError(f"IBOTHead num_layers must be >= 1, got {self.num_layers}.")
    if self.shared_head and self.patch_out_dim != self.out_dim:
      raise ValueError(
        f"shared_head needs patch_out_dim == out_dim, got {self.patch_out_dim} "
        f"and {self.out_dim}; set head.patch_out_dim={self.out_dim} or "
        "head.shared_head=False"
      )
    tokens = cls[:, None] if patches is None else jnp.concatenate([cls[:, None], patches], 1)
    h = _bottleneck_mlp(self, tokens, train)
    last = WeightNormDense(
      self.out_dim, fixed_scale=self.norm_last_layer, dtype=self.dtype, name="last_layer"
    )
    cls_logits = last(h[:, 0])
    if patches is None:
      return cls_logits, None
    if not self.shared_head:
      last = WeightNormDense(
        self.patch_out_dim, fixed_scale=self.norm_last_layer, dtype=self.dtype, name="last_layer2"
      )
    return cls_logits, last(h[:, 1:])


class SereProjection(nn.Module):
  """SERE projection h: BatchNorm over (batch, tokens) per channel, then ReLU; no linear layer.

  Always uses the statistics of the current batch (the official code never puts
  these heads in eval mode, teacher included). Under jit on
  globally sharded arrays the statistics are global-batch ones (SyncBN).
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.BatchNorm(
      use_running_average=False, momentum=0.9, epsilon=1e-5, use_fast_variance=False, name="bn"
    )(x.astype(jnp.float32))
    return nn.relu(x)


class SerePredictor(nn.Module):
  """SERE predictor g: 1x1 linear (no bias) -> BatchNorm -> ReLU, applied to h's output.

  The linear keeps PyTorch's default init (the SERE heads' own init is never applied)."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(
      x.shape[-1],
      use_bias=False,
      dtype=self.dtype,
      kernel_init=_TORCH_DEFAULT_KERNEL,
      name="linear",
    )(x)
    x = nn.BatchNorm(
      use_running_average=False, momentum=0.9, epsilon=1e-5, use_fast_variance=False, name="bn"
    )(x.astype(jnp.float32))
    return nn.relu(x)


class SereHeads(nn.Module):
  """The four SERE branches for one crop kind (global or local; the official code has
  separate weights for each kind).

  `__call__(tokens [B, N, C], student: bool)` returns (spatial features, channel
  features): the student gets predictor(projection(x)), the teacher projection(x)
  (as released). Initialise with student=True so the tree holds both paths; the
  teacher (the EMA of the student's tree) then simply leaves its predictors unused.
  """

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, *, student: bool) -> tuple[jax.Array, jax.Array]:
    outs = []
    for branch in ("spatial", "channel"):
      z = SereProjection(name=f"{branch}_projection")(tokens)
      outs.append(SerePredictor(self.dtype, name=f"{branch}_predictor")(z) if student else z)
    return tuple(outs)


class MocoMLP(nn.Module):
  """MoCo v3 projector / predictor: [Dense(no bias) -> BN -> ReLU] x (L-1) -> Dense(no bias) -> BN.

  The last BatchNorm has no affine parameters (facebookresearch/moco-v3 builder.py _build_mlp).
  BatchNorm always uses the statistics of the current call's batch (the official momentum encoder
  runs in train mode too) and keeps no running averages; under jit on sharded arrays those are
  global-batch statistics, as the official SyncBatchNorm. The Linears keep PyTorch's default
  init, U(+-1/sqrt(fan_in)): the official builder makes them after the ViT's own init.
  """

  num_layers: int
  hidden_dim: int
  out_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = x.astype(jnp.float32)
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      h = nn.Dense(
        self.out_dim if last else self.hidden_dim,
        use_bias=False,
        dtype=self.dtype,
        kernel_init=_TORCH_DEFAULT_KERNEL,
        name=f"linear_{i}",
      )(h).astype(jnp.float32)
      h = nn.BatchNorm(
        use_running_average=False,
        momentum=0.9,
        epsilon=1e-5,
        use_bias=not last,
        use_scale=not last,
        use_fast_variance=False,
        name=f"bn_{i}",
      )(h)
      if not last:
        h = nn.relu(h)
    return h
