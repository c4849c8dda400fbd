r"""SaGe ("Semantic-aware Generation for Self-supervised Visual Representation Learning"):
BYOL + a decoder judged by a frozen self-supervised evaluator.

Default: the paper/release recipe (docs/fidelity.md, SaGe):
ResNet-50 online/target networks and BYOL heads as configs/byol.py; decoder from the
7x7x2048 c5 (7x7 conv -> 1x1x512, transposed convs to 224², 1x1 conv, tanh) with its own
Adam lr 0.048 (10 warm-up epochs from 1e-4 of it, then constant, no decay); LARS lr 4.8 at
batch 4096 with the cosine updated per epoch and a warm-up from 1e-4 of it; EMA 0.99 -> 1;
inputs normalised with mean = std = 0.5; generation loss weights pixel 1/10, projector
1/10, c5 c4 c3 1/30 each, intra-view (each view rebuilt from its own c5). The release
accumulates 2 iterations per step (`--config.optim.accum_steps=2` gives the same
4096-image steps on half the devices).

The evaluator is a frozen ResNet + projector from an sslx BYOL workdir; it is required:
  python main.py --config=configs/byol.py --workdir=/tmp/byol_r50      # the evaluator
  python main.py --config=configs/sage.py --workdir=/tmp/sage_r50 \
      --config.sage.evaluator_path=/tmp/byol_r50 --config.data.tfds_data_dir=$HOME/tensorflow_datasets
  # Fashion-MNIST on a 2-core CPU (the evaluator is the byol preset's run), one epoch; kNN
  # top-1 and the perceptual test of the reconstructions in experiments/fashion_mnist/byol_sage.md:
  python main.py --config=configs/byol.py:fashion_mnist --workdir=/tmp/byol_fmnist
  python main.py --config=configs/sage.py:fashion_mnist --workdir=/tmp/sage_fmnist \
      --config.sage.evaluator_path=/tmp/byol_fmnist
  # Smoke (tests): byol smoke first, or --config.sage.ablation=random_evaluator
  python main.py --config=configs/byol.py:smoke --workdir=/tmp/byol_smoke
  python main.py --config=configs/sage.py:smoke --workdir=/tmp/sage_smoke

Ablations of the paper (Tables 6, 7): --config.sage.ablation=no_mse | mse_only |
random_evaluator. Measured numbers: experiments/fashion_mnist/byol_sage.md.
"""

import os

import ml_collections

from sslx.config_check import load_config_file

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """BYOL's preset `arg` turned into SaGe (see the module docstring)."""
  arg = (arg or "").strip()
  c = load_config_file(os.path.join(HERE, f"byol.py:{arg}"))
  with c.unlocked():
    c.method = "sage"
    c.augment.update(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    c.optim.update(warmup_start_ratio=1e-4, lr_by_epoch=True)
    c.decoder = ml_collections.ConfigDict(
      dict(
        bottleneck_dim=512,
        stem_channels=256,
        up_channels=(512, 256, 128, 64, 32),
        lr=0.048,
        b1=0.9,
        b2=0.999,
      )
    )
    c.sage = ml_collections.ConfigDict(
      dict(
        # An sslx BYOL workdir whose latest checkpoint's EMA target is the evaluator.
        evaluator_path="",
        ablation="none",  # none | no_mse | mse_only | random_evaluator
        weight=1.0,  # lambda on the whole generation loss
        weights=dict(pixel=0.1, proj=0.1, c5=1 / 30, c4=1 / 30, c3=1 / 30),
        detach_decoder_input=False,
      )
    )
    if arg == "fashion_mnist":
      # c5 is 4x4x64 at 32 px: 3 up-blocks; widths scaled down with the encoder.
      c.decoder.update(bottleneck_dim=128, stem_channels=64, up_channels=(64, 32, 16), lr=0.01)
      # The run is shorter than an epoch: a per-epoch cosine would never move (the recorded
      # run in experiments/fashion_mnist/byol_sage.md had it on, constant lr); per step as BYOL.
      c.optim.lr_by_epoch = False
      c.sage.evaluator_path = "/tmp/byol_fmnist"
    elif arg == "smoke":
      c.decoder.update(bottleneck_dim=16, stem_channels=8, up_channels=(8, 8, 4), lr=0.01)
      c.sage.evaluator_path = "/tmp/byol_smoke"
  c.lock()
  return c
