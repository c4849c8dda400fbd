"""FSDP (config.mesh.fsdp > 1): which tensors are split, and that the step is the data-parallel one.

The step test runs in a subprocess on 4 fake CPU devices (fsdp_step.py); the sharding rule is
checked on jax.eval_shape shapes with an AbstractMesh, so it needs neither devices nor compute.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from sslx.config_check import load_config_file
from sslx.train import sharding, trainer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _specs(config, fsdp: int) -> tuple[dict[str, tuple], sharding.StateMemory]:
  """{path: (shape, PartitionSpec)} of the whole train state of `config` under fsdp = `fsdp`."""
  built = trainer.build(config, sharding.make_mesh(config.mesh), 100, 100)  # shapes only
  mesh = AbstractMesh((1, fsdp), sharding.AXES)
  shardings = sharding.param_sharding(mesh, built.state_shape, config.sharding.fsdp_min_size)
  leaves = jax.tree_util.tree_flatten_with_path(built.state_shape)[0]
  specs = {
    "/".join(sharding._names(p)): (x.shape, s.spec)
    for (p, x), s in zip(
      leaves, jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    )
  }
  return specs, sharding.state_memory(built.state_shape, shardings, config.sharding.fsdp_min_size)


@pytest.mark.parametrize("scan_blocks", [False, True])
def test_vit_s16_block_weights_are_split_at_the_default_rule(scan_blocks):
  config = load_config_file(os.path.join(ROOT, "configs/dino.py"))  # ViT-S/16, fsdp_min_size 2**14
  with config.unlocked():
    config.model.scan_blocks = scan_blocks
  specs, memory = _specs(config, 8)
  block = "backbone/blocks/block" if scan_blocks else "backbone/block_0"
  layer = (None,) if scan_blocks else ()  # the stacked layer axis is never split
  want = {
    "attn/qkv/kernel": P(*layer, None, "fsdp"),
    "attn/proj/kernel": P(*layer, "fsdp", None),
    "fc1/kernel": P(*layer, None, "fsdp"),
    "fc2/kernel": P(*layer, "fsdp", None),
  }
  for name, spec in want.items():
    for field in ("params", "teacher_params"):
      assert specs[f"{field}/{block}/{name}"][1] == spec, (field, name)
    # Adam's moments are laid out like their parameter.
    moments = [
      v[1] for k, v in specs.items() if k.startswith("opt_state") and k.endswith(f"{block}/{name}")
    ]
    assert len(moments) == 2 and all(m == spec for m in moments), (name, moments)
  assert specs[f"params/{block}/norm1/scale"][1] == P()  # small: replicated
  # Everything big is split: per device ~1/8 of the state (the replicated biases and norms add
  # ~1%), and (nearly) no byte replicated.
  assert memory.indivisible == 0
  assert memory.replicated_bytes_fraction < 0.01
  for field in ("params", "teacher_params", "opt_state"):
    assert memory.per_device[field] < memory.full[field] / 8 * 1.02, field
  metrics = memory.metrics()
  assert metrics["memory/state_bytes_per_device"] == memory.per_device["total"]


def test_fsdp_spec_never_splits_the_stacked_layer_axis_and_leaves_indivisible_tensors_whole():
  assert sharding.fsdp_spec(["params", "blocks", "k"], (8, 4, 6), 8, 1) == P()  # only dim 0 fits
  assert sharding.fsdp_spec(["params", "block_0", "k"], (8, 4, 6), 8, 1) == P("fsdp", None, None)
  assert sharding.fsdp_spec(["params", "blocks", "k"], (8, 16, 6), 8, 1) == P(None, "fsdp", None)
  assert sharding.fsdp_spec(["p"], (6, 10), 4, 1) == P()  # no dimension divisible by 4
  assert sharding.fsdp_spec(["p"], (64, 64), 4, 2**14) == P()  # below the minimum size
  assert sharding.fsdp_spec(["p"], (64, 64), 1, 1) == P()  # fsdp 1: data-parallel


def test_fsdp_step_equals_the_data_parallel_step_on_4_devices():
  r = subprocess.run(
    [sys.executable, os.path.join(HERE, "fsdp_step.py"), "4"],
    capture_output=True,
    text=True,
    timeout=900,
    cwd=ROOT,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  dp, fsdp = (json.loads(line) for line in r.stdout.strip().splitlines()[-2:])
  assert (dp["mesh"], fsdp["mesh"]) == ({"data": 4, "fsdp": 1}, {"data": 1, "fsdp": 4})
  # Tolerance: float32 reductions are summed in a different order when the matrices are split
  # (as in test_multidevice.py); Adam moves a parameter whose gradient is at float-noise level by
  # up to ~lr (1.25e-4 at this batch of 8), so parameters get atol 1e-4.
  np.testing.assert_allclose(fsdp["losses"], dp["losses"], rtol=1e-5)
  np.testing.assert_allclose(fsdp["grad_norms"], dp["grad_norms"], rtol=1e-4)
  np.testing.assert_allclose(fsdp["params"], dp["params"], atol=1e-4)
  np.testing.assert_allclose(fsdp["center"], dp["center"], atol=1e-6)
  # Block 0's qkv kernel [32, 96] is split 4 ways on its output dimension in the student, the
  # teacher and both Adam moments; data-parallel keeps it whole.
  assert fsdp["qkv_shape"] == [32, 96]
  assert fsdp["qkv_shards"] == {
    "params": [[32, 24]],
    "teacher_params": [[32, 24]],
    "opt_state": [[32, 24], [32, 24]],
  }
  assert dp["qkv_shards"]["opt_state"] == [[32, 96], [32, 96]]
  assert fsdp["sharded"] > 0 and dp["sharded"] == 0
  for field in ("params", "teacher_params", "opt_state"):
    assert dp["per_device"][field] == dp["full"][field]
    assert fsdp["per_device"][field] < 0.5 * fsdp["full"][field], field


def test_run_logs_and_writes_the_per_device_state_bytes(tmp_path, caplog):
  # End to end through trainer.run, with gradient accumulation switched on from the config.
  config = load_config_file(os.path.join(ROOT, "configs/dino.py:smoke"))
  with config.unlocked():
    config.total_steps = config.log_every_steps = config.checkpoint.every_steps = 1
    config.optim.accum_steps = 2
    config.model.depth = 1
  with caplog.at_level("INFO"):
    assert trainer.run(config, str(tmp_path))["step"] == 1
  assert any("train state per device:" in r.getMessage() for r in caplog.records)
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f if "loss" in line]
  built = trainer.build(config, sharding.make_mesh(config.mesh), 100, 100)
  memory = sharding.state_memory(built.state_shape, built.state_sharding)
  # One device holds the whole state: params + teacher + Adam's two moments + centre, float32.
  n_params = sum(x.size for x in jax.tree.leaves(built.state_shape.params))
  assert rows[-1]["memory/params_bytes_per_device"] == 4 * n_params
  assert rows[-1]["memory/state_bytes_per_device"] == memory.per_device["total"] > 16 * n_params
