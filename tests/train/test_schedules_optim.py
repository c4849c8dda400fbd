"""Schedules value-for-value against the official formulas; the optax chain's pieces."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx import schedules
from sslx.train import optim


def dino_cosine_reference(base, final, epochs, niter, warmup_epochs=0, start_warmup=0.0):
  """The official cosine_scheduler written out in numpy (facebookresearch/dino utils.py)."""
  warmup_iters = warmup_epochs * niter
  warm = np.linspace(start_warmup, base, warmup_iters) if warmup_iters > 0 else np.array([])
  iters = np.arange(epochs * niter - warmup_iters)
  cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
  return np.concatenate((warm, cos))


@pytest.mark.parametrize("base,final,warmup", [(1e-3, 1e-6, 2), (0.04, 0.4, 0), (0.996, 1.0, 0)])
def test_cosine_matches_official(base, final, warmup):
  epochs, niter = 7, 5
  ref = dino_cosine_reference(base, final, epochs, niter, warmup)
  ours = schedules.cosine_schedule(base, final, epochs * niter, warmup * niter)
  got = np.array([float(ours(i)) for i in range(epochs * niter)])
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-8)


def test_teacher_temperature_is_per_epoch_linspace():
  # DINO's linspace includes both ends: 0.04 -> 0.07 over 3 epochs gives epoch 1 = 0.055.
  sched = schedules.epoch_linspace_schedule(0.04, 0.07, 3, steps_per_epoch=10)
  for step, want in [(0, 0.04), (9, 0.04), (10, 0.055), (19, 0.055), (20, 0.07), (999, 0.07)]:
    assert math.isclose(float(sched(step)), want, rel_tol=1e-6), step


def test_momentum_schedule_values():
  sched = schedules.cosine_schedule(0.996, 1.0, 100)
  assert math.isclose(float(sched(0)), 0.996, rel_tol=1e-7)
  assert math.isclose(float(sched(50)), 0.998, rel_tol=1e-7)
  assert float(sched(100)) == pytest.approx(1.0)


def test_lr_scaling_rule():
  assert schedules.base_learning_rate(5e-4, 1024) == pytest.approx(2e-3)


def test_per_tensor_clip():
  tx = optim.clip_per_tensor(3.0)
  g = {"a": jnp.full((4,), 10.0), "b": jnp.full((4,), 0.1)}  # norms 20 and 0.2
  out, _ = tx.update(g, tx.init(g))
  assert float(jnp.linalg.norm(out["a"])) == pytest.approx(3.0 * 20 / (20 + 1e-6), rel=1e-5)
  np.testing.assert_allclose(out["b"], g["b"])  # under the threshold: untouched


def test_per_tensor_clip_treats_scanned_blocks_layer_by_layer():
  tx = optim.clip_per_tensor(3.0)
  layers = [jnp.full((4,), v) for v in (10.0, 0.1, 2.0)]  # norms 20, 0.2, 4
  g = {
    "backbone": {
      "blocks": {"block": {"fc1": {"kernel": jnp.stack(layers)}}},
      "block_3": {"fc1": {"kernel": layers[0]}},
    }
  }
  out, _ = tx.update(g, tx.init(g))
  stacked = out["backbone"]["blocks"]["block"]["fc1"]["kernel"]
  for i, layer in enumerate(layers):
    alone, _ = tx.update({"k": layer}, tx.init({"k": layer}))
    np.testing.assert_allclose(stacked[i], alone["k"], rtol=1e-6)
  np.testing.assert_allclose(out["backbone"]["block_3"]["fc1"]["kernel"], stacked[0], rtol=1e-6)


def test_decay_mask_dino_vs_sere():
  params = {
    "dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
    "ln": {"scale": jnp.ones(2)},
    # torch's weight_g [out, 1] and iBOT's masked_embed [1, D] are 2-D there: decayed.
    "last_layer": {"kernel": jnp.ones((2, 3)), "g": jnp.ones(3)},
    "mask_token": jnp.ones(2),
  }
  dino = optim.decay_mask(params, decay_biases=False)
  sere = optim.decay_mask(params, decay_biases=True)
  assert dino == {
    "dense": {"kernel": True, "bias": False},
    "ln": {"scale": False},
    "last_layer": {"kernel": True, "g": True},
    "mask_token": True,
  }
  assert sere == {
    "dense": {"kernel": True, "bias": True},
    "ln": {"scale": False},
    "last_layer": {"kernel": True, "g": True},
    "mask_token": True,
  }


def _make(freeze_steps):
  params = {
    "body": {"kernel": jnp.ones((3, 3))},
    "head": {"last_layer": {"kernel": jnp.ones((3, 2))}},
  }
  tx = optim.make_optimizer(
    params,
    lr=schedules.cosine_schedule(1e-2, 1e-2, 10),
    weight_decay=lambda s: 0.1,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    clip_grad=None,
    freeze_steps=freeze_steps,
    decay_biases=False,
  )
  return params, tx


def test_frozen_last_layer_skips_adamw_entirely_then_starts_fresh():
  params, tx = _make(freeze_steps=2)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates = []
  for _ in range(3):
    u, state = tx.update(grads, state, params)
    updates.append(u)
  # Frozen: no update at all, not even weight decay.
  assert float(jnp.abs(updates[0]["head"]["last_layer"]["kernel"]).max()) == 0.0
  assert float(jnp.abs(updates[1]["head"]["last_layer"]["kernel"]).max()) == 0.0
  # Unfrozen at step 2: its first Adam step (bias-corrected) equals the body's first step.
  np.testing.assert_allclose(
    updates[2]["head"]["last_layer"]["kernel"][0, 0], updates[0]["body"]["kernel"][0, 0], rtol=1e-6
  )


def test_no_freeze_means_all_params_move():
  params, tx = _make(freeze_steps=0)
  state = tx.init(params)
  u, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert float(jnp.abs(u["head"]["last_layer"]["kernel"]).min()) > 0


def test_weight_decay_is_applied_with_its_schedule_and_mask():
  # Regression: a callable mask handed to inject_hyperparams was taken for a schedule,
  # which silently switched weight decay off.
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  tx = optim.make_optimizer(
    params,
    lr=lambda s: 0.1,
    weight_decay=lambda s: 0.4 + s,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    clip_grad=None,
    freeze_steps=0,
    decay_biases=False,
  )
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  u0, state = tx.update(zeros, state, params)
  u1, _ = tx.update(zeros, state, params)
  np.testing.assert_allclose(u0["dense"]["kernel"], -0.1 * 0.4, rtol=1e-6)  # -lr * wd * w
  np.testing.assert_allclose(u1["dense"]["kernel"], -0.1 * 1.4, rtol=1e-6)  # the schedule moves
  np.testing.assert_array_equal(u0["dense"]["bias"], 0.0)  # masked: no decay on biases
