"""The SERE add-on on top of DINO: composition, loss mix, bad configs, no-overlap batches."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx.config_check import load_config_file
from sslx.data import augment, pipeline
from sslx.methods import Dino, WithSere, make_method
from sslx.methods.accumulation import LossStateRule
from sslx.methods.sere import SereConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(**sere):
  c = load_config_file(os.path.join(ROOT, "configs/sere_dino.py:smoke"))
  with c.unlocked():
    c.sere.update(**sere)
  return c


@pytest.fixture(scope="module")
def batch():
  c = _config()
  it = iter(pipeline.train_dataset(c.data, seed=0, batch_size=4))
  host = next(it)
  it.close()
  g, l = jax.jit(lambda r, g, l: augment.augment_multicrop(r, g, l, c.augment))(
    jax.random.PRNGKey(1), host["global_crops"], host["local_crops"]
  )
  return {
    **{k: jnp.asarray(v) for k, v in host.items() if k not in ("label", "index")},
    "global": g,
    "local": l,
  }


def _loss(method, params, batch):
  sched = {"teacher_temp": jnp.float32(0.04), "step": jnp.int32(0)}
  loss_state = {"center": jnp.zeros([method.config.head.out_dim])}
  fn = jax.jit(lambda p, b: method.loss(p, p, loss_state, b, jax.random.PRNGKey(2), sched))
  return fn(params, batch)


def test_make_method_wraps_only_when_enabled():
  assert isinstance(make_method(_config()), WithSere)
  assert isinstance(make_method(_config(enabled=False)), Dino)


def test_the_base_methods_interface_passes_through():
  config = _config()
  plain = make_method(_config(enabled=False))
  assert (
    isinstance(plain, Dino) and plain.optimizer(None, 1, 1) is None
  )  # DINO keeps the trainer's AdamW recipe

  class WithHooks(Dino):
    loss_state_rule = LossStateRule.THREADED

    def check_batch(self, batch):
      raise ValueError("checked")

  wrapped = WithSere(WithHooks(config), config)
  assert wrapped.loss_state_rule is LossStateRule.THREADED  # the base's rule, not a default
  with pytest.raises(ValueError, match="checked"):
    wrapped.check_batch({})
  assert wrapped.optimizer(None, 1, 1) is None
  # SERE asks for the overlap rectangles; plain DINO does not, so its pipeline skips them.
  assert {"gg_rects", "lg_valid"} <= wrapped.batch_keys
  assert not {"gg_rects", "lg_valid"} & plain.batch_keys


def test_sere_never_changes_the_base_networks_initial_parameters():
  """Same seed, same base network: DINO+SERE vs DINO is a fair A/B of the loss alone."""
  key = jax.random.PRNGKey(7)
  with_sere, _ = make_method(_config()).init(key, (28, 28, 3))
  plain, _ = make_method(_config(enabled=False)).init(key, (28, 28, 3))
  assert set(with_sere) == set(plain) | {"sere_global", "sere_local"}
  for name in plain:
    for a, b in zip(jax.tree.leaves(plain[name]), jax.tree.leaves(with_sere[name])):
      np.testing.assert_array_equal(a, b)


def test_base_loss_is_untouched_and_the_mix_is_official(batch):
  sere = make_method(_config(alpha=0.0, beta=0.0))
  params, _ = sere.init(jax.random.PRNGKey(0), (28, 28, 3))
  total, (_, m) = _loss(sere, params, batch)
  dino_only = Dino(sere.config)
  base_params = {k: v for k, v in params.items() if not k.startswith("sere_")}
  base, _ = _loss(dino_only, base_params, batch)
  # The base term is DINO's loss exactly; alpha = beta = 0 leaves (4 - 0 - 0)/2 = 2 x base
  # (the official mix), with no SERE term.
  assert float(m["loss_base"]) == float(base)
  assert float(total) == pytest.approx(2.0 * float(base), rel=1e-6)
  mixed = make_method(_config(alpha=0.2, beta=0.5))
  total2, (_, m2) = _loss(mixed, params, batch)
  want = (
    1.65 * float(m2["loss_base"])
    + 0.2 * float(m2["loss_spatial"])
    + 0.5 * float(m2["loss_channel"])
  )
  assert float(total2) == pytest.approx(want, rel=1e-6)


def test_batch_without_overlap_is_finite_and_spatial_is_log_s2(batch):
  method = make_method(_config())
  params, _ = method.init(jax.random.PRNGKey(0), (28, 28, 3))
  no_overlap = dict(batch)
  for key in ("gg_rects", "lg_rects"):
    no_overlap[key] = jnp.zeros_like(batch[key])
  for key in ("gg_valid", "lg_valid"):
    no_overlap[key] = jnp.zeros_like(batch[key])
  (total, (_, m)), grads = jax.value_and_grad(lambda p: _loss(method, p, no_overlap), has_aux=True)(
    params
  )
  assert np.isfinite(float(total))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  # smoke: 7x7 global tokens -> 6x6 grid; 4x4 local tokens -> 4x4 grid.
  assert float(m["sere/spatial_gg"]) == pytest.approx(math.log(36), abs=1e-4)
  assert float(m["sere/spatial_lg"]) == pytest.approx(math.log(16), abs=1e-4)
  # No overlap: the spatial heads receive no gradient at all.
  sp = grads["sere_global"]["spatial_predictor"]["linear"]["kernel"]
  assert float(jnp.abs(sp).max()) == 0.0


def test_teacher_gets_no_gradient(batch):
  method = make_method(_config())
  params, _ = method.init(jax.random.PRNGKey(0), (28, 28, 3))
  sched = {"teacher_temp": jnp.float32(0.04), "step": jnp.int32(0)}
  loss_state = {"center": jnp.zeros([method.config.head.out_dim])}
  g = jax.jit(
    jax.grad(lambda t: method.loss(params, t, loss_state, batch, jax.random.PRNGKey(2), sched)[0])
  )(params)
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g)) == 0.0


@pytest.mark.parametrize(
  "override,match",
  [
    (dict(grid_gg=1), "at least 2x2"),
    (dict(grid_gg=64), "far finer than the 7x7 token grid"),
    (dict(num_heads=5), "does not divide"),
    (dict(temps_on="both"), "temps_on"),
  ],
)
def test_bad_sere_configs_are_rejected(override, match):
  method = make_method(_config(**override))
  with pytest.raises(SereConfigError, match=match):
    method.init(jax.random.PRNGKey(0), (28, 28, 3))


def test_sere_on_a_backbone_without_patch_tokens_is_rejected():
  c = _config()
  with c.unlocked():
    c.model.arch = "resnet50"
  with pytest.raises(SereConfigError, match="needs patch tokens"):
    make_method(c).init(jax.random.PRNGKey(0), (28, 28, 3))
