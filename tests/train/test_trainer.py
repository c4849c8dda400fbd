"""End-to-end trainer behaviour on the smoke config: resume, divergence, kNN, presets, device crops
(1 vs 8 devices: test_multidevice.py)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sslx.config_check import load_config_file
from sslx.data import pipeline
from sslx.methods import METHODS, dino
from sslx.train import checkpoint, sharding, trainer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def smoke_config(**updates):
  config = load_config_file(os.path.join(ROOT, "configs/dino.py:smoke"))
  with config.unlocked():
    config.log_every_steps = 1
    config.total_steps = 6
    config.checkpoint.every_steps = 3
    for k, v in updates.items():
      setattr(config, k, v)
  return config


def losses_by_step(workdir):
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "loss" in row:
        out[row["step"]] = row["loss"]
  return out


def test_stop_then_resume_gives_the_uninterrupted_losses(tmp_path):
  config = smoke_config()
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  trainer.run(config, a)
  first = trainer.run(config, b, stop_after=3)
  assert first["step"] == 3
  second = trainer.run(config, b)  # resumes from the step-3 checkpoint (state + data iterator)
  assert second["step"] == 6
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(a))  # TensorBoard
  la, lb = losses_by_step(a), losses_by_step(b)
  assert sorted(la) == [1, 2, 3, 4, 5, 6]
  for step in (4, 5, 6):
    # Same batches, same RNG, same state: identical up to float reassociation.
    assert lb[step] == pytest.approx(la[step], rel=1e-6, abs=1e-7), step


class NanAfterStep3(dino.Dino):
  """DINO whose loss turns NaN from step 4 on (0-based step >= 3)."""

  def loss(self, params, teacher_params, loss_state, views, rng, sched):
    loss, aux = super().loss(params, teacher_params, loss_state, views, rng, sched)
    return loss + jnp.where(sched["step"] >= 3, jnp.nan, 0.0), aux


def test_nan_stops_with_the_step_window_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  monkeypatch.setitem(METHODS, "nan_dino", NanAfterStep3)
  config = smoke_config(method="nan_dino")
  workdir = str(tmp_path)
  # Steps are counted from 1 as in the log: the loss of the 4th step (0-based step 3) is NaN.
  with pytest.raises(
    trainer.TrainingDiverged,
    match=r"loss became nan at step 4;.*the last checkpoint, step 3, is finite",
  ):
    trainer.run(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  assert ckpt.all_steps() == [3]
  teacher = ckpt.restore_teacher(3)
  ckpt.close()
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(teacher))


def test_mesh_larger_than_devices_is_rejected_before_compiling():
  with pytest.raises(sharding.ShardingError, match="needs 2 devices but 1 are visible"):
    sharding.make_mesh({"data": 2, "fsdp": 1})


def test_unlabelled_evaluation_data_stops_the_run_before_it_compiles(tmp_path, monkeypatch):
  flat = tmp_path / "flat"
  flat.mkdir()
  for i in range(20):
    Image.fromarray(np.full((40, 36, 3), 10 * i, np.uint8)).save(flat / f"{i}.png")
  config = smoke_config()
  with config.unlocked():
    config.data.update(source="image_folder", path=str(flat), eval_test_split="train")
    config.eval.knn_every_steps = 2
  compiled = []
  monkeypatch.setattr(trainer, "build", lambda *a, **k: compiled.append(1))
  with pytest.raises(pipeline.DataError, match="has no labels.*knn_every_steps=0"):
    trainer.run(config, str(tmp_path / "w"))
  assert not compiled and not os.path.exists(tmp_path / "w" / "checkpoints")


def test_standalone_knn_on_a_workdir(tmp_path):
  config = smoke_config(total_steps=2)
  trainer.run(config, str(tmp_path))
  res = trainer.evaluate_workdir(config, str(tmp_path))
  assert res["step"] == 2
  assert res["num_train"] == 60000 and res["num_test"] == 10000
  assert 10.0 < res["top1"] <= 100.0  # ten classes: far above chance even untrained


def test_standalone_knn_without_checkpoint_says_how(tmp_path):
  with pytest.raises(FileNotFoundError, match="train first"):
    trainer.evaluate_workdir(smoke_config(), str(tmp_path))


@pytest.mark.parametrize("name", ["ibot", "sere_ibot", "mocov3", "sere_mocov3"])
def test_smoke_preset_trains(tmp_path, name):
  config = load_config_file(os.path.join(ROOT, f"configs/{name}.py:smoke"))
  with config.unlocked():
    config.total_steps = 2
    config.log_every_steps = 1
    config.checkpoint.every_steps = 2
  assert trainer.run(config, str(tmp_path))["step"] == 2
  losses = losses_by_step(str(tmp_path))
  assert sorted(losses) == [1, 2] and all(np.isfinite(v) for v in losses.values())


def test_crops_resampled_on_the_device_train_like_host_crops(tmp_path):
  """crops_on='device' (the ImageNet default) gives the host's losses up to PIL's rounding."""
  losses = {}
  for where in ("host", "device"):
    config = smoke_config(total_steps=2)
    with config.unlocked():
      config.data.crops_on = where
      config.data.canvas_size = 28
      config.checkpoint.every_steps = 2
    trainer.run(config, str(tmp_path / where))
    losses[where] = losses_by_step(str(tmp_path / where))
  assert sorted(losses["device"]) == [1, 2]
  for step in (1, 2):
    assert losses["device"][step] == pytest.approx(losses["host"][step], rel=1e-3), step


def test_evaluation_forwards_are_compiled_with_the_eval_options(monkeypatch):
  """The kNN feature function and the probes' token function both ask knn.eval_compiler_options
  (on CPUs: no YNNPACK fusions, experiments/bench/RESULTS.md) for their jit."""
  from sslx.eval import knn
  from sslx.methods import make_method
  from sslx.train import probe_workdir

  calls = []

  def options():
    calls.append(True)
    return None

  monkeypatch.setattr(knn, "eval_compiler_options", options)
  config = load_config_file(os.path.join(ROOT, "configs/dino.py:smoke"))
  trainer.make_feature_fn(make_method(config), sharding.make_mesh(config.mesh), config)
  probe_workdir._on_uint8(lambda params, images: images, None, config)  # pylint: disable=protected-access
  assert len(calls) == 2


def _labelled_folder(root, per_class=12):
  """<root>/{train,test}/{dark,light}/*.png: two separable classes of 32-px images."""
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for label, base in (("dark", 40), ("light", 200)):
      os.makedirs(root / split / label)
      for i in range(per_class):
        pixels = np.clip(base + rng.integers(-30, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / split / label / f"{i}.png")


def test_knn_at_start_and_end_report_and_change_no_loss(tmp_path):
  """The demo's path: kNN at init and at the end on a labelled image folder; the run reports
  both results and trains exactly as a run without evaluations does."""
  _labelled_folder(tmp_path / "data")
  runs = {}
  for name, knn_steps in (("plain", 0), ("knn", 10**9)):
    config = smoke_config(total_steps=3)
    with config.unlocked():
      config.data.update(source="image_folder", path=str(tmp_path / "data"), eval_resize=28)
      config.eval.update(
        knn_every_steps=knn_steps, knn_at_start=bool(knn_steps), batch_size=8, knn_k=5
      )
    runs[name] = (trainer.run(config, str(tmp_path / name)), losses_by_step(str(tmp_path / name)))
  results, losses = runs["knn"]
  assert results["knn_init"]["num_test"] == 24 and results["knn"]["num_test"] == 24
  assert 0.0 <= results["knn_init"]["top1"] <= 100.0
  assert sorted(losses) == [1, 2, 3]
  for step in (1, 2, 3):
    assert losses[step] == pytest.approx(runs["plain"][1][step], rel=1e-6, abs=1e-7), step
