r"""MoCo v3 (Chen, Xie, He 2021) with a ViT: InfoNCE between a predictor and a momentum encoder.

Default: the official ViT-Small recipe (facebookresearch/moco-v3 CONFIG.md / main_moco.py):
batch 1024, 300 epochs, two 224 crops at scale (0.08, 1) with BYOL's asymmetric blur (1.0 / 0.1)
and solarisation (0 / 0.2), AdamW lr 1.5e-4 per 256 with 40 warm-up epochs and a cosine to 0,
constant weight decay 0.1 on every parameter, no gradient clipping, projector 3 x 4096 -> 256
and predictor 2 x 4096 -> 256 with BatchNorm, temperature 0.2, momentum 0.99 -> 1 (cosine),
fixed 2-D sin-cos positions, a frozen random patch embedding (--stop-grad-conv1), no drop path,
MoCo v3's ViT init (xavier-uniform Linears, CLS N(0, 1e-6^2)), 12 heads in ViT-S, bilinear crops.

  python main.py --config=configs/mocov3.py --workdir=/tmp/mocov3_vits16 \
      --config.data.tfds_data_dir=$HOME/tensorflow_datasets
  python main.py --config=configs/mocov3.py:fashion_mnist --workdir=/tmp/mocov3_fmnist
  # -> kNN top-1 after one epoch against random init: experiments/fashion_mnist/RESULTS.md
  python main.py --config=configs/mocov3.py:smoke --workdir=/tmp/mocov3_smoke

Presets: '' / 'imagenet' (ViT-S/16), 'vit_base' (batch 4096), 'fashion_mnist', 'smoke'.
"""

import os

import ml_collections

from sslx.config_check import load_config_file

HERE = os.path.dirname(os.path.abspath(__file__))


def mocov3_on(c: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
  """Turns DINO's preset `arg` into MoCo v3 (used by sere_mocov3.py too)."""
  with c.unlocked():
    c.method = "mocov3"
    c.head = ml_collections.ConfigDict(
      dict(hidden_dim=4096, out_dim=256, projector_layers=3, predictor_layers=2)
    )
    c.loss = ml_collections.ConfigDict(dict(temperature=0.2))
    c.teacher.update(momentum=0.99, momentum_end=1.0)
    c.model.update(pos_embed="sincos", init_scheme="mocov3", drop_path_rate=0.0)
    c.optim.update(
      weight_decay=0.1,
      weight_decay_end=0.1,
      clip_grad=0.0,
      min_lr=0.0,
      freeze_last_layer_epochs=0.0,
      decay_biases=True,
      decay_norms=True,
      frozen="^backbone/patch_embed/",
    )
    c.data.local_crops.number = 0
    if arg in ("", "imagenet", "vit_base"):
      c.batch_size = 4096 if arg == "vit_base" else 1024
      c.total_epochs = 300
      c.optim.update(lr_per_256=1.5e-4, warmup_epochs=40.0)
      c.data.global_crops.update(number=2, size=224, scale=(0.08, 1.0))
      # moco-v3 vits.py: ViT-S has 12 heads of 32 channels (DeiT's has 6); torchvision's
      # RandomResizedCrop default, bilinear.
      c.model.num_heads = 12
      c.data.interpolation = "bilinear"
    else:  # fashion_mnist, smoke: DINO's preset budget and lr, MoCo v3's heads and loss
      c.head.update(hidden_dim=512, out_dim=128)
      c.data.global_crops.update(scale=(0.2, 1.0))
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config for preset `arg` (see the module docstring)."""
  arg = (arg or "").strip()
  c = mocov3_on(load_config_file(os.path.join(HERE, f"dino.py:{arg}")), arg)
  if arg == "smoke":
    c.head.update(hidden_dim=64, out_dim=32)
  c.lock()
  return c
