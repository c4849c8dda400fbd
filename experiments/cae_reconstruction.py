r"""CAE paper Fig. 4 check: what the decoder makes of encoder representations.

For test images, writes one row per image:
  original | masked input (masked patches grey) | CAE prediction of the masked patches from
  the visible ones (encoder -> regressor -> decoder) | all patches -> encoder -> decoder, with
  no regressor (the paper's Fig. 4 protocol) | patch means only (what a zero prediction shows,
  the baseline the third and fourth columns must beat)
Pixel targets are per-patch normalised, so predicted patches are shown with the original patch's
mean and standard deviation put back (as MAE's pictures do); the numbers printed (and written
to <out>.json) are the MSE in that normalised space, where predicting the patch mean scores 1.0.

  python experiments/cae_reconstruction.py --config=configs/cae.py:fashion_mnist \
      --workdir=/tmp/cae_fmnist --out=experiments/fashion_mnist/cae_reconstruction.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--config", required=True, help="configs/cae.py[:preset]")
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--out", required=True, help="PNG path")
  ap.add_argument("--num", type=int, default=8, help="images (rows)")
  ap.add_argument("--scale", type=int, default=4, help="pixel upscaling for viewing")
  ap.add_argument("--random_init", action="store_true", help="use untrained weights")
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  from PIL import Image

  from sslx.config_check import load_config_file
  from sslx.data import masks, pipeline
  from sslx.losses import cae as cae_losses
  from sslx.methods import make_method
  from sslx.models import cae as cae_model
  from sslx.train.probe_workdir import teacher_of

  config = load_config_file(args.config)
  if config.method != "cae" or config.cae.target != "pixels":
    sys.exit("error: the picture needs a CAE run with config.cae.target='pixels'")
  method = make_method(config)
  step, params = teacher_of(config, args.workdir, method, args.random_init)
  batch = next(
    iter(pipeline.eval_dataset(config.data, config.data.eval_test_split, batch_size=args.num))
  )
  raw = np.asarray(batch["image"], np.float32) / 255.0
  mean, std = np.asarray(config.augment.mean), np.asarray(config.augment.std)
  x = jnp.asarray((raw - mean) / std, jnp.float32)
  p, (gh, gw) = config.model.patch_size, method.grid
  spec = masks.MaskSpec.from_config(config.data.masks)
  rng = np.random.default_rng(0)
  mask = np.stack([spec.draw(rng, (gh, gw)).reshape(-1) for _ in range(args.num)])
  vis, msk = cae_model.split_by_mask(jnp.asarray(mask), method.num_masked)
  net = method.network()

  @jax.jit
  def run(params, x, vis, msk):
    pred_masked = net.apply({"params": params}, x, vis, msk, train=False)["pred"]
    pred_all = net.apply({"params": params}, x, method=cae_model.CAE.reconstruct_all)
    return pred_masked, pred_all

  pred_masked, pred_all = (np.asarray(a) for a in run(params, x, vis, msk))
  patches = np.asarray(cae_losses.patchify(x, p))
  mu, sd = patches.mean(-1, keepdims=True), np.sqrt(patches.var(-1, keepdims=True) + 1e-6)
  target = (patches - mu) / sd
  msk_np = np.asarray(msk)
  take = lambda a: np.take_along_axis(a, msk_np[..., None], axis=1)  # noqa: E731
  mse_all = float(np.mean((pred_all - target) ** 2))
  mse_masked = float(np.mean((pred_masked - take(target)) ** 2))

  def to_image(patch_values):
    img = np.asarray(cae_losses.unpatchify(jnp.asarray(patch_values), (gh, gw), p, 3))
    return np.clip(img * std + mean, 0.0, 1.0)

  masked_in = np.where(mask[..., None], ((0.5 - mean) / std).mean(), patches)
  filled = patches.copy()
  np.put_along_axis(filled, msk_np[..., None], take(mu) + pred_masked * take(sd), axis=1)
  means_only = np.broadcast_to(mu, patches.shape)  # what a zero prediction would show
  columns = [
    raw,
    to_image(masked_in),
    to_image(filled),
    to_image(mu + pred_all * sd),
    to_image(means_only),
  ]
  pad = np.ones((args.num, raw.shape[1], 2, 3))
  grid = np.concatenate([np.concatenate([c, pad], axis=2) for c in columns], axis=2)
  grid = grid.reshape(-1, grid.shape[2], 3)
  img = Image.fromarray((grid * 255).round().astype(np.uint8))
  img = img.resize((img.width * args.scale, img.height * args.scale), Image.NEAREST)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  img.save(args.out)
  result = {
    "step": step,
    "random_init": args.random_init,
    "images": args.num,
    "mse_all_patches_normalised": mse_all,
    "mse_masked_from_visible_normalised": mse_masked,
    "columns": "original | masked input | prediction from visible | all patches, no "
    "regressor | patch means only (zero prediction)",
  }
  with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()
