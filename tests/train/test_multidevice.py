"""The train step sharded over 8 fake CPU devices equals the 1-device step (subprocesses, since
the device count is fixed when jax starts)."""

import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _multidevice(n, batch=16, name="dino"):
  r = subprocess.run(
    [sys.executable, os.path.join(HERE, "multidevice_step.py"), str(n), str(batch), name],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=ROOT,
  )
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
