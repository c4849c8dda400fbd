"""BYOL/SaGe projector and predictor MLPs (Flax linen).

Linear(hidden, bias) -> BatchNorm -> ReLU -> Linear(out, bias), no BN after the last
layer: BYOL's MLP (deepmind-research/byol) and OpenSelfSup's NonLinearNeckSimCLR as
SaGe uses it (2048 -> 4096 -> 256 for the projector,
256 -> 4096 -> 256 for the predictor). BatchNorm is the cross-device one described in
sslx/models/resnet.py (a plain batch mean under jit is the global-batch mean).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from sslx.models.resnet import batch_norm

# OpenSelfSup inits the projector Kaiming (fan_in) and the predictor N(0, 0.01).
KAIMING = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
NORMAL_001 = nn.initializers.normal(0.01)


class MLP(nn.Module):
  """x [B, in] -> [B, out_dim] float32.

  Attributes:
    hidden_dim: width of the hidden layer (4096).
    out_dim: output width (256).
    init_std: None for Kaiming fan_in (projector), else a normal std (0.01 for the predictor).
  """

  hidden_dim: int = 4096
  out_dim: int = 256
  init_std: float | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    init = KAIMING if self.init_std is None else nn.initializers.normal(self.init_std)
    x = nn.Dense(self.hidden_dim, kernel_init=init, name="fc1")(x.astype(jnp.float32))
    x = nn.relu(batch_norm(train, "bn1")(x))
    return nn.Dense(self.out_dim, kernel_init=init, name="fc2")(x)
