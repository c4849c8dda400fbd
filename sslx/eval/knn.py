"""Weighted k-nearest-neighbour evaluation of frozen features (the DINO k-NN protocol).

Protocol: L2-normalise train and test features, score every test sample against every train sample
by cosine similarity, keep the k most similar train samples, give each a weight exp(sim / T), let
each class collect the weights of its neighbours, and rank classes by those votes. Top-1 / top-5
accuracy are reported in percent.

The evaluator takes a feature function, never a model or a train state, so the trainer and a
standalone script can both call it.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sslx.data import augment
from sslx.normalize import l2_normalize

FeatureFn = Callable[[np.ndarray], jax.Array | np.ndarray]

# How many feature batches may be in flight on the device before we pull the oldest to host:
# enough to overlap the device->host copy with the next batch's compute, small enough to bound
# device memory.
_MAX_PENDING_BATCHES = 2


def eval_compiler_options() -> dict[str, str] | None:
  """XLA options for the evaluation forward: on CPUs, no YNNPACK library fusions.

  XLA's CPU default hands dots and their neighbours to YNNPACK in fused subgraphs; for the
  inference forward of every method's Fashion-MNIST model that was 1.3-1.8x slower than XLA's own
  code, and 1.8x slower for ViT-S/16 in bfloat16 (experiments/bench/knn_cost.py, RESULTS.md).
  Training steps showed no difference either way, so only evaluation sets it.
  """
  if jax.default_backend() != "cpu":
    return None
  return {"xla_cpu_experimental_ynn_fusion_type": ""}


def uint8_forward(
  fn: Callable[[Any, jax.Array], jax.Array], mean: tuple[float, ...], std: tuple[float, ...]
) -> Callable[[Any, jax.Array], jax.Array]:
  """(params, normalised float images) -> out, as (params, uint8 images [B, H, W, C]) -> out.

  The images are scaled to [0, 1] and normalised with the config's `mean` / `std`, as in training.
  """

  def forward(params: Any, images: jax.Array) -> jax.Array:
    return fn(params, augment.normalize(images.astype(jnp.float32) / 255.0, mean, std))

  return forward


def eval_forward(
  fn: Callable[[Any, jax.Array], jax.Array], mean: tuple[float, ...], std: tuple[float, ...]
) -> Callable[[Any, jax.Array], jax.Array]:
  """`uint8_forward(fn, mean, std)` jitted with `eval_compiler_options()`: the one way evaluators
  (kNN features, probe tokens) compile a frozen network's forward."""
  return jax.jit(uint8_forward(fn, mean, std), compiler_options=eval_compiler_options())


def raw_pixel_features(images: np.ndarray) -> np.ndarray:
  """Flattens uint8 images into raw-pixel feature vectors (the pixel baseline).

  Args:
    images: uint8 array [N, H, W, C] (any trailing shape is accepted and flattened).

  Returns:
    float32 array [N, H*W*C] with values in [0, 1] (pixel / 255).
  """
  images = np.asarray(images)
  if images.ndim < 2:
    raise ValueError(
      f"raw_pixel_features expects a batch of images [N, H, W, C]; got shape {images.shape}. "
      "Add the batch dimension (e.g. images[None])."
    )
  return images.reshape(images.shape[0], -1).astype(np.float32) / np.float32(255.0)


def one_channel_if_grey(*image_sets: np.ndarray) -> tuple[np.ndarray, ...]:
  """The first channel of every set when every image in all of them is grey (equal channels).

  The input pipeline delivers grey datasets such as Fashion-MNIST as three equal channels. The
  kNN's cosine similarity of the raw pixels is the same with one channel as with three (the dot
  product and the product of the norms both scale by 3), so the baseline can score a third of
  the numbers. The
  sets are reduced together or not at all, so train and test features keep one layout.

  Args:
    image_sets: uint8 arrays [N, H, W, C].

  Returns:
    The arrays as [N, H, W, 1] if C == 3 and all channels are equal everywhere, else unchanged.
  """

  def grey(images: np.ndarray) -> bool:
    return (
      images.ndim == 4
      and images.shape[-1] == 3
      and bool(np.all(images[..., 0] == images[..., 1]))
      and bool(np.all(images[..., 0] == images[..., 2]))
    )

  if image_sets and all(grey(images) for images in image_sets):
    return tuple(images[..., :1] for images in image_sets)
  return image_sets


@functools.partial(jax.jit, static_argnames=("num_classes", "k", "num_top"))
def _count_correct_chunk(
  train_features: jax.Array,
  train_labels: jax.Array,
  test_features: jax.Array,
  test_labels: jax.Array,
  valid: jax.Array,
  temperature: jax.Array,
  *,
  num_classes: int,
  k: int,
  num_top: int,
) -> tuple[jax.Array, jax.Array]:
  """Counts top-1 and top-`num_top` hits for one chunk of (already normalised) test features."""
  # HIGHEST: on GPUs the default f32 matmul may run in TF32, which reorders close neighbours.
  sims = jnp.matmul(test_features, train_features.T, precision=jax.lax.Precision.HIGHEST)
  top_sims, top_idx = jax.lax.top_k(sims, k)  # [c, k]
  weights = jnp.exp(top_sims / temperature)
  neighbour_labels = train_labels[top_idx]  # [c, k]
  votes = jnp.einsum(
    "ck,ckn->cn",
    weights,
    jax.nn.one_hot(neighbour_labels, num_classes, dtype=weights.dtype),
    precision=jax.lax.Precision.HIGHEST,
  )
  # top_k breaks ties towards the lower class index, like a stable descending sort.
  _, ranked = jax.lax.top_k(votes, num_top)  # [c, num_top]
  hits = ranked == test_labels[:, None]
  top1 = jnp.sum(hits[:, 0] & valid)
  topn = jnp.sum(jnp.any(hits, axis=1) & valid)
  return top1, topn


def _check_features_and_labels(
  features: np.ndarray, labels: np.ndarray, name: str, num_classes: int
) -> None:
  if features.ndim != 2:
    raise ValueError(
      f"{name}_features must be 2-D [num_samples, dim]; got shape {features.shape}. "
      "Flatten or pool the features first."
    )
  if labels.shape != (features.shape[0],):
    raise ValueError(
      f"{name}_labels must have shape [{features.shape[0]}] to match "
      f"{name}_features {features.shape}; got {labels.shape}."
    )
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
      f"{name}_labels must lie in [0, num_classes={num_classes}); found range "
      f"[{labels.min()}, {labels.max()}]. Check num_classes or the label mapping."
    )


def knn_classify(
  train_features: np.ndarray | jax.Array,
  train_labels: np.ndarray | jax.Array,
  test_features: np.ndarray | jax.Array,
  test_labels: np.ndarray | jax.Array,
  *,
  num_classes: int,
  k: int = 20,
  temperature: float = 0.07,
  chunk_size: int = 1024,
) -> dict[str, float]:
  """Weighted k-NN classification accuracy of test features against a train feature bank.

  Features are L2-normalised, similarity is cosine, each of the k nearest train samples votes
  for its label with weight exp(similarity / temperature), and the classes are ranked by their
  summed votes (ties go to the lower class index).

  Args:
    train_features: float [N, D] feature bank (any float dtype; computed in float32).
    train_labels: int [N] class ids in [0, num_classes).
    test_features: float [M, D] query features.
    test_labels: int [M] class ids in [0, num_classes).
    num_classes: number of classes C.
    k: neighbours per query; must satisfy 1 <= k <= N.
    temperature: softmax-style temperature T of the vote weights.
    chunk_size: test samples scored per device call; peak memory is about chunk_size * N floats.

  Returns:
    {'top1': float, 'top5': float} accuracies in percent. With fewer than 5 classes 'top5' is
    computed over all C classes (and is therefore 100).
  """
  train_features = np.asarray(train_features, dtype=np.float32)
  test_features = np.asarray(test_features, dtype=np.float32)
  train_labels = np.asarray(train_labels)
  test_labels = np.asarray(test_labels)
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1; got {num_classes}.")
  _check_features_and_labels(train_features, train_labels, "train", num_classes)
  _check_features_and_labels(test_features, test_labels, "test", num_classes)
  if train_features.shape[1] != test_features.shape[1]:
    raise ValueError(
      f"train and test features must share the feature dim; got "
      f"{train_features.shape[1]} and {test_features.shape[1]}."
    )
  num_train, num_test = train_features.shape[0], test_features.shape[0]
  if num_train == 0 or num_test == 0:
    raise ValueError(
      f"k-NN needs at least one train and one test sample; got {num_train} train, "
      f"{num_test} test. Check the evaluation datasets."
    )
  if not 1 <= k <= num_train:
    raise ValueError(
      f"k={k} must be in [1, number of train samples={num_train}]. Use a smaller k "
      "or a larger train split for the k-NN evaluator."
    )
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0; got {temperature}.")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1; got {chunk_size}.")

  chunk_size = min(chunk_size, num_test)
  num_top = min(5, num_classes)
  bank = l2_normalize(jnp.asarray(train_features))
  bank_labels = jnp.asarray(train_labels, dtype=jnp.int32)
  temperature = jnp.float32(temperature)

  # Pad the test set to whole chunks so one compiled function serves every chunk.
  num_chunks = -(-num_test // chunk_size)
  pad = num_chunks * chunk_size - num_test
  queries = np.pad(test_features, ((0, pad), (0, 0)))
  query_labels = np.pad(test_labels.astype(np.int32), (0, pad))
  valid = np.arange(num_chunks * chunk_size) < num_test

  counts = []
  for i in range(num_chunks):
    sl = slice(i * chunk_size, (i + 1) * chunk_size)
    counts.append(
      _count_correct_chunk(
        bank,
        bank_labels,
        l2_normalize(jnp.asarray(queries[sl])),
        jnp.asarray(query_labels[sl]),
        jnp.asarray(valid[sl]),
        temperature,
        num_classes=num_classes,
        k=k,
        num_top=num_top,
      )
    )
  # Synchronise only once every chunk has been dispatched.
  top1 = sum(int(hits1) for hits1, _ in counts)
  top5 = sum(int(hits5) for _, hits5 in counts)
  return {"top1": 100.0 * top1 / num_test, "top5": 100.0 * top5 / num_test}


def extract_features(
  feature_fn: FeatureFn,
  batches: Iterable[Mapping[str, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
  """Runs `feature_fn` over evaluation batches and gathers features and labels on the host.

  Device results are pulled to the host with a lag of a couple of batches, so the next batch is
  dispatched before the previous one is waited on.

  Args:
    feature_fn: maps a uint8 image batch [b, S, S, 3] to features [b, D] (typically jitted).
    batches: iterable of dicts with 'image' uint8 [b, S, S, 3], 'label' int [b] and optionally
      'mask' bool [b]; rows whose mask is False are padding and are dropped. Without 'mask' every
      row counts.

  Returns:
    (features float32 [N, D], labels int32 [N]) over all unmasked rows, in input order.
  """
  pending: collections.deque = collections.deque()
  feature_parts: list[np.ndarray] = []
  label_parts: list[np.ndarray] = []

  def drain_one() -> None:
    out, labels, mask, index = pending.popleft()
    out = np.asarray(out, dtype=np.float32)
    if out.ndim != 2 or out.shape[0] != mask.shape[0]:
      raise ValueError(
        f"feature_fn must return features [batch={mask.shape[0]}, dim]; got shape "
        f"{out.shape} for batch {index}. Pool or flatten inside feature_fn."
      )
    feature_parts.append(out[mask])
    label_parts.append(labels[mask])

  for index, batch in enumerate(batches):
    for key in ("image", "label"):
      if key not in batch:
        raise KeyError(
          f"evaluation batch {index} has no '{key}' entry; got keys "
          f"{sorted(batch)}. Batches must be dicts with 'image', 'label' and 'mask'."
        )
    labels = np.asarray(batch["label"]).astype(np.int32).reshape(-1)
    mask = (
      np.asarray(batch["mask"], dtype=bool).reshape(-1)
      if "mask" in batch
      else np.ones(labels.shape, dtype=bool)
    )
    if mask.shape != labels.shape:
      raise ValueError(
        f"batch {index}: 'mask' shape {mask.shape} does not match 'label' shape {labels.shape}."
      )
    pending.append((feature_fn(batch["image"]), labels, mask, index))
    if len(pending) > _MAX_PENDING_BATCHES:
      drain_one()
  while pending:
    drain_one()

  if not feature_parts:
    raise ValueError("extract_features got no batches; the evaluation dataset is empty.")
  return np.concatenate(feature_parts, axis=0), np.concatenate(label_parts, axis=0)


def run_knn(
  feature_fn: FeatureFn,
  train_batches: Iterable[Mapping[str, np.ndarray]],
  test_batches: Iterable[Mapping[str, np.ndarray]],
  *,
  num_classes: int,
  k: int = 20,
  temperature: float = 0.07,
) -> dict[str, float | int]:
  """Extracts train/test features with `feature_fn` and scores them with `knn_classify`.

  Args:
    feature_fn: maps a uint8 image batch [b, S, S, 3] to features [b, D].
    train_batches: batches (see `extract_features`) of the labelled feature bank.
    test_batches: batches of the evaluation queries.
    num_classes: number of classes C.
    k: neighbours per query.
    temperature: vote temperature T.

  Returns:
    {'top1', 'top5'} in percent and {'num_train', 'num_test'} sample counts.
  """
  train_x, train_y = extract_features(feature_fn, train_batches)
  test_x, test_y = extract_features(feature_fn, test_batches)
  result: dict[str, float | int] = dict(
    knn_classify(
      train_x, train_y, test_x, test_y, num_classes=num_classes, k=k, temperature=temperature
    )
  )
  result["num_train"] = int(train_x.shape[0])
  result["num_test"] = int(test_x.shape[0])
  return result
