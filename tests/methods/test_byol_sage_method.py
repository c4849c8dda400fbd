"""BYOL and SaGe through the trainer (smoke presets) and SaGe's frozen evaluator."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx.config_check import load_config_file
from sslx.methods import make_method
from sslx.methods.sage import EvaluatorNotFound, SageConfigError, load_evaluator
from sslx.train import checkpoint as ckpt_lib
from sslx.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config(name, **updates):
  c = load_config_file(os.path.join(ROOT, f"configs/{name}"))
  with c.unlocked():
    for key, value in updates.items():
      node = c
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return c


@pytest.fixture(scope="module")
def byol_workdir(tmp_path_factory):
  """Two BYOL smoke steps with 2 micro-batches per step; its checkpoint is SaGe's evaluator."""
  workdir = str(tmp_path_factory.mktemp("byol"))
  res = trainer.run(config("byol.py:smoke", total_steps=2, **{"optim.accum_steps": 2}), workdir)
  assert res["step"] == 2
  return workdir


def test_byol_smoke_trains_and_knn_uses_target_running_stats(byol_workdir):
  ckpt = ckpt_lib.Checkpointer(byol_workdir, async_save=False)
  parts = ckpt.restore_parts(2, ("params", "teacher_params", "loss_state"))
  ckpt.close()
  assert set(parts["params"]) == {"encoder", "projector", "predictor"}
  assert set(parts["teacher_params"]) == {"encoder", "projector"}
  # The target's BN running statistics moved away from their init (mean 0) by its own passes.
  mean = parts["loss_state"]["target_stats"]["encoder"]["stem_bn"]["mean"]
  assert np.abs(np.asarray(mean)).max() > 0
  method = make_method(config("byol.py:smoke"))
  eval_params = method.eval_params(parts["teacher_params"], parts["loss_state"])
  feats = method.features(eval_params, jnp.zeros((3, 32, 32, 3)))
  assert feats.shape == (3, 32)  # ResNet-10 width 4: c5 has 8 * 4 channels


def test_sage_smoke_with_a_byol_evaluator_keeps_it_frozen(byol_workdir, tmp_path):
  c = config("sage.py:smoke", total_steps=2, **{"sage.evaluator_path": byol_workdir})
  res = trainer.run(c, str(tmp_path))
  assert res["step"] == 2
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  state = ckpt.restore_parts(2, ("params", "opt_state", "loss_state"))
  ckpt.close()
  assert "decoder" in state["params"] and "evaluator" not in state["params"]
  evaluator = load_evaluator(byol_workdir)
  # Unchanged after the steps: bit-equal to the BYOL checkpoint's EMA target.
  for a, b in zip(jax.tree.leaves(state["loss_state"]["evaluator"]), jax.tree.leaves(evaluator)):
    np.testing.assert_array_equal(a, b)


def test_sage_random_evaluator_gets_no_gradient_and_decoder_output_in_range():
  c = config("sage.py:smoke", **{"sage.ablation": "random_evaluator", "batch_size": 4})
  method = make_method(c)
  params, loss_state = jax.jit(lambda r: method.init(r, (32, 32, 3)))(jax.random.PRNGKey(0))
  assert "evaluator" in loss_state and "evaluator" not in params
  views = {
    "global": jax.random.uniform(jax.random.PRNGKey(1), (4, 2, 32, 32, 3), minval=-1, maxval=1),
    "local": jnp.zeros((4, 0, 16, 16, 3)),
  }
  teacher = method.teacher_params(params)

  def f(params, evaluator):
    state = {**loss_state, "evaluator": evaluator}
    return method.loss(params, teacher, state, views, jax.random.PRNGKey(2), {})

  (loss, (new_state, metrics)), (g_params, g_eval) = jax.jit(
    jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
  )(params, loss_state["evaluator"])
  assert np.isfinite(float(loss))
  assert float(metrics["gen_c3"]) > 0 and float(metrics["gen_pixel"]) > 0
  # The evaluator is stop-gradient'ed inside the loss: zero gradient, and unchanged state.
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_eval))
  assert float(jnp.abs(jax.tree.leaves(g_params["decoder"])[0]).max()) > 0
  for a, b in zip(
    jax.tree.leaves(new_state["evaluator"]), jax.tree.leaves(loss_state["evaluator"])
  ):
    np.testing.assert_array_equal(a, b)
  c5 = jnp.ones((4, 4, 4, 32))
  recon, _ = method.reconstruct(params, loss_state["decoder_stats"], c5, train=False)
  assert recon.shape == (4, 32, 32, 3) and float(jnp.abs(recon).max()) <= 1.0


def test_sage_missing_evaluator_fails_before_compiling(tmp_path):
  c = config("sage.py:smoke", **{"sage.evaluator_path": str(tmp_path / "nope")})
  with pytest.raises(EvaluatorNotFound, match=r"config\.sage\.evaluator_path.*configs/byol.py"):
    make_method(c)
  c = config("sage.py:smoke", **{"sage.evaluator_path": ""})
  with pytest.raises(EvaluatorNotFound, match="evaluator_path"):
    trainer.build(c, None, 10, 10)
  # Ablations that need no evaluator checkpoint build without one.
  for ablation in ("mse_only", "random_evaluator"):
    make_method(config("sage.py:smoke", **{"sage.evaluator_path": "", "sage.ablation": ablation}))


def test_sage_config_errors():
  with pytest.raises(SageConfigError, match="up_channels"):
    make_method(
      config("sage.py:smoke", **{"decoder.up_channels": (8, 8), "sage.ablation": "mse_only"})
    )
  with pytest.raises(SageConfigError, match="augment.mean"):
    make_method(
      config("sage.py:smoke", **{"augment.mean": (0.3, 0.3, 0.3), "sage.ablation": "mse_only"})
    )
  with pytest.raises(SageConfigError, match="ablation"):
    make_method(config("sage.py:smoke", **{"sage.ablation": "nope"}))


def test_sage_encoder_lr_is_mmcv_by_epoch_cosine_with_linear_warmup():
  """SaGe r50_bs64_acc8_ep300.py: lr 4.8, 300 epochs, mmcv CosineAnnealing(by_epoch, min_lr 0)
  with warm-up 'linear' over 10 epochs from ratio 1e-4: the cosine runs over all 300 epochs."""
  from sslx.methods.byol import lars_lr_schedule

  c = config("sage.py")
  spe = 10
  total = 300 * spe
  sched = lars_lr_schedule(c, spe, total)
  base = 4.8 * c.batch_size / 4096
  assert c.optim.lr_per_256 * 4096 / 256 == pytest.approx(4.8)
  regular = lambda e: 0.5 * base * (1 + np.cos(np.pi * e / 300))  # noqa: E731
  for step in (0, 7, 55, 99):  # warm-up: that epoch's cosine times r + (1 - r) i / W
    want = regular(step // spe) * (1e-4 + (1 - 1e-4) * step / 100)
    assert float(sched(step)) == pytest.approx(want, rel=1e-5), step
  for e in (10, 100, 150, 299):
    for i in (0, spe - 1):
      assert float(sched(e * spe + i)) == pytest.approx(regular(e), rel=1e-5, abs=1e-6), (e, i)
