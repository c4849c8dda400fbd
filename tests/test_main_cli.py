"""main.py rejects bad command lines with one clear line, before anything heavy runs."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args):
  return subprocess.run(
    [sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
  )


def test_unknown_override_lists_valid_keys(tmp_path):
  r = _main("--config=configs/dino.py:smoke", f"--workdir={tmp_path}", "--config.model.dropth=1")
  assert r.returncode == 2
  assert "unknown config key 'model.dropth'" in r.stderr
  assert "drop_path_rate" in r.stderr  # the valid keys are listed
  assert "Traceback" not in r.stderr


def test_unknown_preset_is_one_line(tmp_path):
  r = _main("--config=configs/dino.py:smok", f"--workdir={tmp_path}")
  assert r.returncode == 2
  assert "unknown preset 'smok'" in r.stderr and "smoke" in r.stderr
  assert "Traceback" not in r.stderr


VIT_CONFIGS = ["dino", "sere_dino", "ibot", "sere_ibot", "mocov3", "sere_mocov3"]


@pytest.mark.parametrize("name", VIT_CONFIGS)
def test_every_config_preset_loads(name):
  sys.path.insert(0, ROOT)
  from sslx.config_check import load_config_file

  for preset in ("", "fashion_mnist", "smoke", "vit_base"):
    path = os.path.join(ROOT, f"configs/{name}.py")
    c = load_config_file(f"{path}:{preset}" if preset else path)
    assert c.method == name.replace("sere_", "")
    assert c.batch_size > 0
    assert c.sere.enabled == name.startswith("sere_")
    if preset in ("fashion_mnist", "smoke") and "mocov3" not in name:  # DINO-family CPU presets
      # keep the small heads of dino.py's presets.
      dino = load_config_file(os.path.join(ROOT, f"configs/dino.py:{preset}"))
      assert c.head.out_dim == dino.head.out_dim


@pytest.mark.parametrize("name", ["dino", "sere_dino"])
def test_demo_preset_is_fashion_mnist_on_the_7px_network(name):
  sys.path.insert(0, ROOT)
  from sslx.config_check import load_config_file

  demo = load_config_file(os.path.join(ROOT, f"configs/{name}.py:demo")).to_dict()
  fmnist = load_config_file(os.path.join(ROOT, f"configs/{name}.py:fashion_mnist")).to_dict()
  m, f = demo.pop("model"), fmnist.pop("model")
  assert (m["patch_size"], m["pos_grid"], m["embed_dim"], m["num_heads"]) == (7, 4, 128, 4)
  assert {k: v for k, v in m.items() if f[k] != v} == dict(
    patch_size=7, pos_grid=4, embed_dim=128, num_heads=4
  )
  assert demo["data"].pop("local_crops")["size"] == 14
  fmnist["data"].pop("local_crops")
  assert demo == fmnist  # same data, schedule, losses and budget otherwise


def test_finetune_demo_preset_builds_the_make_demo_network():
  # `--mode=finetune --config=configs/finetune.py:demo --init_from=runs/demo` loads strictly.
  sys.path.insert(0, ROOT)
  from sslx.config_check import load_config_file

  ft = load_config_file(os.path.join(ROOT, "configs/finetune.py:demo")).model
  pre = load_config_file(os.path.join(ROOT, "configs/dino.py:demo")).model
  keys = ("patch_size", "pos_grid", "embed_dim", "depth", "num_heads", "mlp_ratio", "variant")
  assert {k: ft[k] for k in keys} == {k: pre[k] for k in keys}


def test_sere_ibot_default_is_the_readme_recipe():
  sys.path.insert(0, ROOT)
  from sslx.config_check import load_config_file

  c = load_config_file(os.path.join(ROOT, "configs/sere_ibot.py"))
  assert c.batch_size == 1024 and c.total_epochs == 100
  assert (c.data.local_crops.number, tuple(c.data.local_crops.scale)) == (10, (0.05, 0.4))
  assert tuple(c.data.global_crops.scale) == (0.4, 1.0)
  assert (c.sere.alpha, c.sere.beta, c.optim.clip_grad, c.loss.teacher_temp) == (
    0.2,
    0.5,
    0.3,
    0.07,
  )
  assert c.head.shared_head and c.head.out_dim == c.head.patch_out_dim == 8192
  assert not c.head.norm_last_layer and c.optim.decay_biases
  assert c.data.masks.scheme == "ibot" and tuple(c.data.masks.ratios) == (0.0, 0.3)
  b = load_config_file(os.path.join(ROOT, "configs/sere_ibot.py:vit_base"))
  assert b.model.variant == "base" and b.optim.lr_per_256 == 7.5e-4
  assert b.loss.warmup_teacher_temp_epochs == 50 and b.optim.freeze_last_layer_epochs == 3.0


def test_sere_dino_default_is_the_paper_recipe():
  sys.path.insert(0, ROOT)
  from sslx.config_check import load_config_file

  c = load_config_file(os.path.join(ROOT, "configs/sere_dino.py"))
  assert (c.data.global_crops.number, c.data.global_crops.size) == (2, 224)
  assert tuple(c.data.global_crops.scale) == (0.35, 1.0)
  assert (c.data.local_crops.number, c.data.local_crops.size) == (4, 96)
  assert tuple(c.data.local_crops.scale) == (0.05, 0.35)
  assert (c.sere.alpha, c.sere.beta, c.sere.spatial_temp, c.sere.channel_temp) == (
    1.0,
    1.0,
    0.5,
    0.1,
  )
  assert c.optim.lr_per_256 == 5e-4 and c.batch_size == 512 and c.total_epochs == 100


@pytest.mark.parametrize("config", [f"configs/{n}.py" for n in VIT_CONFIGS])
def test_imagenet_default_without_tfds_stops_at_once_with_the_recipe(tmp_path, config):
  r = _main(
    f"--config={config}",
    f"--workdir={tmp_path / 'w'}",
    f"--config.data.tfds_data_dir={tmp_path / 'tfds'}",
  )
  assert r.returncode == 1, r.stderr[-2000:]
  assert "downloads/manual" in r.stderr and "tfds build imagenet2012" in r.stderr
  assert "Traceback" not in r.stderr


def test_missing_fashion_mnist_names_the_package(tmp_path):
  r = _main(
    "--config=configs/dino.py:smoke",
    f"--workdir={tmp_path / 'w'}",
    f"--config.data.path={tmp_path / 'nowhere'}",
  )
  assert r.returncode == 1
  assert "apt-get install dataset-fashion-mnist" in r.stderr
  assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
  "args, message",
  [
    # A method's config error (MocoConfigError) is a UserError: one line, no traceback.
    (
      ("--config=configs/mocov3.py:smoke", "--config.data.local_crops.number=2"),
      "data.local_crops.number=0",
    ),
    # A bad choice for the new device-crop switch names the valid values.
    (("--config=configs/dino.py:smoke", "--config.data.crops_on=gpu"), "'host', 'device'"),
    # --mode=finetune: a pretraining config, or no starting point.
    (("--config=configs/dino.py:smoke", "--mode=finetune"), "use --mode=train"),
    (("--config=configs/finetune.py:smoke", "--mode=finetune"), "--random_init for the"),
  ],
)
def test_config_errors_found_while_building_are_one_line(tmp_path, args, message):
  r = _main(*args, f"--workdir={tmp_path / 'w'}")
  assert r.returncode == 1, r.stderr[-2000:]
  assert message in r.stderr
  assert "Traceback" not in r.stderr


def test_mocov3_default_is_the_official_vit_small():
  """moco-v3 vits.py / main_moco.py: ViT-S with 12 heads, its own init, bilinear crops."""
  sys.path.insert(0, ROOT)
  from sslx.config_check import load_config_file
  from sslx.models.build import build_backbone

  for name in ("mocov3.py", "mocov3.py:vit_base", "sere_mocov3.py"):
    c = load_config_file(os.path.join(ROOT, f"configs/{name}"))
    m = build_backbone(c.model)
    assert (m.num_heads, m.init_scheme, m.pos_embed) == (12, "mocov3", "sincos"), name
    assert c.data.interpolation == "bilinear", name
  d = build_backbone(load_config_file(os.path.join(ROOT, "configs/dino.py")).model)
  assert (d.num_heads, d.init_scheme, d.pos_embed) == (6, "dino", "learned")
