"""Supervised fine-tuning of a (pre-trained) ViT with a classification head, as a `Method`.

The trainer runs it like any pretraining method (mesh, checkpoints with the data position,
resume, preemption, finite checks, metrics); what is specific lives here:

* The network: the config's backbone (`config.model.arch`: 'vit', the DINO-style ViT, or
  'cae', CAE's BEiT-style encoder with layer scale, q/v biases and fixed sin-cos positions, plus
  BEiT's relative position bias when `config.model.rel_pos_bias`) and a linear head on its [CLS] token (`pooling='cls'`) or, as
  BEiT, MAE and CAE fine-tune by default, on the LayerNorm ('fc_norm') of the mean of the last
  block's patch tokens (`pooling='mean'`; the backbone's own final norm is then unused, as
  theirs is replaced by an identity). The head's weights are N(0, head_init_std^2) times
  `init_scale` with a zero bias (BEiT: trunc_normal(.02) * 0.001, i.e. std 2e-5, which is also
  MAE's trunc_normal(std=2e-5)); the truncation at +-2 in absolute units never bites at that
  std, so it is a plain normal.
* The starting backbone (`load_backbone`): the teacher (default) or student backbone of the
  latest checkpoint of a pretraining workdir (`config.finetune.pretrained`), through the
  method's PyTorch export and back (sslx/models/torch_layout.py), so any ViT method's workdir
  works and the block layout (scanned or not) may differ from the pretraining run's; or freshly
  initialised (`config.finetune.random_init`, the from-scratch baseline).
* The optimiser (`finetune_optimizer`): AdamW with the official layer-wise lr decay
  (`layer_ids`, `layer_decay_scales`), no weight decay on biases, norms, 1-D parameters (layer
  scale and BEiT's q/v biases among them), cls_token and pos_embed, warm-up + cosine lr, and
  gradient clipping by global norm if set.
* The batch (`device_views`): one RandAugmented crop per image comes from the host (the data
  pipeline, config.data.randaugment); on the device it is normalised, randomly erased, and
  mixed (mixup / cutmix with smoothed targets, sslx/data/mixup.py).
* The loss: soft-target cross-entropy; evaluation: top-1 / top-5 of the head on the
  evaluation split (the trainer calls `logits` when `is_classifier`).
* `config.finetune.ema_decay > 0` keeps an EMA of the weights (timm's ModelEma, as BEiT's
  `--model_ema`) in the trainer's teacher slot, and evaluation reads the EMA.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import linen as nn

from sslx import schedules
from sslx.data import augment
from sslx.data import mixup as mixup_lib
from sslx.errors import UserError
from sslx.methods.accumulation import LossStateRule
from sslx.methods.base import Method
from sslx.methods.teacher_cls import fixed_positions
from sslx.models import beit, cae, torch_layout, vit
from sslx.models.build import ARCHS, build_backbone, build_cae_encoder

# No weight decay on these (BEiT's and MAE's `no_weight_decay()`), besides biases and norms.
# Layer scale and BEiT's q/v biases are 1-D, which BEiT's rule already exempts; named here so
# that a leading (stacked) axis cannot make them look 2-D.
NO_DECAY_NAMES = frozenset({"cls_token", "pos_embed", "gamma_1", "gamma_2", "q_bias", "v_bias"})
# Parameters of the backbone that sit below the first block (layer id 0 of the official rule).
EMBEDDING_NAMES = frozenset({"cls_token", "pos_embed", "patch_embed", "mask_token"})


class FinetuneError(UserError):
  """The fine-tuning config or its starting weights cannot be used; the message names the fix."""


def backbone_for(model_cfg: ml_collections.ConfigDict, *, drop_path: bool = True) -> nn.Module:
  """The fine-tuning backbone of `config.model`: sslx.models.vit.ViT (arch 'vit') or
  sslx.models.cae.CAEEncoder (arch 'cae'); both return 'cls' (normed) and 'prenorm' tokens.

  Raises:
    FinetuneError: an unknown arch, or an option the CAE encoder does not have.
  """
  arch = model_cfg.get("arch", "vit")
  if arch not in ARCHS:
    raise FinetuneError(f"config.model.arch={arch!r}; valid: {', '.join(ARCHS)}")
  if arch == "vit":
    return build_backbone(model_cfg, drop_path=drop_path)
  if model_cfg.get("scan_blocks", False):
    raise FinetuneError(
      "the CAE encoder (config.model.arch='cae') has no scanned blocks: set "
      "config.model.scan_blocks=False"
    )
  return build_cae_encoder(model_cfg, drop_path=drop_path)


class Classifier(nn.Module):
  """A ViT backbone and a linear classification head.

  Attributes:
    backbone: the ViT (sslx.models.vit.ViT).
    num_classes: outputs of the head.
    pooling: 'cls' (the backbone's normed [CLS]) or 'mean' (LayerNorm of the mean of the last
      block's patch tokens, before the backbone's final norm).
    head_init_std, init_scale: the head's weights are N(0, head_init_std^2) * init_scale.
  """

  backbone: nn.Module
  num_classes: int
  pooling: str = "cls"
  head_init_std: float = 0.02
  init_scale: float = 1.0

  def pooled(self, images: jax.Array, train: bool) -> jax.Array:
    out = self.backbone(images, train=train)
    if self.pooling == "mean":
      return nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32, name="fc_norm")(
        jnp.mean(out["prenorm"][:, 1:], axis=1)
      )
    return out["cls"]

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool, features_only: bool = False) -> jax.Array:
    """float [B, H, W, C] -> logits float32 [B, K] (or the pooled features [B, D])."""
    feats = self.pooled(images, train)
    if features_only:
      return feats
    std = self.head_init_std * self.init_scale
    return nn.Dense(
      self.num_classes,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      kernel_init=nn.initializers.normal(std),
      bias_init=nn.initializers.zeros,
      name="head",
    )(feats)


# ---- layer-wise lr decay -----------------------------------------------------------------------


def _name(key: Any) -> str:
  return str(getattr(key, "key", getattr(key, "name", key)))


def layer_ids(params: Any, depth: int) -> Any:
  """The official layer id of every parameter (BEiT's get_num_layer_for_vit, MAE's
  get_layer_id_for_vit), as a tree of int arrays like `params`.

  cls_token, pos_embed, patch_embed (and a mask token) -> 0; block i -> i + 1; everything else
  (the backbone's final norm, fc_norm, the head) -> depth + 1. Blocks stacked by nn.scan
  ('backbone/blocks', leading axis = the first depth - 1 blocks) get the vector [1, ..., depth - 1];
  the unscanned last block 'block_{depth-1}' gets depth.
  """

  def one(path, leaf):
    names = [_name(k) for k in path]
    if names[0] == "backbone" and len(names) > 1:
      top = names[1]
      if top in EMBEDDING_NAMES:
        return np.zeros((), np.int32)
      if top == "blocks":
        if np.shape(leaf)[0] != depth - 1:
          raise ValueError(f"stacked blocks {'/'.join(names)}: leading axis != depth - 1")
        return np.arange(1, depth, dtype=np.int32)
      if top.startswith("block_"):
        return np.asarray(int(top[len("block_") :]) + 1, np.int32)
    return np.asarray(depth + 1, np.int32)

  return jax.tree_util.tree_map_with_path(one, params)


def layer_decay_scales(params: Any, depth: int, decay: float) -> Any:
  """lr multipliers decay ** (depth + 1 - layer id) per parameter, shaped to broadcast against it
  (a stacked block parameter [depth - 1, ...] gets [depth - 1, 1, ..., 1])."""
  ids = layer_ids(params, depth)

  def scale(i, leaf):
    s = np.power(float(decay), (depth + 1 - i).astype(np.float64)).astype(np.float32)
    return s.reshape(s.shape + (1,) * (np.ndim(leaf) - s.ndim)) if s.ndim else s

  return jax.tree.map(scale, ids, params)


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
  """Multiplies each update by its entry of `scales` (a tree like the params, broadcastable).

  Placed after AdamW it scales the whole step, decoupled weight decay included, which is what a
  PyTorch parameter group with lr * lr_scale does.
  """

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: (u * s).astype(u.dtype), updates, scales), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def decay_mask(params: Any) -> Any:
  """True for parameters with weight decay: not biases, norm scales, 1-D parameters, cls_token
  or pos_embed (decided by name where scanned blocks add a leading axis)."""

  def want(path, leaf):
    name = _name(path[-1])
    if name in ("bias", "scale") or name in NO_DECAY_NAMES:
      return False
    return np.ndim(leaf) > 1

  return jax.tree_util.tree_map_with_path(want, params)


def finetune_optimizer(
  config: ml_collections.ConfigDict, params_shape: Any, steps_per_epoch: int, total_steps: int
) -> tuple[optax.GradientTransformation, dict[str, Callable]]:
  """AdamW with layer-wise lr decay and the warm-up + cosine lr -> (tx, schedules).

  The lr is `config.optim.lr_per_256 * batch / 256`, warmed up linearly from 0 over
  `warmup_epochs` and then cosine-annealed to `min_lr` (BEiT's per-iteration schedule, the one
  sslx/schedules.py reproduces); weight decay follows a cosine from `weight_decay` to
  `weight_decay_end` (equal in the recipes: constant). 'momentum' is the EMA decay of the
  weights (0 without EMA).
  """
  oc, fc = config.optim, config.finetune
  warmup = int(round(oc.warmup_epochs * steps_per_epoch))
  base_lr = schedules.base_learning_rate(oc.lr_per_256, config.batch_size)
  scheds = {
    "lr": schedules.cosine_schedule(base_lr, oc.min_lr, total_steps, warmup),
    "weight_decay": schedules.cosine_schedule(oc.weight_decay, oc.weight_decay_end, total_steps),
    "momentum": lambda step: jnp.asarray(fc.ema_decay, jnp.float32),
  }
  depth = backbone_for(config.model).depth
  parts = []
  if oc.get("clip_grad"):
    parts.append(optax.clip_by_global_norm(float(oc.clip_grad)))
  parts.append(
    optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
      learning_rate=scheds["lr"],
      weight_decay=scheds["weight_decay"],
      b1=oc.b1,
      b2=oc.b2,
      eps=oc.eps,
      mask=decay_mask,
    )
  )
  if fc.layer_decay < 1.0:
    parts.append(scale_by_tree(layer_decay_scales(params_shape, depth, fc.layer_decay)))
  return optax.chain(*parts), scheds


# ---- the method ----------------------------------------------------------------------------------


class Finetune(Method):
  """Fine-tuning as the trainer sees it; `config` is the whole run config (configs/finetune.py)."""

  loss_state_rule: ClassVar[LossStateRule] = LossStateRule.MEAN
  is_classifier: ClassVar[bool] = True

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self._num_classes: int | None = None

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> None:
    check_config(config)

  # ---- settings -------------------------------------------------------------------------
  @property
  def has_teacher(self) -> bool:  # type: ignore[override]
    """An EMA of the weights is kept (in the teacher slot) when config.finetune.ema_decay > 0."""
    return float(self.config.finetune.ema_decay) > 0

  @property
  def batch_keys(self) -> frozenset[str]:
    return frozenset({"global_crops", "label"})

  @property
  def num_classes(self) -> int:
    """config.finetune.num_classes, or (0) the training split's number of classes."""
    if self._num_classes is None:
      n = int(self.config.finetune.num_classes)
      if n <= 0:
        from sslx.data import pipeline  # pylint: disable=g-import-not-at-top

        n = pipeline.num_classes(self.config.data) or 0
      if n <= 0:
        raise FinetuneError(
          "the training split has no labels; fine-tuning needs labelled images (an image "
          "folder with class sub-folders) or set config.finetune.num_classes"
        )
      self._num_classes = n
    return self._num_classes

  def network(self, *, train: bool = True) -> Classifier:
    fc = self.config.finetune
    if fc.pooling not in ("cls", "mean"):
      raise FinetuneError(f"config.finetune.pooling={fc.pooling!r}; valid: 'cls', 'mean'")
    return Classifier(
      backbone_for(self.config.model, drop_path=train),
      self.num_classes,
      pooling=fc.pooling,
      head_init_std=fc.head_init_std,
      init_scale=fc.init_scale,
    )

  # ---- interface ------------------------------------------------------------------------
  def init(self, rng: jax.Array, image_shape: tuple[int, int, int]) -> tuple[Any, Any]:
    """Fresh parameters; the trainer then puts the pretrained backbone in (`start_weights`,
    `import_backbone`), outside the compiled init, so no weights become program constants."""
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    return self.network().init({"params": rng}, dummy, train=False)["params"], {}

  def start_weights(self) -> tuple[str, str] | None:
    """The pretrained network (config.finetune.pretrained: a workdir or a weights file) and
    which of its networks (config.finetune.weights); None for the from-scratch baseline."""
    fc = self.config.finetune
    return None if fc.random_init else (str(fc.pretrained), str(fc.weights))

  @property
  def is_cae(self) -> bool:
    """The backbone is CAE's encoder (config.model.arch='cae')."""
    return self.config.model.get("arch", "vit") == "cae"

  def import_backbone(
    self, params: Any, loss_state: Any, state_dict: Mapping[str, np.ndarray]
  ) -> tuple[Any, Any]:
    """`params` with the backbone from a timm-layout state dict (a learned position grid of
    another size is resized); the head keeps its fresh init.

    For the CAE encoder, as the official CAE fine-tuning loads a pretrained encoder: relative
    position bias tables the file lacks keep their zero init, and with mean pooling and
    `config.finetune.fc_norm_from_norm` the file's final norm also starts fc_norm (the official
    loader renames `norm.` to `fc_norm.`).

    Raises:
      FinetuneError: the file's ViT flavour (layer scale or not) and config.model.arch differ.
      torch_layout.LayoutError: any other misfit (init_from reports it).
    """
    sd = dict(state_dict)
    self._check_flavour(sd)
    like = params["backbone"]
    sd, note = torch_layout.fit_pos_embed(sd, like)
    if note:
      logging.info("finetune: %s", note)
    if self.is_cae:
      kept = self._keep_fresh_tables(sd, like)
      if kept:
        logging.info(
          "finetune: %d relative position bias tables start at zero (not in the weights)", kept
        )
    backbone = torch_layout.vit_from_torch(sd, like, pos_embed=self._positions_of(sd))
    params = {**params, "backbone": backbone}
    if self.is_cae and self.config.finetune.get("fc_norm_from_norm") and "fc_norm" in params:
      params["fc_norm"] = {k: np.array(v) for k, v in backbone["norm"].items()}
    return params, loss_state

  def _check_flavour(self, sd: Mapping[str, Any]) -> None:
    layer_scale = any(k.endswith(".ls1.gamma") for k in sd)
    if layer_scale and not self.is_cae:
      raise FinetuneError(
        "the starting weights have layer scale (blocks.*.ls1.gamma): a CAE / BEiT-style "
        "encoder; fine-tune it with config.model.arch='cae' "
        "(--config=configs/finetune.py:cae_vit_b16, or :cae_smoke for the smoke models)"
      )
    if self.is_cae and not layer_scale and float(self.config.model.init_values) > 0:
      raise FinetuneError(
        "config.model.arch='cae' expects CAE's layer scale (blocks.*.ls1.gamma), which the "
        "starting weights lack: fine-tune a plain ViT with config.model.arch='vit' (or set "
        "config.model.init_values=0 for a BEiT-style encoder without layer scale)"
      )

  @staticmethod
  def _keep_fresh_tables(sd: dict[str, Any], like: Mapping[str, Any]) -> int:
    """Puts `like`'s relative position tables into `sd` where it has none -> how many."""
    kept = 0
    for name, block in like.items():
      if name.startswith("block_") and torch_layout.REL_POS_TABLE in block.get("attn", {}):
        key = f"blocks.{int(name[len('block_') :])}.attn.{torch_layout.REL_POS_TABLE}"
        if key not in sd:
          sd[key] = np.asarray(block["attn"][torch_layout.REL_POS_TABLE], np.float32)
          kept += 1
    return kept

  def _positions_of(self, sd: Mapping[str, Any]) -> np.ndarray | None:
    """The fixed sin-cos table a state dict's `pos_embed` must equal, at the file's grid (the
    CAE encoder computes its table for each input), or None for learned positions."""
    if self.is_cae:
      side = torch_layout.pos_grid_of(sd)
      if side is None:
        return None
      return fixed_positions(beit.sincos_pos_embed(side, side, self._embed_dim()))
    return self._fixed_positions()

  def _embed_dim(self) -> int:
    return int(backbone_for(self.config.model).embed_dim)

  def _fixed_positions(self) -> np.ndarray | None:
    """The [1, 1 + N, D] sin-cos table (zero [CLS] row) at config.model.pos_grid, or None."""
    mc = self.config.model
    if not self.is_cae and mc.get("pos_embed", "learned") != "sincos":
      return None
    # CAE's table (beit.sincos_pos_embed) is MoCo v3's (vit.sincos_2d): one function for both.
    table = vit.sincos_2d(mc.pos_grid, mc.pos_grid, self._embed_dim())
    return fixed_positions(table)

  def optimizer(self, params_shape: Any, steps_per_epoch: int, total_steps: int) -> Any:
    return finetune_optimizer(self.config, params_shape, steps_per_epoch, total_steps)

  def check_batch(self, batch: Mapping[str, np.ndarray]) -> None:
    labels = np.asarray(batch["label"])
    if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
      raise FinetuneError(
        f"a training batch has labels in [{labels.min()}, {labels.max()}], outside 0 .. "
        f"{self.num_classes - 1}: fine-tuning needs labelled images (-1 = unlabelled) and "
        "config.finetune.num_classes covering them (0 = from the training split)"
      )

  def device_views(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Normalise the one crop per image, erase, then mixup / cutmix with smoothed targets."""
    fc, ac = self.config.finetune, self.config.augment
    crops = batch["global_crops"]
    images = augment.normalize(augment.to_float(crops[:, 0]), tuple(ac.mean), tuple(ac.std))
    k_erase, k_mix = jax.random.split(rng)
    images = mixup_lib.random_erasing(k_erase, images, float(fc.reprob))
    images, targets, lam = mixup_lib.mixup_cutmix(
      k_mix,
      images,
      batch["label"],
      self.num_classes,
      mixup_alpha=float(fc.mixup),
      cutmix_alpha=float(fc.cutmix),
      prob=float(fc.mixup_prob),
      switch_prob=float(fc.mixup_switch_prob),
      smoothing=float(fc.label_smoothing),
    )
    return {"images": images, "targets": targets, "mix_lambda": lam}

  def loss(
    self,
    params: Any,
    teacher_params: Any,
    loss_state: Any,
    views: Mapping[str, jax.Array],
    rng: jax.Array,
    sched: Mapping[str, jax.Array],
  ) -> tuple[jax.Array, tuple[Any, dict]]:
    """Soft-target cross-entropy of the head on the mixed batch (timm's SoftTargetCrossEntropy)."""
    del teacher_params, sched
    logits = self.network().apply(
      {"params": params}, views["images"], train=True, rngs={"dropout": rng}
    )
    loss = jnp.mean(optax.softmax_cross_entropy(logits, views["targets"]))
    hit = jnp.argmax(logits, -1) == jnp.argmax(views["targets"], -1)
    metrics = {"loss_ce": loss, "train_top1_dominant": 100.0 * jnp.mean(hit)}
    if "mix_lambda" in views:
      metrics["mix_lambda"] = views["mix_lambda"]
    return loss, (loss_state, metrics)

  def features(self, eval_params: Any, images: jax.Array) -> jax.Array:
    """The head's input [B, D] (pooled backbone features)."""
    return self.network(train=False).apply(
      {"params": eval_params}, images, train=False, features_only=True
    )

  def logits(self, eval_params: Any, images: jax.Array) -> jax.Array:
    """Class scores [B, K] of normalised float images."""
    return self.network(train=False).apply({"params": eval_params}, images, train=False)

  def export_backbone(
    self, params: Any, loss_state: Any, weights: str
  ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The fine-tuned backbone (no head) in timm's layout (a CAE encoder's relative position
    bias tables under BEiT's key, which timm's VisionTransformer lacks: architecture
    'vit+rel_pos_bias' then)."""
    del loss_state, weights
    m = self.network(train=False).backbone
    sd = torch_layout.vit_to_torch(params["backbone"], pos_embed=self._fixed_positions())
    kwargs: dict[str, Any] = dict(
      img_size=self.config.model.pos_grid * m.patch_size,
      patch_size=m.patch_size,
      in_chans=int(sd["patch_embed.proj.weight"].shape[1]),
      embed_dim=m.embed_dim,
      depth=m.depth,
      num_heads=m.num_heads,
      mlp_ratio=m.mlp_ratio,
      qkv_bias=True,
      num_classes=0,
    )
    arch = "vit"
    if isinstance(m, cae.CAEEncoder):
      kwargs["init_values"] = m.init_values
      if m.rel_pos_bias:
        arch = "vit+rel_pos_bias"
    return sd, {"architecture": arch, "timm_kwargs": json.dumps(kwargs)}


def with_start(
  config: ml_collections.ConfigDict, init_from: str | None, key: str, random_init: bool
) -> ml_collections.ConfigDict:
  """`config` with main.py's --init_from / --init_from_key / --random_init folded into
  config.finetune (so the checkpointed config records where the run started).

  Raises:
    FinetuneError: not a fine-tuning config, or --init_from naming another network than
      config.finetune.pretrained.
  """
  if config.method != "finetune":
    raise FinetuneError(
      f"--mode=finetune needs a fine-tuning config (--config=configs/finetune.py[:preset]); "
      f"{config.method!r} is a pretraining method: use --mode=train"
    )
  fc = config.finetune
  if init_from and fc.pretrained and os.path.abspath(init_from) != os.path.abspath(fc.pretrained):
    raise FinetuneError(
      f"--init_from={init_from} and config.finetune.pretrained={fc.pretrained} disagree; drop one"
    )
  with config.unlocked():
    if init_from:
      fc.pretrained = init_from
      if key != "auto":
        fc.weights = key
    if random_init:
      fc.random_init = True
  return config


def check_config(config: ml_collections.ConfigDict) -> None:
  """Refuses a fine-tuning config without a starting point, before anything is built."""
  fc = config.finetune
  if fc.random_init and fc.pretrained:
    raise FinetuneError(
      "config.finetune.pretrained is set and --random_init asks for fresh weights; drop one"
    )
  if not fc.random_init and not fc.pretrained:
    raise FinetuneError(
      "fine-tuning needs a starting point: --init_from=<a pretraining workdir or a weights "
      "file> (or config.finetune.pretrained), or --random_init for the from-scratch baseline"
    )
  if (fc.mixup > 0 or fc.cutmix > 0) and config.batch_size % 2:
    raise FinetuneError(
      f"mixup / cutmix pair each image with the mirrored one: config.batch_size="
      f"{config.batch_size} must be even"
    )
