"""KoLeo against DINOv2's official KoLeoLoss (fixture: tests/fixtures/official_losses/
make_golden_koleo.py), and the add-on stacked on DINO with SERE."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx.config_check import load_config_file
from sslx.losses.koleo import koleo_loss
from sslx.methods import make_method
from sslx.methods.koleo import WithKoLeo
from sslx.methods.sere import WithSere

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
GOLDEN = np.load(os.path.join(ROOT, "tests/fixtures/official_losses/golden_koleo.npz"))
CASES = sorted({k.split(".")[0] for k in GOLDEN if not k.startswith("meta")})


@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradient_equal_the_official(case):
  x = jnp.asarray(GOLDEN[f"{case}.x"])
  loss, grad = jax.value_and_grad(koleo_loss)(x)
  # rtol 1e-5: two rows 1e-4 apart ('near_duplicates') have a distance whose float32 rounding
  # depends on the order of the normalisation's operations (4e-6 relative seen there).
  np.testing.assert_allclose(loss, GOLDEN[f"{case}.loss"], rtol=1e-5, atol=1e-6)
  # The gradient scales as 1 / distance: for rows 1e-4 apart, float32's 1e-7 rounding of the
  # normalised rows is a 1e-3 relative error of that distance in either implementation.
  rtol = 5e-3 if case == "near_duplicates" else 2e-4
  np.testing.assert_allclose(grad, GOLDEN[f"{case}.grad"], rtol=rtol, atol=2e-6)


def test_per_crop_sum_as_dinov2_uses_it():
  x = jnp.asarray(GOLDEN["crops.x"])  # rows: crop 0 of 6 images, then crop 1
  total = koleo_loss(x[:6]) + koleo_loss(x[6:])
  np.testing.assert_allclose(total, GOLDEN["crops.per_crop_sum"], rtol=2e-6)


def _config(**updates):
  c = load_config_file(os.path.join(ROOT, "configs/sere_dino.py:smoke"))
  with c.unlocked():
    c.koleo.enabled = True
    for k, v in updates.items():
      setattr(c, k, v)
  return c


def test_addons_stack_in_order_and_keep_the_base_network():
  method = make_method(_config())
  assert isinstance(method, WithKoLeo) and isinstance(method.base, WithSere)
  key = jax.random.PRNGKey(3)
  stacked, _ = method.init(key, (28, 28, 3))
  plain_cfg = _config()
  with plain_cfg.unlocked():
    plain_cfg.koleo.enabled = plain_cfg.sere.enabled = False
  plain, _ = make_method(plain_cfg).init(key, (28, 28, 3))
  for name in plain:  # KoLeo has no parameters; SERE adds its heads; DINO's are unchanged
    for a, b in zip(jax.tree.leaves(plain[name]), jax.tree.leaves(stacked[name])):
      np.testing.assert_array_equal(a, b)
  assert set(stacked) - set(plain) == {"sere_global", "sere_local"}


def test_dino_sere_koleo_trains_and_logs_each_term(tmp_path):
  import json

  from sslx.train import trainer

  config = _config()
  with config.unlocked():
    config.total_steps = 2
    config.log_every_steps = 1
    config.koleo.weight = 0.1
  trainer.run(config, str(tmp_path))
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  last = [r for r in rows if "loss" in r][-1]
  for term in ("loss_koleo", "loss_before_koleo", "loss_spatial", "loss_channel", "loss_base"):
    assert np.isfinite(last[term]), term
  # The total is the SERE mix plus 0.1 x KoLeo (two global crops: the sum of two losses).
  assert last["loss"] == pytest.approx(
    last["loss_before_koleo"] + 0.1 * last["loss_koleo"], rel=1e-5
  )
  assert last["loss_koleo"] > 0
