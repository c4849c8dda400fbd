r"""DINO + SERE (Li et al., "SERE: Exploring Feature Self-relation for Self-supervised
Transformers"): DINO's loss plus spatial and channel self-relation losses.

Default: the SERE paper's DINO+SERE ViT-S/16 ImageNet recipe (paper §4.1;
docs/fidelity.md, SERE): batch 512, AdamW lr 5e-4 per 256 (1e-3), 100 epochs,
2x224 global crops at (0.35, 1) + 4x96 local crops at (0.05, 0.35), sampling grids
13x13 (global pairs) and 6x6 (global-local pairs), M = 6 relation heads, alpha =
beta = 1 (so the DINO loss keeps weight (4 - 1 - 1)/2 = 1), teacher temperatures
0.5 (spatial) and 0.1 (channel) against 1.0 for the student, as the released code
places them (`--config.sere.temps_on=student` for the paper's wording), biases
decayed as in the SERE code. Everything else is DINO's (configs/dino.py).

  # ImageNet (needs `imagenet2012` prepared for TFDS; otherwise stops at once and says how):
  python main.py --config=configs/sere_dino.py --workdir=/tmp/sere_dino \
      --config.data.tfds_data_dir=$HOME/tensorflow_datasets
  # Fashion-MNIST on the 2-core CPU (same budget as configs/dino.py:fashion_mnist):
  python main.py --config=configs/sere_dino.py:fashion_mnist --workdir=/tmp/sere_fmnist
  # A few steps, for tests:
  python main.py --config=configs/sere_dino.py:smoke --workdir=/tmp/sere_smoke

Measured numbers: experiments/fashion_mnist/RESULTS.md.
"""

import os

import ml_collections

from sslx.config_check import load_config_file

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """DINO's preset `arg` with SERE switched on (and the SERE paper's crops by default)."""
  arg = (arg or "").strip()
  c = load_config_file(os.path.join(HERE, f"dino.py:{arg}"))
  with c.unlocked():
    c.sere.update(enabled=True, alpha=1.0, beta=1.0)
    c.optim.decay_biases = True  # SERE decays biases, unlike DINO and iBOT
    if arg in ("", "imagenet", "vit_base"):
      c.data.global_crops.update(number=2, size=224, scale=(0.35, 1.0))
      c.data.local_crops.update(number=4, size=96, scale=(0.05, 0.35))
  c.lock()
  return c
