"""Tests for sslx.models.heads.DINOHead."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from sslx.models import heads
from sslx.models.heads import DINOHead, WeightNormDense
from sslx.normalize import l2_normalize

SMALL = dict(out_dim=40, hidden_dim=24, bottleneck_dim=8)


def _x(shape=(5, 16), seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def _paths(params):
  return {"/".join(k) for k in traverse_util.flatten_dict(params)}


def test_output_shape_and_dtype():
  head = DINOHead(**SMALL)
  params = head.init(jax.random.key(0), _x())
  out = head.apply(params, _x())
  assert out.shape == (5, 40) and out.dtype == jnp.float32
  tokens = head.apply(params, _x((2, 3, 16)))  # works on token sequences too
  assert tokens.shape == (2, 3, 40)
  bf16 = DINOHead(**SMALL, dtype=jnp.bfloat16).apply(params, _x())
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, out, atol=0.05)


def test_layer_structure_and_last_layer_name():
  params = DINOHead(**SMALL).init(jax.random.key(0), _x())["params"]
  paths = _paths(params)
  assert paths == {
    "mlp_0/kernel",
    "mlp_0/bias",
    "mlp_1/kernel",
    "mlp_1/bias",
    "mlp_2/kernel",
    "mlp_2/bias",
    "last_layer/kernel",
  }
  assert params["mlp_0"]["kernel"].shape == (16, 24)
  assert params["mlp_2"]["kernel"].shape == (24, 8)
  assert params["last_layer"]["kernel"].shape == (8, 40)
  one = DINOHead(**SMALL, num_layers=1).init(jax.random.key(0), _x())["params"]
  assert _paths(one) == {"mlp_0/kernel", "mlp_0/bias", "last_layer/kernel"}


def test_no_g_when_norm_last_layer_and_g_otherwise():
  fixed = DINOHead(**SMALL, norm_last_layer=True).init(jax.random.key(0), _x())["params"]
  assert not any(p.endswith("/g") for p in _paths(fixed))
  free_head = DINOHead(**SMALL, norm_last_layer=False)
  free = free_head.init(jax.random.key(0), _x())["params"]
  np.testing.assert_array_equal(free["last_layer"]["g"], np.ones(40))
  # At g = 1 both variants compute the same function; g then scales each logit.
  np.testing.assert_allclose(
    free_head.apply({"params": free}, _x()),
    DINOHead(**SMALL).apply({"params": fixed}, _x()),
    atol=1e-6,
  )
  scaled = jax.tree.map(lambda a: a, free)
  scaled["last_layer"] = dict(free["last_layer"], g=jnp.full((40,), 2.5))
  np.testing.assert_allclose(
    free_head.apply({"params": scaled}, _x()),
    2.5 * free_head.apply({"params": free}, _x()),
    rtol=1e-5,
    atol=1e-6,
  )


def test_last_layer_directions_have_unit_norm():
  layer = WeightNormDense(12)
  params = layer.init(jax.random.key(0), jnp.zeros((1, 6)))
  effective = np.asarray(
    layer.apply(params, jnp.eye(6))
  )  # rows of the identity read out the weight
  assert effective.shape == (6, 12)
  np.testing.assert_allclose(np.linalg.norm(effective, axis=0), 1.0, atol=1e-6)
  # Rescaling v does not change the function (only its direction matters).
  big = jax.tree.map(lambda a: 7.0 * a, params)
  np.testing.assert_allclose(layer.apply(big, jnp.eye(6)), effective, atol=1e-6)


def test_bottleneck_is_l2_normalised():
  head = DINOHead(**SMALL)
  params = head.init(jax.random.key(0), _x())
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    if context.module.name == "last_layer" and context.method_name == "__call__":
      seen["x"] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    head.apply(params, 100.0 * _x())
  np.testing.assert_allclose(np.linalg.norm(seen["x"], axis=-1), 1.0, atol=1e-5)
  # |logit| <= ||bottleneck|| * ||direction|| = 1 with norm_last_layer.
  assert np.abs(head.apply(params, 100.0 * _x())).max() <= 1.0 + 1e-5


def test_l2_normalize_eps_like_torch():
  np.testing.assert_array_equal(l2_normalize(jnp.zeros((2, 3))), 0.0)
  np.testing.assert_allclose(l2_normalize(jnp.array([[3.0, 4.0]])), [[0.6, 0.8]], atol=1e-7)


def test_batchnorm_variant():
  head = DINOHead(**SMALL, use_bn=True)
  variables = head.init(jax.random.key(0), _x(), train=False)
  assert set(variables["batch_stats"]) == {"bn_0", "bn_1"}
  out, updates = head.apply(variables, _x(), train=True, mutable=["batch_stats"])
  assert out.shape == (5, 40)
  assert not np.allclose(updates["batch_stats"]["bn_0"]["mean"], 0.0)
  with pytest.raises(ValueError, match="train"):
    head.apply(variables, _x())


def test_sere_predictor_and_moco_mlp_keep_torch_default_linear_init():
  """Both official heads are built outside their models' init: nn.Linear's U(+-1/sqrt(fan_in))."""
  x = jnp.ones((4, 5, 256))
  pred = heads.SerePredictor().init(jax.random.PRNGKey(0), x)["params"]
  k = np.abs(np.asarray(pred["linear"]["kernel"]))
  assert k.max() <= 1 / 16 and k.max() > 0.99 / 16
  mlp = heads.MocoMLP(num_layers=2, hidden_dim=64, out_dim=8).init(
    jax.random.PRNGKey(0), jnp.ones((4, 256))
  )["params"]
  for name, fan_in in (("linear_0", 256), ("linear_1", 64)):
    k = np.abs(np.asarray(mlp[name]["kernel"]))
    assert k.max() <= fan_in**-0.5 and k.max() > 0.95 * fan_in**-0.5, name
