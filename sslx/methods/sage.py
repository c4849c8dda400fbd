"""SaGe: semantic-aware generation, BYOL plus an image decoder judged by a frozen evaluator.

L = BYOL loss + lambda * sum over both views of L_G(x_v, decoder(c5_online(x_v))),
with L_G = pixel MSE / 10 + evaluator-feature MSEs (projector / 10, c5, c4, c3 / 30 each;
sslx/losses/sage.py). Our reading of the release (docs/fidelity.md, SaGe), which never
calls its decoder:

  * intra-view: each view is rebuilt from the online encoder's c5 of the *same* view;
    the gradient flows into the encoder (the paper's "target network recovers the
    original image"), `sage.detach_decoder_input` stops it (unverified either way);
  * the evaluator is a frozen ResNet + projector restored from an sslx BYOL workdir (the
    EMA target, `teacher_params`, of its latest checkpoint). It lives in the loss state,
    so it has no optimiser state and receives no update; gradients only flow *through* it
    into the reconstruction. Its BatchNorm runs in train mode with the batch statistics
    of each call (real and reconstructed batches separately), as the release leaves it;
    its running statistics are never used, so they are not kept;
  * inputs are normalised with mean = std = 0.5 ([-1, 1], the tanh range);
  * the decoder has its own Adam (lr 0.048, no weight decay, linear warm-up then constant)
    through optax.multi_transform; everything else is BYOL's LARS (sslx/methods/byol.py).

Ablations (`sage.ablation`): 'no_mse' (pixel weight 0), 'mse_only' (feature weights 0; no
evaluator needed), 'random_evaluator' (a randomly initialised evaluator).

The evaluator is read on the host when the method is built (before anything compiles) and
enters the initial state as constants of the jitted init; fine for the small presets, a
~100 MB constant for ResNet-50.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sslx import errors, schedules
from sslx.losses import sage as sage_losses
from sslx.methods.byol import Byol
from sslx.models.decoders import SageDecoder

ABLATIONS = ("none", "no_mse", "mse_only", "random_evaluator")
FEATURE_LEVELS = ("proj", "c5", "c4", "c3")
STEM_STRIDE = {"imagenet": 32, "cifar": 8}


class SageConfigError(errors.UserError):
  """An impossible SaGe configuration; raised before anything compiles."""


class EvaluatorNotFound(FileNotFoundError):
  """config.sage.evaluator_path holds no sslx BYOL checkpoint."""


def _make_evaluator_hint(path: str) -> str:
  return (
    f"train one first with the BYOL preset matching this one, e.g. `python main.py "
    f"--config=configs/byol.py:fashion_mnist --workdir={path or '/tmp/byol_fmnist'}`, and pass --config.sage.evaluator_path=<that "
    "workdir> (or --config.sage.ablation=random_evaluator)"
  )


@functools.lru_cache(maxsize=2)
def load_evaluator(path: str) -> Any:
  """Teacher params (host numpy) of the latest checkpoint of the sslx workdir `path`.

  Reads the trainer's layout `<workdir>/checkpoints/<step>/state` (sslx/train/checkpoint.py)
  with orbax directly: methods do not import the trainer.
  """
  import orbax.checkpoint as ocp  # late: only SaGe with a checkpoint evaluator needs it

  directory = os.path.abspath(os.path.join(path, "checkpoints")) if path else ""
  if not path or not os.path.isdir(directory):
    raise EvaluatorNotFound(
      f"config.sage.evaluator_path={path!r} holds no sslx checkpoint directory ({directory or 'unset'}); "
      + _make_evaluator_hint(path)
    )
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
  step = manager.latest_step()
  if step is None:
    raise EvaluatorNotFound(
      f"config.sage.evaluator_path={path!r}: no finished checkpoint under "
      f"{directory}; " + _make_evaluator_hint(path)
    )
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  return jax.tree.map(np.asarray, restored["state"]["teacher_params"])


def resolved_weights(config: ml_collections.ConfigDict) -> dict[str, float]:
  """config.sage.weights after config.sage.ablation."""
  sc = config.sage
  if sc.ablation not in ABLATIONS:
    raise SageConfigError(f"config.sage.ablation={sc.ablation!r}; valid: {ABLATIONS}")
  w = {k: float(v) for k, v in sc.weights.items()}
  if sc.ablation == "no_mse":
    w["pixel"] = 0.0
  elif sc.ablation == "mse_only":
    w.update({k: 0.0 for k in FEATURE_LEVELS})
  return w


@dataclasses.dataclass(frozen=True)
class Sage(Byol):
  """BYOL + decoder + frozen evaluator; `config` is the whole run config."""

  def __post_init__(self):
    c = self.config
    resolved_weights(c)  # raises on an unknown config.sage.ablation, before anything is built
    if tuple(c.augment.mean) != (0.5,) * 3 or tuple(c.augment.std) != (0.5,) * 3:
      raise SageConfigError(
        "SaGe rebuilds images in [-1, 1] (tanh): set config.augment.mean and "
        "config.augment.std to (0.5, 0.5, 0.5)"
      )
    stride = STEM_STRIDE.get(c.model.stem, 32)
    size = c.data.global_crops.size
    side = -(-size // stride)
    out = side * 2 ** len(c.decoder.up_channels)
    if out != size:
      raise SageConfigError(
        f"the decoder turns the {side}x{side} c5 map into {out}x{out} images but the views are "
        f"{size}x{size}: set config.decoder.up_channels to {int(np.log2(size / side))} entries "
        "(or change config.data.global_crops.size)"
      )
    # Fail here, before compiling, when the evaluator checkpoint is missing or mismatched.
    if self.uses_evaluator and c.sage.ablation != "random_evaluator":
      self._check_evaluator(load_evaluator(c.sage.evaluator_path))

  @property
  def weights(self) -> dict[str, float]:
    return resolved_weights(self.config)

  @property
  def uses_evaluator(self) -> bool:
    return any(self.weights.get(k, 0.0) for k in FEATURE_LEVELS)

  def decoder(self) -> SageDecoder:
    dc = self.config.decoder
    return SageDecoder(dc.bottleneck_dim, dc.stem_channels, tuple(dc.up_channels))

  def _check_evaluator(self, evaluator: Any) -> None:
    size = self.config.data.global_crops.size
    expected = jax.eval_shape(
      lambda: self.network().init(jax.random.PRNGKey(0), jnp.zeros((2, size, size, 3)), train=False)
    )["params"]
    got = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), evaluator)
    # PyTreeDef's comparison is untyped in jax's stubs.
    same = jax.tree.structure(expected) == jax.tree.structure(got) and all(  # type: ignore[operator]
      a.shape == b.shape for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got))
    )
    if not same:
      raise SageConfigError(
        f"the checkpoint in config.sage.evaluator_path={self.config.sage.evaluator_path!r} is "
        "not a ResNet + projector of the shape config.model / config.projector describe; train "
        "the evaluator with the same model and projector settings"
      )

  # ---- init -------------------------------------------------------------------------
  def init(self, rng: jax.Array, image_shape: tuple[int, int, int]) -> tuple[Any, Any]:
    r_byol, r_dec, r_eval = jax.random.split(rng, 3)
    params, loss_state = super().init(r_byol, image_shape)
    x = jnp.zeros((2, *image_shape))
    c5 = jax.eval_shape(lambda: self.network().init_with_output(r_byol, x, train=False))[0][0]["c5"]
    dec_vars = self.decoder().init({"params": r_dec}, jnp.zeros(c5.shape), train=False)
    params = {**params, "decoder": dec_vars["params"]}
    loss_state = {**loss_state, "decoder_stats": dec_vars["batch_stats"]}
    if self.uses_evaluator:
      if self.config.sage.ablation == "random_evaluator":
        evaluator = self.network().init(r_eval, x, train=False)["params"]
      else:
        evaluator = jax.tree.map(jnp.asarray, load_evaluator(self.config.sage.evaluator_path))
      loss_state["evaluator"] = evaluator
    return params, loss_state

  # ---- optimiser -------------------------------------------------------------------------
  def optimizer(
    self, params_shape: Any, steps_per_epoch: int, total_steps: int
  ) -> tuple[optax.GradientTransformation, dict[str, Any]]:
    """LARS for encoder/projector/predictor, Adam for 'decoder' (optax.multi_transform)."""
    scheds = self.optimizer_schedules(steps_per_epoch, total_steps)
    dc, oc = self.config.decoder, self.config.optim
    warmup = int(round(oc.warmup_epochs * steps_per_epoch))
    # Decoder: linear warm-up from warmup_start_ratio * lr, then constant (released: no cosine).
    dec_lr = schedules.cosine_schedule(
      dc.lr, dc.lr, total_steps, warmup, warmup_start=oc.warmup_start_ratio * dc.lr
    )
    labels = {k: ("decoder" if k == "decoder" else "lars") for k in params_shape}
    tx = optax.multi_transform(
      {"lars": self.lars(scheds["lr"]), "decoder": optax.adam(dec_lr, b1=dc.b1, b2=dc.b2)}, labels
    )
    return tx, {**scheds, "decoder_lr": dec_lr}

  # ---- loss -----------------------------------------------------------------------------
  def evaluate(self, evaluator: Any, images: jax.Array) -> dict[str, jax.Array]:
    """Evaluator levels of images [B, H, W, 3]; BN in train mode on this batch, as released."""
    (stages, proj), _ = self.network().apply(
      {"params": evaluator}, images, train=True, mutable=["batch_stats"]
    )
    return {"c3": stages["c3"], "c4": stages["c4"], "c5": stages["c5"], "proj": proj}

  def reconstruct(
    self, params: Any, decoder_stats: Any, c5: jax.Array, *, train: bool
  ) -> tuple[jax.Array, Any]:
    """decoder(c5) -> (images in [-1, 1], updated decoder BN statistics)."""
    variables = {"params": params["decoder"], "batch_stats": decoder_stats}
    if not train:
      return self.decoder().apply(variables, c5, train=False), decoder_stats
    recon, upd = self.decoder().apply(variables, c5, train=True, mutable=["batch_stats"])
    return recon, upd["batch_stats"]

  def loss(
    self,
    params: Any,
    teacher_params: Any,
    loss_state: Any,
    views: Mapping[str, jax.Array],
    rng: jax.Array,
    sched: Mapping[str, jax.Array],
  ) -> tuple[jax.Array, tuple[Any, dict]]:
    """BYOL loss + lambda * generation loss of both views; (loss, (new_loss_state, metrics))."""
    del rng, sched
    outputs, new_state = self.forward_bn(params, teacher_params, loss_state, views)
    byol_loss, metrics = self.byol_terms(outputs)
    weights = self.weights
    s_dec = loss_state["decoder_stats"]
    gen = jnp.zeros([], jnp.float32)
    terms_sum: dict[str, jax.Array] = {}
    for v in range(2):
      c5 = outputs["online"][v][0]["c5"]
      if self.config.sage.detach_decoder_input:
        c5 = jax.lax.stop_gradient(c5)
      recon, s_dec = self.reconstruct(params, s_dec, c5, train=True)
      image = views["global"][:, v]
      real, fake = {}, {}
      if self.uses_evaluator:
        evaluator = jax.lax.stop_gradient(loss_state["evaluator"])
        real = jax.lax.stop_gradient(self.evaluate(evaluator, image))
        fake = self.evaluate(evaluator, recon)
      g, terms = sage_losses.generation_loss(image, recon, real, fake, weights)
      gen = gen + g
      for k, t in terms.items():
        terms_sum[k] = terms_sum.get(k, 0.0) + t
    loss = byol_loss + self.config.sage.weight * gen
    metrics.update({"loss_gen": gen, **{f"gen_{k}": t for k, t in terms_sum.items()}})
    new_state = {**new_state, "decoder_stats": jax.lax.stop_gradient(s_dec)}
    return loss, (new_state, metrics)
