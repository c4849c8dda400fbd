r"""SaGe's perceptual test on Fashion-MNIST: does a supervised classifier recognise the
reconstructions?

  1. Trains a supervised classifier (the encoder architecture of the config, ResNet-18
     width 8 at 32 px, + a linear layer) on Fashion-MNIST labels with Adam, for
     --classifier_steps steps of --batch images (plain resized images, random flips);
     it is cached in --classifier_path so later calls reuse it.
  2. Takes the first --num_test test images as views (resized to 32 px, normalised with
     mean = std = 0.5), runs SaGe's online encoder and decoder from the latest checkpoint of
     --workdir (BatchNorm in eval mode, running statistics) and classifies the real views
     and their reconstructions: top-1 / top-5 of each, plus the pixel MSE.
  3. Writes a PNG grid: rows of real views and their reconstructions.

  python experiments/sage_perceptual.py --config=configs/sage.py:fashion_mnist \
      --workdir=/tmp/sage_fmnist --png=experiments/fashion_mnist/sage_reconstructions.png

Prints one JSON line with the numbers (paper §4.4, Table 7, did this with an ImageNet
ResNet-50 classifier on ImageNet views).
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

flags.DEFINE_string("config", "configs/sage.py:fashion_mnist", "SaGe config file[:preset].")
flags.DEFINE_string("workdir", "/tmp/sage_fmnist", "SaGe workdir with a checkpoint.")
flags.DEFINE_string("classifier_path", "/tmp/fmnist_supervised_r18w8.pkl", "Classifier cache.")
flags.DEFINE_integer("classifier_steps", 300, "Supervised training steps.")
flags.DEFINE_integer("batch", 128, "Supervised batch size.")
flags.DEFINE_integer("num_test", 2000, "Test images to reconstruct and classify.")
flags.DEFINE_string("png", "experiments/fashion_mnist/sage_reconstructions.png", "Grid output.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import linen as nn
  from PIL import Image

  from sslx.config_check import load_config_file
  from sslx.data import crops, sources
  from sslx.methods import make_method
  from sslx.methods.byol import build_resnet
  from sslx.train import checkpoint as ckpt_lib

  config = load_config_file(
    os.path.join(ROOT, FLAGS.config)
    if not os.path.isabs(FLAGS.config.split(":")[0])
    else FLAGS.config
  )
  size = config.data.global_crops.size

  def prepare(images):  # uint8 [N, 28, 28] -> float [N, S, S, 3] in [-1, 1]
    out = np.stack(
      [crops.resize_center_crop(np.repeat(im[..., None], 3, -1), size, size) for im in images]
    )
    return out.astype(np.float32) / 127.5 - 1.0

  class Classifier(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
      return nn.Dense(10)(build_resnet(config.model)(x, train=train)["pooled"])

  model = Classifier()
  train_x, train_y = sources.load_fashion_mnist(config.data.path, "train")
  test_x, test_y = sources.load_fashion_mnist(config.data.path, "test")
  test_views = prepare(test_x[: FLAGS.num_test])
  test_labels = test_y[: FLAGS.num_test]

  # ---- 1. supervised classifier ---------------------------------------------------------
  if os.path.exists(FLAGS.classifier_path):
    with open(FLAGS.classifier_path, "rb") as f:
      variables = pickle.load(f)
  else:
    t0 = time.time()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, size, size, 3)), train=False)
    tx = optax.adam(optax.cosine_decay_schedule(2e-3, FLAGS.classifier_steps))
    opt_state = tx.init(variables["params"])

    @jax.jit
    def step(variables, opt_state, x, y):
      def loss_fn(params):
        logits, upd = model.apply(
          {"params": params, "batch_stats": variables["batch_stats"]},
          x,
          train=True,
          mutable=["batch_stats"],
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

      (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
      updates, opt_state = tx.update(grads, opt_state)
      return (
        {
          "params": optax.apply_updates(variables["params"], updates),
          "batch_stats": upd["batch_stats"],
        },
        opt_state,
        loss,
      )

    rng = np.random.default_rng(0)
    all_train = prepare(train_x)
    for i in range(FLAGS.classifier_steps):
      idx = rng.integers(0, len(all_train), FLAGS.batch)
      x = all_train[idx]
      flip = rng.random(FLAGS.batch) < 0.5
      x[flip] = x[flip, :, ::-1]
      variables, opt_state, loss = step(variables, opt_state, x, train_y[idx])
      if i % 50 == 0:
        print(f"classifier step {i} loss {float(loss):.3f}", flush=True)
    variables = jax.device_get(variables)
    with open(FLAGS.classifier_path, "wb") as f:
      pickle.dump(variables, f)
    print(f"classifier trained in {time.time() - t0:.0f} s", flush=True)

  classify = jax.jit(lambda x: model.apply(variables, x, train=False))

  def topk(x, labels):
    logits = np.concatenate([np.asarray(classify(x[i : i + 500])) for i in range(0, len(x), 500)])
    order = np.argsort(-logits, axis=-1)
    return (
      100 * float(np.mean(order[:, 0] == labels)),
      100 * float(np.mean(np.any(order[:, :5] == labels[:, None], axis=-1))),
    )

  # ---- 2. reconstructions -----------------------------------------------------------------
  with config.unlocked():
    config.sage.ablation = "mse_only"  # reconstruction needs no evaluator checkpoint
  method = make_method(config)
  ckpt = ckpt_lib.Checkpointer(FLAGS.workdir, async_save=False)
  step_ = ckpt.latest_step()
  if step_ is None:
    raise SystemExit(f"no checkpoint in {FLAGS.workdir}; train SaGe first (see the docstring)")
  parts = ckpt.restore_parts(step_, ("params", "loss_state"))
  ckpt.close()
  params, loss_state = parts["params"], parts["loss_state"]
  encoder = build_resnet(config.model)

  @jax.jit
  def reconstruct(x):
    c5 = encoder.apply(
      {"params": params["encoder"], "batch_stats": loss_state["online_stats"]["net"]["encoder"]},
      x,
      train=False,
    )["c5"]
    return method.reconstruct(params, loss_state["decoder_stats"], c5, train=False)[0]

  recon = np.concatenate(
    [np.asarray(reconstruct(test_views[i : i + 500])) for i in range(0, len(test_views), 500)]
  )
  real1, real5 = topk(test_views, test_labels)
  rec1, rec5 = topk(recon, test_labels)
  result = {
    "workdir": FLAGS.workdir,
    "step": step_,
    "num_test": FLAGS.num_test,
    "real_top1": real1,
    "real_top5": real5,
    "recon_top1": rec1,
    "recon_top5": rec5,
    "pixel_mse": float(np.mean((recon - test_views) ** 2)),
  }

  # ---- 3. PNG grid -----------------------------------------------------------------------
  n = 12
  to_uint8 = lambda x: np.clip((x + 1) * 127.5, 0, 255).astype(np.uint8)  # noqa: E731
  rows = [np.concatenate(list(to_uint8(test_views[r * n : (r + 1) * n])), axis=1) for r in range(2)]
  rows_rec = [np.concatenate(list(to_uint8(recon[r * n : (r + 1) * n])), axis=1) for r in range(2)]
  grid = np.concatenate([rows[0], rows_rec[0], rows[1], rows_rec[1]], axis=0)
  png = os.path.join(ROOT, FLAGS.png) if not os.path.isabs(FLAGS.png) else FLAGS.png
  os.makedirs(os.path.dirname(png), exist_ok=True)
  Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(png)
  result["png"] = FLAGS.png
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)
