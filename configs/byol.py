r"""BYOL (Grill et al., 2020): bootstrap your own latent, on a ResNet.

Default: the ResNet-50 ImageNet recipe as SaGe's release (OpenSelfSup) runs BYOL
(docs/fidelity.md, BYOL): effective batch 4096, 300 epochs, two
224-px views at scale (0.08, 1), blur p (1.0, 0.1), solarize p (0.0, 0.2), colour jitter
(0.4, 0.4, 0.2, 0.1) p 0.8, grey p 0.2; projector 2048 -> 4096 -> 256 and predictor
256 -> 4096 -> 256 (BN in the hidden layer); LARS lr 0.3 * batch / 256 = 4.8, momentum
0.9, trust coefficient 1e-3, weight decay 1e-6, biases and BN excluded from both decay
and adaptation; 10 warm-up epochs then a per-iteration cosine to 0; target EMA cosine
0.99 -> 1. `optim.accum_steps` splits each 4096 batch into micro-batches so fewer
devices hold it (one LARS and one EMA update per 4096 images). BYOL's paper uses lr 0.2
per 256 and wd 1.5e-6: `--config.optim.lr_per_256=0.2 --config.optim.weight_decay=1.5e-6`.

  # ImageNet (needs `imagenet2012` prepared for TFDS), e.g. on 8 devices with 2 micro-batches:
  python main.py --config=configs/byol.py --workdir=/tmp/byol_r50 \
      --config.data.tfds_data_dir=$HOME/tensorflow_datasets --config.optim.accum_steps=2
  # Fashion-MNIST on a 2-core CPU (also the evaluator for configs/sage.py:fashion_mnist), one
  # epoch; kNN top-1 and wall time in experiments/fashion_mnist/byol_sage.md:
  python main.py --config=configs/byol.py:fashion_mnist --workdir=/tmp/byol_fmnist
  # A few steps, for tests:
  python main.py --config=configs/byol.py:smoke --workdir=/tmp/byol_smoke

Presets: '' (ImageNet ResNet-50), 'fashion_mnist', 'smoke'. Measured numbers:
experiments/fashion_mnist/byol_sage.md.
"""

import ml_collections

from sslx import config_blocks
from sslx.config_blocks import IMAGENET_MEAN, IMAGENET_STD

HALF = (0.5, 0.5, 0.5)


def base_config() -> ml_collections.ConfigDict:
  """The BYOL ResNet-50 ImageNet recipe; presets edit a copy of it."""
  c = ml_collections.ConfigDict()
  c.method = "byol"
  c.seed = 0
  c.batch_size = 4096  # global and effective: one optimiser step per 4096 images
  c.total_epochs = 300
  c.total_steps = 0  # > 0 overrides total_epochs
  c.log_every_steps = 50
  c.device_prefetch = 2
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})

  # patch_size is unused by ResNets (no block masks); the data pipeline reads it.
  c.model = ml_collections.ConfigDict(
    dict(arch="resnet", depth=50, width=64, stem="imagenet", dtype="bfloat16", patch_size=32)
  )
  c.projector = ml_collections.ConfigDict(dict(hidden_dim=4096, out_dim=256))
  c.predictor = ml_collections.ConfigDict(dict(hidden_dim=4096))
  c.teacher = ml_collections.ConfigDict(dict(momentum=0.99, momentum_end=1.0))
  c.optim = ml_collections.ConfigDict(
    dict(
      lr_per_256=0.3,
      min_lr=0.0,
      warmup_epochs=10.0,
      warmup_start_ratio=0.0,
      lr_by_epoch=False,
      weight_decay=1e-6,
      momentum=0.9,
      trust_coefficient=1e-3,
    )
  )

  c.data = config_blocks.imagenet_data(
    global_crops=dict(number=2, size=224, scale=(0.08, 1.0)),
    local_crops=dict(number=0, size=96, scale=(0.05, 0.4)),
  )
  # Per view: (view 1, view 2, local views); BYOL's asymmetric blur and solarize.
  c.augment = ml_collections.ConfigDict(
    dict(
      color_jitter_prob=0.8,
      brightness=0.4,
      contrast=0.4,
      saturation=0.2,
      hue=0.1,
      grayscale_prob=0.2,
      blur_probs=(1.0, 0.1, 0.0),
      solarize_probs=(0.0, 0.2, 0.0),
      blur_sigma=(0.1, 2.0),
      mean=IMAGENET_MEAN,
      std=IMAGENET_STD,
    )
  )
  c.sere = ml_collections.ConfigDict(dict(enabled=False))
  c.koleo = ml_collections.ConfigDict(dict(enabled=False))

  config_blocks.checkpoint_and_eval(c)
  config_blocks.scale_out(c)
  return c


def fashion_mnist(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A narrow ResNet-18 on Fashion-MNIST at 32 px, sized for the 2-core CPU.

  28-px images are cropped and resized to 32 px (so the CIFAR stem's stride 8 gives a 4x4
  c5); ResNet-18 at width 8 (an eighth of the standard width, 0.18M parameters: width 16
  ran at ~21 img/s on the shared CPU, width 8 at ~54) and a projector/predictor
  64 -> 512 -> 64. Inputs normalised with mean = std = 0.5, as SaGe
  does, so this checkpoint serves as SaGe's evaluator on the same inputs. lr and budget:
  experiments/fashion_mnist/byol_sage.md.
  """
  c.batch_size = 128
  c.total_epochs = 1  # 468 steps: the one-epoch budget of the other Fashion-MNIST rows
  c.total_steps = 0
  c.log_every_steps = 20
  c.model.update(depth=18, width=8, stem="cifar", dtype="float32")
  c.projector.update(hidden_dim=512, out_dim=64)
  c.predictor.update(hidden_dim=512)
  c.teacher.update(momentum=0.99)
  # solo-learn's CIFAR BYOL LARS (lr 1.0 per 256, eta 0.02, wd 1e-5): with the ImageNet
  # eta 1e-3 a step moves each kernel by at most lr * 1e-3 = 0.05% of its norm, too slow
  # for one epoch (the 200-step run with it ended below random features).
  c.optim.update(lr_per_256=1.0, warmup_epochs=0.05, trust_coefficient=0.02, weight_decay=1e-5)
  config_blocks.use_fashion_mnist(c, size=32)
  c.data.global_crops.update(number=2, size=32, scale=(0.2, 1.0))
  c.data.local_crops.update(number=0, size=16)
  c.augment.update(blur_sigma=(0.1, 0.5), hue=0.0, saturation=0.0, mean=HALF, std=HALF)
  c.checkpoint.update(every_steps=100, max_to_keep=2)
  return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A few steps of a tiny ResNet-10 on Fashion-MNIST, for tests."""
  c = fashion_mnist(c)
  c.batch_size = 16
  c.total_steps = 4
  c.log_every_steps = 2
  c.model.update(depth=10, width=4)  # ResNet-10: half the compile time of ResNet-18
  c.projector.update(hidden_dim=32, out_dim=16)
  c.predictor.update(hidden_dim=32)
  c.optim.update(warmup_epochs=0.0)
  config_blocks.smoke_run(c, checkpoint_every=2)
  return c


PRESETS = {"": lambda c: c, "imagenet": lambda c: c, "fashion_mnist": fashion_mnist, "smoke": smoke}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config for preset `arg` (see the module docstring)."""
  return config_blocks.select_preset(PRESETS, base_config, arg, "configs/byol.py")
