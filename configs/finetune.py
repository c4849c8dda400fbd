r"""Supervised fine-tuning of a pretrained ViT (sslx/methods/finetune.py).

The backbone starts from `--init_from`: a pretraining workdir's latest checkpoint (its EMA
teacher by default, `--init_from_key=student` for the student) or a weights file (an official
DINO / iBOT / SERE / MoCo v3 checkpoint, timm names, an sslx export); or fresh with
`--random_init` (the from-scratch baseline at the same budget). The fine-tuning model
(config.model) must be the pretraining one (variant, patch size, positions); drop path may
differ. `config.model.arch` says which: 'vit' (DINO / iBOT / SERE / MoCo v3's ViT) or 'cae'
(CAE's BEiT-style encoder: layer scale, q/v biases, fixed sin-cos positions; the cae_* presets).

  # ImageNet, the SERE paper's ViT-S/16 recipe (default preset):
  python main.py --mode=finetune --config=configs/finetune.py --workdir=/ckpt/ft_s16 \
      --init_from=/ckpt/sere_ibot_s16 \
      --config.data.tfds_data_dir=$HOME/tensorflow_datasets
  # ViT-B/16 (pretrained with configs/sere_ibot.py:vit_base), and CAE's ViT-B/16 recipe:
  python main.py --mode=finetune --config=configs/finetune.py:sere_vit_b16 --workdir=/ckpt/ft_b16 \
      --init_from=/ckpt/sere_ibot_b16
  python main.py --mode=finetune --config=configs/finetune.py:cae_vit_b16 --workdir=/ckpt/ft_cae_b16 \
      --init_from=/ckpt/cae_vitb16      # a configs/cae.py workdir, or CAE's released .pth

  # Fashion-MNIST on the CPU, from the `make demo` network, and the from-scratch baseline:
  python main.py --mode=finetune --config=configs/finetune.py:demo --workdir=/tmp/ft_demo \
      --init_from=runs/demo
  python main.py --mode=finetune --config=configs/finetune.py:demo --workdir=/tmp/ft_demo_scratch \
      --random_init
  # ... and from a configs/dino.py:fashion_mnist run (the 4-px-patch, width-64 ViT):
  python main.py --mode=finetune --config=configs/finetune.py:fashion_mnist --workdir=/tmp/ft_fmnist \
      --init_from=/tmp/dino_fmnist

  # A few steps for tests (`--config.finetune.pretrained` from configs/dino.py:smoke, and
  # configs/cae.py:smoke's encoder for cae_smoke):
  python main.py --mode=finetune --config=configs/finetune.py:smoke --workdir=/tmp/ft_smoke --random_init
  python main.py --mode=finetune --config=configs/finetune.py:cae_smoke --workdir=/tmp/ft_cae_smoke \
      --init_from=/tmp/cae_smoke

Recipes (what each preset sets, and where it comes from):
* 'sere_vit_s16' (= ''): the SERE paper's ImageNet fine-tuning of ViT-S/16: 100 epochs, AdamW,
  batch 512, initial lr 1e-3 (read as the absolute lr at batch 512, i.e. 5e-4 per 256; the SERE
  code base fine-tunes with MAE's, whose `--blr` is per 256 — if the paper's 1e-3 is that `blr`,
  set --config.optim.lr_per_256=1e-3), layer-wise decay 0.65, 5 warm-up epochs, cosine to 1e-6.
  What the paper leaves out is MAE's main_finetune default: weight decay 0.05, drop path 0.1,
  RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, label smoothing 0.1, mean pooling,
  head init std 2e-5, betas (0.9, 0.999); mixup 0.8 and cutmix 1.0 as in MAE's commands.
* 'sere_vit_b16': the SERE paper gives its ViT-B/16 fine-tuning values only in a supplement;
  this preset is MAE's published ViT-B/16 command, which the SERE release points to: batch
  1024, 5e-4 per 256, layer decay 0.65, 100 epochs, drop path 0.1, the rest as above.
* 'cae_vit_b16': the CAE paper's ViT-B fine-tuning (it follows BEiT's protocol), checked
  against the paper's fine-tuning paragraph and the Atten4Vis/CAE release (its ViT-B
  fine-tuning script, `tools/run_class_finetuning.py` defaults, `models/modeling_finetune.py`):
  100 epochs, batch 4096 (128 x 32 GPUs), lr 8e-3 absolute (= 5e-4 per 256, not rescaled by
  the release), layer decay 0.65, 5 warm-up epochs from 0, weight decay 0.05 constant, drop
  path 0.1, mean pooling with fc_norm, head init x 0.001, RandAugment rand-m9-mstd0.5-inc1,
  erasing 0.25, smoothing 0.1, mixup 0.8 / cutmix 1.0, min lr 1e-6, no EMA, no clipping,
  betas (0.9, 0.999). The backbone is CAE's encoder (arch 'cae'): layer scale kept and
  trained, q/v biases, the pretraining's fixed sin-cos positions; as the release does by
  default, every block also learns BEiT's relative position bias (zero at the start), and
  fc_norm starts from the encoder's final norm (its loader renames `norm.` to `fc_norm.`).
  No weight decay on 1-D parameters (layer scale, q/v biases, norms, biases) and cls_token;
  the relative position tables are decayed, as the release's default.
* 'cae_smoke': 'smoke' with configs/cae.py:smoke's encoder (tests).
* 'fashion_mnist': configs/dino.py:fashion_mnist's 4-block ViT (4-px patches, width 64), a few
  epochs on the CPU, lighter regularisation for a small model and data set.
* 'demo': 'fashion_mnist' on the `make demo` network (configs/dino.py:demo: 7-px patches, width
  128, 4 heads).
* 'smoke': a few steps of a tiny ViT (tests).

config.eval.knn_every_steps schedules the evaluation; for this classifier it is top-1 / top-5
of the head on config.data.eval_test_split (logged as eval/top1, eval/top5), not a kNN.
"""

import ml_collections

from sslx import config_blocks
from sslx.config_blocks import FMNIST_MEAN, FMNIST_STD, IMAGENET_MEAN, IMAGENET_STD
from sslx.data.randaugment import fill_from_mean


def base_config() -> ml_collections.ConfigDict:
  """The SERE paper's ViT-S/16 ImageNet fine-tuning; presets edit a copy of it."""
  c = ml_collections.ConfigDict()
  c.method = "finetune"
  c.seed = 0
  c.batch_size = 512
  c.total_epochs = 100
  c.total_steps = 0
  c.log_every_steps = 50
  c.device_prefetch = 2
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
  c.model = config_blocks.vit_model()
  # arch='cae' only: the layer-scale init of a fresh encoder (weights from a file bring their
  # own) and BEiT's relative position bias (zero-initialised, learned).
  c.model.update(init_values=0.1, rel_pos_bias=False)
  c.finetune = ml_collections.ConfigDict(
    dict(
      # Where the backbone starts (main.py's --init_from / --init_from_key set these): a
      # pretraining workdir's latest checkpoint or a weights file, and which network
      # ('auto' = what the official evaluations read: the teacher), or fresh weights.
      pretrained="",
      weights="auto",
      random_init=False,
      num_classes=0,  # 0: the training split's
      pooling="mean",  # 'mean' (fc_norm of the mean patch token) or 'cls'
      head_init_std=0.02,
      init_scale=0.001,  # head weights ~ N(0, (0.02 * 0.001)^2) = MAE's std 2e-5
      layer_decay=0.65,
      label_smoothing=0.1,
      mixup=0.8,
      cutmix=1.0,
      mixup_prob=1.0,
      mixup_switch_prob=0.5,
      reprob=0.25,  # random erasing per image
      ema_decay=0.0,  # > 0: EMA of the weights, evaluated instead of the weights
      # arch='cae', pooling='mean': fc_norm starts from the pretrained final norm (CAE's loader)
      fc_norm_from_norm=False,
    )
  )
  c.optim = ml_collections.ConfigDict(
    dict(
      lr_per_256=5e-4,
      min_lr=1e-6,
      warmup_epochs=5.0,
      weight_decay=0.05,
      weight_decay_end=0.05,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      clip_grad=0.0,  # 0: none (MAE, BEiT); > 0: clip by the global norm
    )
  )
  c.data = config_blocks.imagenet_data(
    global_crops=dict(number=1, size=224, scale=(0.08, 1.0)),
    local_crops=dict(number=0, size=96, scale=(0.05, 0.4)),
  )
  # One crop per image, RandAugmented by PIL on the host: no canvas on the device.
  c.data.update(crops_on="host", eval_train_split="train")
  c.data.randaugment = ml_collections.ConfigDict(
    dict(policy="rand-m9-mstd0.5-inc1", fill=fill_from_mean(IMAGENET_MEAN))
  )
  c.augment = ml_collections.ConfigDict(dict(mean=IMAGENET_MEAN, std=IMAGENET_STD))
  config_blocks.checkpoint_and_eval(c)
  config_blocks.scale_out(c)
  # Top-1 / top-5 of the head once per epoch on ImageNet (2502 steps at batch 512) and at the end.
  c.eval.update(knn_every_steps=2502, batch_size=500)
  return c


def sere_vit_b16(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.model.variant = "base"
  c.batch_size = 1024
  c.optim.lr_per_256 = 5e-4
  c.eval.knn_every_steps = 1251
  return c


def _cae_backbone(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """CAE's encoder as the official fine-tuning builds it (see the module docstring)."""
  c.model.update(arch="cae", pos_embed="sincos", init_values=0.1, rel_pos_bias=True)
  c.finetune.update(pooling="mean", fc_norm_from_norm=True)
  return c


def cae_vit_b16(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c = _cae_backbone(c)
  c.model.variant = "base"
  c.batch_size = 4096
  c.optim.lr_per_256 = 8e-3 * 256 / 4096
  c.eval.knn_every_steps = 312
  return c


def demo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`fashion_mnist` on `make demo`'s network (configs/dino.py:demo: 7-px patches, width 128)."""
  c = fashion_mnist(c)
  c.model.update(patch_size=7, pos_grid=4, embed_dim=128, num_heads=4)
  return c


def fashion_mnist(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """configs/dino.py:fashion_mnist's ViT fine-tuned on Fashion-MNIST for a few CPU epochs."""
  c.batch_size = 128
  c.total_epochs = 3
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
    recompute_elementwise=True,
  )
  # A 4-block ViT on 28-px images underfits in a few CPU epochs (from random init the official
  # DINO ViT learns as slowly as ours on the same batches), so this preset drops the ImageNet
  # recipe's regularisers (mixup, RandAugment, drop path) and raises the lr: 400-step trials
  # in experiments/finetune/RESULTS.md.
  c.finetune.update(
    pooling="cls", layer_decay=0.75, mixup=0.0, cutmix=0.0, reprob=0.0, label_smoothing=0.1
  )
  c.optim.update(lr_per_256=4e-3, warmup_epochs=0.2, min_lr=1e-6)
  config_blocks.use_fashion_mnist(c, size=28)
  c.data.global_crops.update(number=1, size=28, scale=(0.5, 1.0))
  c.data.randaugment.update(policy="", fill=fill_from_mean(FMNIST_MEAN))
  c.augment.update(mean=FMNIST_MEAN, std=FMNIST_STD)
  c.checkpoint.update(every_steps=500, max_to_keep=2)
  # Evaluate the head once at the end only (use_fashion_mnist turns on a kNN at the start).
  c.eval.update(knn_every_steps=10**9, knn_at_start=False)
  return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A few steps of a tiny ViT on Fashion-MNIST, for tests (seconds on a CPU)."""
  c = fashion_mnist(c)
  c.batch_size = 16
  c.total_steps = 6
  c.log_every_steps = 2
  # The same ViT as configs/dino.py:smoke, so its checkpoints load.
  c.model.update(embed_dim=32, depth=2, num_heads=2, patch_size=4, pos_grid=7)
  # Every regulariser on, so that the tests run them all.
  c.model.drop_path_rate = 0.1
  c.finetune.update(mixup=0.8, cutmix=1.0, reprob=0.25)
  c.data.randaugment.policy = "rand-m5-mstd0.5-inc1"
  c.optim.update(warmup_epochs=0.0)
  c.checkpoint.update(every_steps=3, async_save=False)
  return c


def cae_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """'smoke' on configs/cae.py:smoke's encoder (same size), for tests."""
  return _cae_backbone(smoke(c))


PRESETS = {
  "": lambda c: c,
  "sere_vit_s16": lambda c: c,
  "sere_vit_b16": sere_vit_b16,
  "cae_vit_b16": cae_vit_b16,
  "fashion_mnist": fashion_mnist,
  "demo": demo,
  "smoke": smoke,
  "cae_smoke": cae_smoke,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config for preset `arg` (see the module docstring)."""
  return config_blocks.select_preset(PRESETS, base_config, arg, "configs/finetune.py")
