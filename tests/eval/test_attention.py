"""Attention maps (`--mode=attention`): DINO's [CLS] maps, its thresholded masks, the picture."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sslx.config_check import load_config_file
from sslx.eval import attention
from sslx.methods.base import UnsupportedMode
from sslx.train import attention_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(name):
  return load_config_file(os.path.join(ROOT, f"configs/{name}"))


def test_cls_attention_puts_each_patch_at_its_grid_cell():
  rows, cols, n = 2, 3, 6
  att = np.zeros((1, 2, 1 + n, 1 + n), np.float32)
  att[0, 0, 0, 1 + 4] = 1.0  # head 0: [CLS] looks at patch 4 = row 1, col 1 (row-major)
  att[0, 1, 0, 1 + 2] = 0.7  # head 1: patch 2 = row 0, col 2; 0.3 stays on [CLS]
  att[0, 1, 0, 0] = 0.3
  att[0, :, 1:, 0] = 1.0  # other queries' rows must not leak in
  maps = attention.cls_attention(att, (rows, cols))
  assert maps.shape == (1, 2, rows, cols)
  assert maps[0, 0, 1, 1] == 1.0 and maps[0, 0].sum() == 1.0
  assert maps[0, 1, 0, 2] == pytest.approx(0.7) and maps[0, 1].sum() == pytest.approx(0.7)
  with pytest.raises(ValueError, match="1 \\+ N"):
    attention.cls_attention(att, (3, 3))


def test_mass_mask_keeps_the_smallest_top_set_holding_the_share():
  maps = np.array([[0.5, 0.1], [0.3, 0.1]])
  # ascending 0.1, 0.1, 0.3, 0.5: cumulative shares 0.1, 0.2, 0.5, 1.0.
  np.testing.assert_array_equal(attention.mass_mask(maps, 0.6), [[True, False], [True, False]])
  np.testing.assert_array_equal(attention.mass_mask(maps, 0.5), [[True, False], [False, False]])
  np.testing.assert_array_equal(attention.mass_mask(maps, 1.0), np.ones((2, 2), bool))
  # Unnormalised maps (the [CLS] weight is missing from the patches) give the same mask.
  np.testing.assert_array_equal(
    attention.mass_mask(0.37 * maps, 0.6), attention.mass_mask(maps, 0.6)
  )
  with pytest.raises(ValueError, match="keep"):
    attention.mass_mask(maps, 0.0)


def test_kept_fraction_uniform_vs_focused():
  uniform = np.full((1, 10, 10), 0.01)
  focused = np.zeros((1, 10, 10))
  focused[0, 3, 4] = 1.0
  # 60 of 100 equal patches (61 where the cumulative share rounds just past 0.4).
  assert attention.kept_fraction(uniform, 0.6)[0] == pytest.approx(0.6, abs=0.011)
  assert attention.kept_fraction(focused, 0.6)[0] == pytest.approx(0.01)


def test_attention_figure_layout():
  images = np.full((2, 8, 8, 3), 200, np.uint8)
  maps = np.zeros((2, 3, 2, 2), np.float32)
  maps[:, :, 0, 1] = 1.0  # every head looks at the top-right patch
  fig = attention.attention_figure(images, maps, keep=0.6, scale=2, gap=1)
  ph = 16
  assert fig.shape == (2 * ph + 1, 5 * ph + 4, 3) and fig.dtype == np.uint8
  head0 = fig[:ph, ph + 1 : 2 * ph + 1]
  assert (head0[:8, 8:] == 255).all()  # the attended patch is white on the hot ramp
  assert (head0[:8, :8] == 0).all() and (head0[8:] == 0).all()
  masked = fig[:ph, 4 * (ph + 1) :]
  assert (masked[:8, 8:] == 200).all() and (masked[8:] == 50).all()  # outside the mask: dimmed
  assert (fig[ph, :] == 255).all()  # the gap between rows
  with pytest.raises(ValueError, match="uint8"):
    attention.attention_figure(images.astype(np.float32), maps)


def test_write_attention_on_the_eval_split(tmp_path):
  c = _config("sere_dino.py:smoke")
  res = attention_workdir.write_attention(c, str(tmp_path), num_images=3, random_init=True)
  assert res["png"] == os.path.join(str(tmp_path), "attention", "random_init.png")
  heads, grid = c.model.num_heads, c.data.eval_size // c.model.patch_size
  assert res["heads"] == heads and tuple(res["grid"]) == (grid, grid) and res["images"] == 3
  with Image.open(res["png"]) as im:
    assert im.mode == "RGB" and im.size[0] > im.size[1] > 0
  saved = np.load(res["npz"])
  assert saved["maps"].shape == (3, heads, grid, grid)
  # Softmax rows: each head's patch weights plus its [CLS] weight make 1.
  assert (saved["maps"].sum(axis=(-2, -1)) <= 1.0 + 1e-5).all()
  assert (saved["maps"].sum(axis=(-2, -1)) > 0.5).all()
  assert saved["images"].dtype == np.uint8 and saved["images"].shape[1] == c.data.eval_size
  assert all(0.0 < f <= 1.0 for f in res["kept_fraction"])
  assert not [f for f in os.listdir(tmp_path / "attention") if f.endswith(".tmp")]


def test_write_attention_on_image_files_of_any_mode(tmp_path):
  folder = tmp_path / "pics"
  folder.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (40, 30), np.uint8), "L").save(folder / "grey.png")
  Image.fromarray(rng.integers(0, 255, (20, 50, 4), np.uint8), "RGBA").save(folder / "alpha.png")
  c = _config("dino.py:smoke")
  res = attention_workdir.write_attention(
    c, str(tmp_path / "w"), images=[str(folder)], random_init=True
  )
  saved = np.load(res["npz"])
  assert res["images"] == 2 and sorted(os.path.basename(n) for n in saved["names"]) == [
    "alpha.png",
    "grey.png",
  ]
  with pytest.raises(attention_workdir.AttentionError, match="neither a file nor a folder"):
    attention_workdir.write_attention(
      c, str(tmp_path / "w"), images=[str(tmp_path / "nope")], random_init=True
    )


def test_write_attention_of_cae_reads_the_encoders_last_block(tmp_path):
  c = _config("cae.py:smoke")
  res = attention_workdir.write_attention(c, str(tmp_path), num_images=2, random_init=True)
  saved = np.load(res["npz"])
  grid = c.data.eval_size // c.model.patch_size
  assert saved["maps"].shape == (2, res["heads"], grid, grid)
  assert (
    (saved["maps"].sum(axis=(-2, -1)) > 0.3) & (saved["maps"].sum(axis=(-2, -1)) <= 1 + 1e-5)
  ).all()


def test_attention_needs_a_vit_cls_teacher(tmp_path):
  with pytest.raises(UnsupportedMode, match="config.method='byol'"):
    attention_workdir.write_attention(_config("byol.py:smoke"), str(tmp_path), random_init=True)


def test_attention_without_a_checkpoint_is_one_line(tmp_path):
  r = subprocess.run(
    [
      sys.executable,
      "main.py",
      "--config=configs/dino.py:smoke",
      f"--workdir={tmp_path}",
      "--mode=attention",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 1, r.stderr[-2000:]
  assert "no checkpoint under" in r.stderr and "Traceback" not in r.stderr
