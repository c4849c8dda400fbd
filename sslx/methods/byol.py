"""BYOL: bootstrap your own latent (Grill et al., 2020) on a ResNet.

Online network = ResNet encoder -> projector MLP -> predictor MLP; target network = EMA
of encoder + projector (the trainer's EMA teacher, momentum cosine 0.99 -> 1 per
optimiser step). Loss = l(q1, sg z2) + l(q2, sg z1), l = 2 - 2 cos (sslx/losses/byol.py).

As in the official code (deepmind-research/byol, OpenSelfSup BYOL as SaGe uses it):
  * each view goes through the networks on its own, so BatchNorm statistics are per view
    (B images, global over devices), and both online and target run BN in train mode;
  * LARS (optax.lars) over all parameters, momentum 0.9, trust coefficient 1e-3, lr
    0.3 * batch / 256 with a 10-epoch linear warm-up and a cosine to 0, weight decay 1e-6;
    biases and BatchNorm parameters get neither decay nor trust-ratio adaptation.
    optax.lars adapts by eta * |w| / |g + wd w| (DeepMind's BYOL); OpenSelfSup's LARS
    (SaGe's release) uses eta * |w| / (|g| + wd |w|), equal when wd |w| << |g|. OpenSelfSup
    also decays and adapts the downsample-BN scales (its name regex misses them); we
    exclude every BN parameter, as BYOL's paper describes.

BatchNorm running statistics are model state, kept in the loss state:
loss_state = {'online_stats': {'net', 'predictor'}, 'target_stats': ...}; the target's
are updated by its own train-mode forward passes (running averages of the EMA
network's batch statistics). The kNN / evaluation features are the EMA target
encoder's pooled c5 in BN eval mode with those target statistics (`eval_params`).

Gradient accumulation (config.optim.accum_steps = k): the loss is a batch mean, but BatchNorm
normalises each micro-batch with its own statistics (not the big-batch step), and the running
averages, the only loss state, are threaded through the micro-batches (`LossStateRule.THREADED`:
k updates per step, as PyTorch's running stats take under accumulation). SaGe inherits the rule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from sslx import schedules
from sslx.losses import byol as byol_losses
from sslx.methods.accumulation import LossStateRule
from sslx.methods.base import Method
from sslx.models import mlp, resnet, torch_layout
from sslx.normalize import l2_normalize


def _dtype(name: str):
  table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
  if name not in table:
    raise ValueError(f"config.model.dtype={name!r}; valid: {sorted(table)}")
  return table[name]


def build_resnet(model_cfg: ml_collections.ConfigDict) -> resnet.ResNet:
  """The ResNet described by config.model (arch 'resnet', depth, width, stem, dtype)."""
  if model_cfg.get("arch", "vit") != "resnet":
    raise ValueError(
      f"config.model.arch={model_cfg.get('arch')!r}: BYOL/SaGe need --config.model.arch=resnet"
    )
  return resnet.ResNet(
    depth=model_cfg.depth, width=model_cfg.width, stem=model_cfg.stem, dtype=_dtype(model_cfg.dtype)
  )


class EncoderProjector(nn.Module):
  """ResNet + projector: x -> (stage outputs dict, projection [B, out_dim])."""

  encoder: nn.Module
  projector: nn.Module

  def __call__(self, x: jax.Array, *, train: bool) -> tuple[dict[str, jax.Array], jax.Array]:
    out = self.encoder(x, train=train)
    return out, self.projector(out["pooled"], train=train)


def decay_and_adapt_mask(params: Any) -> Any:
  """True for weights that get LARS weight decay and trust-ratio adaptation.

  Kernels (conv and dense, ndim > 1) only; biases and BatchNorm scales/biases are excluded.
  """
  return jax.tree_util.tree_map_with_path(
    lambda path, leaf: getattr(path[-1], "key", None) not in ("bias", "scale") and leaf.ndim > 1,
    params,
  )


def lars_lr_schedule(config, steps_per_epoch: int, total_steps: int) -> schedules.Schedule:
  """The encoder's lr: linear warm-up, then cosine to optim.min_lr.

  Per step (BYOL) by default. With optim.lr_by_epoch (SaGe), mmcv's by-epoch
  CosineAnnealingLrUpdaterHook with a linear warm-up, as the official SaGe trainer runs it: the
  cosine is that of the current epoch over *all* epochs (warm-up included), lr(e) = min_lr +
  (base - min_lr) (1 + cos(pi e / E)) / 2, and during the warm-up's W iterations it is scaled by
  r + (1 - r) i / W, r = optim.warmup_start_ratio.
  """
  oc = config.optim
  base = schedules.base_learning_rate(oc.lr_per_256, config.batch_size)
  warmup = int(round(oc.warmup_epochs * steps_per_epoch))
  if not oc.get("lr_by_epoch", False):
    return schedules.cosine_schedule(
      base, oc.min_lr, total_steps, warmup, warmup_start=oc.warmup_start_ratio * base
    )
  epochs = total_steps / steps_per_epoch
  ratio = oc.warmup_start_ratio

  def by_epoch(step):
    epoch = jnp.asarray(step // steps_per_epoch, jnp.float32)
    regular = oc.min_lr + (base - oc.min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))
    ramp = jnp.where(step < warmup, ratio + (1.0 - ratio) * step / max(warmup, 1), 1.0)
    return (regular * ramp).astype(jnp.float32)

  return by_epoch


@dataclasses.dataclass(frozen=True)
class Byol(Method):
  """BYOL as the trainer sees it; `config` is the whole run config."""

  config: ml_collections.ConfigDict
  loss_state_rule: ClassVar[LossStateRule] = LossStateRule.THREADED  # see the module docstring

  # ---- networks -------------------------------------------------------------
  def network(self) -> EncoderProjector:
    c = self.config
    return EncoderProjector(
      build_resnet(c.model), mlp.MLP(c.projector.hidden_dim, c.projector.out_dim)
    )

  def predictor(self) -> mlp.MLP:
    c = self.config
    return mlp.MLP(c.predictor.hidden_dim, c.projector.out_dim, init_std=0.01)

  def init(self, rng: jax.Array, image_shape: tuple[int, int, int]) -> tuple[Any, Any]:
    """(params {'encoder', 'projector', 'predictor'}, loss_state with BN statistics)."""
    r_net, r_pred = jax.random.split(rng)
    x = jnp.zeros((2, *image_shape), jnp.float32)
    net_vars = self.network().init({"params": r_net}, x, train=False)
    pred_vars = self.predictor().init(
      {"params": r_pred}, jnp.zeros((2, self.config.projector.out_dim)), train=False
    )
    params = {**net_vars["params"], "predictor": pred_vars["params"]}
    loss_state = {
      "online_stats": {"net": net_vars["batch_stats"], "predictor": pred_vars["batch_stats"]},
      "target_stats": net_vars["batch_stats"],
    }
    return params, loss_state

  def teacher_params(self, params: Any) -> Any:
    """The EMA target tracks encoder + projector (not the predictor)."""
    return {"encoder": params["encoder"], "projector": params["projector"]}

  # ---- optimiser and schedules ---------------------------------------------------
  def schedules(self, steps_per_epoch: int, total_steps: int) -> dict[str, Any]:
    del steps_per_epoch, total_steps
    return {}

  def optimizer_schedules(self, steps_per_epoch: int, total_steps: int) -> dict[str, Any]:
    c = self.config
    return {
      "lr": lars_lr_schedule(c, steps_per_epoch, total_steps),
      "weight_decay": lambda step: jnp.asarray(c.optim.weight_decay, jnp.float32),
      # BYOL's tau = 1 - (1 - tau0)(cos(pi k / K) + 1) / 2, per optimiser step.
      "momentum": schedules.cosine_schedule(
        c.teacher.momentum, c.teacher.momentum_end, total_steps
      ),
    }

  def lars(self, lr: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    oc = self.config.optim
    return optax.lars(
      lr,
      weight_decay=oc.weight_decay,
      weight_decay_mask=decay_and_adapt_mask,
      trust_coefficient=oc.trust_coefficient,
      trust_ratio_mask=decay_and_adapt_mask,
      momentum=oc.momentum,
    )

  def optimizer(
    self, params_shape: Any, steps_per_epoch: int, total_steps: int
  ) -> tuple[optax.GradientTransformation, dict[str, Any]]:
    """LARS over every parameter -> (tx, {'lr', 'weight_decay', 'momentum'})."""
    del params_shape
    scheds = self.optimizer_schedules(steps_per_epoch, total_steps)
    return self.lars(scheds["lr"]), scheds

  # ---- forward and loss ----------------------------------------------------------
  def forward_bn(
    self, params: Any, teacher_params: Any, loss_state: Any, views: Mapping[str, jax.Array]
  ) -> tuple[dict[str, Any], Any]:
    """Both networks on each global view separately (per-view BN statistics).

    Args:
      views: 'global' [B, 2, H, W, C] normalised floats.

    Returns:
      ({'online': [per view (stage dict, projection, prediction)], 'target_proj': [per view
        [B, D], no gradient]}, new loss_state).
    """
    g = views["global"]
    if g.ndim != 5 or g.shape[1] != 2:
      raise ValueError(
        f"BYOL needs exactly 2 global views [B, 2, H, W, C], got {g.shape}; set "
        "--config.data.global_crops.number=2"
      )
    net, pred = self.network(), self.predictor()
    online_params = self.teacher_params(params)
    s_net = loss_state["online_stats"]["net"]
    s_pred = loss_state["online_stats"]["predictor"]
    s_tgt = loss_state["target_stats"]
    online, target = [], []
    for v in range(2):
      (stages, proj), upd = net.apply(
        {"params": online_params, "batch_stats": s_net},
        g[:, v],
        train=True,
        mutable=["batch_stats"],
      )
      s_net = upd["batch_stats"]
      q, upd = pred.apply(
        {"params": params["predictor"], "batch_stats": s_pred},
        proj,
        train=True,
        mutable=["batch_stats"],
      )
      s_pred = upd["batch_stats"]
      online.append((stages, proj, q))
      (_, z), upd = net.apply(
        {"params": teacher_params, "batch_stats": s_tgt},
        g[:, v],
        train=True,
        mutable=["batch_stats"],
      )
      s_tgt = upd["batch_stats"]
      target.append(jax.lax.stop_gradient(z))
    new_state = {
      **loss_state,
      "online_stats": {"net": s_net, "predictor": s_pred},
      "target_stats": jax.lax.stop_gradient(s_tgt),
    }
    return {"online": online, "target_proj": target}, new_state

  def byol_terms(self, outputs: Mapping[str, Any]) -> tuple[jax.Array, dict[str, jax.Array]]:
    (_, _, q1), (_, _, q2) = outputs["online"]
    z1, z2 = outputs["target_proj"]
    loss = byol_losses.byol_loss(q1, q2, z1, z2)
    # Collapse diagnostic: per-dimension std of the normalised target projections
    # (about 1/sqrt(D) when healthy, 0 when collapsed).
    zn = l2_normalize(z1)
    return loss, {"loss_byol": loss, "target_std": jnp.mean(jnp.std(zn, axis=0))}

  def loss(
    self,
    params: Any,
    teacher_params: Any,
    loss_state: Any,
    views: Mapping[str, jax.Array],
    rng: jax.Array,
    sched: Mapping[str, jax.Array],
  ) -> tuple[jax.Array, tuple[Any, dict]]:
    """Total loss of one batch; returns (loss, (new_loss_state, metrics))."""
    del rng, sched
    outputs, new_state = self.forward_bn(params, teacher_params, loss_state, views)
    loss, metrics = self.byol_terms(outputs)
    return loss, (new_state, metrics)

  # ---- evaluation ------------------------------------------------------------------
  def eval_params(self, teacher_params: Any, loss_state: Any) -> Any:
    """What `features` needs: the EMA target's params and its BN running statistics."""
    return {"params": teacher_params, "batch_stats": loss_state["target_stats"]}

  def features(self, eval_params: Any, images: jax.Array) -> jax.Array:
    """Pooled c5 [B, C] of the EMA target encoder, BN in eval mode (kNN protocol)."""
    encoder = build_resnet(self.config.model)
    out = encoder.apply(
      {
        "params": eval_params["params"]["encoder"],
        "batch_stats": eval_params["batch_stats"]["encoder"],
      },
      images,
      train=False,
    )
    return out["pooled"]

  def tokens(self, eval_params: Any, images: jax.Array) -> jax.Array:
    """[B, 1 + h*w, C]: the pooled c5 feature, then c5 at each position (attentive probe)."""
    encoder = build_resnet(self.config.model)
    out = encoder.apply(
      {
        "params": eval_params["params"]["encoder"],
        "batch_stats": eval_params["batch_stats"]["encoder"],
      },
      images,
      train=False,
    )
    c5 = out["c5"]
    return jnp.concatenate(
      [out["pooled"][:, None], c5.reshape(c5.shape[0], -1, c5.shape[-1])], axis=1
    )

  def export_backbone(
    self, params: Any, loss_state: Any, weights: str
  ) -> tuple[dict[str, Any], dict[str, str]]:
    """torchvision ResNet names, with the BatchNorm statistics of the chosen network."""
    stats = (
      loss_state["target_stats"] if weights == "teacher" else loss_state["online_stats"]["net"]
    )["encoder"]
    sd = torch_layout.resnet_to_torch(params["encoder"], stats)
    mc = self.config.model
    meta = {"architecture": "resnet", "torchvision_model": f"resnet{mc.depth}"}
    if mc.width != 64 or mc.stem != "imagenet":
      # torchvision builds only the 64-wide ImageNet stem; the names still follow it.
      meta["note"] = (
        f"width {mc.width}, stem {mc.stem!r}: torchvision's resnet{mc.depth} has "
        "width 64 and the ImageNet stem, so build a matching model to load this."
      )
    return sd, meta

  def import_backbone(
    self, params: Any, loss_state: Any, state_dict: Mapping[str, Any]
  ) -> tuple[Any, Any]:
    """The encoder from torchvision names; its BatchNorm statistics go to both the online
    network and the target (which start equal, as at init)."""
    encoder, stats = torch_layout.resnet_from_torch(state_dict, params["encoder"])

    def with_stats(tree: Any) -> Any:
      return {**tree, "encoder": stats}

    new_state = {
      **loss_state,
      "online_stats": {
        **loss_state["online_stats"],
        "net": with_stats(loss_state["online_stats"]["net"]),
      },
      "target_stats": with_stats(loss_state["target_stats"]),
    }
    return {**params, "encoder": encoder}, new_state
