"""ViT masked forward, MoCo v3's sin-cos positions / patch init, and the iBOT head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx.models import heads, vit

KW = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, pos_grid=4)


def _images(seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (2, 16, 16, 3))


def test_masked_forward_depends_on_images_only_through_unmasked_patches():
  model = vit.ViT(use_mask_token=True, **KW)
  x = _images()
  params = model.init(jax.random.PRNGKey(1), x, train=False)
  # A trained mask token is not zero: make it so, the property must hold for any value.
  params = jax.tree_util.tree_map_with_path(
    lambda p, v: v + 0.3 if "mask_token" in jax.tree_util.keystr(p) else v, params
  )
  mask = jnp.zeros((2, 4, 4), bool).at[:, 1, 2].set(True).at[0, 3, 0].set(True)
  f = lambda img, m=mask: model.apply(params, img, train=False, mask=m)  # noqa: E731
  base = f(x)
  # Changing the pixels under a masked patch changes nothing ...
  inside = x.at[:, 4:8, 8:12].add(5.0)
  np.testing.assert_array_equal(f(inside)["prenorm"], base["prenorm"])
  # ... changing an unmasked patch changes the output.
  outside = x.at[:, 0:4, 0:4].add(5.0)
  assert float(jnp.abs(f(outside)["cls"] - base["cls"]).max()) > 1e-3
  # An all-False mask is the unmasked forward; masking changes the output.
  none = model.apply(params, x, train=False)
  np.testing.assert_array_equal(f(x, jnp.zeros((2, 4, 4), bool))["prenorm"], none["prenorm"])
  assert float(jnp.abs(base["cls"] - none["cls"]).max()) > 1e-4


def test_sincos_positions_match_the_formula_and_have_no_parameter():
  pe = vit.sincos_2d(3, 5, 8)
  assert pe.shape == (15, 8)
  # Patch (row 1, col 2) -> index 7; omega = [1, 1e-2] for dim 8; the row comes first.
  omega = np.array([1.0, 0.01])
  want = np.concatenate(
    [np.sin(1 * omega), np.cos(1 * omega), np.sin(2 * omega), np.cos(2 * omega)]
  )
  np.testing.assert_allclose(pe[7], want, rtol=1e-6)
  # moco-v3 vits.py build_2d_sincos_position_embedding, transcribed to numpy (square grid).
  n, dim = 4, 16
  grid_w, grid_h = np.meshgrid(
    np.arange(n, dtype=np.float32), np.arange(n, dtype=np.float32), indexing="ij"
  )
  om = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float32) / (dim // 4))
  out_w, out_h = np.outer(grid_w.ravel(), om), np.outer(grid_h.ravel(), om)
  official = np.concatenate([np.sin(out_w), np.cos(out_w), np.sin(out_h), np.cos(out_h)], axis=1)
  np.testing.assert_allclose(vit.sincos_2d(n, n, dim), official, atol=1e-6)
  model = vit.ViT(pos_embed="sincos", init_scheme="mocov3", **KW)
  params = model.init(jax.random.PRNGKey(0), _images(), train=False)["params"]
  assert "pos_embed" not in params
  kernel = params["patch_embed"]["kernel"]  # [4, 4, 3, 32]
  bound = np.sqrt(6.0 / (4 * 4 * 3 + 32))
  assert float(jnp.abs(kernel).max()) <= bound and float(jnp.abs(kernel).max()) > 0.9 * bound
  assert not np.any(params["patch_embed"]["bias"])
  with pytest.raises(ValueError, match="pos_embed"):
    vit.ViT(pos_embed="rope", **KW).init(jax.random.PRNGKey(0), _images(), train=False)


def test_ibot_head_shares_dino_head_parameters_and_layers():
  cls = jax.random.normal(jax.random.PRNGKey(0), (3, 16))
  patches = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 16))
  kw = dict(hidden_dim=32, bottleneck_dim=8, norm_last_layer=False)
  shared = heads.IBOTHead(out_dim=12, patch_out_dim=12, shared_head=True, **kw)
  p = shared.init(jax.random.PRNGKey(2), cls, patches)["params"]
  assert sorted(p) == ["last_layer", "mlp_0", "mlp_1", "mlp_2"]
  c_log, p_log = shared.apply({"params": p}, cls, patches)
  assert c_log.shape == (3, 12) and p_log.shape == (3, 5, 12)
  # The DINO head with the same parameters gives the same [CLS] and (shared) patch logits.
  dino = heads.DINOHead(out_dim=12, **kw)
  np.testing.assert_allclose(dino.apply({"params": p}, cls), c_log, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dino.apply({"params": p}, patches), p_log, rtol=1e-5, atol=1e-6)
  separate = heads.IBOTHead(out_dim=12, patch_out_dim=7, shared_head=False, **kw)
  ps = separate.init(jax.random.PRNGKey(2), cls, patches)["params"]
  assert "last_layer2" in ps and separate.apply({"params": ps}, cls, patches)[1].shape == (3, 5, 7)
  with pytest.raises(ValueError, match="patch_out_dim"):
    heads.IBOTHead(out_dim=12, patch_out_dim=7, shared_head=True, **kw).init(
      jax.random.PRNGKey(2), cls, patches
    )


def test_moco_mlp_last_bn_has_no_affine_and_uses_batch_statistics():
  mlp = heads.MocoMLP(num_layers=3, hidden_dim=16, out_dim=8)
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 4)) * 3 + 1
  p = mlp.init(jax.random.PRNGKey(1), x)["params"]
  assert "bn_2" not in p and "scale" in p["bn_0"]  # last BN: no affine parameters at all
  assert all("bias" not in p[f"linear_{i}"] for i in range(3))
  y, _ = mlp.apply({"params": p}, x, mutable=["batch_stats"])
  np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-5)  # normalised with this batch's stats
  np.testing.assert_allclose(y.std(0), 1.0, atol=1e-2)
