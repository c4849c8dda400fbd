"""Two train steps of the DINO smoke config on N fake CPU devices, data-parallel and FSDP.

`python fsdp_step.py N` in a fresh process (the device count is fixed when jax starts) runs the
same two batches with config.mesh {data: N, fsdp: 1} and {data: 1, fsdp: N}, with
config.sharding.fsdp_min_size lowered so that the tiny model's block matrices are split, and
prints one JSON line per mesh: losses, parameters, centre, the shard shapes of one block's qkv
kernel in params / teacher / Adam moments, and the per-device state bytes.
"""

import json
import os
import sys

n = int(sys.argv[1])
# LLVM's backend optimisations off: both meshes compile the same way, about twice as fast.
os.environ["XLA_FLAGS"] = (
  f"--xla_force_host_platform_device_count={n} --xla_backend_optimization_level=0"
)
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

MIN_SIZE = 2**10  # the smoke ViT's qkv kernel is 32 x 96 = 3072 elements
QKV = ("backbone", "block_0", "attn", "qkv", "kernel")


def qkv_shards(tree) -> list[list[int]]:
  """Shard shapes of every qkv kernel of block 0 in `tree` (one per state field holding it)."""
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if tuple(sharding._names(path)[-len(QKV) :]) == QKV:
      out.append([list(s.data.shape) for s in x.addressable_shards][0])
  return out


base = load_config_file(os.path.join(ROOT, "configs/dino.py:smoke"))
with base.unlocked():
  base.batch_size = 2 * n
  base.model.depth = 1
it = iter(
  pipeline.train_dataset(
    base.data, seed=0, batch_size=base.batch_size, patch_size=base.model.patch_size
  )
)
hosts = [next(it) for _ in range(2)]
del it  # closed now, not by the garbage collector at exit
for mesh_cfg in ({"data": n, "fsdp": 1}, {"data": 1, "fsdp": n}):
  config = base.copy_and_resolve_references()
  with config.unlocked():
    config.mesh.update(mesh_cfg)
    config.sharding.fsdp_min_size = MIN_SIZE
  mesh = sharding.make_mesh(config.mesh)
  built = trainer.build(config, mesh, steps_per_epoch=100, total_steps=100)
  state = built.init(config.seed)
  losses, grad_norms = [], []
  for host in hosts:
    batch = sharding.to_global(
      {k: host[k] for k in trainer.DEVICE_KEYS if k in host}, sharding.batch_sharding(mesh)
    )
    state, metrics = built.train_step(state, batch)
    losses.append(float(metrics["loss"]))
    grad_norms.append(float(metrics["l2_grads"]))
  memory = sharding.state_memory(built.state_shape, built.state_sharding, MIN_SIZE)
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(jax.device_get(state.params))]
  print(
    json.dumps(
      {
        "mesh": dict(mesh.shape),
        "losses": losses,
        "grad_norms": grad_norms,
        "params": np.concatenate([x.ravel() for x in leaves]).tolist(),
        "center": np.asarray(state.loss_state["center"]).tolist(),
        "qkv_shape": list(
          jax.tree.leaves(state.params["backbone"]["block_0"]["attn"]["qkv"]["kernel"])[0].shape
        ),
        "qkv_shards": {
          "params": qkv_shards(state.params),
          "teacher_params": qkv_shards(state.teacher_params),
          "opt_state": qkv_shards(state.opt_state),
        },
        "per_device": memory.per_device,
        "full": memory.full,
        "sharded": memory.sharded,
      }
    )
  )
