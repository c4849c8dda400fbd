"""CAE: context autoencoder (Chen et al., 2022) as the trainer sees it.

One global view per image with an exact-count block mask (config.data.masks: scheme 'beit',
exact=True, num_masked = 98 of 196 at ViT-B/16). Per step (docs/fidelity.md, CAE):
  1. split the patches into visible / masked indices (static counts, so jit shapes are fixed);
  2. encoder(visible + CLS) -> regressor(mask queries | visible latents) -> decoder(masked only);
  3. alignment target = the *current* encoder on the masked patches, parameters under
     stop-gradient, in train mode (drop path on), CLS dropped;
  4. loss = reconstruction + align_weight (2) * MSE(latent_pred, target).

Reconstruction targets (`config.cae.target`):
  'pixels' (default here, no tokenizer weights ship offline): per-patch normalised pixels of the
     normalised view, MSE on masked patches (the VIMER CAE `rgb` mode, its layernorm default);
  'tokens' (the official CAE): DALL-E encoder ids of a 112-px resize of the same crop. Deviation:
     the official resizes the original crop with Lanczos in the input pipeline; here the 224-px
     view is de-normalised and resized on device with `jax.image.resize('lanczos3')`.

Other differences from the official pipeline: the flip comes after the crop (sslx/data/crops.py;
the official flips first: the same distribution, since the crop box is mirror-symmetric); pixel
targets are taken from the mean/std-normalised view (VIMER's `--denorm` off; with per-patch
normalisation only a per-channel scale differs); a batch whose masks miss the exact count
stops training with `MaskCountError`, checked on the host before the batch reaches the device
(`check_batch`).

There is no EMA teacher (`has_teacher = False`): the state keeps no second copy of the parameters,
and kNN / probes / export read the current encoder. Optimiser (the `optimizer` hook):
AdamW with absolute lr (1.5e-3 for batch 2048, not rescaled), linear warm-up then cosine to
min_lr, constant weight decay 0.05 on every tensor of rank >= 2 (cls and mask tokens included;
biases, norms, layer scales exempt, as `furnace/optim_factory.py`), global-norm clipping 3.0.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sslx import errors
from sslx.losses import cae as cae_losses
from sslx.methods.accumulation import LossStateRule
from sslx.methods.base import Forward, Method
from sslx.methods.teacher_cls import fixed_positions
from sslx.models import beit, dalle, torch_layout, vit
from sslx.models import cae as cae_model
from sslx.models.build import compute_dtype
from sslx.schedules import cosine_schedule


class CaeConfigError(errors.UserError):
  """A config value CAE cannot run with; the message names the key to change."""


class MaskCountError(errors.UserError):
  """A batch's mask does not mask exactly config.data.masks.num_masked patches."""


def _name(path) -> str:
  last = path[-1]
  return str(getattr(last, "key", getattr(last, "name", last)))


def cae_decay_mask(params: Any) -> Any:
  """True where CAE decays: rank >= 2 and not a bias (cls_token and mask_token included)."""
  return jax.tree_util.tree_map_with_path(lambda p, x: x.ndim >= 2 and _name(p) != "bias", params)


@dataclasses.dataclass(frozen=True)
class Cae(Method):
  """CAE; `config` is the whole run config (configs/cae.py).

  Gradient accumulation reproduces the big-batch step: every loss term is a mean over images of
  a fixed number of masked patches, and there is no BatchNorm. The loss state (a step counter
  and, for token targets, the frozen tokenizer) takes one update per step (`LossStateRule.MEAN`:
  the counter's mean increment is 1, the tokenizer is unchanged).
  """

  config: ml_collections.ConfigDict
  loss_state_rule: ClassVar[LossStateRule] = LossStateRule.MEAN
  # The alignment target is the current encoder under stop-gradient: no EMA copy to keep.
  has_teacher: ClassVar[bool] = False

  def __post_init__(self):
    c = self.config
    m = c.data.masks
    if m.scheme != "beit" or not m.exact:
      raise CaeConfigError(
        f"CAE needs exact-count block masks: set config.data.masks.scheme='beit' "
        f"and exact=True (got scheme={m.scheme!r}, exact={m.exact})."
      )
    if c.data.global_crops.number != 1 or c.data.local_crops.number != 0:
      raise CaeConfigError(
        "CAE takes one view: set config.data.global_crops.number=1 and "
        "config.data.local_crops.number=0."
      )
    if c.cae.target not in ("pixels", "tokens"):
      raise CaeConfigError(f"config.cae.target={c.cae.target!r}; valid: 'pixels', 'tokens'.")
    n = self.grid[0] * self.grid[1]
    if not 0 < m.num_masked < n:
      raise CaeConfigError(
        f"config.data.masks.num_masked={m.num_masked} must be in (0, {n}) for "
        f"a {self.grid[0]}x{self.grid[1]} patch grid."
      )

  # ---- shapes -----------------------------------------------------------------
  @property
  def grid(self) -> tuple[int, int]:
    side = self.config.data.global_crops.size // self.config.model.patch_size
    return side, side

  @property
  def num_masked(self) -> int:
    return int(self.config.data.masks.num_masked)

  def out_dim(self) -> int:
    if self.config.cae.target == "pixels":
      return self.config.model.patch_size**2 * 3
    return int(self.config.cae.vocab_size)

  # ---- networks -------------------------------------------------------------
  def network(self) -> cae_model.CAE:
    mc = self.config.model
    kw = dict(vit.vit_kwargs(mc.variant))
    for key in ("embed_dim", "depth", "num_heads", "mlp_ratio"):
      if mc.get(key):
        kw[key] = mc[key]
    return cae_model.CAE(
      out_dim=self.out_dim(),
      patch_size=mc.patch_size,
      init_values=mc.init_values,
      drop_path_rate=mc.drop_path_rate,
      decoder_embed_dim=mc.decoder_embed_dim,
      decoder_num_heads=mc.decoder_num_heads,
      regressor_depth=mc.regressor_depth,
      decoder_depth=mc.decoder_depth,
      dtype=compute_dtype(mc.dtype),
      **kw,
    )

  def tokenizer(self) -> tuple[dalle.DalleEncoder, dict]:
    """The DALL-E encoder and its weights from config.cae.tokenizer_path (token targets)."""
    module, variables = dalle.load_dalle_encoder(self.config.cae.tokenizer_path)
    if module.vocab_size != self.config.cae.vocab_size:
      raise CaeConfigError(
        f"the tokenizer has {module.vocab_size} codes but "
        f"config.cae.vocab_size={self.config.cae.vocab_size}; make them equal."
      )
    return module, variables

  def init(self, rng: jax.Array, image_shape: tuple[int, int, int]) -> tuple[Any, Any]:
    """Returns (params, loss_state); token targets keep the frozen tokenizer in loss_state."""
    images = jnp.zeros((1, *image_shape), jnp.float32)
    n = self.grid[0] * self.grid[1]
    mask = jnp.arange(n)[None] >= n - self.num_masked
    vis, msk = cae_model.split_by_mask(mask, self.num_masked)
    params = self.network().init({"params": rng}, images, vis, msk, train=False)["params"]
    loss_state = {"step": jnp.zeros([], jnp.int32)}
    if self.config.cae.target == "tokens":
      loss_state["tokenizer"] = self.tokenizer()[1]["params"]
    return params, loss_state

  def schedules(self, steps_per_epoch: int, total_steps: int) -> dict[str, Any]:
    del steps_per_epoch, total_steps
    return {}

  def optimizer(
    self, params_shape: Any, steps_per_epoch: int, total_steps: int
  ) -> tuple[optax.GradientTransformation, dict[str, Any]]:
    """CAE's AdamW (absolute lr, constant wd, global-norm clip) -> (tx, schedules)."""
    del params_shape
    oc, tc = self.config.optim, self.config.teacher
    lr = cosine_schedule(
      oc.lr, oc.min_lr, total_steps, int(round(oc.warmup_epochs * steps_per_epoch))
    )
    parts = [optax.clip_by_global_norm(oc.clip_grad)] if oc.clip_grad else []
    parts.append(
      optax.adamw(
        lr, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay, mask=cae_decay_mask
      )
    )
    wd = float(oc.weight_decay)
    return optax.chain(*parts), {
      "lr": lr,
      "weight_decay": lambda step: jnp.float32(wd),
      "momentum": cosine_schedule(tc.momentum, tc.momentum_end, total_steps),
    }

  # ---- loss ---------------------------------------------------------------------
  def _indices(self, views: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    if "global_masks" not in views:
      raise CaeConfigError("the batch has no 'global_masks'; set config.data.masks.scheme='beit'.")
    masks = views["global_masks"][:, 0]
    if tuple(masks.shape[1:]) != self.grid:
      raise CaeConfigError(
        f"masks of shape {tuple(masks.shape[1:])} do not match the "
        f"{self.grid} patch grid; check config.model.patch_size."
      )
    masks = masks.reshape(masks.shape[0], -1)
    return cae_model.split_by_mask(masks, self.num_masked)

  def token_ids(self, tokenizer_params: Any, images: jax.Array) -> jax.Array:
    """DALL-E ids [B, N] of normalised images [B, H, W, 3] (de-normalised, resized, mapped)."""
    mean = jnp.asarray(self.config.augment.mean, jnp.float32)
    std = jnp.asarray(self.config.augment.std, jnp.float32)
    x = jnp.clip(images * std + mean, 0.0, 1.0)
    size = self.config.cae.tokenizer_size
    x = jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), "lanczos3")
    module = dalle.DalleEncoder(
      n_hid=tokenizer_params["input"]["w"].shape[0],
      n_blk_per_group=sum(k.startswith("block_") for k in tokenizer_params["group_1"]),
      vocab_size=tokenizer_params["output"]["conv"]["w"].shape[0],
    )
    logits = module.apply({"params": tokenizer_params}, dalle.map_pixels(jnp.clip(x, 0.0, 1.0)))
    if tuple(logits.shape[1:3]) != self.grid:
      raise CaeConfigError(
        f"tokenizer grid {tuple(logits.shape[1:3])} != patch grid {self.grid}; "
        "set config.cae.tokenizer_size = 8 * (crop size / patch size)."
      )
    return jnp.argmax(logits, axis=-1).reshape(logits.shape[0], -1)

  def loss(
    self,
    params: Any,
    teacher_params: Any,
    loss_state: Any,
    views: Mapping[str, jax.Array],
    rng: jax.Array,
    sched: Mapping[str, jax.Array],
  ) -> tuple[jax.Array, tuple[Any, dict]]:
    """CAE loss of one batch; returns (loss, (new_loss_state, metrics))."""
    del teacher_params, sched
    images = views["global"][:, 0]
    vis_idx, mask_idx = self._indices(views)
    net = self.network()
    r_main, r_target = jax.random.split(rng)
    out = net.apply(
      {"params": params}, images, vis_idx, mask_idx, train=True, rngs={"dropout": r_main}
    )
    # The current weights (the release aliases its target encoder: no EMA), no gradient, train mode.
    target = net.apply(
      {"params": jax.lax.stop_gradient(params)},
      images,
      mask_idx,
      train=True,
      rngs={"dropout": r_target},
      method=cae_model.CAE.align_target,
    )
    align = cae_losses.alignment_loss(out["latent_pred"], target)
    metrics = {}
    if self.config.cae.target == "pixels":
      patches = cae_losses.patchify(images, self.config.model.patch_size)
      recon = cae_losses.pixel_loss(out["pred"], cae_model.gather_tokens(patches, mask_idx))
    else:
      ids = self.token_ids(loss_state["tokenizer"], images)
      ids = jnp.take_along_axis(ids, mask_idx, axis=1)
      recon = cae_losses.token_loss(out["pred"], ids)
      metrics["token_acc"] = jnp.mean(jnp.argmax(out["pred"], -1) == ids)
    loss = cae_losses.cae_loss(recon, align, self.config.cae.align_weight)
    metrics.update(loss_recon=recon, loss_align=align)
    return loss, ({**loss_state, "step": loss_state["step"] + 1}, metrics)

  def check_batch(self, batch: Mapping[str, np.ndarray]) -> None:
    """Host-side check of each batch before it goes to the device (the trainer's hook).

    The model gathers exactly num_masked tokens per image, so any other count would silently
    drop or duplicate patches; this raises MaskCountError instead.
    """
    masks = np.asarray(batch["global_masks"])
    _check_counts(masks.reshape(masks.shape[0], -1).sum(axis=-1), self.num_masked)

  # ---- evaluation -------------------------------------------------------------
  def tokens(self, eval_params: Any, images: jax.Array) -> jax.Array:
    """Encoder tokens [B, 1 + N, D] (CLS first) of all patches of normalised images."""
    return self.network().apply(
      {"params": eval_params}, images, None, train=False, method=cae_model.CAE.encode
    )["tokens"]

  def features(self, eval_params: Any, images: jax.Array) -> jax.Array:
    """Encoder CLS [B, D] of all patches (the kNN / linear-probe feature)."""
    return self.tokens(eval_params, images)[:, 0]

  def export_backbone(
    self, params: Any, loss_state: Any, weights: str
  ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The encoder in timm's names (LayerScale as ls1/ls2), sin-cos positions written out."""
    del loss_state, weights
    net = self.network()
    grid = self.config.data.global_crops.size // net.patch_size
    pos = fixed_positions(beit.sincos_pos_embed(grid, grid, net.embed_dim))
    sd = torch_layout.vit_to_torch(params["encoder"], pos_embed=pos)
    kwargs = dict(
      img_size=grid * net.patch_size,
      patch_size=net.patch_size,
      in_chans=int(sd["patch_embed.proj.weight"].shape[1]),
      embed_dim=net.embed_dim,
      depth=net.depth,
      num_heads=net.num_heads,
      mlp_ratio=net.mlp_ratio,
      qkv_bias=True,
      init_values=net.init_values,
      num_classes=0,
    )
    return sd, {"architecture": "vit", "timm_kwargs": json.dumps(kwargs)}

  def import_backbone(
    self, params: Any, loss_state: Any, state_dict: Mapping[str, np.ndarray]
  ) -> tuple[Any, Any]:
    """The encoder from timm names (ls1/ls2, fused qkv bias with a zero k part); its sin-cos
    positions are compared at the file's grid, since the encoder computes them per input."""
    side = torch_layout.pos_grid_of(state_dict)
    pos = None
    if side is not None:
      pos = fixed_positions(beit.sincos_pos_embed(side, side, self.network().embed_dim))
    encoder = torch_layout.vit_from_torch(state_dict, params["encoder"], pos_embed=pos)
    return {**params, "encoder": encoder}, loss_state

  def attention(self) -> tuple[Forward, int]:
    """The encoder on all patches; its blocks sow their attention weights."""
    net = self.network()

    def forward(params, images):
      _, state = net.apply(
        {"params": params}, images, None, train=False, method=net.encode, mutable=["intermediates"]
      )
      return state["intermediates"]["encoder"][f"block_{net.depth - 1}"]["attn"]["attention"][0]

    return forward, net.patch_size


def _check_counts(counts: np.ndarray, expected: int) -> None:
  if np.any(counts != expected):
    raise MaskCountError(
      f"CAE needs exactly {expected} masked patches per image (config.data.masks.num_masked) "
      f"but a batch has counts {sorted(set(counts.tolist()))}; draw masks with "
      "config.data.masks.exact=True."
    )
