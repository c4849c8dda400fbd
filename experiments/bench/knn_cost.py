r"""Where a k-NN evaluation spends its time on this machine, and what XLA's CPU fusion choice costs.

  python experiments/bench/knn_cost.py --config=configs/sere_dino.py:fashion_mnist
  python experiments/bench/knn_cost.py --config=configs/byol.py:fashion_mnist --skip_data

Times, for the config's evaluation splits: one pass of the eval input pipeline, the feature forward
(teacher at init, batch config.eval.batch_size) compiled with XLA's default CPU library fusions and
with each setting in --cpu_fusions, and the k-NN scoring of random features of the model's width.
Alternate settings are timed in turns (--rounds) and medians are printed, as the machine is noisy.
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sslx.data import pipeline  # noqa: E402
from sslx.eval import knn  # noqa: E402
from sslx.methods import make_method  # noqa: E402
from sslx.train import trainer  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/sere_dino.py:fashion_mnist", "Config.")
flags.DEFINE_list(
  "cpu_fusions",
  ["", "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"],
  "Values of xla_cpu_experimental_ynn_fusion_type to time against XLA's default "
  "('' = no YNNPACK fusions).",
)
flags.DEFINE_integer("batches", 5, "Timed feature batches per round.")
flags.DEFINE_integer("rounds", 3, "Rounds of alternating settings.")
flags.DEFINE_bool("skip_data", False, "Do not time the eval input pipeline.")


def main(argv):
  del argv
  config = FLAGS.config
  ec, dc = config.eval, config.data
  method = make_method(config)
  size = dc.eval_size
  params, loss_state = method.init(jax.random.PRNGKey(0), (size, size, 3))
  state = trainer.TrainState(
    step=jnp.zeros([], jnp.int32),
    params=params,
    teacher_params=method.teacher_params(params),
    opt_state=None,
    loss_state=loss_state,
    rng=jax.random.PRNGKey(1),
  )
  eval_params = trainer.eval_params_of(method, state)
  # What knn.eval_forward jits, compiled here with each setting in turn.
  features = knn.uint8_forward(
    method.features, tuple(config.augment.mean), tuple(config.augment.std)
  )
  images = jnp.asarray(
    np.random.RandomState(0).randint(0, 256, (ec.batch_size, size, size, 3), np.uint8)
  )
  settings = {"default": None}
  settings.update(
    {
      f"ynn_fusion_type={v!r}": {"xla_cpu_experimental_ynn_fusion_type": v}
      for v in FLAGS.cpu_fusions
    }
  )
  compiled, reference = {}, None
  for name, options in settings.items():
    t0 = time.time()
    compiled[name] = (
      jax.jit(features, compiler_options=options).lower(eval_params, images).compile()
    )
    out = np.asarray(compiled[name](eval_params, images))
    reference = out if reference is None else reference
    print(
      f"{name}: compiled in {time.time() - t0:.1f} s, max |features - default| "
      f"{np.abs(out - reference).max():.2e}"
    )
  times = {name: [] for name in settings}
  for _ in range(FLAGS.rounds):
    for name, fn in compiled.items():
      t0 = time.time()
      for _ in range(FLAGS.batches):
        fn(eval_params, images).block_until_ready()
      times[name].append((time.time() - t0) / (FLAGS.batches * ec.batch_size))
  n_eval = None
  if not FLAGS.skip_data:
    t0 = time.time()
    n_eval = sum(
      int(b["mask"].sum())
      for split in (dc.eval_train_split, dc.eval_test_split)
      for b in pipeline.eval_dataset(dc, split, batch_size=ec.batch_size)
    )
    print(f"eval input pipeline: {n_eval} images in {time.time() - t0:.1f} s")
  n = n_eval or 70_000
  for name, ts in times.items():
    med = float(np.median(ts))
    print(
      f"features {name}: {1e6 * med:.0f} us/image (rounds: "
      f"{', '.join(f'{1e6 * t:.0f}' for t in ts)}) -> {n * med:.1f} s for {n} images"
    )
  dim = reference.shape[1]
  rng = np.random.RandomState(0)
  n_test = min(10_000, n // 7)
  train_x, test_x = rng.randn(n - n_test, dim), rng.randn(n_test, dim)
  train_y, test_y = rng.randint(0, 10, n - n_test), rng.randint(0, 10, n_test)
  t0 = time.time()
  knn.knn_classify(
    train_x, train_y, test_x, test_y, num_classes=10, k=ec.knn_k, temperature=ec.knn_temperature
  )
  print(f"k-NN scoring, {n - n_test} x {n_test} x {dim}: {time.time() - t0:.1f} s (with compile)")


if __name__ == "__main__":
  app.run(main)
