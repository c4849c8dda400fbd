r"""Per-device train-state bytes (parameters, teacher, optimiser) under data parallelism and FSDP.

Shapes only: `jax.eval_shape` of the initial state, the trainer's shardings
(sslx/train/sharding.py, config.sharding.fsdp_min_size) and their shard shapes; nothing is
compiled or run, so this answers on a laptop what a ViT-B/16 run holds per GPU. Fake CPU
devices stand in for the accelerators.

  python experiments/bench/fsdp_memory.py                     # DINO ViT-S/16 and ViT-B/16
  python experiments/bench/fsdp_memory.py --configs=configs/ibot.py,configs/dino.py:vit_base

Prints a markdown table (MiB per device; 'params' = the student's, 'teacher' = the EMA copy,
'opt' = AdamW's two moments).
"""

import os
import sys

DEVICES = 8
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

flags.DEFINE_list(
  "configs", ["configs/dino.py", "configs/dino.py:vit_base"], "config[:preset] files to measure."
)
flags.DEFINE_list("layouts", ["1x1", "8x1", "8x8"], "devices x fsdp pairs.")
FLAGS = flags.FLAGS


def main(_):
  import jax

  from sslx.config_check import load_config_file
  from sslx.train import sharding, trainer

  mib = lambda b: f"{b / 2**20:,.1f}"  # noqa: E731
  print(
    "| config | devices | fsdp | params | teacher | opt | total state | of unsharded | "
    "replicated bytes |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for spec in FLAGS.configs:
    for layout in FLAGS.layouts:
      n, fsdp = (int(v) for v in layout.split("x"))
      config = load_config_file(os.path.join(ROOT, spec))
      with config.unlocked():
        config.mesh.update(data=n // fsdp, fsdp=fsdp)
      mesh = sharding.make_mesh(config.mesh, jax.devices()[:n])
      # build() traces the method and the optimiser with jax.eval_shape; its jit is never called.
      built = trainer.build(config, mesh, steps_per_epoch=1000, total_steps=100_000)
      m = sharding.state_memory(
        built.state_shape, built.state_sharding, config.sharding.fsdp_min_size
      )
      pd = m.per_device
      print(
        f"| {spec.replace('configs/', '')} | {n} | {fsdp} | {mib(pd['params'])} | "
        f"{mib(pd['teacher_params'])} | {mib(pd['opt_state'])} | {mib(pd['total'])} | "
        f"{mib(m.full['total'])} | {100 * m.replicated_bytes_fraction:.2f}% |"
      )


if __name__ == "__main__":
  app.run(main)
