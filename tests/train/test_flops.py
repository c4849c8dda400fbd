"""sslx.train.flops: matrix-product FLOPs from the jaxpr, through jit, grad, scan and cond."""

import jax
import jax.numpy as jnp
import pytest

from sslx.models.vit import ViT, vit_flops_per_image
from sslx.train import flops


def test_matmul_and_its_gradient():
  m, k, n = 8, 16, 4
  a, b = jnp.ones((m, k)), jnp.ones((k, n))
  assert flops.function_flops(jnp.matmul, a, b) == 2 * m * k * n
  # Forward plus the two backward products (dA = g B^T, dB = A^T g), under jit.
  grad = jax.jit(jax.grad(lambda a, b: jnp.sum(a @ b), argnums=(0, 1)))
  assert flops.function_flops(grad, a, b) == 3 * 2 * m * k * n


def test_batched_dot_scan_and_cond():
  x = jnp.ones((3, 5, 7))
  assert flops.function_flops(lambda x: jnp.einsum("bij,bkj->bik", x, x), x) == 2 * 3 * 5 * 5 * 7

  def scanned(w):
    return jax.lax.scan(lambda c, _: (c @ w, None), jnp.ones((2, 4)), length=6)[0]

  assert flops.function_flops(scanned, jnp.ones((4, 4))) == 6 * 2 * 2 * 4 * 4

  def branchy(p, a):
    return jax.lax.cond(p, lambda a: a @ a @ a, lambda a: a @ a, a)

  assert flops.function_flops(branchy, True, jnp.ones((4, 4))) == 2 * 2 * 4 * 4 * 4


def test_vit_forward_matches_the_analytic_count():
  model = ViT(patch_size=16, pos_grid=14, embed_dim=64, depth=2, num_heads=2)
  x = jnp.ones((1, 224, 224, 3))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  counted = flops.function_flops(lambda p, x: model.apply(p, x, train=False), params, x)
  assert counted == pytest.approx(vit_flops_per_image(224, 16, 64, 2), rel=1e-6)


def test_trainer_counts_fused_attention_as_explicit():
  # MFU's FLOPs: a config asking for cuDNN attention is counted as its explicit form (and so can
  # be counted on a CPU, where that kernel does not exist).
  from configs import dino
  from sslx.train import sharding, trainer

  config = dino.get_config("smoke")
  mesh = sharding.make_mesh(config.mesh)
  built = trainer.build(config, mesh, steps_per_epoch=10, total_steps=10)
  state = built.state_shape
  g, l = config.data.global_crops, config.data.local_crops
  batch = jax.eval_shape(
    lambda: {
      "global_crops": jnp.zeros((16, g.number, g.size, g.size, 3), jnp.uint8),
      "local_crops": jnp.zeros((16, l.number, l.size, l.size, 3), jnp.uint8),
      "global_boxes": jnp.zeros((16, g.number, 4)),
      "global_flips": jnp.zeros((16, g.number), bool),
      "local_boxes": jnp.zeros((16, l.number, 4)),
      "local_flips": jnp.zeros((16, l.number), bool),
      "image_size": jnp.zeros((16, 2), jnp.int32),
    }
  )
  explicit = trainer.model_flops_per_device(config, mesh, 10, 10, state, batch)
  assert explicit and explicit > 0
  with config.unlocked():
    config.model.attention = "cudnn"
  assert trainer.model_flops_per_device(config, mesh, 10, 10, state, batch) == explicit
