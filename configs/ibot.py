r"""iBOT (Zhou et al., 2022): DINO's [CLS] self-distillation plus masked-patch self-distillation.

Default: the official iBOT ViT-S/16 recipe (bytedance/ibot README; docs/fidelity.md, iBOT):
batch 1024 (16 GPUs x 64), 800 epochs, 2x224 global crops at (0.25, 1) + 10x96 local crops at
(0.05, 0.25), block masks on the global crops with prob. 0.5 at a ratio ~U(0.1, 0.5) (pred_ratio
[0, 0.3], pred_ratio_var [0, 0.2]), shared head with out_dim 8192 for [CLS] and patches, no
weight-normalised last-layer freezing of g (norm_last_layer False), teacher temperature 0.04 -> 0.07
and patch temperature 0.04 -> 0.07 over 30 epochs, AdamW lr 5e-4 per 256 with 10 warm-up epochs,
weight decay 0.04 -> 0.4, momentum 0.996 -> 1, per-tensor clip 3.0, last layer frozen 1 epoch,
drop path 0.1. Everything not named is DINO's (configs/dino.py).

  # ImageNet (needs `imagenet2012` prepared for TFDS; otherwise stops at once and says how):
  python main.py --config=configs/ibot.py --workdir=/tmp/ibot_vits16 \
      --config.data.tfds_data_dir=$HOME/tensorflow_datasets
  # Fashion-MNIST on the 2-core CPU (DINO's fashion_mnist budget, masks on the 7x7 grid):
  python main.py --config=configs/ibot.py:fashion_mnist --workdir=/tmp/ibot_fmnist
  # -> kNN top-1 after one epoch against random init: experiments/fashion_mnist/RESULTS.md
  # A few steps, for tests:
  python main.py --config=configs/ibot.py:smoke --workdir=/tmp/ibot_smoke

Presets: '' / 'imagenet' (ViT-S/16), 'vit_base', 'fashion_mnist', 'smoke'.
"""

import os

import ml_collections

from sslx.config_check import load_config_file

HERE = os.path.dirname(os.path.abspath(__file__))


def ibot_on(c: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
  """Turns DINO's preset `arg` into iBOT (used by sere_ibot.py too)."""
  with c.unlocked():
    c.method = "ibot"
    small = arg not in ("", "imagenet", "vit_base")
    out_dim = c.head.out_dim if small else 8192  # small presets keep DINO's preset head size
    c.head.update(out_dim=out_dim, patch_out_dim=out_dim, shared_head=True, norm_last_layer=False)
    c.loss.update(
      teacher_temp=0.07,
      warmup_teacher_temp=0.04,
      warmup_teacher_temp_epochs=30,
      teacher_patch_temp=0.07,
      warmup_teacher_patch_temp=0.04,
      lambda1=1.0,
      lambda2=1.0,
      center_momentum_patch=0.9,
      # Epochs before the patch temperature's warm-up starts; iBOT's scripts set it
      # equal to data.masks.pred_start_epoch (e.g. 50 for Swin), 0 by default.
      mim_start_epoch=0,
    )
    c.data.masks.update(scheme="ibot", ratios=(0.0, 0.3), ratio_vars=(0.0, 0.2), aspect=0.3)
    if not small:
      c.batch_size = 1024
      c.total_epochs = 800
      c.data.global_crops.update(number=2, size=224, scale=(0.25, 1.0))
      c.data.local_crops.update(number=10, size=96, scale=(0.05, 0.25))
    else:  # fashion_mnist, smoke: DINO's preset budget and crops, iBOT's head and losses
      c.loss.update(
        teacher_temp=0.04,
        warmup_teacher_temp=0.04,
        warmup_teacher_temp_epochs=0,
        warmup_teacher_patch_temp=0.07,
      )
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config for preset `arg` (see the module docstring)."""
  arg = (arg or "").strip()
  c = ibot_on(load_config_file(os.path.join(HERE, f"dino.py:{arg}")), arg)
  c.lock()
  return c
