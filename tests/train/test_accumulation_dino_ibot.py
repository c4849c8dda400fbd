"""Gradient accumulation reproduces the big-batch step for DINO and iBOT: loss, centres,
gradient norm and parameters after two steps, with k = 2 and k = 4 micro-batches.

Tolerances: the micro-batch sums run in another order than the big batch's reductions
(float32, ~1e-7 relative). Adam moves every parameter by about lr whatever its gradient's
size, so a parameter whose gradient is at float-noise level can move differently by a
fraction of lr (1.25e-4 here): params get atol 2e-5. Adam cannot see a wrong gradient
scale, so the gradient norm and the loss are compared tightly as well.
"""

import numpy as np
import pytest
from accumulation_setup import Steps, flat, host_batches, smoke_config

CASES = {"dino": ("center",), "ibot": ("center", "center_patch")}


@pytest.fixture(scope="module", params=sorted(CASES))
def runs(request):
  name = request.param
  config = smoke_config(name)
  steps = Steps(config)
  batches = host_batches(config, 2)
  return name, {k: steps.run(k, batches) for k in (1, 2, 4)}


def test_accumulated_steps_equal_the_big_batch_step(runs):
  name, by_k = runs
  big_metrics, big = by_k[1]
  if name == "ibot":  # the patch loss is live: some images of the batch are masked
    assert big_metrics[0]["masked_fraction"] > 0 and big_metrics[0]["loss_patch"] > 0
  for k in (2, 4):
    metrics, state = by_k[k]
    for got, want in zip(metrics, big_metrics):
      np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5, err_msg=f"{name} k={k}")
      np.testing.assert_allclose(got["l2_grads"], want["l2_grads"], rtol=1e-4)
    for key in CASES[name]:  # one centre update per step, from the whole batch's teacher outputs
      np.testing.assert_allclose(
        state.loss_state[key], big.loss_state[key], atol=1e-6, err_msg=f"{name} {key} k={k}"
      )
      assert np.abs(big.loss_state[key]).max() > 1e-3  # the centre did move
    np.testing.assert_allclose(flat(state.params), flat(big.params), atol=2e-5)
    np.testing.assert_allclose(flat(state.teacher_params), flat(big.teacher_params), atol=2e-5)
    assert int(state.step) == 2
