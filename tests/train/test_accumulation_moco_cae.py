"""Gradient accumulation for MoCo v3 and CAE: the documented behaviour of each.

MoCo v3 contrasts each micro-batch against its own keys (and normalises it with its own
BatchNorm statistics), so the accumulated loss is the mean of the micro-batches' own losses,
not the big batch's. CAE's loss is a per-image mean with no BatchNorm: accumulation is the
big-batch step, and its step counter (loss state) advances once per step.
"""

import numpy as np
import pytest
from accumulation_setup import Steps, flat, host_batches, micro_batch, smoke_config


@pytest.fixture(scope="module")
def moco():
  config = smoke_config("mocov3")
  return Steps(config), host_batches(config, 1)


def test_mocov3_loss_is_the_mean_of_the_micro_batch_losses(moco):
  steps, batches = moco
  k = 2
  (acc,), _ = steps.run(k, batches)
  (big,), _ = steps.run(1, batches)
  # Each micro-batch as a batch of its own, from the same initial state.
  own = [steps.run(1, [micro_batch(batches[0], j, k)])[0][0]["loss"] for j in range(k)]
  np.testing.assert_allclose(acc["loss"], np.mean(own), rtol=1e-5)
  # The stated difference from the big batch: B/k negatives per query instead of B.
  assert abs(acc["loss"] - big["loss"]) > 1e-3


@pytest.fixture(scope="module")
def cae():
  config = smoke_config("cae")
  steps, batches = Steps(config), host_batches(config, 2)
  return {k: steps.run(k, batches) for k in (1, 2)}


def test_cae_accumulation_is_the_big_batch_step(cae):
  # Tolerances as in test_accumulation_dino_ibot.py, params scaled to this preset's AdamW lr
  # (1e-3, absolute): a noise-level gradient can move a parameter by a fraction of lr.
  big_m, big = cae[1]
  m, state = cae[2]
  for got, want in zip(m, big_m):
    for key in ("loss", "loss_recon", "loss_align"):
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(got["l2_grads"], want["l2_grads"], rtol=1e-4)
  np.testing.assert_allclose(flat(state.params), flat(big.params), atol=1.5e-4)
  assert int(state.loss_state["step"]) == int(big.loss_state["step"]) == 2  # once per step
