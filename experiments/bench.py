r"""Throughput benchmark: the train step (img/s, step time, MFU, memory) and the input pipeline.

  # Train step of a config on whatever devices are visible (synthetic uint8 crops, or with
  # data.crops_on='device' synthetic canvases whose crops the step resamples; compile and the
  # first step are excluded):
  python experiments/bench.py --config=configs/dino.py --steps=20 \
      --config.batch_size=128 --config.data.local_crops.number=10
  # Input pipeline (host only, real decoding + multi-crop or canvases): images/s, per core,
  # and per CPU-second of this process and its worker processes:
  python experiments/bench.py --config=configs/dino.py:fashion_mnist --what=pipeline

Results are recorded in experiments/bench/RESULTS.md with the machine named.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", "configs/dino.py", "Config to benchmark.", lock_config=True
)
flags.DEFINE_enum("what", "step", ["step", "pipeline", "both"], "What to measure.")
flags.DEFINE_integer("steps", 10, "Timed train steps.")
flags.DEFINE_integer("batches", 20, "Timed pipeline batches.")
flags.DEFINE_integer("workers", -1, "Pipeline worker processes (-1: config.data.workers).")
flags.DEFINE_string(
  "make_jpegs",
  "",
  "If set, first write ImageNet-sized JPEGs (scikit-image "
  "sample photos, random 500x375-ish crops) into this folder and read from it.",
)
flags.DEFINE_integer("num_jpegs", 256, "How many JPEGs --make_jpegs writes.")
flags.DEFINE_bool(
  "compile_only",
  False,
  "Step: report compile time, FLOPs and XLA's memory "
  "figures without running (e.g. to compare model variants on a CPU).",
)
flags.DEFINE_string(
  "profile_dir",
  "",
  "If set, trace 3 more train steps with jax.profiler into this "
  "folder (with a Perfetto JSON that experiments/bench/trace_summary.py reads).",
)


def synthetic_batch(config, per_process_batch: int):
  import numpy as np

  rng = np.random.default_rng(0)
  g, l = config.data.global_crops, config.data.local_crops
  b = per_process_batch
  from sslx.data import overlap, pipeline

  batch = {
    "global_crops": rng.integers(0, 256, (b, g.number, g.size, g.size, 3), dtype=np.uint8),
    "local_crops": rng.integers(0, 256, (b, l.number, l.size, l.size, 3), dtype=np.uint8),
    "global_boxes": np.tile(np.float32([0, 0, 256, 256]), (b, g.number, 1)),
    "global_flips": np.zeros((b, g.number), bool),
    "local_boxes": np.tile(np.float32([64, 64, 96, 96]), (b, l.number, 1)),
    "local_flips": np.zeros((b, l.number), bool),
    "image_size": np.full((b, 2), 256, np.int32),
  }
  batch.update(
    overlap.batch_overlaps(
      batch["global_boxes"], batch["global_flips"], batch["local_boxes"], batch["local_flips"]
    )
  )
  c = pipeline.canvas_size_of(config.data)
  if c:  # crops_on='device': the step resamples the crops from a canvas (a 375 x 500 photo)
    del batch["global_crops"], batch["local_crops"]
    batch["canvas"] = rng.integers(0, 256, (b, c, c, 3), dtype=np.uint8)
    batch["canvas_extent"] = np.tile(np.int32([min(c, 375), min(c, 500)]), (b, 1))
    batch["canvas_scale"] = np.ones((b, 2), np.float32)
  return batch


def _xla_memory(compiled, images_per_device: float) -> dict:
  """XLA's own figures for the compiled step, per device: the temporary buffers it assigned and
  the bytes its cost model says the step reads and writes (a proxy for memory traffic)."""
  out = {}
  try:
    out["xla_temp_gib"] = round(compiled.memory_analysis().temp_size_in_bytes / 2**30, 2)
  except Exception:  # pylint: disable=broad-except  # not every backend reports it
    pass
  try:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    out["xla_mb_accessed_per_image"] = round(
      float(analysis["bytes accessed"]) / images_per_device / 2**20, 1
    )
  except Exception:  # pylint: disable=broad-except
    pass
  return out


def bench_step(config) -> dict:
  import jax

  from sslx.data import device_crops, pipeline
  from sslx.train import metrics, sharding, trainer

  mesh = sharding.make_mesh(config.mesh)
  per_process = sharding.check_batch(config.batch_size, mesh)
  built = trainer.build(config, mesh, steps_per_epoch=1000, total_steps=100_000)
  state = built.init(config.seed)
  batch = sharding.to_global(synthetic_batch(config, per_process), sharding.batch_sharding(mesh))
  t0 = time.time()
  compiled = built.train_step.lower(state, batch).compile()
  compile_s = time.time() - t0
  # Model FLOPs (matrix products in the jaxpr, fused attention counted as explicit attention):
  # XLA's GPU estimate leaves out what cuBLAS runs. One device's share.
  flops = trainer.model_flops_per_device(config, mesh, 1000, 100_000, state, batch)
  xla_flops = metrics.step_flops(compiled)
  memory = _xla_memory(compiled, config.batch_size / mesh.devices.size)
  if FLAGS.compile_only:
    return {
      "compile_s": round(compile_s, 1),
      "batch": config.batch_size,
      "gflop_per_image": round(flops * mesh.devices.size / config.batch_size / 1e9, 1)
      if flops
      else None,
      **memory,
    }
  state, m = compiled(state, batch)  # the first step is slower; not timed
  jax.block_until_ready(m)
  t0 = time.time()
  for _ in range(FLAGS.steps):
    state, m = compiled(state, batch)
  jax.block_until_ready((state, m))
  step_s = (time.time() - t0) / FLAGS.steps
  if FLAGS.profile_dir:
    try:
      with jax.profiler.trace(FLAGS.profile_dir, create_perfetto_trace=True):
        for _ in range(3):
          state, m = compiled(state, batch)
        jax.block_until_ready((state, m))
    except Exception as e:  # pylint: disable=broad-except  # the timing above still stands
      print(f"profiling failed: {e!r}", flush=True)
  dev = jax.devices()[0]
  peak = metrics.peak_flops_per_device(dev)
  out = {
    "device": f"{mesh.devices.size} x {dev.device_kind}",
    "batch": config.batch_size,
    "compile_s": round(compile_s, 1),
    "step_s": round(step_s, 4),
    "img_per_s": round(config.batch_size / step_s, 1),
    "gflop_per_image": round(flops * mesh.devices.size / config.batch_size / 1e9, 1)
    if flops
    else None,
    "xla_gflop_per_image": (
      round(xla_flops * mesh.devices.size / config.batch_size / 1e9, 1) if xla_flops else None
    ),
    "mfu": round(flops / step_s / peak, 4) if (flops and peak) else None,
    # The last step's loss on the fixed synthetic batch: variants of one config (attention
    # kernel, crop path) should agree to bfloat16 noise.
    "loss": round(float(m["loss"]), 4) if "loss" in m else None,
    **memory,
  }
  canvas = pipeline.canvas_size_of(config.data)
  if canvas:  # the share of the step's FLOPs that resamples the crops (device_crops.py)
    g, l = config.data.global_crops, config.data.local_crops
    out["crop_gflop_per_image"] = round(
      device_crops.flops_per_image(canvas, [(g.number, g.size), (l.number, l.size)]) / 1e9, 2
    )
  stats = getattr(dev, "memory_stats", lambda: None)()
  if stats and "peak_bytes_in_use" in stats:
    out["peak_mem_gib"] = round(stats["peak_bytes_in_use"] / 2**30, 2)
  return out


def make_jpegs(folder: str, n: int) -> None:
  """ImageNet-like files (JPEG q90, ~500x375, like the ILSVRC train median) from skimage photos."""
  import numpy as np
  from PIL import Image
  from skimage import data as skdata

  photos = [
    skdata.astronaut(),
    skdata.chelsea(),
    skdata.coffee(),
    skdata.rocket(),
    skdata.immunohistochemistry(),
    skdata.hubble_deep_field(),
  ]
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(folder, "photos"), exist_ok=True)
  for i in range(n):
    img = Image.fromarray(photos[i % len(photos)])
    w, h = (500, 375) if i % 3 else (375, 500)
    img = img.resize((int(w * rng.uniform(1.0, 1.3)), int(h * rng.uniform(1.0, 1.3))))
    img.save(os.path.join(folder, "photos", f"{i:05d}.jpg"), quality=90)


def bench_pipeline(config) -> dict:
  from sslx.data import pipeline

  workers = config.data.workers if FLAGS.workers < 0 else FLAGS.workers
  with config.unlocked():
    config.data.workers = workers
  per_process = config.batch_size
  it = iter(
    pipeline.train_dataset(
      config.data, seed=0, batch_size=per_process, patch_size=config.model.patch_size
    )
  )
  # Start-up (file listing, and each worker process's spawn and imports) is excluded: with
  # workers, batches come round-robin from them, so wait until each has delivered two.
  for _ in range(1 + 2 * workers):
    next(it)
  t0, cpu0 = time.time(), _cpu_seconds()
  for _ in range(FLAGS.batches):
    next(it)
  dt, cpu1 = time.time() - t0, _cpu_seconds()
  close = getattr(it, "close", None)
  if close:
    close()
  n = FLAGS.batches * per_process
  cores = os.cpu_count() or 1  # threads and workers share all of this machine's cores
  out = {
    "workers": workers,
    "crops_on": config.data.get("crops_on", "host"),
    "img_per_s": round(n / dt, 1),
    "img_per_s_per_core": round(n / dt / cores, 1),
    "crops_per_image": config.data.global_crops.number + config.data.local_crops.number,
  }
  if cpu0 is not None and cpu1 is not None:
    # Images per CPU-second of this process (all its threads) and its worker processes: the
    # per-core rate even when other jobs share the machine.
    out["img_per_cpu_s"] = round(n / (cpu1 - cpu0), 1)
  return out


def _cpu_seconds() -> float | None:
  """CPU seconds used so far by this process and its live children (grain's worker processes);
  None where /proc cannot be read (not Linux)."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench"))
  from worker_cost import children_stats  # pylint: disable=g-import-not-at-top

  try:
    children = children_stats()
  except OSError:
    return None
  return time.process_time() + sum(user + system for user, system, _ in children.values())


def main(argv):
  del argv
  config = FLAGS.config
  if FLAGS.make_jpegs:
    make_jpegs(FLAGS.make_jpegs, FLAGS.num_jpegs)
    with config.unlocked():
      config.data.source, config.data.path = "image_folder", FLAGS.make_jpegs
  if FLAGS.what in ("step", "both"):
    print("train step:", bench_step(config), flush=True)
  if FLAGS.what in ("pipeline", "both"):
    print("input pipeline:", bench_pipeline(config), flush=True)


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main)
