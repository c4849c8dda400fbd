"""main.py rejects bad command lines with one clear line, before anything heavy runs."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args):
  return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)


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


def test_every_config_preset_loads():
  sys.path.insert(0, ROOT)
  from sslx.config_check import load_config_file
  for preset in ("", "fashion_mnist", "smoke", "vit_base"):
    c = load_config_file(os.path.join(ROOT, f"configs/dino.py:{preset}") if preset
                         else os.path.join(ROOT, "configs/dino.py"))
    assert c.method == "dino"
    assert c.batch_size > 0


def test_imagenet_default_without_tfds_stops_at_once_with_the_recipe(tmp_path):
  r = _main("--config=configs/dino.py", f"--workdir={tmp_path / 'w'}",
            f"--config.data.tfds_data_dir={tmp_path / 'tfds'}")
  assert r.returncode == 1, r.stderr[-2000:]
  assert "downloads/manual" in r.stderr and "tfds build imagenet2012" in r.stderr
  assert "Traceback" not in r.stderr


def test_missing_fashion_mnist_names_the_package(tmp_path):
  r = _main("--config=configs/dino.py:smoke", f"--workdir={tmp_path / 'w'}",
            f"--config.data.path={tmp_path / 'nowhere'}")
  assert r.returncode == 1
  assert "apt-get install dataset-fashion-mnist" in r.stderr
  assert "Traceback" not in r.stderr
