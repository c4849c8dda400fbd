"""Runs two train steps of a smoke config on N fake CPU devices; prints JSON.

Used by test_trainer.py: `python multidevice_step.py N [batch [config name]]` in a fresh process, because
the device count is fixed when jax starts.
"""

import json
import os
import sys

n = int(sys.argv[1])
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

from sslx.config_check import load_config_file  # noqa: E402
from sslx.data import pipeline  # noqa: E402
from sslx.train import sharding, trainer  # noqa: E402

name = sys.argv[3] if len(sys.argv) > 3 else "dino"
config = load_config_file(os.path.join(ROOT, f"configs/{name}.py:smoke"))
with config.unlocked():
  config.batch_size = int(sys.argv[2]) if len(sys.argv) > 2 else 16
mesh = sharding.make_mesh(config.mesh)
try:
  per_process = sharding.check_batch(config.batch_size, mesh)
except sharding.ShardingError as e:
  print(json.dumps({"error": str(e)}))
  sys.exit(0)
built = trainer.build(config, mesh, steps_per_epoch=100, total_steps=100)
state = built.init(config.seed)
it = iter(
  pipeline.train_dataset(
    config.data, seed=0, batch_size=per_process, patch_size=config.model.patch_size
  )
)
losses, grad_norms = [], []
for _ in range(2):
  host = next(it)
  batch = sharding.to_global(
    {k: host[k] for k in trainer.DEVICE_KEYS if k in host}, sharding.batch_sharding(mesh)
  )
  state, metrics = built.train_step(state, batch)
  losses.append(float(metrics["loss"]))
  grad_norms.append(float(metrics["l2_grads"]))
leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(jax.device_get(state.params))]
print(
  json.dumps(
    {
      "devices": len(jax.devices()),
      "losses": losses,
      "grad_norms": grad_norms,
      "params": np.concatenate([x.ravel() for x in leaves]).tolist(),
      "center": np.asarray(state.loss_state.get("center", np.zeros(1))).tolist(),
    }
  )
)
