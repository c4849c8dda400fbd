r"""CAE (Chen et al., "Context Autoencoder for Self-Supervised Representation Learning").

Default: the Atten4Vis/CAE ViT-B/16 300-epoch ImageNet recipe (scripts/cae_base_300e.sh;
docs/fidelity.md, CAE): batch 2048 (64 x 32 GPUs), AdamW lr 1.5e-3 *absolute* (not
rescaled by batch), betas (0.9, 0.999), 10 warm-up epochs then cosine to 1e-5, constant weight
decay 0.05 (cls and mask tokens decayed), global-norm clipping 3.0, drop path 0.1, layer scale
0.1, regressor and decoder depth 4 at width 768, exactly 98 of 196 patches masked in BEiT blocks
(min 16 per block), one 224-px RandomResizedCrop (0.08, 1) + flip, no colour augmentation,
alignment weight 2, xavier init. Targets: 'pixels' here by default (per-patch normalised pixels,
the VIMER CAE `rgb` mode) because no tokenizer weights ship offline; the official DALL-E token
targets are `--config.cae.target=tokens --config.cae.tokenizer_path=/path/dalle_encoder.npz`
(conversion of OpenAI's encoder.pkl: sslx/models/dalle.py).

  # ImageNet (needs `imagenet2012` prepared for TFDS):
  python main.py --config=configs/cae.py --workdir=/tmp/cae_vitb16 \
      --config.data.tfds_data_dir=$HOME/tensorflow_datasets
  # Fashion-MNIST on a 2-core CPU (experiments/fashion_mnist/cae.md):
  python main.py --config=configs/cae.py:fashion_mnist --workdir=/tmp/cae_fmnist
  python main.py --config=configs/cae.py:fashion_mnist --workdir=/tmp/cae_fmnist --mode=knn
  python main.py --config=configs/cae.py:fashion_mnist --workdir=/tmp/cae_fmnist --mode=linear_probe
  python main.py --config=configs/cae.py:fashion_mnist --workdir=/tmp/cae_fmnist --mode=attentive_probe
  # A few steps, for tests:
  python main.py --config=configs/cae.py:smoke --workdir=/tmp/cae_smoke

Presets: '' (ImageNet ViT-B/16), 'vit_small' (the official ViT-S/16: 12 heads; regressor and
decoder 768 wide with 12 heads, behind a 384 -> 768 Linear + LN), 'fashion_mnist', 'smoke'.
"""

import ml_collections

from sslx import config_blocks
from sslx.config_blocks import FMNIST_MEAN, FMNIST_STD, IMAGENET_MEAN, IMAGENET_STD


def base_config() -> ml_collections.ConfigDict:
  """The CAE ViT-B/16 ImageNet recipe; presets edit a copy of it."""
  c = ml_collections.ConfigDict()
  c.method = "cae"
  c.seed = 0
  c.batch_size = 2048
  c.total_epochs = 300
  c.total_steps = 0
  c.log_every_steps = 50
  c.device_prefetch = 2
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})

  c.model = ml_collections.ConfigDict(
    dict(
      arch="vit",
      variant="base",
      patch_size=16,
      pos_grid=14,
      drop_path_rate=0.1,
      dtype="bfloat16",
      scan_blocks=False,
      embed_dim=0,
      depth=0,
      num_heads=0,
      mlp_ratio=0.0,
      init_values=0.1,
      decoder_embed_dim=0,
      decoder_num_heads=0,
      regressor_depth=4,
      decoder_depth=4,
    )
  )
  c.cae = ml_collections.ConfigDict(
    dict(target="pixels", align_weight=2.0, tokenizer_path="", vocab_size=8192, tokenizer_size=112)
  )
  # No EMA teacher: momentum 0 makes the trainer's teacher the current student.
  c.teacher = ml_collections.ConfigDict(dict(momentum=0.0, momentum_end=0.0))
  c.optim = ml_collections.ConfigDict(
    dict(
      lr=1.5e-3,
      min_lr=1e-5,
      warmup_epochs=10.0,
      weight_decay=0.05,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      clip_grad=3.0,
    )
  )

  c.data = config_blocks.imagenet_data(
    global_crops=dict(number=1, size=224, scale=(0.08, 1.0)),
    local_crops=dict(number=0, size=96, scale=(0.05, 0.4)),
    masks=dict(
      scheme="beit",
      ratios=(0.0,),
      ratio_vars=(0.0,),
      num_masked=98,
      min_area=16,
      max_area=0,
      aspect=0.3,
      exact=True,
      pred_start_epoch=0,
    ),
  )
  # CAE uses flip + crop only (colour jitter 0): every photometric probability is 0.
  c.augment = ml_collections.ConfigDict(
    dict(
      color_jitter_prob=0.0,
      brightness=0.0,
      contrast=0.0,
      saturation=0.0,
      hue=0.0,
      grayscale_prob=0.0,
      blur_probs=(0.0, 0.0, 0.0),
      solarize_probs=(0.0, 0.0, 0.0),
      blur_sigma=(0.1, 2.0),
      mean=IMAGENET_MEAN,
      std=IMAGENET_STD,
    )
  )
  c.sere = ml_collections.ConfigDict(dict(enabled=False))
  c.koleo = ml_collections.ConfigDict(dict(enabled=False))

  config_blocks.checkpoint_and_eval(c)
  config_blocks.scale_out(c)
  # Probes (sslx/eval/probe.py; paper §5.2): linear = BN(no affine) + Linear on the CLS,
  # LARS lr 6.4 at batch 16384; attentive = cross-attention from a learned query over all tokens,
  # BN(no affine), Linear, SGD momentum 0.9 lr 0.4 at batch 8192; 90 epochs, 10 warm-up, no wd.
  c.probe.update(
    dict(
      linear=dict(optimizer="lars", lr=6.4, batch_size=16384, epochs=90, warmup_epochs=10.0),
      attentive=dict(
        optimizer="sgd", lr=0.4, batch_size=8192, epochs=90, warmup_epochs=10.0, num_heads=0
      ),
    )
  )
  return c


def vit_small(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  # Atten4Vis/CAE registers cae_small_patch16_224 with 12 heads (head width 32), and
  # run_pretraining.py's defaults (decoder_embed_dim 768, decoder_num_heads 12) then give a
  # 768-wide regressor/decoder behind the encoder_to_regressor Linear + LN.
  c.model.update(variant="small", num_heads=12, decoder_embed_dim=768, decoder_num_heads=12)
  return c


def fashion_mnist(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A tiny CAE on real Fashion-MNIST for the 2-core CPU (one epoch, ~10 minutes).

  4-px patches on 28-px crops give a 7x7 grid; 24 of 49 patches (49%) are masked in blocks of at
  least 4 cells. Regressor and decoder have depth 2 (4 in the recipe) to fit the CPU budget.
  """
  c.batch_size = 64
  c.total_epochs = 1
  c.log_every_steps = 50
  c.model.update(
    variant="tiny",
    patch_size=4,
    pos_grid=7,
    drop_path_rate=0.0,
    dtype="float32",
    embed_dim=64,
    depth=4,
    num_heads=2,
    regressor_depth=2,
    decoder_depth=2,
  )
  c.optim.update(lr=1e-3, warmup_epochs=0.05, min_lr=1e-5)
  config_blocks.use_fashion_mnist(c, size=28)
  c.data.global_crops.update(number=1, size=28, scale=(0.3, 1.0))
  c.data.local_crops.update(number=0, size=12)
  c.data.masks.update(num_masked=24, min_area=4)
  c.augment.update(mean=FMNIST_MEAN, std=FMNIST_STD)
  c.checkpoint.update(every_steps=500, max_to_keep=2)
  c.probe.linear.update(optimizer="sgd", lr=0.1, batch_size=256, epochs=10, warmup_epochs=1.0)
  c.probe.attentive.update(optimizer="sgd", lr=0.05, batch_size=256, epochs=10, warmup_epochs=1.0)
  return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A few steps of a tiny model on Fashion-MNIST, for tests (seconds on a CPU)."""
  c = fashion_mnist(c)
  c.batch_size = 16
  c.total_steps = 6
  c.log_every_steps = 2
  c.model.update(embed_dim=32, depth=2, num_heads=2, regressor_depth=1, decoder_depth=1)
  c.optim.update(warmup_epochs=0.0)
  config_blocks.smoke_run(c, checkpoint_every=3)
  c.probe.linear.update(epochs=1, batch_size=64)
  c.probe.attentive.update(epochs=1, batch_size=64)
  c.probe.update(max_train=512, max_test=1000)
  return c


PRESETS = {
  "": lambda c: c,
  "imagenet": lambda c: c,
  "vit_small": vit_small,
  "fashion_mnist": fashion_mnist,
  "smoke": smoke,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config for preset `arg` (see the module docstring)."""
  return config_blocks.select_preset(PRESETS, base_config, arg, "configs/cae.py")
