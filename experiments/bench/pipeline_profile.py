"""Where the host's time per image goes in the device-crops input pipeline (one thread, cProfile).

Runs the same per-record work as `sslx.data.pipeline.train_dataset` (source read, boxes, masks,
batching, SERE overlaps) in this thread, so the profile sees all of it (grain's reader threads
are invisible to cProfile), and prints ms of CPU per image and the top functions.

  python experiments/bench.py --config=configs/dino.py --what=pipeline --make_jpegs=/tmp/jpegs \
      --num_jpegs=128 --batches=1   # once, to write the benchmark JPEGs
  python experiments/bench/pipeline_profile.py --folder=/tmp/jpegs --canvas=672
"""

import cProfile
import os
import pstats
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from configs import dino  # noqa: E402  pylint: disable=g-import-not-at-top
from sslx.data import masks as masks_lib  # noqa: E402
from sslx.data import pipeline  # noqa: E402

flags.DEFINE_string("folder", "/tmp/jpegs", "Image folder (bench.py --make_jpegs writes one).")
flags.DEFINE_integer("canvas", 672, "config.data.canvas_size.")
flags.DEFINE_integer("batches", 8, "Batches of 32 profiled (after one untimed batch).")
flags.DEFINE_integer("top", 16, "Functions listed.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = dino.get_config(None)
  with config.unlocked():
    config.data.update(
      source="image_folder", path=FLAGS.folder, crops_on="device", canvas_size=FLAGS.canvas
    )
    config.data.local_crops.number = 10
    config.data.masks.scheme = "ibot"
  data = config.data
  source = pipeline.train_source(data)
  multi_crop = pipeline._MultiCrop(  # pylint: disable=protected-access
    pipeline._crop_spec(data.global_crops),
    pipeline._crop_spec(data.local_crops),  # pylint: disable=protected-access
    data.interpolation,
    (3 / 4, 4 / 3),
    masks_lib.MaskSpec.from_config(data.masks),
    16,
    FLAGS.canvas,
  )
  batch_fn = pipeline._Batch(FLAGS.canvas)  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  size = 32

  def run(batches):
    for b in range(batches):
      examples = [multi_crop(source[(b * size + i) % len(source)], rng) for i in range(size)]
      batch_fn(examples)

  run(1)
  profile = cProfile.Profile()
  start = time.process_time()
  profile.enable()
  run(FLAGS.batches)
  profile.disable()
  n = FLAGS.batches * size
  print(
    f"{(time.process_time() - start) / n * 1e3:.2f} ms of CPU per image (profiled), "
    f"canvas {FLAGS.canvas}, {n} images"
  )
  pstats.Stats(profile).sort_stats("tottime").print_stats(FLAGS.top)


if __name__ == "__main__":
  app.run(main)
