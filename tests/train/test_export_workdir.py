"""`main.py --mode=export`: the checkpoint's backbone as a safetensors file of PyTorch tensors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from sslx.config_check import load_config_file
from sslx.models import torch_layout
from sslx.train import checkpoint, export_workdir, sharding, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(name):
  return load_config_file(os.path.join(ROOT, f"configs/{name}"))


def _workdir(c, path):
  """A step-1 checkpoint of the method's initial state, written the trainer's way; the teacher
  is made to differ from the student so that --weights visibly picks one."""
  built = trainer.build(c, sharding.make_mesh(c.mesh), steps_per_epoch=10, total_steps=10)
  state = built.init(c.seed)
  teacher = jax.tree.map(lambda x: x + 1.0, state.teacher_params)
  ckpt = checkpoint.Checkpointer(str(path), async_save=False)
  ckpt.save(1, state.replace(step=state.step + 1, teacher_params=teacher), None)
  ckpt.close()
  return state.replace(teacher_params=teacher)


def _read(path):
  with safe_open(path, "np") as f:
    meta = f.metadata()
  return load_file(path), meta


@pytest.mark.parametrize("name", ["sere_dino.py:smoke", "mocov3.py:smoke"])
def test_vit_methods_export_their_backbone(tmp_path, name):
  c = _config(name)
  state = _workdir(c, tmp_path)
  for weights, tree in (("teacher", state.teacher_params), ("student", state.params)):
    res = export_workdir.export(c, str(tmp_path), weights)
    assert res["path"] == os.path.join(
      str(tmp_path), "export", f"{weights}_backbone_step1.safetensors"
    )
    sd, meta = _read(res["path"])
    assert meta["sslx.weights"] == weights and meta["sslx.step"] == "1"
    assert meta["architecture"] == "vit" and meta["sslx.method"] == c.method
    kwargs = json.loads(meta["timm_kwargs"])
    assert kwargs["depth"] == sum(1 for k in sd if k.endswith(".attn.qkv.weight"))
    assert kwargs["num_classes"] == 0
    # Only the backbone: no head, projector, SERE heads or mask token.
    assert all(
      k.split(".")[0] in {"cls_token", "pos_embed", "patch_embed", "blocks", "norm"} for k in sd
    )
    back = torch_layout.vit_from_torch(
      sd,
      jax.tree.map(np.asarray, tree["backbone"]),
      pos_embed=sd["pos_embed"] if c.model.get("pos_embed") == "sincos" else None,
    )
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree["backbone"])):
      np.testing.assert_array_equal(a, np.asarray(b))
  assert not [f for f in os.listdir(tmp_path / "export") if ".tmp" in f]
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(res["path"]).st_mode & 0o777 == 0o666 & ~umask


def test_byol_exports_target_or_online_with_their_batch_statistics(tmp_path):
  c = _config("byol.py:smoke")
  state = _workdir(c, tmp_path)
  for weights, tree, stats in (
    ("teacher", state.teacher_params, state.loss_state["target_stats"]),
    ("student", state.params, state.loss_state["online_stats"]["net"]),
  ):
    sd, meta = _read(export_workdir.export(c, str(tmp_path), weights)["path"])
    assert meta["torchvision_model"] == f"resnet{c.model.depth}" and "width" in meta["note"]
    np.testing.assert_array_equal(
      sd["conv1.weight"],
      np.transpose(np.asarray(tree["encoder"]["stem_conv"]["kernel"]), (3, 2, 0, 1)),
    )
    np.testing.assert_array_equal(
      sd["bn1.running_var"], np.asarray(stats["encoder"]["stem_bn"]["var"])
    )
    assert not any(k.startswith("fc") for k in sd)


def test_cae_exports_the_encoder_with_layer_scale(tmp_path):
  c = _config("cae.py:smoke")
  state = _workdir(c, tmp_path)
  sd, meta = _read(export_workdir.export(c, str(tmp_path))["path"])
  kwargs = json.loads(meta["timm_kwargs"])
  assert kwargs["init_values"] == c.model.init_values
  assert (
    "blocks.0.ls1.gamma" in sd
    and sd["pos_embed"].shape[1] == 1 + (kwargs["img_size"] // kwargs["patch_size"]) ** 2
  )
  d = kwargs["embed_dim"]
  enc = state.params["encoder"]  # CAE keeps no teacher copy: the encoder is the student
  np.testing.assert_array_equal(sd["blocks.0.attn.qkv.bias"][:d], enc["block_0"]["attn"]["q_bias"])
  assert not np.any(sd["blocks.0.attn.qkv.bias"][d : 2 * d])


def test_cli_export_and_its_errors(tmp_path):
  c = _config("dino.py:smoke")
  _workdir(c, tmp_path)
  run = lambda *a: subprocess.run(  # noqa: E731
    [sys.executable, "main.py", "--config=configs/dino.py:smoke", *a],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  r = run(f"--workdir={tmp_path}", "--mode=export", "--weights=student")
  assert r.returncode == 0, r.stderr[-2000:]
  assert os.path.exists(tmp_path / "export" / "student_backbone_step1.safetensors")
  r = run(f"--workdir={tmp_path / 'empty'}", "--mode=export")
  assert r.returncode == 1
  assert "error: no checkpoint under" in r.stderr and "Traceback" not in r.stderr
