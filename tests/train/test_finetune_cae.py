"""Fine-tuning CAE encoders (configs/finetune.py:cae_smoke, config.model.arch='cae'): the starting
encoder of a CAE workdir and of an official-layout CAE checkpoint, exactly; BEiT's relative
position index; the official layer ids and weight-decay groups on CAE's parameter names; a few
training steps; export and import back; the errors that name the preset to use."""

import os

import jax
import numpy as np
import pytest

from sslx.config_check import load_config_file
from sslx.methods import finetune as ft
from sslx.methods import make_method
from sslx.models import beit, init_from
from sslx.train import checkpoint, sharding, trainer
from tests.train.test_finetune import _losses, _timm_name, official_layer_id

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures", "init_from")


@pytest.fixture(scope="module")
def cae_pretrained(tmp_path_factory):
  """A smoke CAE workdir with one checkpoint of its initial state (layer scale at 0.1 there, so
  the weights are made distinct first) and its config.json, as the trainer writes them."""
  workdir = str(tmp_path_factory.mktemp("cae_pretrain"))
  c = load_config_file(os.path.join(ROOT, "configs/cae.py:smoke"))
  built = trainer.build(c, sharding.make_mesh(c.mesh), steps_per_epoch=10, total_steps=10)
  state = built.init(c.seed)
  # Distinct values everywhere (fresh biases, gammas and norms are constants), so a swap shows.
  leaves, tree = jax.tree.flatten(state.params)
  rng = np.random.default_rng(0)
  params = jax.tree.unflatten(
    tree, [np.asarray(x) + rng.normal(0, 0.01, np.shape(x)).astype(np.float32) for x in leaves]
  )
  state = state.replace(step=state.step + 1, params=params)
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  ckpt.save(1, state, None)
  ckpt.close()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(c.to_json_best_effort())
  return workdir, jax.device_get(params["encoder"])


def cae_config(pretrained_dir="", **model):
  c = load_config_file(os.path.join(ROOT, "configs/finetune.py:cae_smoke"))
  with c.unlocked():
    c.finetune.pretrained = pretrained_dir
    c.finetune.random_init = not pretrained_dir
    c.model.update(**model)
    c.log_every_steps = 1
    c.eval.knn_every_steps = 0
  return c


def _flat(tree):
  return {
    "/".join(ft._name(k) for k in path): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _start(c, path, size):
  method = make_method(c)
  fresh, _ = jax.device_get(jax.jit(lambda r: method.init(r, (size, size, 3)))(jax.random.key(0)))
  params, _, _ = init_from.init_params(method, fresh, {}, path, "auto")
  return method, fresh, params


def test_starts_from_the_cae_workdirs_encoder(cae_pretrained):
  workdir, encoder = cae_pretrained
  method, fresh, params = _start(cae_config(workdir), workdir, 28)
  got, want = _flat(params["backbone"]), _flat(encoder)
  tables = {k for k in got if k.endswith("relative_position_bias_table")}
  assert set(got) - tables == set(want) and len(tables) == 2
  assert "block_1/gamma_2" in want and "block_0/attn/q_bias" in want
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)
  for name in tables:  # not in the pretrained encoder: BEiT's zero start
    np.testing.assert_array_equal(got[name], 0.0)
  # The official loader starts fc_norm from the encoder's final norm; the head stays fresh.
  np.testing.assert_array_equal(params["fc_norm"]["scale"], encoder["norm"]["scale"])
  np.testing.assert_array_equal(params["head"]["kernel"], fresh["head"]["kernel"])


def test_official_cae_checkpoint_loads_strictly_and_gives_its_features():
  c = cae_config(pos_grid=4)
  path = os.path.join(FIX, "cae_checkpoint.pth")
  method, _, params = _start(c, path, 16)
  golden = np.load(os.path.join(FIX, "golden.npz"))
  backbone = method.network(train=False).backbone
  out = backbone.apply({"params": params["backbone"]}, golden["images"], train=False)
  want = golden["cae.encoder"][-1]
  np.testing.assert_allclose(
    np.asarray(out["tokens"]), want, rtol=0, atol=2e-5 * np.abs(want).max()
  )
  # Strict: a key too many is named (the relative tables are the only ones allowed to be absent).
  sd = dict(init_from.read_backbone(path).state_dict)
  sd["blocks.0.extra"] = np.zeros(2, np.float32)
  fresh, _ = method.init(jax.random.key(0), (16, 16, 3))
  with pytest.raises(ValueError, match=r"unexpected keys \(1\): blocks.0.extra"):
    method.import_backbone(fresh, {}, sd)


def test_the_wrong_arch_names_the_preset():
  dino = os.path.join(FIX, "dino_checkpoint.pth")
  with pytest.raises(ft.FinetuneError, match="config.model.arch='vit'"):
    _start(cae_config(pos_grid=4), dino, 16)
  plain = load_config_file(os.path.join(ROOT, "configs/finetune.py:smoke"))
  with plain.unlocked():
    plain.model.pos_grid = 4
    plain.finetune.random_init = True
  with pytest.raises(ft.FinetuneError, match="cae_vit_b16"):
    _start(plain, os.path.join(FIX, "cae_checkpoint.pth"), 16)
  with pytest.raises(ft.FinetuneError, match="scan_blocks=False"):
    ft.backbone_for(cae_config(scan_blocks=True).model)


def test_relative_position_index_is_beits():
  h, w = 2, 3
  index = beit.relative_position_index(h, w)
  size = beit.relative_position_table_size(h, w)
  assert size == 3 * 5 + 3 and index.shape == (7, 7)
  cells = [(r, col) for r in range(h) for col in range(w)]
  for i, (ri, ci) in enumerate(cells):
    for j, (rj, cj) in enumerate(cells):
      assert index[1 + i, 1 + j] == (ri - rj + h - 1) * (2 * w - 1) + (ci - cj + w - 1)
  assert index[0, 0] == size - 1
  assert set(index[0, 1:]) == {size - 3} and set(index[1:, 0]) == {size - 2}


def test_layer_ids_and_decay_follow_beits_rules():
  c = cae_config()
  depth, decay = 2, 0.65
  method = make_method(c)
  params, _ = jax.eval_shape(lambda r: method.init(r, (28, 28, 3)), jax.random.key(0))
  scales, mask = _flat(ft.layer_decay_scales(params, depth, decay)), _flat(ft.decay_mask(params))
  seen = set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [ft._name(k) for k in path]
    key, name = "/".join(names), _timm_name(names, None)
    layer = official_layer_id(name, depth)
    np.testing.assert_allclose(scales[key], decay ** (depth + 1 - layer), rtol=1e-6, err_msg=name)
    # BEiT's get_parameter_groups: 1-D, '.bias' and no_weight_decay() names are not decayed.
    no_decay = len(leaf.shape) == 1 or name.endswith(".bias") or name in ("cls_token", "pos_embed")
    assert bool(mask[key]) == (not no_decay), name
    seen.add(layer)
  assert seen == set(range(depth + 2))
  assert not mask["backbone/block_0/gamma_1"] and not mask["backbone/block_1/attn/v_bias"]
  assert mask["backbone/block_0/attn/relative_position_bias_table"]  # decayed, as the release


def test_cae_finetune_trains_and_exports(cae_pretrained, tmp_path):
  workdir, encoder = cae_pretrained
  c = cae_config(workdir)
  with c.unlocked():
    c.total_steps = 3
    c.optim.lr_per_256 = 0.05
  res = trainer.run(c, str(tmp_path))
  assert res["step"] == 3
  losses = _losses(str(tmp_path))
  assert sorted(losses) == [1, 2, 3] and all(np.isfinite(list(losses.values())))
  # Layer scale is trained (not frozen), and the result exports and imports back exactly.
  method = make_method(c)
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  params = jax.device_get(ckpt.restore_parts(3, ("params",))["params"])
  ckpt.close()
  trained = params["backbone"]
  assert not np.array_equal(trained["block_0"]["gamma_1"], encoder["block_0"]["gamma_1"])
  sd, meta = method.export_backbone(params, {}, "student")
  assert meta["architecture"] == "vit+rel_pos_bias" and "blocks.1.ls2.gamma" in sd
  back, _ = method.import_backbone(jax.tree.map(np.zeros_like, params), {}, sd)
  assert jax.tree.structure(back["backbone"]) == jax.tree.structure(trained)
  for a, b in zip(jax.tree.leaves(back["backbone"]), jax.tree.leaves(trained)):
    np.testing.assert_array_equal(a, b)
