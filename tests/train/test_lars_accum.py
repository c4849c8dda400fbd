"""LARS (optax.lars through the BYOL hook) and gradient accumulation in the trainer."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sslx.config_check import load_config_file
from sslx.methods.accumulation import LossStateRule
from sslx.methods.base import Method
from sslx.methods.byol import Byol, decay_and_adapt_mask
from sslx.train import trainer
from sslx.train.state import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def byol_smoke():
  return load_config_file(os.path.join(ROOT, "configs/byol.py:smoke"))


def test_decay_and_adapt_mask_excludes_biases_and_batchnorm():
  params = {
    "conv": {"kernel": jnp.ones((3, 3, 2, 4))},
    "bn": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
    "fc": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)},
  }
  mask = decay_and_adapt_mask(params)
  assert mask == {
    "conv": {"kernel": True},
    "bn": {"scale": False, "bias": False},
    "fc": {"kernel": True, "bias": False},
  }


def test_lars_step_matches_a_hand_computation():
  config = byol_smoke()
  method = Byol(config)
  lr, wd, eta = 0.7, config.optim.weight_decay, config.optim.trust_coefficient
  with config.unlocked():
    config.optim.weight_decay = wd = 0.01  # large enough to matter in the check
  tx = method.lars(lambda step: lr)
  rng = np.random.default_rng(0)
  params = {
    "fc": {
      "kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=3), jnp.float32),
    },
    "bn": {"scale": jnp.asarray(rng.normal(size=3), jnp.float32)},
  }
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  w, g = np.asarray(params["fc"]["kernel"]), np.asarray(grads["fc"]["kernel"])
  u = g + wd * w
  trust = eta * np.linalg.norm(w) / np.linalg.norm(u)  # optax: eta |w| / |g + wd w|
  np.testing.assert_allclose(updates["fc"]["kernel"], -lr * trust * u, rtol=1e-5)
  # Excluded: no decay, no trust ratio, just the (momentum-0 first step) SGD update.
  np.testing.assert_allclose(
    updates["fc"]["bias"], -lr * np.asarray(grads["fc"]["bias"]), rtol=1e-6
  )
  np.testing.assert_allclose(
    updates["bn"]["scale"], -lr * np.asarray(grads["bn"]["scale"]), rtol=1e-6
  )
  # Second step: heavy-ball momentum 0.9 on the lr-scaled updates.
  updates2, _ = tx.update(grads, state, params)
  np.testing.assert_allclose(
    updates2["fc"]["bias"], -lr * 1.9 * np.asarray(grads["fc"]["bias"]), rtol=1e-5
  )


def test_byol_schedules():
  config = byol_smoke()
  with config.unlocked():
    config.batch_size = 4096
    config.optim.update(lr_per_256=0.3, warmup_epochs=10.0, weight_decay=1e-6)
  # 10 warm-up epochs of 10 steps, then a per-step cosine over the remaining 900 steps.
  _, scheds = Byol(config).optimizer(None, steps_per_epoch=10, total_steps=1000)
  assert float(scheds["lr"](999)) < 1e-3
  np.testing.assert_allclose(
    float(scheds["lr"](200)), 4.8 * (1 + np.cos(np.pi * 100 / 900)) / 2, rtol=1e-5
  )
  np.testing.assert_allclose(
    float(scheds["lr"](201)), 4.8 * (1 + np.cos(np.pi * 101 / 900)) / 2, rtol=1e-5
  )
  np.testing.assert_allclose(float(scheds["lr"](99)), 4.8, rtol=1e-6)  # end of warm-up
  np.testing.assert_allclose(float(scheds["momentum"](0)), 0.99, rtol=1e-7)
  np.testing.assert_allclose(float(scheds["momentum"](500)), 0.995, rtol=1e-6)
  np.testing.assert_allclose(float(scheds["weight_decay"](3)), 1e-6)


# ---- gradient accumulation ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LinearToy(Method):
  """A BN-free method: a linear map of the mean view regressed onto the other view's mean."""

  config: ml_collections.ConfigDict
  loss_state_rule = LossStateRule.THREADED

  def features(self, eval_params, images):
    return images.mean(axis=(1, 2)) @ eval_params["w"]

  def init(self, rng, image_shape):
    return {"w": jax.random.normal(rng, (3, 3)), "b": jnp.zeros(3)}, {"count": jnp.zeros([])}

  def teacher_params(self, params):
    return params

  def schedules(self, steps_per_epoch, total_steps):
    return {}

  def loss(self, params, teacher_params, loss_state, views, rng, sched):
    g = views["global"].mean(axis=(2, 3))  # [B, 2, 3]
    pred = g[:, 0] @ params["w"] + params["b"]
    target = g[:, 1] @ teacher_params["w"]
    loss = jnp.mean(jnp.sum((pred - target) ** 2, axis=-1))
    return loss, ({"count": loss_state["count"] + 1}, {"pred_mean": jnp.mean(pred)})


def _toy_step(accum_steps: int, method_cls=LinearToy):
  config = byol_smoke()
  with config.unlocked():
    config.optim.accum_steps = accum_steps
  method = method_cls(config)
  tx = optax.sgd(0.5, momentum=0.9)
  m = 0.9
  scheds = {"lr": lambda s: 0.5, "weight_decay": lambda s: 0.0, "momentum": lambda s: m}
  step = jax.jit(trainer.make_train_step(config, method, tx, scheds, {}))
  params, loss_state = method.init(jax.random.PRNGKey(0), (8, 8, 3))
  teacher = jax.tree.map(lambda x: x + 0.1, params)
  state = TrainState(
    step=jnp.zeros([], jnp.int32),
    params=params,
    teacher_params=teacher,
    opt_state=tx.init(params),
    loss_state=loss_state,
    rng=jax.random.PRNGKey(1),
  )
  batch = {
    "global_crops": jnp.asarray(
      np.random.default_rng(0).integers(0, 255, (8, 2, 8, 8, 3)), jnp.uint8
    ),
    "local_crops": jnp.zeros((8, 0, 4, 4, 3), jnp.uint8),
  }
  new_state, metrics = step(state, batch)
  return state, new_state, metrics


def test_accumulating_4_micro_batches_equals_one_big_batch_step():
  """Exact up to float error for a BN-free model (BatchNorm statistics would be per
  micro-batch, the one stated difference)."""
  _, big, m_big = _toy_step(1)
  _, acc, m_acc = _toy_step(4)
  np.testing.assert_allclose(float(m_acc["loss"]), float(m_big["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(m_acc["pred_mean"]), float(m_big["pred_mean"]), rtol=1e-4)
  for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(big.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(m_acc["l2_grads"]), float(m_big["l2_grads"]), rtol=1e-5)
  assert int(acc.step) == 1
  assert float(acc.loss_state["count"]) == 4.0  # loss state threaded through 4 micro-batches


def test_mean_rule_updates_the_loss_state_once():
  @dataclasses.dataclass(frozen=True)
  class MeanToy(LinearToy):
    loss_state_rule = LossStateRule.MEAN

  _, big, m_big = _toy_step(1, MeanToy)
  _, acc, m_acc = _toy_step(4, MeanToy)
  assert float(acc.loss_state["count"]) == 1.0  # each micro-batch counted from 0; mean of 1s
  np.testing.assert_allclose(float(m_acc["loss"]), float(m_big["loss"]), rtol=1e-5)


def test_ema_teacher_updates_once_per_optimizer_step():
  before, after, _ = _toy_step(4)
  expected = jax.tree.map(lambda t, s: 0.9 * t + 0.1 * s, before.teacher_params, after.params)
  for a, b in zip(jax.tree.leaves(after.teacher_params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_accumulation_needs_a_rule_and_a_dividing_k():
  @dataclasses.dataclass(frozen=True)
  class NoRule(LinearToy):
    loss_state_rule = None

  with pytest.raises(TypeError, match="loss_state_rule"):
    _toy_step(2, NoRule)
  from sslx.methods import make_method

  for name in ("dino", "ibot", "mocov3", "cae", "sere_dino", "sere_ibot", "sere_mocov3", "byol"):
    config = load_config_file(os.path.join(ROOT, f"configs/{name}.py:smoke"))
    with config.unlocked():
      config.optim.accum_steps = 2 if config.batch_size % 2 == 0 else 1
    assert trainer.check_accumulation(config, make_method(config)) == 2, name
  with pytest.raises(trainer.AccumulationError, match="divide") as err:
    _toy_step(3)
  assert "\n" not in str(err.value)  # main.py prints a UserError as one line
