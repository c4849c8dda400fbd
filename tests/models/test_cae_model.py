"""CAE networks: visible-only encoder, regressor Q/K/V composition, index split, init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx.models import beit
from sslx.models import cae as cae_model

D, HEADS = 32, 2


def _encoder():
  return cae_model.CAEEncoder(
    patch_size=4, embed_dim=D, depth=2, num_heads=HEADS, drop_path_rate=0.0
  )


def _keep(n_keep, b=2, n=49, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(np.stack([np.sort(rng.permutation(n)[:n_keep]) for _ in range(b)]), jnp.int32)


def test_split_by_mask_gives_sorted_visible_then_masked_indices():
  mask = jnp.asarray([[0, 1, 1, 0, 0, 1], [1, 0, 0, 1, 1, 0]], bool)
  vis, msk = cae_model.split_by_mask(mask, 3)
  np.testing.assert_array_equal(vis, [[0, 3, 4], [1, 2, 5]])
  np.testing.assert_array_equal(msk, [[1, 2, 5], [0, 3, 4]])
  with pytest.raises(ValueError, match="num_masked"):
    cae_model.split_by_mask(mask, 6)


def test_encoder_output_length_and_cost_scale_with_the_visible_count():
  enc = _encoder()
  images = jnp.ones((2, 28, 28, 3))
  params = jax.eval_shape(lambda: enc.init(jax.random.PRNGKey(0), images, None, train=False))
  fn = jax.jit(lambda p, x, i: enc.apply(p, x, i, train=False))
  flops = {}
  for k in (12, 25, 49):
    keep = _keep(k)
    out = jax.eval_shape(fn, params, images, keep)
    assert out["tokens"].shape == (2, 1 + k, D)
    assert out["patch"].shape == (2, k, D)
    flops[k] = fn.lower(params, images, keep).compile().cost_analysis()["flops"]
  # Patch embedding runs on all 49 patches; the blocks only on 1 + k tokens.
  assert flops[12] < flops[25] < flops[49]
  assert flops[25] / flops[49] < 0.65


def test_encoder_on_a_subset_equals_the_gathered_positions_of_that_subset():
  # Each visible token carries its own grid position: encoding patches {3, 10} of an image
  # equals encoding an image made of just those two patches at the same positions.
  enc = _encoder()
  images = jax.random.normal(jax.random.PRNGKey(1), (1, 28, 28, 3))
  params = jax.jit(lambda: enc.init(jax.random.PRNGKey(0), images, None, train=False))()
  fn = jax.jit(lambda i: enc.apply(params, images, i, train=False)["tokens"])
  a, b = fn(jnp.asarray([[3, 10]])), fn(jnp.asarray([[10, 3]]))
  # Attention is permutation-equivariant: swapping the order swaps the outputs.
  np.testing.assert_allclose(a[:, 1], b[:, 2], atol=1e-5)
  np.testing.assert_allclose(a[:, 0], b[:, 0], atol=1e-5)


def test_sincos_positions_rows_first_then_columns():
  pos = beit.sincos_pos_embed(3, 4, 8)  # pos_dim 2: omega = (1, 1/100)
  assert pos.shape == (12, 8)
  r, c = 2, 1
  row = pos[r * 4 + c]
  om = np.array([1.0, 0.01])
  np.testing.assert_allclose(
    row, np.concatenate([np.sin(r * om), np.cos(r * om), np.sin(c * om), np.cos(c * om)]), atol=1e-6
  )


def _reference_block(p, x_q, x_vis, pos_q, pos_vis):
  """RegressorBlock written out from the spec with the block's own parameters."""

  def ln(name, x):
    m = x.mean(-1, keepdims=True)
    v = x.var(-1, keepdims=True)
    return (x - m) / np.sqrt(v + 1e-6) * p[name]["scale"] + p[name]["bias"]

  ca = p["cross_attn"]
  kv = np.concatenate([x_vis, x_q], 1)
  pkv = np.concatenate([pos_vis, pos_q], 1)
  q = ln("norm_q", x_q + pos_q) @ ca["q"]["kernel"] + ca["q_bias"]
  k = ln("norm_k", kv + pkv) @ ca["k"]["kernel"]
  v = ln("norm_v", kv) @ ca["v"]["kernel"] + ca["v_bias"]
  b, tq, d = q.shape
  hd = d // HEADS
  split = lambda t: t.reshape(b, t.shape[1], HEADS, hd).transpose(0, 2, 1, 3)  # noqa: E731
  logits = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(hd)
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  o = (attn @ split(v)).transpose(0, 2, 1, 3).reshape(b, tq, d)
  o = o @ ca["proj"]["kernel"] + ca["proj"]["bias"]
  x = ln("norm2", x_q + p["gamma_1"] * o)
  mlp = p["mlp"]
  h = x @ mlp["fc1"]["kernel"] + mlp["fc1"]["bias"]
  h = np.asarray(jax.nn.gelu(h, approximate=False))
  return x + p["gamma_2"] * (h @ mlp["fc2"]["kernel"] + mlp["fc2"]["bias"])


def test_regressor_block_matches_the_stated_qkv_composition():
  rng = np.random.default_rng(0)
  x_q, pos_q = (rng.normal(size=(2, 5, D)).astype(np.float32) for _ in range(2))
  x_vis, pos_vis = (rng.normal(size=(2, 7, D)).astype(np.float32) for _ in range(2))
  block = beit.RegressorBlock(HEADS, init_values=0.5)
  params = jax.jit(lambda: block.init(jax.random.PRNGKey(0), x_q, x_vis, pos_q, pos_vis, False))()
  params = params["params"]
  # Non-trivial biases and LN parameters so that a wrong composition shows.
  params = jax.tree.map(
    lambda t: t + 0.1 * jax.random.normal(jax.random.PRNGKey(t.size), t.shape), params
  )
  got = jax.jit(lambda p: block.apply({"params": p}, x_q, x_vis, pos_q, pos_vis, False))(params)
  p = jax.tree.map(np.asarray, params)
  np.testing.assert_allclose(
    got, _reference_block(p, x_q, x_vis, pos_q, pos_vis), rtol=2e-4, atol=2e-4
  )
  # No k bias exists (BEiT); values carry no positions.
  assert "bias" not in params["cross_attn"]["k"] and "k_bias" not in params["cross_attn"]


def test_regressor_keeps_the_visible_latents_fixed_across_blocks():
  rng = np.random.default_rng(1)
  x_vis, pos_vis = (jnp.asarray(rng.normal(size=(2, 7, D)), jnp.float32) for _ in range(2))
  pos_m = jnp.asarray(rng.normal(size=(2, 5, D)), jnp.float32)
  reg = cae_model.LatentRegressor(HEADS, depth=3, drop_path_rate=0.0)
  variables = reg.init(jax.random.PRNGKey(0), x_vis, pos_vis, pos_m, train=False)
  out = reg.apply(variables, x_vis, pos_vis, pos_m, train=False)
  p = variables["params"]
  # Chain the blocks by hand, feeding every block the *original* visible latents.
  x = jnp.broadcast_to(p["mask_token"], pos_m.shape)
  for i in range(3):
    x = beit.RegressorBlock(HEADS).apply(
      {"params": p[f"block_{i}"]}, x, x_vis, pos_m, pos_vis, False
    )
  x = beit.layer_norm("n").apply({"params": p["norm"]}, x)
  np.testing.assert_allclose(out, x, atol=1e-5)
  assert out.shape == (2, 5, D)


def test_cae_forward_shapes_and_init():
  model = cae_model.CAE(
    out_dim=48,
    patch_size=4,
    embed_dim=D,
    depth=2,
    num_heads=HEADS,
    regressor_depth=1,
    decoder_depth=1,
    decoder_embed_dim=16,
  )
  images = jnp.ones((2, 28, 28, 3))
  mask = jnp.asarray(np.arange(49) >= 25)[None].repeat(2, 0)
  vis, msk = cae_model.split_by_mask(mask, 24)
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), images, vis, msk, train=False))()
  params = params["params"]
  run = lambda **kw: jax.eval_shape(lambda p: model.apply({"params": p}, images, **kw), params)  # noqa: E731
  out = run(vis_idx=vis, mask_idx=msk, train=False)
  assert out["latent_pred"].shape == (2, 24, 16) and out["pred"].shape == (2, 24, 48)
  assert out["encoded"].shape == (2, 26, D)
  target = run(mask_idx=msk, train=False, method=cae_model.CAE.align_target)
  assert target.shape == (2, 24, 16)
  assert run(method=cae_model.CAE.reconstruct_all).shape == (2, 49, 48)
  # Xavier-uniform Linears; tokens are N(0, .02^2) cut at +-1 sigma.
  k = np.asarray(params["encoder"]["block_0"]["attn"]["qkv"]["kernel"])
  assert np.abs(k).max() <= np.sqrt(6.0 / (D + 3 * D)) and k.std() > 0.5 * np.sqrt(2.0 / (4 * D))
  for tok in (params["encoder"]["cls_token"], params["regressor"]["mask_token"]):
    assert 0 < np.abs(np.asarray(tok)).max() <= 0.02 + 1e-7
  # The distribution itself: N(0, .02^2) cut at +-.02 has std .02 * 0.5379 (timm trunc_normal_).
  draws = np.asarray(beit.TRUNC_NORMAL_1SIGMA(jax.random.PRNGKey(0), (200_000,)))
  assert abs(draws.std() - 0.010758) < 1e-4 and 0.0199 < np.abs(draws).max() <= 0.02
  assert np.allclose(params["encoder"]["block_0"]["gamma_1"], 0.1)
