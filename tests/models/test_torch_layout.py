"""sslx backbones <-> PyTorch state dicts (sslx/models/torch_layout.py).

The golden outputs come from the official PyTorch models (DINO's vision_transformer.py,
torchvision's resnet.py) run on the state dicts sslx exports; tests/fixtures/torch_layout/
make_golden.py says how they were made.
"""

import json
import os

import jax
import numpy as np
import pytest

from sslx.models import torch_layout
from tests.fixtures.torch_layout import cases

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "fixtures", "torch_layout", "golden.npz")


def _export(name, variables):
  if name.startswith("resnet"):
    return torch_layout.resnet_to_torch(variables["params"], variables["batch_stats"])
  return torch_layout.vit_to_torch(variables["params"], pos_embed=cases.fixed_pos_embed(name))


@pytest.mark.parametrize("name", list(cases.CASES))
def test_export_matches_official_pytorch_model(name):
  golden = np.load(GOLDEN)
  variables = cases.variables(name)
  sd = _export(name, variables)
  # The reference model's own state dict: same keys, same shapes (it loaded ours strictly).
  want = json.loads(str(golden[f"{name}.keys"]))
  assert {k: list(v.shape) for k, v in sd.items()} == want
  ref = golden[name]
  out = cases.sslx_output(name, variables)
  # float32 both sides; tolerance relative to the output's scale (the noisy ResNets reach 1e4).
  np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5 * max(1.0, float(np.abs(ref).max())))


@pytest.mark.parametrize("name", list(cases.CASES))
def test_round_trip_is_exact(name):
  variables = cases.variables(name)
  sd = _export(name, variables)
  if name.startswith("resnet"):
    params, stats = torch_layout.resnet_from_torch(sd, variables["params"])
    back = {"params": params, "batch_stats": stats}
  else:
    back = {
      "params": torch_layout.vit_from_torch(
        sd, variables["params"], pos_embed=cases.fixed_pos_embed(name)
      )
    }
  assert jax.tree.structure(back) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)


def test_scanned_blocks_export_like_unrolled_ones():
  x = cases.images("vit")
  plain = cases.module("vit").init(jax.random.PRNGKey(0), x, train=False)["params"]
  scanned_like = cases.module("vit", scan_blocks=True).init(jax.random.PRNGKey(0), x, train=False)[
    "params"
  ]
  assert "blocks" in scanned_like
  sd = torch_layout.vit_to_torch(plain)
  scanned = torch_layout.vit_from_torch(sd, scanned_like)
  assert jax.tree.structure(scanned) == jax.tree.structure(scanned_like)
  back = torch_layout.vit_to_torch(scanned)
  assert list(back) == list(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])
  out_plain = cases.module("vit").apply({"params": plain}, x, train=False)["cls"]
  out_scan = cases.module("vit", scan_blocks=True).apply({"params": scanned}, x, train=False)["cls"]
  np.testing.assert_allclose(out_scan, out_plain, atol=1e-5)


def test_mask_token_is_left_out():
  x = cases.images("vit")
  params = cases.module("vit", use_mask_token=True).init(jax.random.PRNGKey(0), x, train=False)[
    "params"
  ]
  assert "mask_token" in params
  sd = torch_layout.vit_to_torch(params)
  assert not any("mask" in k for k in sd)
  back = torch_layout.vit_from_torch(sd, params)
  np.testing.assert_array_equal(back["mask_token"], params["mask_token"])


def test_mismatched_state_dict_lists_every_problem():
  variables = cases.variables("vit")
  sd = torch_layout.vit_to_torch(variables["params"])
  sd.pop("blocks.2.mlp.fc2.bias")
  sd["head.weight"] = np.zeros((3, 32), np.float32)
  sd["blocks.0.attn.qkv.weight"] = np.zeros((96, 16), np.float32)
  with pytest.raises(torch_layout.LayoutError) as e:
    torch_layout.vit_from_torch(sd, variables["params"])
  msg = str(e.value)
  assert "missing keys (1): blocks.2.mlp.fc2.bias" in msg
  assert "unexpected keys (1): head.weight" in msg
  assert "blocks.0.attn.qkv.weight: got [96, 16], want [96, 32]" in msg


def test_fixed_positions_refuse_other_positions():
  variables = cases.variables("vit_sincos")
  table = cases.fixed_pos_embed("vit_sincos")
  sd = torch_layout.vit_to_torch(variables["params"], pos_embed=table)
  sd["pos_embed"] = sd["pos_embed"] + 0.1
  with pytest.raises(torch_layout.LayoutError, match="pos_embed='learned'"):
    torch_layout.vit_from_torch(sd, variables["params"], pos_embed=table)
  with pytest.raises(torch_layout.LayoutError, match="pass pos_embed="):
    torch_layout.vit_to_torch(variables["params"])


def test_beit_encoder_rejects_a_k_bias():
  variables = cases.variables("cae_encoder")
  sd = torch_layout.vit_to_torch(
    variables["params"], pos_embed=cases.fixed_pos_embed("cae_encoder")
  )
  sd["blocks.1.attn.qkv.bias"] = sd["blocks.1.attn.qkv.bias"] + 1.0
  with pytest.raises(torch_layout.LayoutError, match="non-zero k part"):
    torch_layout.vit_from_torch(
      sd, variables["params"], pos_embed=cases.fixed_pos_embed("cae_encoder")
    )


def test_resnet_wrong_depth_is_named():
  v18 = cases.variables("resnet18")
  sd = torch_layout.resnet_to_torch(v18["params"], v18["batch_stats"])
  with pytest.raises(torch_layout.LayoutError, match="missing keys"):
    torch_layout.resnet_from_torch(sd, cases.variables("resnet50")["params"])
