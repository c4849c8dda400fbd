"""The optax chain of the self-distillation methods: AdamW with scheduled lr and
weight decay, per-tensor clipping and a frozen last layer (docs/fidelity.md, Shared pieces)."""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sslx.schedules import Schedule


class _ClipState(NamedTuple):
  pass


def clip_per_tensor(max_norm: float) -> optax.GradientTransformation:
  """Clips each parameter's gradient to L2 norm `max_norm` on its own.

  The official DINO/iBOT/SERE trainers clip every tensor separately with
  coefficient max_norm / (norm + 1e-6) when that is below 1, not by the global norm; optax
  only ships global-norm and block-RMS clipping, hence this small transform.
  """

  def update(updates, state, params=None):
    del params

    def clip(path, g):
      # Blocks stacked by nn.scan ('blocks/...', leading axis = layer) are clipped layer by
      # layer, as the unrolled blocks would be.
      stacked = g.ndim > 0 and "blocks" in _path_str(path).split("/")
      axes = tuple(range(1, g.ndim)) if stacked else None
      norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=axes, keepdims=stacked))
      coef = jnp.minimum(max_norm / (norm + 1e-6), 1.0)
      return (g * coef).astype(g.dtype)

    return jax.tree_util.tree_map_with_path(clip, updates), state

  return optax.GradientTransformation(lambda _: _ClipState(), update)


class FreezeState(NamedTuple):
  steps: jax.Array
  inner: Any


def freeze_for(inner: optax.GradientTransformation, steps: int) -> optax.GradientTransformation:
  """Skips `inner` entirely (zero update, state untouched) for the first `steps` steps.

  This mirrors PyTorch where a parameter whose grad is None is skipped by AdamW:
  no moment update, no weight decay and no step count, so bias correction starts
  afresh when the parameter unfreezes (DINO's freeze_last_layer; a zero gradient instead would
  still decay the weights and move the moments).
  """

  def init(params):
    return FreezeState(jnp.zeros([], jnp.int32), inner.init(params))

  def update(updates, state, params=None):
    new_updates, new_inner = inner.update(updates, state.inner, params)
    frozen = state.steps < steps
    out = jax.tree.map(lambda u: jnp.where(frozen, jnp.zeros_like(u), u), new_updates)
    kept = jax.tree.map(lambda old, new: jnp.where(frozen, old, new), state.inner, new_inner)
    return out, FreezeState(state.steps + 1, kept)

  return optax.GradientTransformation(init, update)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def decay_mask(params, *, decay_biases: bool, decay_norms: bool = False) -> Any:
  """True for parameters that get weight decay.

  DINO/iBOT: no decay on biases and any 1-D parameter (LayerNorm scales...).
  SERE (`decay_biases=True`): biases are decayed, other 1-D parameters are not.
  MoCo v3 (`decay_biases=decay_norms=True`): AdamW over every parameter.
  (docs/fidelity.md, Weight decay groups.)
  The official trainers decide by the PyTorch tensor's rank, so two 1-D tensors here are decayed
  because theirs are 2-D: a weight-normalised layer's magnitude 'g' (torch's weight_g is
  [out, 1]; it exists only with norm_last_layer=False) and iBOT's 'mask_token' ([1, D]).
  """

  def want(path, leaf):
    name = _path_str(path).split("/")[-1]
    if decay_norms and decay_biases:
      return True
    if name == "bias":
      return decay_biases
    if name in ("g", "mask_token"):
      return True
    # Norm scales are 1-D per layer but gain a leading axis when blocks are stacked by
    # nn.scan: decide by name, not only by rank.
    if name == "scale":
      return False
    return leaf.ndim > 1

  return jax.tree_util.tree_map_with_path(want, params)


LAST_LAYER = r"(^|/)last_layer\d*(/|$)"  # 'last_layer' and iBOT's 'last_layer2': both frozen


def label_frozen(params, pattern: str = LAST_LAYER, fixed: str = "") -> Any:
  """Labels params 'fixed' if their path matches `fixed` (never trained), else 'frozen_head' if it
  matches `pattern` (trained after the freeze), else 'rest'."""
  regex = re.compile(pattern)
  fixed_re = re.compile(fixed) if fixed else None

  def label(path, _):
    name = _path_str(path)
    if fixed_re is not None and fixed_re.search(name):
      return "fixed"
    return "frozen_head" if regex.search(name) else "rest"

  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(
  params,
  *,
  lr: Schedule,
  weight_decay: Schedule,
  b1: float,
  b2: float,
  eps: float,
  clip_grad: float | None,
  freeze_steps: int,
  decay_biases: bool,
  decay_norms: bool = False,
  fixed: str = "",
) -> optax.GradientTransformation:
  """AdamW with scheduled lr and weight decay, per-tensor clipping and a frozen last layer.

  The lr and weight decay are `optax.inject_hyperparams`, so their current values
  live in the optimiser state (and are logged from there).

  Args:
    fixed: regex over parameter paths ('backbone/patch_embed' for MoCo v3's frozen random patch
      embedding) that are never updated: no step, no decay, no optimiser state (PyTorch's
      requires_grad=False).
  """
  # A callable mask: multi_transform hands each group a tree with MaskedNode holes.
  mask = lambda p: decay_mask(p, decay_biases=decay_biases, decay_norms=decay_norms)  # noqa: E731

  def adamw(offset=0):
    # A frozen group's own step count starts at 0 when it unfreezes (which is what
    # restarts Adam's bias correction, as in PyTorch); the schedules must still see
    # the global step, hence the offset.
    return optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
      learning_rate=lambda c: lr(c + offset),
      weight_decay=lambda c: weight_decay(c + offset),
      b1=b1,
      b2=b2,
      eps=eps,
      mask=mask,
    )

  parts = []
  if clip_grad:
    parts.append(clip_per_tensor(clip_grad))
  labels = label_frozen(params, fixed=fixed)
  present = set(jax.tree.leaves(labels))
  if fixed and "fixed" not in present:
    raise ValueError(
      f"config.optim.frozen={fixed!r} matches no parameter; paths look like "
      "'backbone/patch_embed/kernel'"
    )
  if freeze_steps <= 0:
    labels = jax.tree.map(lambda x: "rest" if x == "frozen_head" else x, labels)
    present.discard("frozen_head")
  groups = {"rest": adamw()}
  if "frozen_head" in present:
    groups["frozen_head"] = freeze_for(adamw(freeze_steps), freeze_steps)
  if "fixed" in present:
    groups["fixed"] = optax.set_to_zero()
  parts.append(groups["rest"] if len(groups) == 1 else optax.multi_transform(groups, labels))
  return optax.chain(*parts)
