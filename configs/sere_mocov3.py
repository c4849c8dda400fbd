r"""MoCo v3 + SERE (SERE paper, Table 7): MoCo v3's loss plus the spatial and channel relations.

The SERE release ships no MoCo v3 recipe; alpha and beta for it are not published
(docs/fidelity.md, SERE). We keep SERE's defaults alpha = beta = 1 (base
loss weight 1) and SERE's bias decay; everything else is configs/mocov3.py. With two views only,
there are no global-local pairs. sslx takes the relation heads M from the backbone's heads
(methods/sere.py; `config.sere.num_heads` overrides): 12 for MoCo v3's ViT-S, where the
paper's M = 6 is DINO's ViT-S; M for MoCo v3 is not published.

  python main.py --config=configs/sere_mocov3.py --workdir=/tmp/sere_mocov3 \
      --config.data.tfds_data_dir=$HOME/tensorflow_datasets
  python main.py --config=configs/sere_mocov3.py:fashion_mnist --workdir=/tmp/sere_mocov3_fmnist
  # -> kNN top-1 after one epoch against random init and MoCo v3 alone:
  #    experiments/fashion_mnist/RESULTS.md
  python main.py --config=configs/sere_mocov3.py:smoke --workdir=/tmp/sere_mocov3_smoke
"""

import os

import ml_collections

from sslx.config_check import load_config_file

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = (arg or "").strip()
  c = load_config_file(os.path.join(HERE, f"mocov3.py:{arg}"))
  with c.unlocked():
    c.sere.update(enabled=True, alpha=1.0, beta=1.0)
  c.lock()
  return c
