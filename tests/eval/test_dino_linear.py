"""DINO's linear protocol (`--config.probe.protocol=dino`): the feature is [CLS] x n (+ the mean
patch token), the augmentation is redrawn every epoch from a seed, and the probe trains end to end
on a smoke model through the method interface."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from sslx.config_check import load_config_file
from sslx.eval import probe
from sslx.methods import make_method
from sslx.train import probe_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _smoke():
  c = load_config_file(os.path.join(ROOT, "configs/dino.py:smoke"))
  method = make_method(c)
  params, loss_state = jax.jit(lambda r: method.init(r, (28, 28, 3)))(jax.random.PRNGKey(0))
  return c, method, method.eval_params(params, loss_state)


def test_features_are_cls_of_the_last_blocks_and_the_pool():
  _, method, params = _smoke()
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 28, 28, 3)), jnp.float32)
  tokens = np.asarray(jax.jit(method.tokens)(params, x))  # [B, 1 + N, D], last block
  d = tokens.shape[-1]
  blocks = jax.jit(method.block_features, static_argnums=(2, 3))
  pooled = np.asarray(blocks(params, x, 2, True))
  assert pooled.shape == (3, 3 * d)
  np.testing.assert_allclose(pooled[:, d : 2 * d], tokens[:, 0], atol=1e-6)  # the last block
  assert not np.allclose(pooled[:, :d], tokens[:, 0])  # the block before it
  np.testing.assert_allclose(pooled[:, 2 * d :], tokens[:, 1:].mean(1), atol=1e-6)
  # n = 1 with the pool: DINO's interleaved order [c0, p0, c1, p1, ...].
  one = np.asarray(blocks(params, x, 1, True))
  assert one.shape == (3, 2 * d)
  np.testing.assert_allclose(one[:, 0::2], tokens[:, 0], atol=1e-6)
  np.testing.assert_allclose(one[:, 1::2], tokens[:, 1:].mean(1), atol=1e-6)


def _blobs(n, rng):
  """uint8 images whose class is their brightness (which crops and flips keep)."""
  y = rng.integers(0, 3, n).astype(np.int32)
  x = rng.integers(0, 40, (n, 16, 16, 3)) + (y * 70)[:, None, None, None]
  return [
    {"image": x[i : i + 50].astype(np.uint8), "label": y[i : i + 50]} for i in range(0, n, 50)
  ]


def _histogram(images):
  """Three brightness bins per image: linearly separable features of `_blobs`."""
  x = images.reshape(len(images), -1)
  return np.stack([(x < 60).mean(1), ((x >= 60) & (x < 130)).mean(1), (x >= 130).mean(1)], 1)


def test_crops_are_new_every_epoch_and_the_same_on_a_rerun():
  rng = np.random.default_rng(1)
  train, test = _blobs(200, rng), _blobs(100, rng)
  settings = probe.DinoLinearSettings(lr_per_256=50.0, batch_size=50, epochs=3, seed=7)

  def run():
    seen = []

    def features(images):
      seen.append(images.copy())
      return _histogram(images).astype(np.float32)

    res = probe.dino_linear_probe(features, train, test, num_classes=3, settings=settings)
    return res, seen

  res, seen = run()
  again, seen_again = run()
  assert res == again and all(np.array_equal(a, b) for a, b in zip(seen, seen_again))
  # The first calls are the test set (once, unaugmented); then 4 train batches per epoch.
  train_calls = seen[2:]
  assert len(train_calls) == 3 * 4
  assert not np.array_equal(np.sort(train_calls[0], 0), np.sort(train_calls[4], 0))
  assert res["num_train"] == 200 and res["feature_dim"] == 3
  assert res["top1"] > 90.0


def test_probe_runs_on_a_smoke_model_through_the_interface(tmp_path):
  c = load_config_file(os.path.join(ROOT, "configs/dino.py:smoke"))
  with c.unlocked():
    c.probe.update(protocol="dino", max_train=128, max_test=128)
    c.probe.dino.update(n_last_blocks=2, avgpool=True, batch_size=64, epochs=2, lr_per_256=0.1)
    c.eval.batch_size = 128
  res = probe_workdir.evaluate(c, str(tmp_path), "linear_probe", random_init=True)
  assert res["protocol"] == "dino" and res["num_train"] == 128 and res["num_test"] == 128
  assert res["feature_dim"] == 3 * 32
  assert 0.0 <= res["top1"] <= 100.0 and np.isfinite(res["train_loss"])
