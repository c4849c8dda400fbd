r"""iBOT + SERE: the released SERE recipe (MCG-NKU/SERE README, main_sere.py).

Default: the SERE README ViT-S/16 command (docs/fidelity.md, SERE): batch 1024, 100 epochs,
2x224 global crops at (0.4, 1) + 10x96 local crops at (0.05, 0.4), iBOT block masks (pred_ratio
[0, 0.3], var [0, 0.2]), shared head, out_dim 8192, norm_last_layer False, teacher temperature
0.04 -> 0.07 and patch temperature 0.04 -> 0.07 over 30 epochs, per-tensor clip 0.3, alpha 0.2,
beta 0.5 (base loss weight (4 - 0.2 - 0.5)/2 = 1.65), spatial/channel teacher temperatures
0.5 / 0.1, grids 13/6, biases decayed (SERE's grouping). The student's relations come from the
masked global views. Preset 'vit_base' is the README ViT-B/16 command (lr 7.5e-4 per
256, min_lr 2e-6, teacher-temperature warm-up 50 epochs, norm_last_layer True, last layer frozen 3
epochs, crops (0.32, 1) / (0.05, 0.32)).

  python main.py --config=configs/sere_ibot.py --workdir=/tmp/sere_ibot_vits16 \
      --config.data.tfds_data_dir=$HOME/tensorflow_datasets
  python main.py --config=configs/sere_ibot.py:fashion_mnist --workdir=/tmp/sere_ibot_fmnist
  # -> kNN top-1 after one epoch against random init and iBOT alone:
  #    experiments/fashion_mnist/RESULTS.md
  python main.py --config=configs/sere_ibot.py:smoke --workdir=/tmp/sere_ibot_smoke
"""

import os

import ml_collections

from sslx.config_check import load_config_file

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = (arg or "").strip()
  c = load_config_file(os.path.join(HERE, f"ibot.py:{arg}"))
  with c.unlocked():
    c.sere.update(enabled=True, alpha=0.2, beta=0.5)
    c.optim.decay_biases = True  # SERE decays biases, unlike DINO and iBOT
    if arg in ("", "imagenet", "vit_base"):
      c.total_epochs = 100
      c.optim.clip_grad = 0.3
      c.data.global_crops.update(scale=(0.4, 1.0))
      c.data.local_crops.update(number=10, scale=(0.05, 0.4))
    if arg == "vit_base":
      c.optim.update(lr_per_256=7.5e-4, min_lr=2e-6, freeze_last_layer_epochs=3.0)
      c.loss.warmup_teacher_temp_epochs = 50
      c.head.norm_last_layer = True
      c.data.global_crops.update(scale=(0.32, 1.0))
      c.data.local_crops.update(scale=(0.05, 0.32))
  c.lock()
  return c
