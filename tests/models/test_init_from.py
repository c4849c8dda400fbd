"""--init_from (sslx/models/init_from.py, sslx/models/torch_pickle.py).

The fixtures are tiny checkpoints in the layout of each official release, built and run with the
official model code (tests/fixtures/init_from/make_fixtures.py says how); golden.npz holds those
models' outputs, which the loaded sslx backbones must reproduce.
"""

import os
import pickle
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from sslx.config_check import load_config_file
from sslx.methods import make_method
from sslx.methods.base import evaluated_params
from sslx.models import init_from, torch_pickle

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures", "init_from")


def _config(name, pos_grid=4):
  c = load_config_file(os.path.join(ROOT, "configs", name))
  with c.unlocked():
    c.model.update(embed_dim=32, depth=2, num_heads=2, patch_size=4, pos_grid=pos_grid)
  return c


def _loaded(c, path, key="auto"):
  """(method, eval params) of a fresh init with the backbone of `path`."""
  method = make_method(c)
  size = c.data.global_crops.size
  params, loss_state = jax.device_get(
    jax.jit(lambda r: method.init(r, (size, size, 3)))(jax.random.PRNGKey(0))
  )
  params, loss_state, _ = init_from.init_params(method, params, loss_state, path, key)
  teacher = method.teacher_params(params) if method.has_teacher else None
  fields = {"params": params, "teacher_params": teacher, "loss_state": loss_state}
  return method, evaluated_params(method, fields)


CASES = [
  # config, file, key, golden entry, config pos_grid (the files' grid is 4), images
  ("dino.py:smoke", "dino_deitsmall_pretrain.pth", "auto", "dino.teacher.24", 6, "images24"),
  ("dino.py:smoke", "dino_checkpoint.pth", "auto", "dino.teacher", 4, "images"),
  ("dino.py:smoke", "dino_checkpoint.pth", "student", "dino.student", 4, "images"),
  ("ibot.py:smoke", "ibot_checkpoint.pth", "auto", "ibot.teacher", 4, "images"),
  ("sere_ibot.py:smoke", "sere_checkpoint.pth", "student", "sere.student", 4, "images"),
  ("mocov3.py:smoke", "mocov3_checkpoint.pth.tar", "auto", "mocov3.student", 4, "images"),
  ("mocov3.py:smoke", "mocov3_checkpoint.pth.tar", "teacher", "mocov3.teacher", 4, "images"),
  ("cae.py:smoke", "cae_checkpoint.pth", "auto", "cae.encoder", 4, "images"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[1]}-{c[2]}" for c in CASES])
def test_official_layout_gives_the_official_features(case):
  name, file, key, entry, grid, images = case
  golden = np.load(os.path.join(FIX, "golden.npz"))
  method, params = _loaded(_config(name, grid), os.path.join(FIX, file), key)
  x = golden[images]
  want = golden[entry]  # [blocks, B, 1 + N, D], the last block last
  tol = 2e-5 * max(1.0, float(np.abs(want).max()))
  np.testing.assert_allclose(np.asarray(method.tokens(params, x)), want[-1], rtol=0, atol=tol)
  if not name.startswith("cae"):
    feats = np.asarray(method.block_features(params, x, 2, False))
    np.testing.assert_allclose(feats, np.concatenate(list(want[:, :, 0]), -1), rtol=0, atol=tol)


def test_sslx_export_round_trips(tmp_path):
  from sslx.train import export_workdir
  from tests.train.test_export_workdir import _workdir

  c = _config("sere_dino.py:smoke", 7)
  state = _workdir(c, tmp_path)
  path = export_workdir.export(c, str(tmp_path), "teacher")["path"]
  method, params = _loaded(c, path)
  want = jax.device_get(state.teacher_params["backbone"])
  assert jax.tree.structure(params["backbone"]) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(params["backbone"]), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


def test_every_mismatch_in_one_line(tmp_path):
  sd = dict(init_from.read_backbone(os.path.join(FIX, "dino_deitsmall_pretrain.pth")).state_dict)
  sd.pop("blocks.1.mlp.fc2.bias")
  sd["blocks.0.extra.weight"] = np.zeros((2, 2), np.float32)
  sd["blocks.0.attn.qkv.weight"] = np.zeros((96, 16), np.float32)
  path = str(tmp_path / "bad.safetensors")
  save_file(sd, path)
  with pytest.raises(init_from.InitFromError) as e:
    _loaded(_config("dino.py:smoke"), path)
  msg = str(e.value)
  assert "\n" not in msg and path in msg
  assert "missing keys (1): blocks.1.mlp.fc2.bias" in msg
  assert "unexpected keys (1): blocks.0.extra.weight" in msg
  assert "blocks.0.attn.qkv.weight: got [96, 16], want [96, 32]" in msg


def test_wrong_entry_and_unreadable_files(tmp_path):
  with pytest.raises(init_from.InitFromError, match="its state dicts: student, teacher"):
    init_from.read_backbone(os.path.join(FIX, "dino_checkpoint.pth"), "model_ema")
  bad = tmp_path / "legacy.pth"
  bad.write_bytes(b"\x80\x02not a zip")
  with pytest.raises(init_from.InitFromError, match="not a zip-format torch checkpoint"):
    init_from.read_backbone(str(bad))
  with pytest.raises(init_from.InitFromError, match="no such file"):
    init_from.read_backbone(str(tmp_path / "missing.pth"))


class _Evil:
  def __reduce__(self):
    return (os.system, ("touch /nonexistent-dir/pwned",))


def test_reader_runs_no_code(tmp_path):
  # A torch-style archive whose pickle calls os.system: the call becomes an inert record.
  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps({"x": _Evil()}, protocol=2))
  obj = torch_pickle.load(str(path))
  assert isinstance(obj["x"], torch_pickle.Opaque)
  assert obj["x"].name.endswith(".system") and obj["x"].args == ("touch /nonexistent-dir/pwned",)
  # ... and a real checkpoint's argparse.Namespace is kept as data.
  args = torch_pickle.load(os.path.join(FIX, "dino_checkpoint.pth"))["args"]
  assert args.name == "argparse.Namespace" and args.state["patch_size"] == 4


def test_load_backbone_for_fine_tuning():
  c = _config("dino.py:smoke", 6)
  params = init_from.load_backbone(os.path.join(FIX, "dino_checkpoint.pth"), c)
  golden = np.load(os.path.join(FIX, "golden.npz"))
  from sslx.models.build import build_backbone

  out = build_backbone(c.model).apply({"params": params}, golden["images24"], train=False)
  want = golden["dino.teacher.24"][-1]
  np.testing.assert_allclose(np.asarray(out["patch"]), want[:, 1:], rtol=0, atol=2e-5 * 10)


def test_cli_missing_file_is_one_error_line(tmp_path):
  r = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "main.py"),
      "--config=" + os.path.join(ROOT, "configs/dino.py:smoke"),
      f"--workdir={tmp_path}",
      "--mode=knn",
      f"--init_from={tmp_path}/missing.pth",
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=120,
  )
  assert r.returncode == 1
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert errors == [f"error: --init_from={tmp_path}/missing.pth: no such file"]


def test_training_starts_student_and_teacher_from_the_file(tmp_path):
  from sslx.train import sharding, trainer

  c = _config("dino.py:smoke", 4)
  built = trainer.build(c, sharding.make_mesh(c.mesh), steps_per_epoch=10, total_steps=10)
  state = built.init(c.seed)
  path = os.path.join(FIX, "dino_checkpoint.pth")
  backbone = init_from.read_backbone(path)
  new = trainer._with_backbone(
    built.method, state, built.state_sharding, backbone, path, "auto", str(tmp_path)
  )
  want = init_from.read_backbone(path).state_dict["blocks.1.mlp.fc1.weight"].T
  for tree in (new.params, new.teacher_params):
    np.testing.assert_array_equal(np.asarray(tree["backbone"]["block_1"]["fc1"]["kernel"]), want)
  # The head keeps its fresh init; the record of what was read is in the workdir.
  for a, b in zip(jax.tree.leaves(new.params["head"]), jax.tree.leaves(state.params["head"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert (tmp_path / "init_from.json").exists()


def test_run_reads_the_file_on_a_fresh_workdir_and_ignores_it_on_a_resume(tmp_path, caplog):
  """trainer.run's wiring, without compiling a step (the positive path of a fresh workdir is
  test_training_starts_student_and_teacher_from_the_file)."""
  from sslx.train import checkpoint, faults, sharding, trainer

  c = load_config_file(os.path.join(ROOT, "configs/dino.py:smoke"))
  with c.unlocked():
    c.total_steps = 1
  path = os.path.join(FIX, "dino_deitsmall_pretrain.pth")
  # Fresh workdir: the file is read before anything compiles, and a misfit is one error.
  with pytest.raises(init_from.InitFromError, match="no such file"):
    trainer.run(c, str(tmp_path / "a"), init_from=str(tmp_path / "missing.pth"))
  cae = os.path.join(FIX, "cae_checkpoint.pth")
  with pytest.raises(init_from.InitFromError, match=r"unexpected keys \(4\): blocks.0.ls1.gamma"):
    trainer.run(c, str(tmp_path / "b"), init_from=cae)
  # A workdir with a checkpoint (here at the last step, so nothing is trained) resumes from it.
  wd = str(tmp_path / "c")
  built = trainer.build(c, sharding.make_mesh(c.mesh), steps_per_epoch=10, total_steps=1)
  state = built.init(c.seed)
  ckpt = checkpoint.Checkpointer(wd, async_save=False)
  ckpt.save(1, state.replace(step=state.step + 1), None, faults.config_as_json(c))
  ckpt.close()
  with caplog.at_level("INFO"):
    assert trainer.run(c, wd, init_from=path)["step"] == 1
  assert "--init_from=" + path + " ignored" in caplog.text
  assert not os.path.exists(os.path.join(wd, "init_from.json"))


def test_methods_without_per_block_tokens_refuse_the_dino_protocol():
  from sslx.methods.base import UnsupportedMode

  for name in ("cae.py:smoke", "byol.py:smoke"):
    method = make_method(load_config_file(os.path.join(ROOT, "configs", name)))
    with pytest.raises(UnsupportedMode, match="protocol='dino'"):
      method.block_features(None, None, 4, False)


def test_dino_head_loads_and_gives_the_official_logits():
  c = _config("dino.py:smoke", 4)
  with c.unlocked():
    c.head.update(out_dim=16, hidden_dim=16, bottleneck_dim=8)
  method = make_method(c)
  params, _ = jax.device_get(jax.jit(lambda r: method.init(r, (16, 16, 3)))(jax.random.PRNGKey(0)))
  path = os.path.join(FIX, "dino_checkpoint.pth")
  params, _, read = init_from.init_params(method, params, {}, path, "teacher", head=True)
  assert set(read.head) == {
    "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias",
    "last_layer.weight_g", "last_layer.weight_v",
  }  # fmt: skip
  golden = np.load(os.path.join(FIX, "golden.npz"))
  _, logits = method.network(teacher=True).apply({"params": params}, golden["images"], train=False)
  want = golden["dino.teacher.head"]
  np.testing.assert_allclose(np.asarray(logits), want, rtol=0, atol=2e-5 * np.abs(want).max())
  # A file without a head next to the backbone, and a head the config cannot hold, are refused.
  plain = os.path.join(FIX, "dino_deitsmall_pretrain.pth")
  with pytest.raises(init_from.InitFromError, match="no projection head"):
    init_from.init_params(method, params, {}, plain, head=True)
  with c.unlocked():
    c.head.hidden_dim = 24
  small = make_method(c)
  params, _ = jax.device_get(jax.jit(lambda r: small.init(r, (16, 16, 3)))(jax.random.PRNGKey(0)))
  with pytest.raises(
    init_from.InitFromError, match=r"mlp.0.weight: got \[16, 32\], want \[24, 32\]"
  ):
    init_from.init_params(small, params, {}, path, head=True)
