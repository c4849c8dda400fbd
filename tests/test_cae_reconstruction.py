"""experiments/cae_reconstruction.py: picture layout and JSON, on untrained smoke weights."""

import importlib.util
import json
import os

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
  spec = importlib.util.spec_from_file_location(
    "cae_reconstruction", os.path.join(ROOT, "experiments", "cae_reconstruction.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_random_init_picture_has_five_columns_and_scores_worse_than_patch_means(tmp_path):
  out = str(tmp_path / "rec.png")
  res = _script().main(
    [
      f"--config={ROOT}/configs/cae.py:smoke",
      f"--workdir={tmp_path}",
      f"--out={out}",
      "--num=3",
      "--scale=2",
      "--random_init",
    ]
  )
  img = Image.open(out)
  assert img.size == (5 * (28 + 2) * 2, 3 * 28 * 2)  # 5 columns (+2-px gaps), 3 rows
  with open(str(tmp_path / "rec.json")) as f:
    assert json.load(f)["mse_all_patches_normalised"] == res["mse_all_patches_normalised"]
  # An untrained decoder is no better than predicting each patch's mean (MSE 1 in this space).
  assert res["mse_all_patches_normalised"] > 1.0
