"""SaGe's image decoder (generator): the encoder's last feature map -> an image in [-1, 1].

What `sunsmarterjie/SaGe:models/decoder.py` builds on c5 (docs/fidelity.md, SaGe):

  1. conv (k x k, no padding, bias) c5 [k, k, C] -> [1, 1, 512]; no BN/activation (the
     released `bn7` is never applied);
  2. stem: transposed conv (k x k, stride 1, no padding) -> [k, k, 256] -> BN -> ReLU;
  3. up-blocks: transposed conv (4x4, stride 2, PyTorch padding 1, no bias) -> BN -> ReLU,
     doubling the side each time (512, 256, 128, 64, 32 channels: 7 -> 224 at k = 7);
  4. 1x1 conv (bias) -> 3 channels -> tanh.

k is the side of the incoming map (7 for ResNet-50 at 224 px, 4 for the CIFAR-stem ResNet
at 32 px), so the bottleneck is a single 1x1 vector whatever the resolution. The modules
the release defines but never uses (conv1/bn1, bn7, a 2048->8192 linear, conv1_7,
conv1_14) are left out: they get no gradient there either.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from sslx.models.resnet import batch_norm, conv_init

# mmcv kaiming_init(fan_in) on a torch ConvTranspose2d, whose weight is [in, out, k, k]: torch
# takes its fan_in from dim 1, i.e. out * k^2 (the official decoder's init). Flax's transposed
# kernel is [k, k, in, out], so the fan comes from the last axis.
deconv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal", in_axis=-1, out_axis=-2)


class SageDecoder(nn.Module):
  """c5 [B, k, k, C] -> image [B, k * 2**len(up_channels), ..., 3] in [-1, 1] (float32).

  Attributes:
    bottleneck_dim: channels of the 1x1 code (512).
    stem_channels: channels after the first transposed conv (256).
    up_channels: channels of each stride-2 up-block; their count sets the output side.
  """

  bottleneck_dim: int = 512
  stem_channels: int = 256
  up_channels: Sequence[int] = (512, 256, 128, 64, 32)

  @nn.compact
  def __call__(self, c5: jax.Array, *, train: bool) -> jax.Array:
    if c5.ndim != 4 or c5.shape[1] != c5.shape[2]:
      raise ValueError(f"SageDecoder expects a square map [B, k, k, C], got {c5.shape}")
    k = c5.shape[1]
    x = nn.Conv(
      self.bottleneck_dim, (k, k), padding="VALID", kernel_init=conv_init, name="conv_code"
    )(c5.astype(jnp.float32))
    x = nn.ConvTranspose(
      self.stem_channels, (k, k), padding="VALID", kernel_init=deconv_init, name="deconv_stem"
    )(x)
    x = nn.relu(batch_norm(train, "bn_stem")(x))
    for i, ch in enumerate(self.up_channels):
      # PyTorch ConvTranspose2d(k=4, s=2, p=1) == lax padding k - 1 - p = 2 on each side.
      x = nn.ConvTranspose(
        ch,
        (4, 4),
        (2, 2),
        padding=((2, 2), (2, 2)),
        use_bias=False,
        kernel_init=deconv_init,
        name=f"deconv{i}",
      )(x)
      x = nn.relu(batch_norm(train, f"bn{i}")(x))
    x = nn.Conv(3, (1, 1), kernel_init=conv_init, name="conv_out")(x)
    return jnp.tanh(x)
