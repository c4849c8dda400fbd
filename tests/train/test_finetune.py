"""Fine-tuning (sslx/methods/finetune.py) end to end on the smoke config: the official layer-wise
lr decay on every parameter (scanned and unscanned blocks), the pretrained backbone it starts
from, training with top-1 reported, stop + resume = the uninterrupted losses, the --random_init
baseline."""

import json
import os

import jax
import numpy as np
import pytest

from sslx.config_check import load_config_file
from sslx.methods import finetune as ft
from sslx.methods import make_method
from sslx.models import init_from
from sslx.train import checkpoint, sharding, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A smoke DINO workdir holding one checkpoint of its initial state (no training needed: the
  test is about reading its backbone) and its config.json, as the trainer writes them."""
  workdir = str(tmp_path_factory.mktemp("dino_pretrain"))
  c = load_config_file(os.path.join(ROOT, "configs/dino.py:smoke"))
  built = trainer.build(c, sharding.make_mesh(c.mesh), steps_per_epoch=10, total_steps=10)
  state = built.init(c.seed)
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  ckpt.save(1, state.replace(step=state.step + 1), None)
  ckpt.close()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(c.to_json_best_effort())
  return workdir, jax.device_get(state.teacher_params["backbone"])


def ft_config(pretrained_dir="", **finetune):
  c = load_config_file(os.path.join(ROOT, "configs/finetune.py:smoke"))
  with c.unlocked():
    c.finetune.pretrained = pretrained_dir
    c.finetune.random_init = not pretrained_dir
    c.finetune.update(**finetune)
    c.log_every_steps = 1
    c.optim.lr_per_256 = 0.05  # a visible change in 6 steps
    c.eval.knn_every_steps = 0
  return c


# ---- (a) layer-wise lr decay --------------------------------------------------------------------


def official_layer_id(name: str, num_layers: int) -> int:
  """BEiT's get_num_layer_for_vit / MAE's get_layer_id_for_vit on timm parameter names."""
  if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
    return 0
  if name.startswith("blocks"):
    return int(name.split(".")[1]) + 1
  return num_layers + 1


def _timm_name(names: list[str], index: int | None) -> str:
  """Our parameter path (and stacked-layer index) -> the timm-style name of the same tensor."""
  if names[0] != "backbone":
    return ".".join(names)  # head, fc_norm
  top = names[1]
  if top == "blocks":
    return f"blocks.{index}." + ".".join(names[3:])
  if top.startswith("block_"):
    return f"blocks.{int(top[len('block_') :])}." + ".".join(names[2:])
  return ".".join(names[1:])


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_layer_decay_follows_the_official_rule(scan, pooling):
  c = ft_config(pooling=pooling)
  depth, decay = 4, 0.65
  with c.unlocked():
    c.model.update(depth=depth, scan_blocks=scan)
  method = make_method(c)
  params, _ = jax.eval_shape(lambda r: method.init(r, (28, 28, 3)), jax.random.PRNGKey(0))
  scales = ft.layer_decay_scales(params, depth, decay)
  seen = set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [ft._name(k) for k in path]
    scale = np.broadcast_to(_at(scales, path), leaf.shape)
    stacked = names[:2] == ["backbone", "blocks"]
    for i in range(leaf.shape[0]) if stacked else [None]:
      name = _timm_name(names, i)
      want = decay ** (depth + 1 - official_layer_id(name, depth))
      got = scale[i] if stacked else scale
      np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=name)
      seen.add(official_layer_id(name, depth))
  assert seen == set(range(depth + 2))  # embeddings, every block, and the head's layer
  head = _at(scales, [jax.tree_util.DictKey("head"), jax.tree_util.DictKey("kernel")])
  assert float(head) == 1.0


def _at(tree, path):
  for k in path:
    tree = tree[ft._name(k)]
  return tree


def test_weight_decay_groups():
  method = make_method(ft_config(pooling="mean"))
  params, _ = jax.eval_shape(lambda r: method.init(r, (28, 28, 3)), jax.random.PRNGKey(0))
  flat = {
    "/".join(ft._name(k) for k in p): v
    for p, v in jax.tree_util.tree_flatten_with_path(ft.decay_mask(params))[0]
  }
  assert flat["head/kernel"] and flat["backbone/block_0/attn/qkv/kernel"]
  assert flat["backbone/patch_embed/kernel"]
  for name in ("cls_token", "pos_embed", "norm/scale", "norm/bias", "block_1/fc1/bias"):
    assert not flat[f"backbone/{name}"], name
  assert not flat["head/bias"] and not flat["fc_norm/scale"]


# ---- (c), (d) training ----------------------------------------------------------------------


def _losses(workdir):
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "loss" in row:
        out[row["step"]] = row["loss"]
  return out


def test_starts_from_the_pretrained_teacher_backbone(pretrained):
  workdir, teacher_backbone = pretrained
  method = make_method(ft_config(workdir))
  assert method.start_weights() == (workdir, "auto")
  fresh, _ = method.init(jax.random.PRNGKey(0), (28, 28, 3))
  params, _, _ = init_from.init_params(method, fresh, {}, workdir, "auto")
  for a, b in zip(jax.tree.leaves(params["backbone"]), jax.tree.leaves(teacher_backbone)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(params["head"]["kernel"], fresh["head"]["kernel"])
  with pytest.raises(init_from.InitFromError, match="no such file"):
    init_from.read_backbone(os.path.join(workdir, "missing"))
  assert make_method(ft_config(random_init=True)).start_weights() is None
  with pytest.raises(ft.FinetuneError, match="--random_init"):
    ft.check_config(ft_config(random_init=False))


def test_finetune_trains_reports_top1_and_resumes_exactly(pretrained, tmp_path):
  workdir, _ = pretrained
  c = ft_config(workdir)
  with c.unlocked():
    c.eval.knn_every_steps = 10**9  # evaluate at the end only
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  res = trainer.run(c, a)
  with open(os.path.join(a, "init_from.json")) as f:
    assert json.load(f)["source"] == "workdir, step 1, teacher"
  assert res["step"] == 6 and 0 <= res["eval"]["top1"] <= 100 and res["eval"]["num_test"] > 0
  la = _losses(a)
  assert sorted(la) == [1, 2, 3, 4, 5, 6] and all(np.isfinite(list(la.values())))
  assert min(la[5], la[6]) < la[1]  # it learns
  with c.unlocked():
    c.eval.knn_every_steps = 0
  assert trainer.run(c, b, stop_after=3)["step"] == 3
  assert trainer.run(c, b)["step"] == 6  # resumes state + data position from step 3
  lb = _losses(b)
  for step in (4, 5, 6):
    assert lb[step] == pytest.approx(la[step], rel=1e-6, abs=1e-7), step


def test_random_init_baseline_runs(pretrained, tmp_path):
  c = ft_config()
  with c.unlocked():
    c.total_steps = 2
  res = trainer.run(c, str(tmp_path))
  assert res["step"] == 2
  assert all(np.isfinite(list(_losses(str(tmp_path)).values())))
  _, teacher_backbone = pretrained
  params, _ = make_method(c).init(jax.random.PRNGKey(0), (28, 28, 3))
  assert not np.array_equal(params["backbone"]["cls_token"], teacher_backbone["cls_token"])


def test_main_flags_fold_into_the_finetune_config(tmp_path):
  c = ft_config(random_init=False)
  c = ft.with_start(c, str(tmp_path), "student", random_init=False)
  assert (c.finetune.pretrained, c.finetune.weights, c.finetune.random_init) == (
    str(tmp_path),
    "student",
    False,
  )
  with pytest.raises(ft.FinetuneError, match="disagree"):
    ft.with_start(c, str(tmp_path / "other"), "auto", random_init=False)
  dino = load_config_file(os.path.join(ROOT, "configs/dino.py:smoke"))
  with pytest.raises(ft.FinetuneError, match="use --mode=train"):
    ft.with_start(dino, None, "auto", random_init=False)
