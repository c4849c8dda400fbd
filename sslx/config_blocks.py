"""Config blocks that every method's config file shares (configs/*.py build on these).

Only data that is the same for all methods lives here: the ImageNet input block, the checkpoint
and kNN blocks, the Fashion-MNIST source, and preset selection. What a method changes stays in
its own config file, next to the recipe it cites.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

FASHION_MNIST_PATH = "/usr/share/datasets/fashion-mnist"
# Per-channel input normalisation (config.augment.mean / std).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FMNIST_MEAN = (0.2860, 0.2860, 0.2860)
FMNIST_STD = (0.3530, 0.3530, 0.3530)


def vit_model() -> ml_collections.ConfigDict:
  """config.model of a ViT-S/16 (DINO's; fine-tuning starts from the same block)."""
  return ml_collections.ConfigDict(
    dict(
      arch="vit",
      variant="small",
      patch_size=16,
      pos_grid=14,
      drop_path_rate=0.1,
      dtype="bfloat16",
      # 'auto': cuDNN's fused attention on GPUs, explicit elsewhere (models/vit.py).
      scan_blocks=False,
      attention="auto",
      # 'learned' positions (DINO) or fixed 'sincos' (MoCo v3); parameter init 'dino' or 'mocov3'.
      pos_embed="learned",
      init_scheme="dino",
      # True: backward recomputes LayerNorm/GELU from their inputs (less activation memory).
      recompute_elementwise=False,
      # 0 = take it from the variant; set to override (e.g. a custom small ViT).
      embed_dim=0,
      depth=0,
      num_heads=0,
      mlp_ratio=0.0,
    )
  )


# pred_start_epoch: no masks before this epoch (iBOT's loader); crops are drawn the same anyway.
NO_MASKS = dict(
  scheme="none",
  ratios=(0.0, 0.3),
  ratio_vars=(0.0, 0.2),
  num_masked=75,
  min_area=16,
  max_area=0,
  aspect=0.3,
  exact=False,
  pred_start_epoch=0,
)


def imagenet_data(
  *, global_crops: dict, local_crops: dict, masks: dict | None = None
) -> ml_collections.ConfigDict:
  """config.data for ImageNet-1k from TFDS with multi-crop views (sslx/data/pipeline.py)."""
  return ml_collections.ConfigDict(
    dict(
      source="tfds",
      tfds_name="imagenet2012",
      tfds_data_dir="",
      path="",
      train_split="train",
      eval_train_split="train",
      eval_test_split="validation",
      global_crops=global_crops,
      local_crops=local_crops,
      crop_ratio=(3 / 4, 4 / 3),
      interpolation="bicubic",
      eval_resize=256,
      eval_size=224,
      workers=8,
      read_threads=4,
      prefetch_buffer=4,
      # 'device': the host decodes into a 512 canvas and the step resamples the crops
      # (sslx/data/device_crops.py), since PIL resampling 12 crops starves a GPU; 'host': PIL.
      crops_on="device",
      canvas_size=512,
      # Block masks on the global crops' patch grid (sslx/data/masks.py).
      masks=dict(masks or NO_MASKS),
    )
  )


def checkpoint_and_eval(c: ml_collections.ConfigDict) -> None:
  """Adds config.checkpoint, config.eval (weighted kNN, DINO protocol) and
  config.skip_nonfinite_updates for ImageNet runs."""
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=2500, max_to_keep=3, async_save=True))
  # 0: a non-finite state stops the run (no checkpoint of it is written). N > 0: an update whose
  # gradients are not finite is skipped (optax.apply_if_finite; counted as optim/skipped_updates),
  # and the run stops only after N such updates in a row.
  c.skip_nonfinite_updates = 0
  c.eval = ml_collections.ConfigDict(
    dict(knn_every_steps=25000, knn_at_start=False, knn_k=20, knn_temperature=0.07, batch_size=512)
  )
  # --mode=linear_probe: 'cached' (features once, BN + Linear: fast) or 'dino' (DINO's
  # eval_linear.py: fresh crops every epoch, the [CLS] of the last n blocks; sslx/eval/probe.py).
  # The cached probes' settings are sslx/eval/probe.py's ProbeSettings defaults.
  c.probe = ml_collections.ConfigDict(
    dict(
      protocol="cached",
      linear=dict(optimizer="sgd", lr=0.1, batch_size=256, epochs=10, warmup_epochs=1.0),
      attentive=dict(
        optimizer="sgd", lr=0.1, batch_size=256, epochs=10, warmup_epochs=1.0, num_heads=0
      ),
      dino=dict(
        n_last_blocks=4,
        avgpool=False,
        lr_per_256=0.001,
        batch_size=1024,
        epochs=100,
        momentum=0.9,
        crop_scale=(0.08, 1.0),
        max_host_gib=16.0,
      ),
      max_train=0,
      max_test=0,
      seed=0,
    )
  )


def scale_out(c: ml_collections.ConfigDict) -> None:
  """Adds the scale-out knobs every method shares: config.sharding and config.optim.accum_steps.

  config.sharding.fsdp_min_size: with config.mesh.fsdp = k > 1, every tensor of the train state
  (student and teacher parameters, optimiser moments, loss state) with at least this many
  elements is split k ways along its largest dimension divisible by k (never the leading layer
  axis of blocks stacked by `model.scan_blocks`); smaller or indivisible tensors stay whole on
  every device (sslx/train/sharding.py). 2**14 keeps biases, norms and small heads replicated,
  where the all-gather would cost more than the memory saved, and splits every ViT-S/16 block
  matrix (the smallest, attention's 384 x 384 output projection, has 147,456 elements).

  config.optim.accum_steps: k > 1 splits each step's batch into k micro-batches whose gradients
  are averaged before the one optimiser and EMA update (sslx/train/trainer.py); the loss state
  combines by the method's rule (sslx/methods/accumulation.py). It must divide batch_size.
  """
  c.sharding = ml_collections.ConfigDict(dict(fsdp_min_size=2**14))
  c.optim.accum_steps = 1


def use_fashion_mnist(c: ml_collections.ConfigDict, size: int) -> None:
  """Points config.data at the Debian Fashion-MNIST files, evaluated at `size` px.

  Crops stay on the host (PIL): 28-px images cost nothing to resample. No read threads: the
  prefetch thread alone makes a batch in a tenth of a step, and four threads contending for the
  GIL on two cores used 40% more CPU for the same records (experiments/bench/RESULTS.md,
  "Fashion-MNIST host pipeline"). The kNN runs at the start (the random-init baseline) and at
  the end.
  """
  c.data.update(
    source="fashion_mnist",
    path=FASHION_MNIST_PATH,
    eval_test_split="test",
    eval_resize=size,
    eval_size=size,
    workers=0,
    read_threads=0,
    prefetch_buffer=4,
    crops_on="host",
  )
  # Batch 250: the CPU feature forward is 30% faster than at 1000, whose block activations
  # outgrow the caches (experiments/bench/RESULTS.md, evaluation batch size).
  c.eval.update(knn_every_steps=10**9, knn_at_start=True, batch_size=250)


def smoke_run(c: ml_collections.ConfigDict, checkpoint_every: int) -> None:
  """A few steps for tests: synchronous checkpoints, no kNN."""
  c.checkpoint.update(every_steps=checkpoint_every, async_save=False)
  c.eval.update(knn_every_steps=0, knn_at_start=False, batch_size=500)


def select_preset(
  presets: dict[str, Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict]],
  base: Callable[[], ml_collections.ConfigDict],
  arg: str | None,
  file_name: str,
) -> ml_collections.ConfigDict:
  """presets[arg](base()), locked so that unknown override keys fail instead of being added."""
  arg = (arg or "").strip()
  if arg not in presets:
    raise ValueError(
      f"unknown preset {arg!r} for {file_name}; valid: {sorted(k for k in presets if k)}"
    )
  c = presets[arg](base())
  c.lock()
  return c
