"""Shared set-up of the gradient-accumulation tests: smoke configs, real host batches, k steps.

A `Steps` object builds one config, initialises its state once and compiles one step per k
(and per batch shape); the batches come from the Fashion-MNIST pipeline, so every key a
method reads (masks, overlap rectangles...) is real.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from sslx.config_check import load_config_file
from sslx.data import pipeline
from sslx.train import sharding, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NO_AUGMENT = dict(
  color_jitter_prob=0.0,
  grayscale_prob=0.0,
  blur_probs=(0.0, 0.0, 0.0),
  solarize_probs=(0.0, 0.0, 0.0),
)
# The tests compare maths, not speed: LLVM's backend optimisations off halves the compile time
# of a step on the 2-core CPU, and every k is compiled the same way.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def smoke_config(name: str, batch_size: int = 8):
  """configs/{name}.py:smoke with `batch_size`, one block (compiles faster), no drop path (so
  that the micro-batches' random draws, fold_in(rng, j), cannot differ from the big batch's) and
  the on-device augmentation switched off (it runs on the whole batch before the split, so it
  cannot tell k apart; off, it compiles faster and equal source images give equal views)."""
  c = load_config_file(os.path.join(ROOT, f"configs/{name}.py:smoke"))
  with c.unlocked():
    c.batch_size = batch_size
    c.model.depth = 1
    c.model.drop_path_rate = 0.0
    c.augment.update(NO_AUGMENT)
  return c


def host_batches(config, n: int) -> list[dict[str, np.ndarray]]:
  """n batches of the smoke pipeline, the keys the step reads."""
  it = iter(
    pipeline.train_dataset(
      config.data, seed=0, batch_size=config.batch_size, patch_size=config.model.patch_size
    )
  )
  out = []
  for _ in range(n):
    host = next(it)
    out.append({k: np.asarray(host[k]) for k in trainer.DEVICE_KEYS if k in host})
  return out


def micro_batch(batch: dict[str, np.ndarray], j: int, k: int) -> dict[str, np.ndarray]:
  """Micro-batch j of k as the trainer takes it: examples j, j + k, j + 2k, ..."""
  return {key: v[j::k] for key, v in batch.items()}


class Steps:
  """The train step of `config` for any accum_steps k, all from one initial state."""

  def __init__(self, config):
    self.config = config
    self.mesh = sharding.make_mesh(config.mesh)
    self.init_state = jax.device_get(
      trainer.build(config, self.mesh, steps_per_epoch=100, total_steps=100).init(config.seed)
    )
    self._compiled = {}

  def _step(self, k: int, state, batch):
    key = (k, batch["global_crops"].shape)
    if key not in self._compiled:
      config = self.config.copy_and_resolve_references()
      with config.unlocked():
        config.optim.accum_steps = k
      built = trainer.build(config, self.mesh, steps_per_epoch=100, total_steps=100)
      self._compiled[key] = built.train_step.lower(state, batch).compile(COMPILER_OPTIONS)
    return self._compiled[key](state, batch)

  def run(self, k: int, batches) -> tuple[list[dict[str, float]], object]:
    """Steps with accum_steps = k over `batches` -> (per-step metrics, final state), numpy."""
    shard = sharding.batch_sharding(self.mesh)
    # A fresh device copy each run: the step donates (deletes) its input state.
    state = jax.device_put(
      self.init_state, jax.tree.map(lambda _: sharding.replicated(self.mesh), self.init_state)
    )
    metrics = []
    for host in batches:
      state, m = self._step(k, state, sharding.to_global(host, shard))
      metrics.append({name: float(v) for name, v in jax.device_get(m).items()})
    return metrics, jax.device_get(state)


def flat(tree) -> np.ndarray:
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])
