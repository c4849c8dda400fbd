"""Tests for sslx.models.vit: shapes, numerics, drop path, mask token, pos-embed interpolation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from sslx.models.vit import (
  PatchEmbed,
  ViT,
  bicubic_resize_matrix,
  interpolate_pos_grid,
  vit_flops_per_image,
  vit_kwargs,
)

TINY = dict(embed_dim=32, depth=2, num_heads=2)


def _model(**kw):
  cfg = dict(patch_size=4, pos_grid=7, **TINY)
  cfg.update(kw)
  return ViT(**cfg)


def _images(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.fixture(scope="module")
def mnist_vit():
  model = _model()
  x = _images((2, 28, 28, 1))
  variables = model.init(jax.random.key(0), x, train=False)
  return model, variables, x


def _block0_input(model, variables, x, **kw):
  """Token sequence fed to the first block (after mask token, CLS and position embeddings)."""
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and context.module.name == "block_0":
      seen["tokens"] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply(variables, x, train=False, **kw)
  return seen["tokens"]


# ---------------------------------------------------------------- shapes and basic numerics


def test_shapes_28px_patch4(mnist_vit):
  model, variables, x = mnist_vit
  out = model.apply(variables, x, train=False, return_attention=True)
  assert out["cls"].shape == (2, 32)
  assert out["patch"].shape == (2, 49, 32)
  assert out["prenorm"].shape == (2, 50, 32)
  assert out["attention"].shape == (2, 2, 50, 50)
  assert all(v.dtype == jnp.float32 for v in out.values())
  assert "attention" not in model.apply(variables, x, train=False)


@pytest.mark.parametrize("hw,n", [((224, 224), 196), ((96, 96), 36), ((224, 96), 84)])
def test_shapes_224_patch16(hw, n):
  model = ViT(patch_size=16, pos_grid=14, **TINY)
  x = _images((1,) + hw + (3,))
  variables = model.init(jax.random.key(0), _images((1, 224, 224, 3)), train=False)
  assert variables["params"]["pos_embed"].shape == (1, 197, 32)
  out = model.apply(variables, x, train=False, return_attention=True)
  assert out["patch"].shape == (1, n, 32)
  assert out["attention"].shape == (1, 2, n + 1, n + 1)


def test_prenorm_is_before_final_layernorm(mnist_vit):
  model, variables, x = mnist_vit
  out = model.apply(variables, x, train=False)
  pre = np.asarray(out["prenorm"], np.float64)
  mean = pre.mean(-1, keepdims=True)
  var = pre.var(-1, keepdims=True)
  norm = variables["params"]["norm"]
  expected = (pre - mean) / np.sqrt(var + 1e-6) * np.asarray(norm["scale"]) + np.asarray(
    norm["bias"]
  )
  np.testing.assert_allclose(out["cls"], expected[:, 0], atol=1e-4)
  np.testing.assert_allclose(out["patch"], expected[:, 1:], atol=1e-4)
  assert not np.allclose(out["cls"], pre[:, 0], atol=1e-2)


def test_attention_rows_are_distributions(mnist_vit):
  model, variables, x = mnist_vit
  attn = np.asarray(model.apply(variables, x, train=False, return_attention=True)["attention"])
  assert (attn >= 0).all()
  np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)


def test_init_follows_dino():
  model = ViT(patch_size=16, pos_grid=14, embed_dim=192, depth=1, num_heads=3)
  params = model.init(jax.random.key(0), _images((1, 224, 224, 3)), train=False)["params"]
  qkv = np.asarray(params["block_0"]["attn"]["qkv"]["kernel"])
  assert abs(qkv.std() - 0.02) < 1e-3
  assert np.abs(qkv).max() > 2 * 0.02  # not truncated at 2 sigma (DINO truncates at +-2 absolute)
  assert abs(np.asarray(params["pos_embed"]).std() - 0.02) < 2e-3
  np.testing.assert_array_equal(params["block_0"]["attn"]["qkv"]["bias"], 0.0)
  np.testing.assert_array_equal(params["block_0"]["norm1"]["scale"], 1.0)
  np.testing.assert_array_equal(params["norm"]["bias"], 0.0)
  # The patch conv keeps PyTorch's default init, bias included: U(+-1/sqrt(16*16*3)).
  bias = np.asarray(params["patch_embed"]["bias"])
  bound = 1 / np.sqrt(16 * 16 * 3)
  assert np.abs(bias).max() <= bound and np.abs(bias).max() > 0.9 * bound
  kernel = np.asarray(params["patch_embed"]["kernel"])
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.99 * bound


@pytest.mark.parametrize("p, hw, c", [(4, (28, 28), 3), (16, (32, 48), 3), (2, (6, 4), 1)])
def test_patch_embed_is_the_strided_convolution(p, hw, c):
  """PatchEmbed (one matrix product) draws the parameters nn.Conv(stride p, VALID) draws from the
  same key, and gives its outputs and parameter gradients."""
  images = _images((3, *hw, c), seed=1)
  init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
  conv = nn.Conv(8, (p, p), strides=(p, p), padding="VALID", kernel_init=init, bias_init=init_bias)
  patch = PatchEmbed(8, p, kernel_init=init, bias_init=init_bias)
  params = conv.init(jax.random.key(2), images)
  jax.tree.map(np.testing.assert_array_equal, params, patch.init(jax.random.key(2), images))
  np.testing.assert_allclose(patch.apply(params, images), conv.apply(params, images), atol=1e-5)
  grads = [
    jax.grad(lambda v, m=m: jnp.sum(jnp.sin(m.apply(v, images))))(params) for m in (patch, conv)
  ]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), *grads)


def init_bias(key, shape, dtype=jnp.float32):
  return jax.random.uniform(key, shape, dtype, -0.1, 0.1)


def test_init_follows_mocov3():
  """moco-v3 vits.py: xavier-uniform Linears (qkv as three D -> D maps), zero biases, CLS N(0, 1e-12)."""
  d = 192
  model = ViT(
    patch_size=16,
    pos_grid=14,
    embed_dim=d,
    depth=1,
    num_heads=3,
    init_scheme="mocov3",
    pos_embed="sincos",
  )
  params = model.init(jax.random.key(0), _images((1, 224, 224, 3)), train=False)["params"]
  block = params["block_0"]
  for kernel, bound in (
    (block["attn"]["qkv"]["kernel"], np.sqrt(6 / (d + d))),
    (block["attn"]["proj"]["kernel"], np.sqrt(6 / (d + d))),
    (block["fc1"]["kernel"], np.sqrt(6 / (d + 4 * d))),
    (block["fc2"]["kernel"], np.sqrt(6 / (4 * d + d))),
  ):
    k = np.abs(np.asarray(kernel))
    assert k.max() <= bound and k.max() > 0.99 * bound
    assert (
      abs(k.std() - 0) > 0 and abs(np.asarray(kernel).std() - bound / np.sqrt(3)) < 0.02 * bound
    )
  np.testing.assert_array_equal(block["fc1"]["bias"], 0.0)
  np.testing.assert_array_equal(params["patch_embed"]["bias"], 0.0)
  cls = np.asarray(params["cls_token"])
  assert 0 < np.abs(cls).max() < 1e-5
  with pytest.raises(ValueError, match="init_scheme="):
    ViT(patch_size=16, embed_dim=d, depth=1, num_heads=3, init_scheme="torch").init(
      jax.random.key(0), _images((1, 32, 32, 3)), train=False
    )


# ---------------------------------------------------------------- drop path


def test_drop_path_inactive_in_eval():
  model = _model(drop_path_rate=0.5)
  x = _images((4, 28, 28, 1))
  variables = model.init(jax.random.key(0), x, train=False)
  a = model.apply(variables, x, train=False, rngs={"dropout": jax.random.key(1)})["prenorm"]
  b = model.apply(variables, x, train=False, rngs={"dropout": jax.random.key(2)})["prenorm"]
  c = model.apply(variables, x, train=False)["prenorm"]
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a, c)
  # ... and active in training: different rngs give different outputs, and differ from eval.
  d = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})["prenorm"]
  e = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})["prenorm"]
  assert not np.allclose(d, e)
  assert not np.allclose(d, a)


def test_zero_drop_path_needs_no_rng_in_train(mnist_vit):
  model, variables, x = mnist_vit
  a = model.apply(variables, x, train=True)["cls"]
  np.testing.assert_array_equal(a, model.apply(variables, x, train=False)["cls"])


def test_drop_path_is_per_sample():
  # With the per-block rate near 1 most residual branches vanish; identical inputs must then still
  # differ across the batch (one Bernoulli draw per sample, not per batch).
  model = _model(drop_path_rate=0.9, depth=2)
  x = jnp.broadcast_to(_images((1, 28, 28, 1)), (16, 28, 28, 1))
  variables = model.init(jax.random.key(0), x, train=False)
  out = np.asarray(
    model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(3)})["cls"]
  )
  distinct = {tuple(np.round(row, 4)) for row in out}
  assert 1 < len(distinct) <= 16


# ---------------------------------------------------------------- mask token


@pytest.fixture(scope="module")
def masked_vit():
  model = _model(use_mask_token=True)
  x = _images((2, 28, 28, 1))
  variables = model.init(jax.random.key(0), x, train=False)
  params = dict(variables["params"])
  assert params["mask_token"].shape == (32,)
  np.testing.assert_array_equal(params["mask_token"], 0.0)  # zero init
  params["mask_token"] = jnp.linspace(-3.0, 3.0, 32)  # non-trivial so masking is visible
  return model, {"params": params}, x


def test_all_false_mask_equals_no_mask(masked_vit):
  model, variables, x = masked_vit
  none = model.apply(variables, x, train=False)
  false = model.apply(variables, x, train=False, mask=jnp.zeros((2, 7, 7), bool))
  for key in none:
    np.testing.assert_array_equal(none[key], false[key])


def test_mask_replaces_only_masked_token_inputs(masked_vit):
  model, variables, x = masked_vit
  mask = np.zeros((2, 7, 7), bool)
  mask[0, 1, 2] = mask[0, 6, 6] = mask[1, 0, 0] = True
  plain = np.asarray(_block0_input(model, variables, x))
  masked = np.asarray(_block0_input(model, variables, x, mask=jnp.asarray(mask)))
  changed = np.abs(masked - plain).max(-1) > 0
  expected = np.concatenate([np.zeros((2, 1), bool), mask.reshape(2, 49)], axis=1)
  np.testing.assert_array_equal(changed, expected)
  # Masked tokens are mask_token + position embedding (mask applied before positions are added).
  pos = np.asarray(variables["params"]["pos_embed"])[0]
  np.testing.assert_allclose(
    masked[0, 1 + 1 * 7 + 2], np.asarray(variables["params"]["mask_token"]) + pos[1 + 9], atol=1e-6
  )
  out_plain = model.apply(variables, x, train=False)["cls"]
  out_masked = model.apply(variables, x, train=False, mask=jnp.asarray(mask))["cls"]
  assert not np.allclose(out_plain, out_masked)


def test_mask_errors(mnist_vit, masked_vit):
  model, variables, x = mnist_vit
  with pytest.raises(ValueError, match="use_mask_token=True"):
    model.apply(variables, x, train=False, mask=jnp.zeros((2, 7, 7), bool))
  model, variables, x = masked_vit
  with pytest.raises(ValueError, match=r"\[B, h, w\]"):
    model.apply(variables, x, train=False, mask=jnp.zeros((2, 49), bool))


def test_bad_image_size_errors(mnist_vit):
  model, variables, _ = mnist_vit
  with pytest.raises(ValueError, match="multiple of patch_size"):
    model.apply(variables, _images((1, 30, 28, 1)), train=False)
  with pytest.raises(ValueError, match="channels-last"):
    model.apply(variables, _images((28, 28, 1)), train=False)


# ---------------------------------------------------------------- dtype and layouts


def test_bfloat16_compute_matches_float32(mnist_vit):
  _, variables, x = mnist_vit
  ref = _model().apply(variables, x, train=False, return_attention=True)
  low = _model(dtype=jnp.bfloat16).apply(variables, x, train=False, return_attention=True)
  for key in ref:
    assert low[key].dtype == jnp.float32
    assert np.isfinite(low[key]).all()
  np.testing.assert_allclose(low["cls"], ref["cls"], atol=0.1)
  np.testing.assert_allclose(low["attention"], ref["attention"], atol=0.02)
  assert not np.array_equal(low["cls"], ref["cls"])  # bf16 really was used


def test_scan_blocks_same_function():
  x = _images((2, 28, 28, 1))
  loop = _model(depth=3)
  scan = _model(depth=3, scan_blocks=True)
  loop_params = loop.init(jax.random.key(0), x, train=False)["params"]
  scan_params = scan.init(jax.random.key(0), x, train=False)["params"]
  assert set(scan_params) == {"patch_embed", "cls_token", "pos_embed", "blocks", "block_2", "norm"}
  assert scan_params["blocks"]["block"]["fc1"]["kernel"].shape == (2, 32, 128)
  converted = {k: v for k, v in loop_params.items() if k not in ("block_0", "block_1")}
  converted["blocks"] = {
    "block": jax.tree.map(
      lambda a, b: jnp.stack([a, b]), loop_params["block_0"], loop_params["block_1"]
    )
  }
  a = loop.apply({"params": loop_params}, x, train=False, return_attention=True)
  b = scan.apply({"params": converted}, x, train=False, return_attention=True)
  for key in a:
    np.testing.assert_allclose(a[key], b[key], atol=1e-5)
  # Stochastic depth also runs under scan.
  scan_dp = _model(depth=3, scan_blocks=True, drop_path_rate=0.3)
  out = scan_dp.apply({"params": converted}, x, train=True, rngs={"dropout": jax.random.key(0)})
  assert out["cls"].shape == (2, 32) and np.isfinite(out["cls"]).all()


@pytest.mark.parametrize("scan_blocks", [False, True])
def test_recompute_elementwise_same_function_and_gradients_fewer_saved(scan_blocks):
  """Recomputing LayerNorm/GELU in the backward pass changes memory, not maths: same parameter
  tree, outputs and gradients (drop path on), and fewer values saved for the backward pass."""
  from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=g-import-not-at-top

  x = _images((2, 28, 28, 1))
  plain = _model(depth=3, drop_path_rate=0.2, scan_blocks=scan_blocks)
  recompute = _model(
    depth=3, drop_path_rate=0.2, scan_blocks=scan_blocks, recompute_elementwise=True
  )
  params = plain.init(jax.random.key(0), x, train=False)["params"]
  assert jax.tree.structure(
    recompute.init(jax.random.key(0), x, train=False)["params"]
  ) == jax.tree.structure(params)

  def loss(model, p):
    out = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(1)})
    return jnp.sum(out["cls"] ** 2) + jnp.sum(jnp.sin(out["patch"]))

  (la, ga), (lb, gb) = (
    jax.value_and_grad(lambda p, m=m: loss(m, p))(params) for m in (plain, recompute)
  )
  np.testing.assert_allclose(la, lb, rtol=1e-6)
  # float32 sums in another order: agreement to ~1e-5 relative, not bit for bit.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), ga, gb)
  saved = lambda m: sum(a.size for a, _ in saved_residuals(lambda p: loss(m, p), params))  # noqa: E731
  assert saved(recompute) < 0.8 * saved(plain)


def test_vit_kwargs():
  assert vit_kwargs("small") == dict(embed_dim=384, depth=12, num_heads=6)
  assert vit_kwargs("S") == vit_kwargs("small")
  assert vit_kwargs("L") == dict(embed_dim=1024, depth=24, num_heads=16)
  assert vit_kwargs("t")["embed_dim"] == 192 and vit_kwargs("B")["num_heads"] == 12
  with pytest.raises(ValueError, match="tiny"):
    vit_kwargs("huge")


def test_flops_estimate_vit_s16():
  # ViT-S/16 at 224 is commonly quoted at ~4.6 GFLOPs multiply-adds, i.e. ~9.2e9 FLOPs.
  flops = vit_flops_per_image(224, 16, 384, 12)
  assert 8.5e9 < flops < 9.5e9


# ---------------------------------------------------------------- position-embedding interpolation


def _keys_cubic(x, a=-0.75):
  x = abs(x)
  if x <= 1:
    return (a + 2) * x**3 - (a + 3) * x**2 + 1
  if x < 2:
    return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
  return 0.0


def _reference_resize_2d(grid, out_h, out_w):
  """Point-by-point evaluation: edge-padded source, every integer tap within the kernel's support,
  torch half-pixel source coordinates with DINO's (n + 0.1) / N scale factor."""
  n_h, n_w, _ = grid.shape
  pad = 4
  padded = np.pad(grid.astype(np.float64), ((pad, pad), (pad, pad), (0, 0)), mode="edge")
  out = np.zeros((out_h, out_w, grid.shape[2]))
  for i in range(out_h):
    y = (i + 0.5) * n_h / (out_h + 0.1) - 0.5
    for j in range(out_w):
      x = (j + 0.5) * n_w / (out_w + 0.1) - 0.5
      acc = 0.0
      for r in range(-pad, n_h + pad):
        wy = _keys_cubic(y - r)
        if wy == 0.0:
          continue
        for c in range(-pad, n_w + pad):
          wx = _keys_cubic(x - c)
          if wx:
            acc = acc + wy * wx * padded[r + pad, c + pad]
      out[i, j] = acc
  return out


@pytest.mark.parametrize("out_hw", [(6, 6), (3, 5), (9, 4), (20, 14)])
def test_pos_interpolation_matches_pointwise_reference(out_hw):
  grid = np.random.default_rng(0).normal(size=(14, 14, 3)).astype(np.float32)
  got = np.asarray(interpolate_pos_grid(jnp.asarray(grid), out_hw))
  ref = _reference_resize_2d(grid, *out_hw)
  assert got.shape == out_hw + (3,)
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_pos_interpolation_scale_factor_is_dino_not_ratio():
  # 14 -> 6 with DINO's factor 6.1 / 14: output 2 samples source coordinate 2.5 * 14 / 6.1 - 0.5 = 5.2377...
  # (6 / 14 would give 5.3333), so taps 4..7 sit at distances 1.2377, 0.2377, 0.7623, 1.7623.
  mat = bicubic_resize_matrix(14, 6, 6.1 / 14)
  coord = 2.5 * 14 / 6.1 - 0.5
  expected = np.zeros(14)
  expected[4:8] = [_keys_cubic(coord - k) for k in range(4, 8)]
  np.testing.assert_allclose(mat[2], expected, atol=1e-12)
  assert expected[5] > 0.8 and expected[4] < 0  # a = -0.75 has negative lobes
  assert not np.allclose(mat, bicubic_resize_matrix(14, 6))
  # Output 0 samples 0.6475; its tap at index -1 is clamped onto index 0 and its weight added there.
  first = (0.5 * 14 / 6.1) - 0.5
  assert first > 0 and abs(mat[0].sum() - 1) < 1e-12
  np.testing.assert_allclose(mat[0, 0], _keys_cubic(first + 1) + _keys_cubic(first), atol=1e-12)


def test_pos_interpolation_identity_and_constant():
  grid = jax.random.normal(jax.random.key(0), (7, 7, 5))
  np.testing.assert_array_equal(interpolate_pos_grid(grid, (7, 7)), grid)
  const = jnp.full((14, 14, 2), 0.37)
  for hw in [(6, 6), (4, 9), (28, 28)]:
    np.testing.assert_allclose(interpolate_pos_grid(const, hw), 0.37, atol=1e-6)
  for src, dst in [(14, 6), (14, 20), (7, 3)]:
    np.testing.assert_allclose(
      bicubic_resize_matrix(src, dst, (dst + 0.1) / src).sum(1), 1.0, atol=1e-12
    )


def test_vit_uses_interpolated_positions_with_correct_orientation():
  # Zero patch embedding: block-0 input is exactly cls/pos embeddings, so the resized grid is visible.
  model = _model(depth=1)
  x = _images((1, 32, 16, 1))  # 8 x 4 patches from a 7 x 7 grid
  params = dict(model.init(jax.random.key(0), _images((1, 28, 28, 1)), train=False)["params"])
  params["patch_embed"] = jax.tree.map(jnp.zeros_like, params["patch_embed"])
  rows, cols = np.meshgrid(np.arange(7.0), np.arange(7.0), indexing="ij")
  grid = np.zeros((7, 7, 32), np.float32)
  grid[..., 0], grid[..., 1] = rows**2, cols  # distinguishable along each axis
  pos = np.asarray(params["pos_embed"]).copy()
  pos[0, 1:] = grid.reshape(49, 32)
  params["pos_embed"] = jnp.asarray(pos)
  tokens = np.asarray(_block0_input(model, {"params": params}, x))
  ref = _reference_resize_2d(grid[..., :2], 8, 4)
  np.testing.assert_allclose(tokens[0, 1:, :2].reshape(8, 4, 2), ref, atol=1e-4)
  np.testing.assert_allclose(
    tokens[0, 0], pos[0, 0] + np.asarray(params["cls_token"])[0, 0], atol=1e-6
  )
  # Identity size: positions used unchanged.
  tokens = np.asarray(_block0_input(model, {"params": params}, _images((1, 28, 28, 1))))
  np.testing.assert_allclose(tokens[0, 1:], pos[0, 1:], atol=1e-6)


def test_attention_kernel_name_is_checked(mnist_vit):
  _, variables, x = mnist_vit
  with pytest.raises(ValueError, match="valid: auto, xla, cudnn"):
    _model(attention="flash").apply(variables, x, train=False)
  if jax.default_backend() != "gpu":  # 'auto' is the explicit path off GPUs
    a = _model(attention="auto", dtype=jnp.bfloat16).apply(variables, x, train=False)
    b = _model(attention="xla", dtype=jnp.bfloat16).apply(variables, x, train=False)
    np.testing.assert_array_equal(a["patch"], b["patch"])


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_attention_matches_explicit_on_gpu():
  # On a GPU machine: JAX_PLATFORMS=cuda (tests/conftest.py otherwise pins the CPU).
  model = ViT(patch_size=16, pos_grid=14, embed_dim=384, depth=2, num_heads=6, dtype=jnp.bfloat16)
  for size in (224, 96):  # 197 and 37 tokens: odd lengths, padded for cuDNN
    x = _images((4, size, size, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    ref = model.clone(attention="xla").apply(variables, x, train=False)
    fused = model.clone(attention="cudnn").apply(variables, x, train=False, return_attention=True)
    np.testing.assert_allclose(fused["patch"], ref["patch"], atol=0.05, rtol=0.05)
    assert float(jnp.mean(jnp.abs(fused["patch"] - ref["patch"]))) < 5e-3
    assert fused["attention"].shape == (4, 6, (size // 16) ** 2 + 1, (size // 16) ** 2 + 1)
    grad = jax.grad(
      lambda p: jnp.sum(
        model.clone(attention="cudnn").apply({"params": p}, x, train=False)["cls"] ** 2
      )
    )(variables["params"])
    ref_grad = jax.grad(
      lambda p: jnp.sum(
        model.clone(attention="xla").apply({"params": p}, x, train=False)["cls"] ** 2
      )
    )(variables["params"])
    g, r = grad["block_0"]["attn"]["qkv"]["kernel"], ref_grad["block_0"]["attn"]["qkv"]["kernel"]
    assert float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r)) < 0.05


def test_gelu_exact_is_the_erf_form():
  """gelu_exact (torch's formula, x/2 (1 + erf(x/sqrt 2))) and jax's erfc form agree, as do
  their gradients."""
  from sslx.models.vit import gelu_exact

  x = jnp.linspace(-8.0, 8.0, 4001, dtype=jnp.float32)
  ref = lambda v: jax.nn.gelu(v, approximate=False)  # noqa: E731
  np.testing.assert_allclose(gelu_exact(x), ref(x), atol=2e-6)
  grad = jax.vmap(jax.grad(gelu_exact))(x)
  np.testing.assert_allclose(grad, jax.vmap(jax.grad(ref))(x), atol=2e-6)
