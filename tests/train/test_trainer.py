"""End-to-end trainer behaviour on the smoke config: resume, devices, divergence."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx.config_check import load_config_file
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
  with pytest.raises(trainer.TrainingDiverged, match=r"at step 3 .*steps \[3, 3\].*step 3\) is intact"):
    trainer.run(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  assert ckpt.all_steps() == [3]
  teacher = ckpt.restore_teacher(3)
  ckpt.close()
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(teacher))


def test_mesh_larger_than_devices_is_rejected_before_compiling():
  with pytest.raises(sharding.ShardingError, match="needs 2 devices but 1 are visible"):
    sharding.make_mesh({"data": 2, "fsdp": 1})


def _multidevice(n, batch=16, name="dino"):
  r = subprocess.run([sys.executable, os.path.join(HERE, "multidevice_step.py"), str(n), str(batch),
                      name],
                     capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_same_step_on_1_and_8_devices():
  one, eight = _multidevice(1), _multidevice(8)
  assert (one["devices"], eight["devices"]) == (1, 8)
  # Tolerance: float32 reductions are summed in a different order across shards.
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5)
  np.testing.assert_allclose(eight["params"], one["params"], atol=1e-4)
  np.testing.assert_allclose(eight["center"], one["center"], atol=1e-5)


def test_batch_not_divisible_by_devices_is_rejected():
  out = _multidevice(8, batch=12)
  assert "not divisible by the 8 devices" in out["error"]
  assert "multiple of 8" in out["error"]


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


def test_mocov3_step_is_the_same_on_1_and_8_devices():
  # The InfoNCE negatives are the keys of the global batch and BatchNorm uses global statistics,
  # so sharding the batch over 8 devices must not change the loss or the update.
  one, eight = _multidevice(1, name="mocov3"), _multidevice(8, name="mocov3")
  assert (one["devices"], eight["devices"]) == (1, 8)
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5)
  np.testing.assert_allclose(eight["grad_norms"], one["grad_norms"], rtol=1e-4)
  # Adam moves a parameter by about lr (2.5e-4 here) whatever its gradient's size, so entries
  # whose gradient is at float-noise level can differ by ~lr; a wrong loss would differ by far more.
  np.testing.assert_allclose(eight["params"], one["params"], atol=1e-3)


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
