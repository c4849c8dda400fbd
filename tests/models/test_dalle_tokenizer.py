"""DALL-E encoder loader: a synthetic state dict round-trips; malformed files fail clearly."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx.models import dalle


def _state_dict(n_hid=8, n_blk=1, vocab=16, seed=0):
  rng = np.random.default_rng(seed)
  return {
    k: rng.normal(size=s).astype(np.float32) * 0.1
    for k, s in dalle.expected_shapes(n_hid, n_blk, 3, vocab).items()
  }


def test_synthetic_checkpoint_round_trips(tmp_path):
  sd = _state_dict(n_hid=8, n_blk=2, vocab=16)
  path = tmp_path / "enc.npz"
  np.savez(path, **sd)
  module, variables = dalle.load_dalle_encoder(str(path))
  assert (module.n_hid, module.n_blk_per_group, module.vocab_size) == (8, 2, 16)
  # Every array lands under its torch name, unchanged.
  p = variables["params"]
  np.testing.assert_array_equal(p["input"]["w"], sd["blocks.input.w"])
  np.testing.assert_array_equal(
    p["group_2"]["block_1"]["id_path"]["w"], sd["blocks.group_2.block_1.id_path.w"]
  )
  np.testing.assert_array_equal(
    p["group_4"]["block_2"]["res_path"]["conv_4"]["b"],
    sd["blocks.group_4.block_2.res_path.conv_4.b"],
  )
  # The loaded tree is exactly the tree the Flax module builds (same names and shapes).
  x = jnp.zeros((1, 56, 56, 3))
  fresh = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x))
  assert jax.tree.structure(fresh) == jax.tree.structure(variables)
  assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(variables)))
  logits = jax.jit(module.apply)(variables, dalle.map_pixels(x + 0.5))
  assert logits.shape == (1, 7, 7, 16) and np.isfinite(np.asarray(logits)).all()


def test_block_is_identity_plus_scaled_residual(tmp_path):
  # Zero residual weights: group_1 blocks (n_in == n_out) are exact identities.
  sd = _state_dict()
  for k in sd:
    if ".res_path." in k:
      sd[k] = np.zeros_like(sd[k])
  np.savez(tmp_path / "e.npz", **sd)
  module, variables = dalle.load_dalle_encoder(str(tmp_path / "e.npz"))
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 8))
  block = dalle._EncoderBlock(8, 4)
  out = block.apply({"params": variables["params"]["group_1"]["block_1"]}, x)
  np.testing.assert_allclose(out, x, atol=1e-6)


@pytest.mark.parametrize(
  "edit, match",
  [
    (lambda sd: sd.pop("blocks.group_3.block_1.res_path.conv_2.w"), "missing blocks.group_3"),
    (lambda sd: sd.update({"blocks.output.conv.b": np.zeros(5, np.float32)}), r"shape \(5,\)"),
    (lambda sd: sd.update({"blocks.extra.w": np.zeros(1, np.float32)}), "unexpected blocks.extra"),
    (lambda sd: sd.pop("blocks.input.w"), "no 'blocks.input.w'"),
  ],
)
def test_malformed_checkpoints_are_rejected_by_name(tmp_path, edit, match):
  sd = _state_dict()
  edit(sd)
  np.savez(tmp_path / "bad.npz", **sd)
  with pytest.raises(dalle.TokenizerWeightsError, match=match):
    dalle.load_dalle_encoder(str(tmp_path / "bad.npz"))


def test_unreadable_or_wrong_files(tmp_path):
  with pytest.raises(dalle.TokenizerWeightsError, match="not found.*tokenizer_path"):
    dalle.load_dalle_encoder(str(tmp_path / "nope.npz"))
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(dalle.TokenizerWeightsError, match="cannot read"):
    dalle.load_dalle_encoder(str(tmp_path / "junk.npz"))
  with open(tmp_path / "list.pkl", "wb") as f:
    pickle.dump([1, 2], f)
  with pytest.raises(dalle.TokenizerWeightsError, match="not a dict"):
    dalle.load_dalle_encoder(str(tmp_path / "list.pkl"))
  # A pickled dict of arrays is accepted too.
  with open(tmp_path / "ok.pkl", "wb") as f:
    pickle.dump(_state_dict(), f)
  assert dalle.load_dalle_encoder(str(tmp_path / "ok.pkl"))[0].vocab_size == 16
