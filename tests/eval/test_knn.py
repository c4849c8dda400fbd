"""Tests for the weighted k-NN evaluator (sslx/eval/knn.py)."""

import gzip
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx.eval import knn

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def _reference_knn(train_x, train_y, test_x, test_y, num_classes, k, temperature):
  """Brute-force float64 numpy version of the protocol, one query at a time."""

  def normalize(x):
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

  train_x, test_x = normalize(train_x), normalize(test_x)
  top1 = top5 = 0
  for query, label in zip(test_x, test_y):
    sims = train_x @ query
    neighbours = np.argsort(-sims, kind="stable")[:k]
    votes = np.zeros(num_classes)
    for j in neighbours:
      votes[train_y[j]] += np.exp(sims[j] / temperature)
    ranked = np.argsort(-votes, kind="stable")
    top1 += ranked[0] == label
    top5 += label in ranked[: min(5, num_classes)]
  return 100.0 * top1 / len(test_y), 100.0 * top5 / len(test_y)


@pytest.mark.parametrize("k,num_classes,chunk_size", [(20, 10, 64), (1, 7, 1000), (7, 3, 33)])
def test_matches_bruteforce_reference(k, num_classes, chunk_size):
  rng = np.random.default_rng(k)
  # Class-dependent means so accuracies are neither 0 nor 100 and top-1 != top-5.
  means = rng.normal(size=(num_classes, 16))
  train_y = rng.integers(0, num_classes, size=400)
  test_y = rng.integers(0, num_classes, size=150)
  train_x = (0.5 * means[train_y] + rng.normal(size=(400, 16))).astype(np.float32)
  test_x = (0.5 * means[test_y] + rng.normal(size=(150, 16))).astype(np.float32)

  got = knn.knn_classify(
    train_x,
    train_y,
    test_x,
    test_y,
    num_classes=num_classes,
    k=k,
    temperature=0.07,
    chunk_size=chunk_size,
  )
  want_top1, want_top5 = _reference_knn(train_x, train_y, test_x, test_y, num_classes, k, 0.07)
  assert got["top1"] == pytest.approx(want_top1, abs=1e-9)
  assert got["top5"] == pytest.approx(want_top5, abs=1e-9)
  assert 0.0 < got["top1"] < 100.0


def test_hand_case_weights_follow_temperature():
  # Query along x. One class-0 neighbour is almost identical; two class-1 neighbours are at 60°.
  train_x = np.array([[1.0, 0.01], [0.5, 0.866], [0.5, -0.866], [-1.0, 0.0]], np.float32)
  train_y = np.array([0, 1, 1, 2])
  test_x = np.array([[2.0, 0.0]], np.float32)  # scale must not matter (cosine)
  # Sharp weights: the single close neighbour outvotes the two far ones.
  sharp = knn.knn_classify(
    train_x, train_y, test_x, np.array([0]), num_classes=3, k=3, temperature=0.07
  )
  assert sharp["top1"] == 100.0
  # Flat weights: it is a plain majority vote, and class 1 wins.
  flat = knn.knn_classify(
    train_x, train_y, test_x, np.array([0]), num_classes=3, k=3, temperature=1e4
  )
  assert flat["top1"] == 0.0
  assert flat["top5"] == 100.0  # 3 classes: top-5 covers them all


def test_k_larger_than_bank_and_bad_labels_raise_clearly():
  x = np.ones((5, 4), np.float32)
  y = np.zeros(5, np.int32)
  with pytest.raises(ValueError, match=r"k=6 must be in \[1, number of train samples=5\]"):
    knn.knn_classify(x, y, x, y, num_classes=2, k=6)
  with pytest.raises(ValueError, match="num_classes=2"):
    knn.knn_classify(x, y + 2, x, y, num_classes=2, k=1)
  with pytest.raises(ValueError, match="feature dim"):
    knn.knn_classify(x, y, x[:, :3], y, num_classes=2, k=1)


def test_raw_pixel_features():
  images = np.zeros((3, 4, 5, 2), np.uint8)
  images[1, 0, 0, 0] = 255
  feats = knn.raw_pixel_features(images)
  assert feats.shape == (3, 40) and feats.dtype == np.float32
  assert feats[1, 0] == 1.0 and feats.sum() == 1.0


def _batches(images, labels, batch_size):
  """Fixed-size batches with the last one padded and masked, like the eval pipeline."""
  for start in range(0, len(images), batch_size):
    img, lab = images[start : start + batch_size], labels[start : start + batch_size]
    pad = batch_size - len(img)
    yield {
      "image": np.pad(img, ((0, pad), (0, 0), (0, 0), (0, 0))),
      "label": np.pad(lab, (0, pad), constant_values=-1).astype(np.int32),
      "mask": np.arange(batch_size) < len(img),
    }


def test_extract_features_drops_padding_and_keeps_order():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(23, 4, 4, 3), dtype=np.uint8)
  labels = np.arange(23, dtype=np.int32) % 5
  # bf16 output checks the float32 conversion; per-image mean makes rows identifiable.
  feature_fn = jax.jit(
    lambda x: jnp.stack([jnp.mean(x, axis=(1, 2, 3)), jnp.arange(x.shape[0])], 1).astype(
      jnp.bfloat16
    )
  )
  feats, labs = knn.extract_features(feature_fn, _batches(images, labels, 4))
  assert feats.shape == (23, 2) and feats.dtype == np.float32
  assert labs.dtype == np.int32
  np.testing.assert_array_equal(labs, labels)
  want = images.reshape(23, -1).mean(1).astype(jnp.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(feats[:, 0], want)


def test_extract_features_rejects_bad_feature_shape():
  images = np.zeros((4, 2, 2, 3), np.uint8)
  with pytest.raises(ValueError, match="feature_fn must return features"):
    knn.extract_features(lambda x: x, _batches(images, np.zeros(4, np.int32), 2))


def test_run_knn_end_to_end():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 2, size=30).astype(np.int32)
  images = np.where(labels[:, None, None, None] == 1, 200, 20).astype(np.uint8)
  images = np.broadcast_to(images, (30, 4, 4, 3)).copy()
  images[:, 0, 0, 0] = rng.integers(0, 256, size=30)  # make every image distinct
  feature_fn = jax.jit(
    lambda x: jnp.stack(
      [jnp.mean(x.astype(jnp.float32), axis=(1, 2, 3)), jnp.full(x.shape[:1], 100.0)], 1
    )
  )
  result = knn.run_knn(
    feature_fn,
    _batches(images[:20], labels[:20], 8),
    _batches(images[20:], labels[20:], 8),
    num_classes=2,
    k=3,
  )
  assert result["num_train"] == 20 and result["num_test"] == 10
  assert result["top1"] == 100.0


def _read_idx(path, offset):
  with gzip.open(path) as f:
    return np.frombuffer(f.read(), np.uint8, offset=offset)


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="Fashion-MNIST not installed")
def test_fashion_mnist_raw_pixels_reference_accuracy():
  """Raw pixels, 60k -> 10k, k=20, T=0.07, cosine: 84.59% top-1 (about 10 s on 2 cores)."""

  def images(split):
    path = os.path.join(FASHION_MNIST_DIR, f"{split}-images-idx3-ubyte.gz")
    return _read_idx(path, 16).reshape(-1, 28, 28, 1)

  def labels(split):
    return _read_idx(os.path.join(FASHION_MNIST_DIR, f"{split}-labels-idx1-ubyte.gz"), 8)

  train_x, test_x = images("train"), images("t10k")
  assert train_x.shape == (60000, 28, 28, 1) and test_x.shape == (10000, 28, 28, 1)
  result = knn.knn_classify(
    knn.raw_pixel_features(train_x),
    labels("train"),
    knn.raw_pixel_features(test_x),
    labels("t10k"),
    num_classes=10,
    k=20,
    temperature=0.07,
  )
  assert result["top1"] == pytest.approx(84.59, abs=1e-6)
  assert 95.0 < result["top5"] <= 100.0


def test_eval_compiler_options_take_effect_and_keep_the_features():
  """On CPUs the evaluation forward is compiled without YNNPACK fusions (knn.eval_compiler_options);
  the option must reach XLA (no 'ynn_fusion' left in the compiled module) and change no result."""
  options = knn.eval_compiler_options()
  if jax.default_backend() != "cpu":
    assert options is None
    return
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(256, 8, 64), jnp.float32)
  w1 = jnp.asarray(rng.randn(64, 256) / 8, jnp.float32)
  w2 = jnp.asarray(rng.randn(256, 64) / 16, jnp.float32)

  def forward(x, w1, w2):  # a transformer MLP and an attention-shaped batched dot
    h = jax.nn.gelu(x @ w1, approximate=False) @ w2
    scores = jax.nn.softmax(jnp.einsum("btd,bsd->bts", h, x), axis=-1)
    return jnp.einsum("bts,bsd->btd", scores, h).mean(axis=1)

  default = jax.jit(forward).lower(x, w1, w2).compile()
  tuned = jax.jit(forward, compiler_options=options).lower(x, w1, w2).compile()
  # (Whether the default fuses depends on the CPU YNNPACK finds; the tuned module never may.)
  assert "ynn_fusion" not in tuned.as_text()
  np.testing.assert_allclose(
    np.asarray(tuned(x, w1, w2)), np.asarray(default(x, w1, w2)), rtol=1e-4, atol=1e-5
  )


def test_one_channel_if_grey_keeps_the_cosine_knn():
  """Grey images stored as RGB are reduced to one channel (the demo's raw-pixel baseline) only
  when every set is grey, and the kNN result is the same as with three channels."""
  rng = np.random.default_rng(0)
  grey = rng.integers(0, 256, size=(60, 4, 4, 1), dtype=np.uint8)
  train, test = np.repeat(grey[:50], 3, axis=-1), np.repeat(grey[50:], 3, axis=-1)
  labels = np.arange(60) % 3
  one_train, one_test = knn.one_channel_if_grey(train, test)
  assert one_train.shape == (50, 4, 4, 1) and one_test.shape == (10, 4, 4, 1)
  np.testing.assert_array_equal(one_train, grey[:50])
  three = knn.knn_classify(
    knn.raw_pixel_features(train),
    labels[:50],
    knn.raw_pixel_features(test),
    labels[50:],
    num_classes=3,
    k=5,
  )
  one = knn.knn_classify(
    knn.raw_pixel_features(one_train),
    labels[:50],
    knn.raw_pixel_features(one_test),
    labels[50:],
    num_classes=3,
    k=5,
  )
  assert one == three
  colour = test.copy()
  colour[3, 1, 2, 1] ^= 1  # one pixel of one test image is no longer grey: nothing is reduced
  kept = knn.one_channel_if_grey(train, colour)
  assert kept[0].shape[-1] == 3 and kept[1].shape[-1] == 3
