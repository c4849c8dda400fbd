"""Linear and attentive probing of frozen features (CAE paper §5.2; Atten4Vis/CAE
`tools/run_linear.py`, `tools/run_attentive.py`, `models/modeling_finetune.py`).

  linear     BatchNorm(affine=False, eps 1e-6) -> Linear (weight N(0, 0.01^2)) on one feature
             vector per image (the CLS token for ViTs);
  attentive  one cross-attention unit: a learned query token (init 0) attends over all tokens of
             the frozen encoder (keys LN_k(x), values LN_v(x), query LN_q(q); q and v biases, no k
             bias; no MLP, no residual), then BatchNorm(affine=False) -> Linear.
Both train with their own small optax chain: SGD momentum 0.9 (or optax.lars, which the paper
uses for the linear probe), linear warm-up + cosine decay, no weight decay; no augmentation (the
official runs use crop + flip). Features are extracted once and cached on the host, which is
what makes a probe cheap on a CPU; the official code re-runs the frozen encoder on augmented
crops every epoch. The attentive unit's Linears are xavier-initialised (sslx/models/beit.py);
the official uses truncated normal 0.02.

`dino_linear_probe` is DINO's linear protocol instead (facebookresearch/dino `eval_linear.py`;
config.probe.protocol='dino'): a BatchNorm-free Linear on the [CLS] of the last blocks, trained
on features recomputed every epoch from fresh random-resized crops and flips.

Evaluators take feature functions, never a train state: `feature_fn(uint8 images [b, S, S, 3])
-> [b, D]` and `token_fn(...) -> [b, T, D]`, and labelled batches as yielded by
sslx/data/pipeline.eval_dataset ('image', 'label', 'mask').
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from sslx.errors import UserError
from sslx.models import beit

Batches = Iterable[Mapping[str, np.ndarray]]


class ProbeError(UserError):
  """A probe setting cannot be used; the message names the setting to change."""


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
  """How a probe head is trained (config.probe.linear / config.probe.attentive)."""

  optimizer: str = "sgd"  # 'sgd' | 'lars'
  lr: float = 0.1
  batch_size: int = 256
  epochs: int = 10
  warmup_epochs: float = 1.0
  momentum: float = 0.9
  num_heads: int = 0  # attentive only; 0 = pick a divisor of the feature width (<= 12)
  seed: int = 0

  @classmethod
  def from_config(cls, cfg: Any, seed: int = 0) -> ProbeSettings:
    if cfg is None:
      return cls(seed=seed)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(cfg).items() if k in names}, seed=seed)


def _batchnorm() -> nn.BatchNorm:
  # torch BatchNorm1d(affine=False): momentum 0.1 there is 0.9 here.
  return nn.BatchNorm(
    momentum=0.9, epsilon=1e-6, use_scale=False, use_bias=False, use_fast_variance=False, name="bn"
  )


class LinearHead(nn.Module):
  """BN (no affine) + Linear: features [B, D] -> logits [B, C]."""

  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = _batchnorm()(x.astype(jnp.float32), use_running_average=not train)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01), name="head")(x)


class AttentiveHead(nn.Module):
  """Learned query cross-attending over tokens [B, T, D] -> BN (no affine) -> Linear -> [B, C]."""

  num_classes: int
  num_heads: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = x.astype(jnp.float32)
    d = x.shape[-1]
    query = jnp.broadcast_to(
      self.param("query_token", nn.initializers.zeros, (1, 1, d)), (x.shape[0], 1, d)
    )
    out = beit.CrossAttention(self.num_heads, name="cross_attn")(
      beit.layer_norm("norm_q")(query), beit.layer_norm("norm_k")(x), beit.layer_norm("norm_v")(x)
    )
    y = _batchnorm()(out[:, 0], use_running_average=not train)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01), name="head")(y)


def extract(
  fn: Callable[[np.ndarray], Any], batches: Batches, max_samples: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """Runs `fn` over labelled batches; drops padding rows ('mask' False); host float32 arrays.

  Returns (features [N, ...], labels int32 [N]); stops after `max_samples` (> 0) rows.
  """
  feats, labels, count = [], [], 0
  for index, batch in enumerate(batches):
    if "image" not in batch or "label" not in batch:
      raise KeyError(f"probe batch {index} needs 'image' and 'label'; got {sorted(batch)}.")
    y = np.asarray(batch["label"]).astype(np.int32).reshape(-1)
    keep = np.asarray(batch.get("mask", np.ones_like(y, bool)), bool).reshape(-1)
    out = np.asarray(fn(batch["image"]), np.float32)
    if out.shape[0] != y.shape[0]:
      raise ValueError(
        f"feature function returned {out.shape[0]} rows for a batch of {y.shape[0]}."
      )
    feats.append(out[keep])
    labels.append(y[keep])
    count += int(keep.sum())
    if max_samples and count >= max_samples:
      break
  if not feats:
    raise ValueError("the probe got no batches; the evaluation dataset is empty.")
  x, y = np.concatenate(feats), np.concatenate(labels)
  return (x[:max_samples], y[:max_samples]) if max_samples else (x, y)


def _optimizer(
  s: ProbeSettings, total_steps: int, steps_per_epoch: int
) -> optax.GradientTransformation:
  warmup = int(round(s.warmup_epochs * steps_per_epoch))
  sched = optax.warmup_cosine_decay_schedule(0.0, s.lr, warmup, max(total_steps, warmup + 1), 0.0)
  if s.optimizer == "sgd":
    return optax.sgd(sched, momentum=s.momentum)
  if s.optimizer == "lars":
    return optax.lars(sched, weight_decay=0.0, momentum=s.momentum)
  raise ValueError(
    f"probe optimizer {s.optimizer!r}; valid: 'sgd', 'lars' (config.probe.<kind>.optimizer)."
  )


def train_and_score(
  head: nn.Module,
  train_x: np.ndarray,
  train_y: np.ndarray,
  test_x: np.ndarray,
  test_y: np.ndarray,
  settings: ProbeSettings,
) -> dict[str, float]:
  """Trains `head` on cached features with cross-entropy and returns test accuracy.

  Returns:
    {'top1', 'top5' (percent), 'train_loss' (mean of the last epoch), 'num_train', 'num_test'}.
  """
  n = train_x.shape[0]
  bs = min(settings.batch_size, n)
  steps_per_epoch = n // bs
  total = settings.epochs * steps_per_epoch
  tx = _optimizer(settings, total, steps_per_epoch)
  variables = jax.jit(lambda r, x: head.init(r, x, train=False))(
    jax.random.PRNGKey(settings.seed), jnp.asarray(train_x[:2])
  )
  params, stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)

  @jax.jit
  def step(params, stats, opt_state, x, y):
    def loss_fn(p):
      logits, new = head.apply(
        {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new["batch_stats"]

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  rng = np.random.default_rng(settings.seed)
  losses: list[float] = []
  for _ in range(settings.epochs):
    order = rng.permutation(n)
    losses = []
    for i in range(steps_per_epoch):
      idx = order[i * bs : (i + 1) * bs]
      params, stats, opt_state, loss = step(params, stats, opt_state, train_x[idx], train_y[idx])
      losses.append(loss)

  predict = jax.jit(lambda x: head.apply({"params": params, "batch_stats": stats}, x, train=False))
  top1 = top5 = 0
  for i in range(0, test_x.shape[0], 1000):
    logits = np.asarray(predict(test_x[i : i + 1000]))
    ranked = np.argsort(-logits, axis=-1)[:, :5]
    y = test_y[i : i + 1000]
    top1 += int((ranked[:, 0] == y).sum())
    top5 += int((ranked == y[:, None]).any(-1).sum())
  m = test_x.shape[0]
  return {
    "top1": 100.0 * top1 / m,
    "top5": 100.0 * top5 / m,
    "train_loss": float(np.mean(jax.device_get(losses))) if losses else float("nan"),
    "num_train": int(n),
    "num_test": int(m),
  }


def _heads_for(d: int, requested: int) -> int:
  if requested:
    if d % requested:
      raise ValueError(
        f"attentive probe num_heads={requested} does not divide the feature width "
        f"{d}; set config.probe.attentive.num_heads."
      )
    return requested
  return max(h for h in range(1, 13) if d % h == 0)


def linear_probe(
  feature_fn: Callable[[np.ndarray], Any],
  train_batches: Batches,
  test_batches: Batches,
  *,
  num_classes: int,
  settings: ProbeSettings,
  max_train: int = 0,
  max_test: int = 0,
) -> dict[str, float]:
  """BN + Linear on `feature_fn` features ([b, D]); returns test top-1/top-5 in percent.

  max_train / max_test > 0 keep only the first that many examples (quick checks).
  """
  train_x, train_y = extract(feature_fn, train_batches, max_train)
  test_x, test_y = extract(feature_fn, test_batches, max_test)
  if train_x.ndim != 2:
    raise ValueError(
      f"linear probing needs one vector per image; features have shape "
      f"{train_x.shape[1:]} per image."
    )
  return train_and_score(LinearHead(num_classes), train_x, train_y, test_x, test_y, settings)


def attentive_probe(
  token_fn: Callable[[np.ndarray], Any],
  train_batches: Batches,
  test_batches: Batches,
  *,
  num_classes: int,
  settings: ProbeSettings,
  max_train: int = 0,
  max_test: int = 0,
) -> dict[str, float]:
  """Cross-attention probe on `token_fn` tokens ([b, T, D]); returns test top-1/top-5 in percent."""
  train_x, train_y = extract(token_fn, train_batches, max_train)
  test_x, test_y = extract(token_fn, test_batches, max_test)
  if train_x.ndim != 3:
    raise ValueError(f"attentive probing needs tokens [T, D] per image; got {train_x.shape[1:]}.")
  head = AttentiveHead(num_classes, _heads_for(train_x.shape[-1], settings.num_heads))
  return train_and_score(head, train_x, train_y, test_x, test_y, settings)


# ---- DINO's linear protocol (facebookresearch/dino eval_linear.py) -------------------------
PROTOCOLS = ("cached", "dino")


@dataclasses.dataclass(frozen=True)
class DinoLinearSettings:
  """config.probe.dino: DINO's linear evaluation (docs/fidelity.md, DINO).

  The defaults are eval_linear.py's: the [CLS] of the last 4 blocks (ViT-S; ViT-B uses 1 block
  and the pooled patch tokens), 100 epochs, lr 0.001 per 256 images, global batch 1024
  (128 per GPU on 8 GPUs), SGD momentum 0.9, no weight decay, cosine by epoch to 0.
  """

  n_last_blocks: int = 4
  avgpool: bool = False
  lr_per_256: float = 0.001
  batch_size: int = 1024
  epochs: int = 100
  momentum: float = 0.9
  crop_scale: tuple[float, float] = (0.08, 1.0)
  seed: int = 0
  # The train split is held on the host as uint8 (crops are redrawn every epoch); refused
  # above this size, with config.probe.max_train as the way out.
  max_host_gib: float = 16.0

  @classmethod
  def from_config(cls, cfg: Any, seed: int = 0) -> DinoLinearSettings:
    if cfg is None:
      return cls(seed=seed)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dict(cfg).items() if k in names}
    if "crop_scale" in values:
      values["crop_scale"] = tuple(float(v) for v in values["crop_scale"])
    return cls(**values, seed=seed)


class DinoLinearHead(nn.Module):
  """DINO's LinearClassifier: one Linear, weight N(0, 0.01^2), bias 0, no BatchNorm."""

  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Dense(
      self.num_classes,
      kernel_init=nn.initializers.normal(0.01),
      bias_init=nn.initializers.zeros,
      name="linear",
    )(x.astype(jnp.float32))


def random_crop_flip(
  images: np.ndarray, rng: np.random.Generator, scale: tuple[float, float]
) -> np.ndarray:
  """torchvision's RandomResizedCrop (bilinear, its default) + RandomHorizontalFlip per image.

  Crops are drawn from each image as given and resized back to its size.

  Args:
    images: uint8 [B, S, S, C].
    rng: the draws (boxes, flips), so an epoch's crops follow from its seed.
  """
  from PIL import Image

  from sslx.data import crops

  out = np.empty_like(images)
  size = images.shape[1]
  for i, image in enumerate(images):
    x0, y0, w, h = crops.random_resized_crop_box(rng, image.shape[0], image.shape[1], scale)
    pil = Image.fromarray(np.ascontiguousarray(image[..., 0] if image.shape[-1] == 1 else image))
    crop = np.asarray(
      pil.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + w, y0 + h)), np.uint8
    ).reshape(size, size, -1)
    out[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
  return out


def _collect_images(batches: Batches, max_samples: int) -> tuple[np.ndarray, np.ndarray]:
  images, labels, count = [], [], 0
  for batch in batches:
    keep = np.asarray(batch.get("mask", np.ones(len(batch["label"]), bool)), bool).reshape(-1)
    images.append(np.asarray(batch["image"])[keep])
    labels.append(np.asarray(batch["label"]).astype(np.int32).reshape(-1)[keep])
    count += int(keep.sum())
    if max_samples and count >= max_samples:
      break
  if not images:
    raise ValueError("the probe got no batches; the evaluation dataset is empty.")
  x, y = np.concatenate(images), np.concatenate(labels)
  return (x[:max_samples], y[:max_samples]) if max_samples else (x, y)


def dino_linear_probe(
  feature_fn: Callable[[np.ndarray], Any],
  train_batches: Batches,
  test_batches: Batches,
  *,
  num_classes: int,
  settings: DinoLinearSettings,
  max_train: int = 0,
  max_test: int = 0,
  on_epoch: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
  """DINO's linear protocol: a Linear trained on frozen features of freshly augmented views.

  Every epoch draws new crops and flips of the train images (seeded by settings.seed and the
  epoch, so a rerun is identical) and recomputes their features with `feature_fn`; the test
  images (the centred evaluation view) are featurised once. SGD with momentum, lr
  lr_per_256 * batch / 256 on a per-epoch cosine to 0, no weight decay, cross-entropy.
  Batches are full (the remainder of an epoch is left for the next epoch's draw).

  Args:
    feature_fn: uint8 images [b, S, S, 3] -> [b, D] (e.g. Method.block_features).
    on_epoch: called with (epoch, mean train loss) after each epoch (progress logging).

  Returns:
    {'top1', 'top5' (percent), 'train_loss' (mean of the last epoch), 'num_train', 'num_test',
    'feature_dim'}.
  """
  s = settings
  train_x, train_y = _collect_images(train_batches, max_train)
  gib = train_x.nbytes / 2**30
  if gib > s.max_host_gib:
    raise ProbeError(
      f"the DINO linear protocol keeps the train images on the host: {gib:.1f} GiB > "
      f"config.probe.dino.max_host_gib={s.max_host_gib}; set config.probe.max_train or raise it"
    )
  test_f, test_y = extract(feature_fn, test_batches, max_test)
  n = train_x.shape[0]
  bs = min(s.batch_size, n)
  steps = n // bs
  base_lr = s.lr_per_256 * bs / 256.0
  head = DinoLinearHead(num_classes)
  params = head.init(jax.random.PRNGKey(s.seed), jnp.zeros((1, test_f.shape[1])))["params"]
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=base_lr, momentum=s.momentum)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y, lr):
    def loss_fn(p):
      logits = head.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    opt_state.hyperparams["learning_rate"] = lr
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses: list = []
  for epoch in range(s.epochs):
    # torch's CosineAnnealingLR(T_max=epochs, eta_min=0), stepped once per epoch.
    lr = np.float32(base_lr * 0.5 * (1.0 + np.cos(np.pi * epoch / s.epochs)))
    rng = np.random.default_rng([s.seed, epoch])
    order = rng.permutation(n)
    losses = []
    for i in range(steps):
      idx = order[i * bs : (i + 1) * bs]
      views = random_crop_flip(train_x[idx], rng, s.crop_scale)
      feats = np.asarray(feature_fn(views), np.float32)
      params, opt_state, loss = step(params, opt_state, feats, train_y[idx], lr)
      losses.append(loss)
    if on_epoch is not None:
      on_epoch(epoch, float(np.mean(jax.device_get(losses))))

  logits = np.asarray(jax.jit(lambda x: head.apply({"params": params}, x))(test_f))
  ranked = np.argsort(-logits, axis=-1)[:, :5]
  m = test_f.shape[0]
  return {
    "top1": 100.0 * float((ranked[:, 0] == test_y).mean()),
    "top5": 100.0 * float((ranked == test_y[:, None]).any(-1).mean()),
    "train_loss": float(np.mean(jax.device_get(losses))) if losses else float("nan"),
    "num_train": int(n),
    "num_test": int(m),
    "feature_dim": int(test_f.shape[1]),
  }
