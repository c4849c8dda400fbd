"""MoCo v3 (Chen, Xie, He 2021): a ViT, a BN projector and predictor, InfoNCE against an EMA encoder.

Official behaviour followed (facebookresearch/moco-v3 builder.py, main_moco.py, vits.py;
docs/fidelity.md, MoCo v3): two views; q = predictor(projector(cls)) of the student, k =
projector(cls) of the momentum encoder (backbone + projector, no predictor); loss ctr(q1, k2) +
ctr(q2, k1) with temperature T and the 2T scale, negatives = the keys of the global batch;
projector 3 layers and predictor 2 layers with BatchNorm in train mode (statistics per view, as the
official code calls the encoder once per view); momentum 0.99 -> 1 cosine; for ViTs fixed 2-D
sin-cos positions and, optionally, a frozen random patch embedding (config.optim.frozen, see
configs/mocov3.py).

Differences, stated: the EMA update runs after the optimiser step (the official code updates the
momentum encoder at the start of the next step with that step's momentum value: same sequence, the
momentum index is one step earlier); kNN monitoring reads the momentum encoder's backbone, while the
official linear evaluation uses the base encoder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from sslx import errors
from sslx.losses import mocov3 as moco_losses
from sslx.methods.accumulation import LossStateRule
from sslx.methods.teacher_cls import TeacherClsMethod
from sslx.models import heads
from sslx.models.build import build_backbone, compute_dtype
from sslx.normalize import l2_normalize


class MocoConfigError(errors.UserError):
  """A MoCo v3 setting that cannot work; raised before anything compiles."""


@dataclasses.dataclass(frozen=True)
class _Net:
  """What SERE reads from `network()`: the backbone."""

  backbone: Any


@dataclasses.dataclass(frozen=True)
class MocoV3(TeacherClsMethod):
  """MoCo v3 as the trainer sees it; `config` is the whole run config.

  Gradient accumulation is not the big-batch step: each micro-batch contrasts its queries
  against its own keys (B/k negatives instead of B) and its projector/predictor BatchNorm uses
  the micro-batch's statistics, as PyTorch-style accumulation gives (the official code has no
  accumulation). The step's loss and gradient are the means over the micro-batches of the
  micro-batch losses and gradients. There is no loss state (`LossStateRule.MEAN` of nothing).
  """

  config: ml_collections.ConfigDict
  loss_state_rule: ClassVar[LossStateRule] = LossStateRule.MEAN

  def _mlp(self, kind: str) -> heads.MocoMLP:
    hc = self.config.head
    layers = hc.projector_layers if kind == "projector" else hc.predictor_layers
    return heads.MocoMLP(layers, hc.hidden_dim, hc.out_dim, compute_dtype(self.config.model.dtype))

  def network(self, *, teacher: bool = False) -> _Net:
    return _Net(build_backbone(self.config.model, drop_path=not teacher))

  def _check(self) -> None:
    dc = self.config.data
    if dc.global_crops.number != 2:
      raise MocoConfigError(
        f"MoCo v3 contrasts exactly two views; data.global_crops.number is "
        f"{dc.global_crops.number}, set it to 2"
      )
    if dc.local_crops.number:
      raise MocoConfigError("MoCo v3 takes no local crops; set data.local_crops.number=0")

  def init(self, rng: jax.Array, image_shape: tuple[int, int, int]) -> tuple[Any, Any]:
    self._check()
    r_b, r_proj, r_pred = jax.random.split(rng, 3)
    backbone = self.network().backbone
    dummy = jnp.zeros((2, *image_shape), jnp.float32)
    params = {"backbone": backbone.init({"params": r_b}, dummy[:1], train=False)["params"]}
    feat = jnp.zeros((2, backbone.embed_dim), jnp.float32)
    params["projector"] = self._mlp("projector").init({"params": r_proj}, feat)["params"]
    z = jnp.zeros((2, self.config.head.out_dim), jnp.float32)
    params["predictor"] = self._mlp("predictor").init({"params": r_pred}, z)["params"]
    return params, {}

  def teacher_params(self, params: Any) -> Any:
    """The momentum encoder: everything but the predictor (SERE heads included when present)."""
    return {k: v for k, v in params.items() if k != "predictor"}

  def schedules(self, steps_per_epoch: int, total_steps: int) -> dict[str, Any]:
    del steps_per_epoch, total_steps
    return {}

  def _project(self, params: Any, cls: jax.Array, kind: str) -> jax.Array:
    out, _ = self._mlp(kind).apply({"params": params}, cls, mutable=["batch_stats"])
    return out

  def forward(
    self, params: Any, teacher_params: Any, views: Mapping[str, jax.Array], rng: jax.Array
  ) -> dict[str, Any]:
    """Returns 'q' and 'k' [2, B, out_dim] and the backbone outputs for SERE."""
    g = views["global"]
    b, ng = g.shape[:2]
    flat = g.reshape(-1, *g.shape[2:])  # example axis outermost: stays sharded on it
    backbone = self.network().backbone
    t_backbone = self.network(teacher=True).backbone
    s_out = backbone.apply({"params": params["backbone"]}, flat, train=True, rngs={"dropout": rng})
    t_out = jax.lax.stop_gradient(
      t_backbone.apply({"params": teacher_params["backbone"]}, flat, train=False)
    )
    by_view = lambda y: jnp.swapaxes(y.reshape(b, ng, *y.shape[1:]), 0, 1)  # noqa: E731
    s_cls, t_cls = by_view(s_out["cls"]), by_view(t_out["cls"])
    # One projector call per view: BatchNorm statistics per view, as the official code.
    q = jnp.stack(
      [
        self._project(
          params["predictor"],
          self._project(params["projector"], s_cls[v], "projector"),
          "predictor",
        )
        for v in range(ng)
      ]
    )
    k = jax.lax.stop_gradient(
      jnp.stack(
        [self._project(teacher_params["projector"], t_cls[v], "projector") for v in range(ng)]
      )
    )
    return {"q": q, "k": k, "student_global": s_out, "student_local": None, "teacher_global": t_out}

  def loss_terms(
    self,
    params: Any,
    teacher_params: Any,
    outputs: Mapping[str, Any],
    loss_state: Any,
    views: Mapping[str, jax.Array],
    sched: Mapping[str, jax.Array],
  ) -> tuple[jax.Array, tuple[Any, dict]]:
    del sched
    q, k = outputs["q"], outputs["k"]
    loss = moco_losses.mocov3_loss(q[0], q[1], k[0], k[1], self.config.loss.temperature)
    # Collapse diagnostic: std of the normalised keys per dimension (-> 0 when all keys agree).
    kn = l2_normalize(k)
    metrics = {"loss_contrastive": loss, "key_std": jnp.mean(jnp.std(kn, axis=1))}
    return loss, (loss_state, metrics)
