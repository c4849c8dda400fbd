"""experiments/sere_relations.py on a 6-step DINO+SERE smoke checkpoint: table, JSON, picture, zero cases."""

import importlib.util
import json
import math
import os
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from sslx.config_check import load_config_file
from sslx.data import overlap
from sslx.losses import sere as sere_losses
from sslx.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script():
  spec = importlib.util.spec_from_file_location(
    "sere_relations", os.path.join(ROOT, "experiments", "sere_relations.py")
  )
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


rel = _load_script()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("sere_smoke"))
  trainer.run(load_config_file(os.path.join(ROOT, "configs/sere_dino.py:smoke")), path)
  return path


@pytest.fixture(scope="module")
def run(workdir):
  return rel.load_run(workdir, "sere")


def test_run_all_writes_table_json_and_picture(workdir, tmp_path, capsys):
  out = str(tmp_path / "pics" / "rel.png")
  result = rel.run_all([workdir, workdir], out, names=["a", "b"], num_images=6, image_index=1)
  assert "spatial diff" in capsys.readouterr().out
  view_size = result["view_size"]
  assert view_size == 28
  with Image.open(out) as im:
    assert im.size == rel.picture_size(2, view_size)
    assert im.mode == "RGB"
    pixels = np.asarray(im)
  assert (pixels == rel.OVERLAP_COLOUR).all(axis=-1).any()  # the overlap box is drawn
  with open(os.path.join(tmp_path, "pics", "rel.json")) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(result))
  assert set(saved["definition"]) == {"spatial", "channel", "pairs"}
  assert saved["num_images"] == 6 and 0 < saved["num_overlapping"] <= 6
  a, b = saved["runs"]
  assert (a["name"], b["name"]) == ("a", "b")
  assert a["step"] == 6 and a["num_heads"] == 2 and a["token_grid"] == [7, 7] and a["grid"] == 6
  for key in (
    "spatial_mean",
    "spatial_std",
    "spatial_sem",
    "channel_mean",
    "channel_std",
    "channel_sem",
  ):
    assert math.isfinite(a[key]) and a[key] >= 0, key
    assert a[key] == pytest.approx(b[key], rel=1e-6)  # same checkpoint, same views
  assert a["spatial_mean"] > 0 and a["channel_mean"] > 0


def test_identical_views_give_zero_difference(run):
  pairs = rel.draw_pairs(run.config, [0, 1, 2], seed=3)
  diffs = rel.measure(run, pairs)
  assert np.all(np.isfinite(diffs["spatial"])) and np.all(diffs["spatial"][pairs["valid"]] > 0)
  same = dict(pairs)
  same["views"] = np.repeat(pairs["views"][:, :1], 2, axis=1)
  same["boxes"] = np.repeat(pairs["boxes"][:, :1], 2, axis=1)
  same["flips"] = np.repeat(pairs["flips"][:, :1], 2, axis=1)
  ov = overlap.batch_overlaps(same["boxes"], same["flips"])
  same["rects"], same["valid"] = ov["gg_rects"][:, 0, 1], ov["gg_valid"][:, 0, 1]
  assert same["valid"].all()
  zero = rel.measure(run, same, batch_size=2)  # also covers the padded last chunk
  np.testing.assert_allclose(zero["spatial"], 0.0, atol=1e-7)
  np.testing.assert_allclose(zero["channel"], 0.0, atol=1e-7)


def test_spatial_difference_is_that_of_the_aligned_relation_and_skips_non_overlapping_pairs():
  rng = np.random.default_rng(0)
  tokens = rng.normal(size=(2, 2, 16, 8)).astype(np.float32)  # [B, view, N = 4x4, C]
  rects = np.array([[[0.1, 0.2, 0.9, 0.8], [0.8, 0.0, 0.2, 0.7]]] * 2, np.float32)
  valid = np.array([True, False])
  got = rel.relation_differences(
    tokens[:, 0], tokens[:, 1], rects[:, 0], rects[:, 1], valid, num_heads=2, grid=3, hw=(4, 4)
  )
  w_a = sere_losses.sampling_matrix(rects[0, 0], True, 3, 4, 4)
  w_b = sere_losses.sampling_matrix(rects[0, 1], True, 3, 4, 4)
  r_a = sere_losses.align_relation(sere_losses.spatial_relation(tokens[0, 0], 2), w_a, w_a)
  r_b = sere_losses.align_relation(sere_losses.spatial_relation(tokens[0, 1], 2), w_b, w_b)
  expected = np.mean(np.abs(jax.nn.softmax(r_a, -1) - jax.nn.softmax(r_b, -1)))
  assert float(got["spatial"][0]) == pytest.approx(float(expected), rel=1e-5)
  assert (
    float(got["spatial"][1]) == 0.0
  )  # no overlap: both sides uniform; callers drop it via valid
  fake = type(
    "R",
    (),
    {"name": "x", "workdir": ".", "step": 0, "num_heads": 2, "token_grid": lambda self, s: (4, 4)},
  )()
  summary = rel.summarize(
    fake,
    {
      "spatial": np.array([0.5, 0.0], np.float32),
      "channel": np.array([0.25, 9.0], np.float32),
      "valid": valid,
    },
    28,
  )
  assert summary["num_pairs"] == 1
  assert summary["spatial_mean"] == 0.5 and summary["channel_mean"] == 0.25


def test_point_maps_are_softmax_rows_over_the_token_grid(run):
  pairs = rel.draw_pairs(run.config, [0])
  tokens = jax.jit(rel._tokens_fn(run))(run.params, pairs["views"])[0]
  points = rel.query_points(pairs["rects"][0])
  assert points.shape == (2, 3, 2)
  maps = np.asarray(
    rel.point_relation_maps(tokens[0], points[0], num_heads=run.num_heads, hw=(7, 7))
  )
  assert maps.shape == (3, 7, 7)
  np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, rtol=1e-5)


def test_bad_inputs_name_the_fix(tmp_path, workdir):
  with pytest.raises(FileNotFoundError, match="config.json"):
    rel.load_run(str(tmp_path))
  with pytest.raises(ValueError, match="one name per workdir"):
    rel.run_all([workdir], str(tmp_path / "x.png"), names=["a", "b"])
  with pytest.raises(ValueError, match="--num_images"):
    rel.run_all([workdir], str(tmp_path / "x.png"), num_images=10**6)
