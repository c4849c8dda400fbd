r"""DINO (Caron et al., 2021): self-distillation with no labels.

Default: the facebookresearch/dino ViT-S/16 ImageNet recipe (main_dino.py
defaults; docs/fidelity.md, DINO): batch 512 (8 GPUs x 64), 100 epochs,
2x224 global crops at (0.4, 1) + 8x96 local crops at (0.05, 0.4), head out_dim
65536 with a weight-normalised last layer, AdamW lr 5e-4 * batch/256 with 10
warm-up epochs and a cosine to 1e-6, weight decay cosine 0.04 -> 0.4, teacher
momentum cosine 0.996 -> 1, teacher temperature 0.04 (warm-up schedule kept, from
0.04; set teacher_temp=0.07 for the longer recipes), student temperature 0.1, last
layer frozen for the first epoch, per-tensor gradient clipping at 3.0, drop path
0.1. Matmuls in bfloat16; parameters, softmax and losses in float32.

  # ImageNet (needs `imagenet2012` prepared for TFDS; the run stops at once and
  # says how when it is not; throughput on one H100 in experiments/bench/RESULTS.md):
  python main.py --config=configs/dino.py --workdir=/tmp/dino_vits16 \
      --config.data.tfds_data_dir=$HOME/tensorflow_datasets

  # Fashion-MNIST on a 2-core CPU (`make demo` runs the 'demo' preset: a wider 7-px-patch ViT):
  python main.py --config=configs/dino.py:fashion_mnist --workdir=/tmp/dino_fmnist
  # -> kNN top-1 after one epoch against random init and raw pixels, and the wall time:
  #    experiments/fashion_mnist/RESULTS.md; ten epochs on one H100
  #    (--config.total_epochs=10): experiments/bench/RESULTS.md.

  # A few steps, for tests:
  python main.py --config=configs/dino.py:smoke --workdir=/tmp/dino_smoke

Presets: '' (ImageNet ViT-S/16), 'vit_base' (ImageNet ViT-B/16, batch 512 lr
7.5e-4 per 256), 'fashion_mnist', 'demo' (`make demo`'s network: fashion_mnist with 7-px
patches, width 128), 'smoke'.
"""

import ml_collections

from sslx import config_blocks
from sslx.config_blocks import FMNIST_MEAN, FMNIST_STD, IMAGENET_MEAN, IMAGENET_STD


def base_config() -> ml_collections.ConfigDict:
  """The DINO ViT-S/16 ImageNet recipe; presets edit a copy of it."""
  c = ml_collections.ConfigDict()
  c.method = "dino"
  c.seed = 0
  c.batch_size = 512  # global, over all devices and hosts
  c.total_epochs = 100
  c.total_steps = 0  # > 0 overrides total_epochs
  c.log_every_steps = 50
  c.device_prefetch = 2
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})

  c.model = config_blocks.vit_model()
  c.head = ml_collections.ConfigDict(
    dict(out_dim=65536, hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True, use_bn=False)
  )
  c.loss = ml_collections.ConfigDict(
    dict(
      student_temp=0.1,
      teacher_temp=0.04,
      warmup_teacher_temp=0.04,
      warmup_teacher_temp_epochs=30,
      center_momentum=0.9,
    )
  )
  c.teacher = ml_collections.ConfigDict(dict(momentum=0.996, momentum_end=1.0))
  c.optim = ml_collections.ConfigDict(
    dict(
      lr_per_256=5e-4,
      min_lr=1e-6,
      warmup_epochs=10.0,
      weight_decay=0.04,
      weight_decay_end=0.4,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      clip_grad=3.0,
      freeze_last_layer_epochs=1.0,
      decay_biases=False,
    )
  )

  c.data = config_blocks.imagenet_data(
    global_crops=dict(number=2, size=224, scale=(0.4, 1.0)),
    local_crops=dict(number=8, size=96, scale=(0.05, 0.4)),
  )
  c.augment = ml_collections.ConfigDict(
    dict(
      color_jitter_prob=0.8,
      brightness=0.4,
      contrast=0.4,
      saturation=0.2,
      hue=0.1,
      grayscale_prob=0.2,
      blur_probs=(1.0, 0.1, 0.5),
      solarize_probs=(0.0, 0.2, 0.0),
      blur_sigma=(0.1, 2.0),
      mean=IMAGENET_MEAN,
      std=IMAGENET_STD,
    )
  )

  # SERE add-on (configs/sere_dino.py switches it on): spatial/channel self-relation
  # losses; grids 0 = derived from the token grids (13 and 6 at 224/96 px, patch 16).
  c.sere = ml_collections.ConfigDict(
    dict(
      enabled=False,
      alpha=1.0,
      beta=1.0,
      spatial_temp=0.5,
      channel_temp=0.1,
      other_temp=1.0,
      temps_on="teacher",
      grid_gg=0,
      grid_lg=0,
      num_heads=0,
    )
  )
  # KoLeo add-on (DINOv2's regulariser on the student's [CLS] of each global crop; weight 0.1
  # as DINOv2's default): --config.koleo.enabled=True. Stacks with SERE.
  c.koleo = ml_collections.ConfigDict(dict(enabled=False, weight=0.1))

  config_blocks.checkpoint_and_eval(c)
  config_blocks.scale_out(c)
  return c


def fashion_mnist(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A small ViT on real Fashion-MNIST, sized for a 2-core CPU (one epoch in 7-12 minutes).

  Tuned on the CPU budget (experiments/fashion_mnist/RESULTS.md): small batches and a
  fast teacher (momentum 0.95) learn most per image in one epoch; 4-px patches give
  7x7 global token grids (3x3 for the 12-px local crops).
  """
  c.batch_size = 64
  c.total_epochs = 1
  c.log_every_steps = 50
  # recompute_elementwise: same maths, about 10% faster steps and 29% less XLA temp memory on
  # the 2-core CPU (experiments/bench/RESULTS.md).
  c.model.update(
    variant="tiny",
    patch_size=4,
    pos_grid=7,
    drop_path_rate=0.0,
    dtype="float32",
    embed_dim=64,
    depth=4,
    num_heads=2,
    recompute_elementwise=True,
  )
  c.head.update(out_dim=1024, hidden_dim=512, bottleneck_dim=128)
  c.loss.update(teacher_temp=0.04, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=0)
  c.teacher.update(momentum=0.95)
  c.optim.update(lr_per_256=4e-3, warmup_epochs=0.05, freeze_last_layer_epochs=0.0, min_lr=1e-5)
  config_blocks.use_fashion_mnist(c, size=28)
  c.data.global_crops.update(number=2, size=28, scale=(0.4, 1.0))
  c.data.local_crops.update(number=6, size=12, scale=(0.1, 0.4))
  c.augment.update(blur_sigma=(0.1, 0.5), hue=0.0, saturation=0.0, mean=FMNIST_MEAN, std=FMNIST_STD)
  c.checkpoint.update(every_steps=500, max_to_keep=2)
  return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A few steps of a tiny model on Fashion-MNIST, for tests (seconds on a CPU)."""
  c = fashion_mnist(c)
  c.batch_size = 16
  c.total_steps = 6
  c.log_every_steps = 2
  c.model.update(embed_dim=32, depth=2, num_heads=2, patch_size=4, pos_grid=7)
  c.head.update(out_dim=64, hidden_dim=64, bottleneck_dim=32)
  c.data.local_crops.update(number=2, size=16)
  c.optim.update(warmup_epochs=0.0)
  config_blocks.smoke_run(c, checkpoint_every=3)
  return c


def demo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`make demo`'s recipe: `fashion_mnist` on a wider ViT with 7-px patches (4x4 global token
  grids, 2x2 for the 14-px local crops), width 128, 4 heads. Of the networks, methods and
  epochs compared at the demo's wall time on 2 cores it learned most (kNN top-1 after one
  epoch; experiments/fashion_mnist/RESULTS.md). Its random init is also a stronger baseline:
  a 7-px patch projection is already a fair pixel-block feature.
  """
  c = fashion_mnist(c)
  c.model.update(patch_size=7, pos_grid=4, embed_dim=128, num_heads=4)
  c.data.local_crops.update(size=14)
  return c


def vit_base(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.model.variant = "base"
  c.optim.lr_per_256 = 7.5e-4
  return c


PRESETS = {
  "": lambda c: c,
  "imagenet": lambda c: c,
  "vit_base": vit_base,
  "fashion_mnist": fashion_mnist,
  "demo": demo,
  "smoke": smoke,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config for preset `arg` (see the module docstring)."""
  return config_blocks.select_preset(PRESETS, base_config, arg, "configs/dino.py")
