r"""How much sharpness the device-crop canvas costs images larger than it.

With `config.data.crops_on='device'` the host shrinks an image larger than `canvas_size` to fit
(`crops.fit_image`), and the crops are then resampled from that canvas: two resamplings where the
official pipelines (torchvision RandomResizedCrop on the decoded image) do one. This script cuts
the same RandomResizedCrop boxes both ways with PIL (the device resampler matches PIL to one grey
level, tests/data/test_device_crops.py) from scikit-image's sample photos that exceed the canvas,
and prints, per crop scale and output size, the ratio of high-frequency energy (mean squared
Laplacian) of the canvas crop to the direct crop, and their mean absolute difference.

  python experiments/bench/canvas_sharpness.py [--canvas=512,768,1024] [--boxes=30]

Results: experiments/bench/RESULTS.md ("Device canvas and sharpness").
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image
from skimage import data as skdata

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from sslx.data import crops  # noqa: E402  pylint: disable=wrong-import-position

PHOTOS = ("coffee", "rocket", "hubble_deep_field", "retina")  # all larger than 512 on a side
SCALES = ((0.08, 0.12), (0.2, 0.25), (0.4, 0.5), (0.9, 1.0))


def high_frequency(image: np.ndarray) -> float:
  """Mean squared 4-neighbour Laplacian of the grey image."""
  g = image.astype(np.float64).mean(-1)
  lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
  return float((lap**2).mean())


def compare(
  photo: Image.Image,
  canvas: int,
  scale: tuple[float, float],
  size: int,
  boxes: int,
  rng: np.random.Generator,
) -> tuple[float, float]:
  """(mean HF ratio canvas/direct, mean |difference| in grey levels) over ``boxes`` crops."""
  width, height = photo.size
  fitted, (sy, sx) = crops.fit_image(photo, canvas, "bicubic")
  fitted = Image.fromarray(fitted)
  ratios, diffs = [], []
  for _ in range(boxes):
    x0, y0, w, h = crops.random_resized_crop_box(rng, height, width, scale)
    direct = crops.resize_box(photo, (x0, y0, w, h), size, "bicubic")
    via_canvas = crops.resize_box(fitted, (x0 * sx, y0 * sy, w * sx, h * sy), size, "bicubic")
    ratios.append(high_frequency(via_canvas) / max(high_frequency(direct), 1e-12))
    diffs.append(np.abs(via_canvas.astype(np.float64) - direct).mean())
  return float(np.mean(ratios)), float(np.mean(diffs))


def main() -> None:
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--canvas", default="512,768,1024")
  ap.add_argument("--boxes", type=int, default=30)
  args = ap.parse_args()
  canvases = [int(c) for c in args.canvas.split(",")]
  photos = {}
  for name in PHOTOS:
    arr = getattr(skdata, name)()
    arr = np.stack([arr] * 3, -1) if arr.ndim == 2 else arr[..., :3]
    photos[name] = Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8)))
  print("photos (h x w):", ", ".join(f"{n} {p.size[1]}x{p.size[0]}" for n, p in photos.items()))
  print(
    "| canvas | crop scale | out px | HF energy kept (mean over photos) | mean abs diff (grey levels) |"
  )
  print("|---|---|---|---|---|")
  for canvas in canvases:
    for scale in SCALES:
      for size in (224, 96):
        rng = np.random.default_rng(0)
        res = [compare(p, canvas, scale, size, args.boxes, rng) for p in photos.values()]
        kept = np.mean([r[0] for r in res])
        diff = np.mean([r[1] for r in res])
        print(f"| {canvas} | {scale[0]}-{scale[1]} | {size} | {kept:.2f} | {diff:.2f} |")


if __name__ == "__main__":
  main()
