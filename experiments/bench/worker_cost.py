r"""CPU time and page faults of the host pipeline, per process, threads vs worker processes.

  python experiments/bench/worker_cost.py --folder=/tmp/jpegs --workers=0   # 4 threads, one process
  python experiments/bench/worker_cost.py --folder=/tmp/jpegs --workers=1

Device-crop batches (2x224 + 10x96 crops, iBOT masks, overlaps) from an image folder (e.g. the JPEGs
`experiments/bench.py --make_jpegs` writes). After 5 warm-up batches it times --batches batches and
prints, for the main process and each grain worker process, user and system CPU seconds and minor
page faults (Linux /proc), so the cost of handing batches over through shared memory shows up as
the workers' extra system time and faults.
"""

import argparse
import multiprocessing
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))


def children_stats() -> dict[int, tuple[float, float, int]]:
  """{pid: (user CPU s, system CPU s, minor page faults)} of this process's live children (grain's
  worker processes), from Linux's /proc; OSError where /proc cannot be read."""
  tick = os.sysconf("SC_CLK_TCK")
  out = {}
  for child in multiprocessing.active_children():
    with open(f"/proc/{child.pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    # After the ')' of the command name: minflt is stat field 10, utime 14, stime 15.
    out[child.pid] = (int(fields[11]) / tick, int(fields[12]) / tick, int(fields[7]))
  return out


def _self() -> tuple:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime, usage.ru_stime, usage.ru_minflt


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--folder", required=True)
  parser.add_argument("--workers", type=int, default=0)
  parser.add_argument("--threads", type=int, default=4, help="read threads per process")
  parser.add_argument("--canvas", type=int, default=672)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--batches", type=int, default=24)
  args = parser.parse_args()
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.FLAGS(["worker_cost"])  # grain reads absl flags in its worker processes
  from configs import dino  # pylint: disable=g-import-not-at-top
  from sslx.data import pipeline  # pylint: disable=g-import-not-at-top

  data = dino.get_config("").data
  data.source, data.path, data.crops_on, data.canvas_size = (
    "image_folder",
    args.folder,
    "device",
    args.canvas,
  )
  data.local_crops.number, data.masks.scheme = 10, "ibot"
  data.workers, data.read_threads = args.workers, args.threads
  it = iter(pipeline.train_dataset(data, seed=0, batch_size=args.batch, patch_size=16))
  for _ in range(5):
    next(it)
  main0, kids0, t0 = _self(), children_stats(), time.time()
  for _ in range(args.batches):
    next(it)
  main1, kids1, wall = _self(), children_stats(), time.time() - t0
  images = args.batches * args.batch
  rows = [("main", main1[0] - main0[0], main1[1] - main0[1], main1[2] - main0[2])]
  rows += [
    (f"worker {pid}", *(b - a for a, b in zip(kids0[pid], kids1[pid])))
    for pid in kids1
    if pid in kids0
  ]
  total = sum(r[1] + r[2] for r in rows)
  print(
    f"{images} images in {wall:.2f} s: {images / wall:.1f} img/s, {images / total:.1f} img/CPU-s "
    f"(workers={args.workers}, threads={args.threads}, canvas={args.canvas})"
  )
  for name, user, system, faults in rows:
    print(
      f"  {name:>14}: user {user:.2f} s, system {system:.2f} s, minor faults {faults:,} "
      f"({faults / images:.0f} per image)"
    )
  close = getattr(it, "close", None)
  if close:
    close()


if __name__ == "__main__":
  main()
