"""iBOT's recipe knobs: `loss.mim_start_epoch` (the patch temperature's warm-up starts late) and
`data.masks.pred_start_epoch` (no masks before it), as the official trainer and loader use them."""

import numpy as np
import pytest

from sslx.data import pipeline
from sslx.schedules import epoch_linspace_schedule


def official_patch_temps(warm, final, warmup_epochs, epochs, mim_start_epoch):
  """iBOT's per-epoch `teacher_temp2_schedule` (main_ibot.py, iBOTLoss.__init__ at da316d8):
  linspace(warm, final, warmup) then `final`, preceded by `mim_start_epoch` epochs of `warm`."""
  if mim_start_epoch == 0:
    return np.concatenate(
      [np.linspace(warm, final, warmup_epochs), np.ones(epochs - warmup_epochs) * final]
    )
  return np.concatenate(
    [
      np.ones(mim_start_epoch) * warm,
      np.linspace(warm, final, warmup_epochs),
      np.ones(epochs - warmup_epochs - mim_start_epoch) * final,
    ]
  )


@pytest.mark.parametrize("warmup,start", [(4, 0), (4, 3), (0, 3), (1, 2), (30, 50)])
def test_patch_temperature_equals_the_official_schedule(warmup, start):
  epochs, per_epoch = 100, 3
  want = official_patch_temps(0.04, 0.07, warmup, epochs, start)
  sched = epoch_linspace_schedule(0.04, 0.07, warmup, per_epoch, start_epoch=start)
  got = np.asarray([sched(step) for step in range(epochs * per_epoch)]).reshape(epochs, per_epoch)
  np.testing.assert_allclose(got, np.repeat(want[:, None], per_epoch, 1), rtol=1e-6)


def test_no_masks_before_pred_start_epoch_and_the_same_crops(fmnist_cfg):
  fmnist_cfg.masks = dict(
    scheme="ibot",
    ratios=(0.0, 0.3),
    ratio_vars=(0.0, 0.2),
    num_masked=0,
    min_area=4,
    max_area=0,
    aspect=0.3,
    exact=False,
    pred_start_epoch=0,
  )
  steps_per_epoch = 60000 // 8

  def batches(start_epoch):
    fmnist_cfg.masks.pred_start_epoch = start_epoch
    it = iter(pipeline.train_dataset(fmnist_cfg, seed=5, batch_size=8, patch_size=4))
    first = next(it)
    it.set_state({**it.get_state(), "step": steps_per_epoch})  # first batch of epoch 1
    second = next(it)
    it.close()
    return first, second

  (a0, a1), (b0, b1) = batches(0), batches(1)
  assert a0["global_masks"].any() and not b0["global_masks"].any()  # epoch 0: none with start 1
  np.testing.assert_array_equal(a1["global_masks"], b1["global_masks"])  # epoch 1: drawn
  for x, y in ((a0, b0), (a1, b1)):  # the masks never change the crops
    np.testing.assert_array_equal(x["global_crops"], y["global_crops"])
    np.testing.assert_array_equal(x["local_boxes"], y["local_boxes"])
