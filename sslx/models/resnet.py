"""ResNet-18/34/50/101 backbones (Flax linen) with every stage's output.

Layout follows torchvision / mmcv 'pytorch' style (the SaGe and OpenSelfSup BYOL
backbones): the stride of a bottleneck sits on its
3x3 conv, the shortcut is a strided 1x1 conv + BN when the shape changes, no zero-init
of the last BN of a block, Kaiming fan_in normal init for convs.

BatchNorm and devices: there is no pmap in sslx. Under `jax.jit` with the batch
sharded over a Mesh, the plain mean over the batch axis that `nn.BatchNorm` takes
already is the *global*-batch statistic (XLA inserts the cross-device reduction), i.e.
SyncBN; no axis_name is needed (tests/models/test_resnet.py checks 1 vs 4 devices).
Running statistics live in the 'batch_stats' collection (PyTorch momentum 0.1 =
Flax momentum 0.9, eps 1e-5); pass `train=True` with `mutable=['batch_stats']` to use
batch statistics and update them, `train=False` to use them.

Stems: 'imagenet' = 7x7/2 conv + 3x3/2 max-pool (stride 32 overall, c5 7x7 at 224 px);
'cifar' = 3x3/1 conv and no pool (stride 8, the usual choice at 32 px: c5 is 4x4).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

Array = jax.Array

STAGES = ("c2", "c3", "c4", "c5")
# depth -> (block kind, blocks per stage)
DEPTHS = {
  10: ("basic", (1, 1, 1, 1)),
  18: ("basic", (2, 2, 2, 2)),
  34: ("basic", (3, 4, 6, 3)),
  50: ("bottleneck", (3, 4, 6, 3)),
  101: ("bottleneck", (3, 4, 23, 3)),
}

# mmcv kaiming_init(mode='fan_in', nonlinearity='relu'): normal, variance 2 / fan_in.
conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def batch_norm(train: bool, name: str | None = None) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults (momentum 0.1, eps 1e-5), statistics in float32 with the
  two-pass variance torch computes (see the note in heads.py)."""
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=0.9,
    epsilon=1e-5,
    use_fast_variance=False,
    dtype=jnp.float32,
    name=name,
  )


def _conv(features: int, kernel: int, strides: int, name: str, *, dtype: Any) -> nn.Conv:
  """Bias-free square conv with 'same' padding for odd kernels, torchvision's init."""
  return nn.Conv(
    features,
    (kernel, kernel),
    (strides, strides),
    padding=kernel // 2,
    use_bias=False,
    kernel_init=conv_init,
    dtype=dtype,
    name=name,
  )


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34); `features` is the block's output width."""

  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    conv = functools.partial(_conv, dtype=self.dtype)
    y = nn.relu(batch_norm(train, "bn1")(conv(self.features, 3, self.strides, "conv1")(x)))
    y = batch_norm(train, "bn2")(conv(self.features, 3, 1, "conv2")(y))
    if x.shape[-1] != self.features or self.strides != 1:
      x = batch_norm(train, "down_bn")(conv(self.features, 1, self.strides, "down_conv")(x))
    return nn.relu(y + x)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided, 'pytorch' style) -> 1x1 x4 (ResNet-50/101); `features` = inner width."""

  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    conv = functools.partial(_conv, dtype=self.dtype)
    out = 4 * self.features
    y = nn.relu(batch_norm(train, "bn1")(conv(self.features, 1, 1, "conv1")(x)))
    y = nn.relu(batch_norm(train, "bn2")(conv(self.features, 3, self.strides, "conv2")(y)))
    y = batch_norm(train, "bn3")(conv(out, 1, 1, "conv3")(y))
    if x.shape[-1] != out or self.strides != 1:
      x = batch_norm(train, "down_bn")(conv(out, 1, self.strides, "down_conv")(x))
    return nn.relu(y + x)


class ResNet(nn.Module):
  """A ResNet returning its four stage outputs and the pooled c5.

  Attributes:
    depth: 10 (tests), 18, 34, 50 or 101.
    width: channels of the stem and first stage (64 in the standard nets; smaller for CPU
      presets: stage widths are width * (1, 2, 4, 8), times 4 after a bottleneck).
    stem: 'imagenet' (7x7/2 conv + max-pool) or 'cifar' (3x3/1 conv, no pool).
    dtype: compute dtype of the convolutions; BatchNorm and outputs are float32.
  """

  depth: int = 50
  width: int = 64
  stem: str = "imagenet"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> dict[str, Array]:
    """x: float [B, H, W, 3]. Returns 'c2'..'c5' ([B, h, w, C] float32) and 'pooled' [B, C5].

    With the ImageNet stem at 224 px: c2 56², c3 28², c4 14², c5 7²; channels (64, 128,
    256, 512) for ResNet-18 and (256, 512, 1024, 2048) for ResNet-50.
    """
    if self.depth not in DEPTHS:
      raise ValueError(f"config.model.depth={self.depth}; valid: {sorted(DEPTHS)}")
    kind, blocks = DEPTHS[self.depth]
    block_cls = BasicBlock if kind == "basic" else Bottleneck
    x = x.astype(self.dtype)
    if self.stem == "imagenet":
      x = nn.Conv(
        self.width,
        (7, 7),
        (2, 2),
        padding=3,
        use_bias=False,
        kernel_init=conv_init,
        dtype=self.dtype,
        name="stem_conv",
      )(x)
      x = nn.relu(batch_norm(train, "stem_bn")(x))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    elif self.stem == "cifar":
      x = nn.Conv(
        self.width,
        (3, 3),
        (1, 1),
        padding=1,
        use_bias=False,
        kernel_init=conv_init,
        dtype=self.dtype,
        name="stem_conv",
      )(x)
      x = nn.relu(batch_norm(train, "stem_bn")(x))
    else:
      raise ValueError(f"config.model.stem={self.stem!r}; valid: 'imagenet', 'cifar'")
    out = {}
    for i, (name, n) in enumerate(zip(STAGES, blocks)):
      for j in range(n):
        strides = 2 if (i > 0 and j == 0) else 1
        x = block_cls(self.width * 2**i, strides, self.dtype, name=f"{name}_block{j}")(x, train)
      out[name] = x.astype(jnp.float32)
    out["pooled"] = jnp.mean(out["c5"], axis=(1, 2))
    return out


def stage_channels(depth: int, width: int = 64) -> Sequence[int]:
  """Output channels of c2..c5."""
  kind, _ = DEPTHS[depth]
  mult = 4 if kind == "bottleneck" else 1
  return tuple(width * 2**i * mult for i in range(4))
