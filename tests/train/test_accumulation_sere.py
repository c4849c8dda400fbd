"""Gradient accumulation with the SERE add-on (DINO+SERE), k = 2 and 4 against the big batch.

SERE's heads normalise with BatchNorm over the current batch (as the official trainer, whose
`accum_iter` also sees one micro-batch at a time), so on an ordinary batch only the DINO part is
the big-batch step. On a batch whose k micro-batches hold the same images every micro-batch has
the global batch's statistics, and then the whole step (loss, centre, parameters) must be the
big-batch step. Tolerances as in test_accumulation_dino_ibot.py.
"""

import numpy as np
import pytest
from accumulation_setup import Steps, flat, host_batches, smoke_config

KS = (2, 4)


def tiled(batch, k_max=max(KS)):
  """The first B/k_max images, each repeated k_max times in a row: micro-batch j of any k
  dividing k_max takes examples j, j + k, ... and so holds every image equally often."""
  b = next(iter(batch.values())).shape[0]
  return {key: np.repeat(v[: b // k_max], k_max, axis=0) for key, v in batch.items()}


@pytest.fixture(scope="module")
def runs():
  config = smoke_config("sere_dino")
  steps = Steps(config)
  real = host_batches(config, 2)
  same = [tiled(b) for b in real]
  return ({k: steps.run(k, real) for k in (1, *KS)}, {k: steps.run(k, same) for k in (1, *KS)})


def test_dino_part_is_the_big_batch_step_on_any_batch(runs):
  real, _ = runs
  (big_m, big) = real[1]
  for k in KS:
    m, state = real[k]
    # Step 1 starts from the same parameters: DINO's loss and the centre (from the teacher's
    # outputs, which SERE does not touch) are the big batch's.
    np.testing.assert_allclose(m[0]["loss_base"], big_m[0]["loss_base"], rtol=1e-5)
    # Step 2 reports the norm of the centre step 1 left.
    np.testing.assert_allclose(m[1]["center_norm"], big_m[1]["center_norm"], rtol=1e-5)
    # The stated difference: SERE's BatchNorm sees one micro-batch, so its losses move.
    assert abs(m[0]["loss_spatial"] - big_m[0]["loss_spatial"]) > 1e-5
    assert int(state.step) == 2


def test_whole_step_is_the_big_batch_step_when_micro_batches_share_statistics(runs):
  _, same = runs
  big_m, big = same[1]
  for k in KS:
    m, state = same[k]
    for got, want in zip(m, big_m):
      for key in ("loss", "loss_spatial", "loss_channel", "loss_base"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=f"{key} k={k}")
      np.testing.assert_allclose(got["l2_grads"], want["l2_grads"], rtol=1e-4)
    np.testing.assert_allclose(state.loss_state["center"], big.loss_state["center"], atol=1e-6)
    np.testing.assert_allclose(flat(state.params), flat(big.params), atol=2e-5)
    np.testing.assert_allclose(flat(state.teacher_params), flat(big.teacher_params), atol=2e-5)
