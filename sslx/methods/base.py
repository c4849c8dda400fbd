"""The one interface between a method and everything else (trainer, evaluations, export, pictures).

A method is a class derived from `Method`, registered once in `sslx/methods/__init__.py`. The
trainer, `--mode=knn|linear_probe|attentive_probe|export|attention` and the add-ons read only what
is declared here; nothing probes a method with `getattr`.

Required (abstract; registration fails with a one-line error naming what is missing):
  init(rng, image_shape) -> (params, loss_state)
  loss(params, teacher_params, loss_state, views, rng, sched) -> (loss, (loss_state, metrics))
  features(eval_params, images) -> [B, D] (the kNN / linear-probe feature)
  loss_state_rule (class attribute): how the loss state combines under gradient accumulation.

Optional, with defaults:
  check_config(config) (classmethod): refuses impossible settings before anything is built.
  has_teacher (True): keep an EMA teacher in the train state. A method without one (CAE) keeps
    no second copy of its parameters; `teacher_params` is then never called and its loss gets
    None for the teacher.
  teacher_params(params): the part of the student the EMA teacher tracks (default: all of it).
  schedules(steps_per_epoch, total_steps): the method's own schedules of the step ({}).
  optimizer(params_shape, steps_per_epoch, total_steps): (tx, schedules), or None for the
    trainer's AdamW recipe (DINO/iBOT/SERE's, from config.optim).
  eval_params(params, loss_state): what `features` and `tokens` take, from the teacher's
    parameters (the student's without a teacher) and the loss state (e.g. BatchNorm statistics).
  check_batch(batch): a host-side check of each batch before it goes to the device.
  extra_batch_keys: batch entries the step needs beyond `BASE_BATCH_KEYS`; the data pipeline
    computes the SERE overlaps only when someone asks for them.
  tokens(eval_params, images) -> [B, T, D] ([CLS] first) for the attentive probe.
  device_views(rng, batch) -> the views `loss` takes, from the device batch; None (default):
    the trainer's multi-crop photometric augmentation (config.augment) makes them.
  is_classifier / logits(eval_params, images) -> [B, K]: a method whose network ends in a
    classifier (fine-tuning) is evaluated by its top-1 / top-5 on the evaluation split
    instead of the kNN of its features.
  export_backbone(params, loss_state, weights) -> (torch state dict, metadata) for --mode=export.
  import_backbone(params, loss_state, state_dict) -> (params, loss_state): the inverse, for
    --init_from (sslx/models/init_from.py): a fresh init with the backbone replaced.
  start_weights() -> (file or workdir, key) | None: where a fresh run's backbone comes from when
    the config says so (fine-tuning); --init_from overrides it.
  import_head(params, head_state_dict) -> params: an official projection head (--init_from_head).
  block_features(eval_params, images, n_last_blocks, avgpool) -> [B, D'] for the DINO linear
    protocol: the [CLS] of the last n blocks (and the mean patch token), after the final norm.
  attention() -> (forward, patch size) for --mode=attention: forward(eval_params, images) gives
    the last block's attention [B, heads, 1 + N, 1 + N].
  supports_addons / forward / loss_terms: methods that split their loss into a forward pass and
    the terms computed from its outputs can carry add-ons (`AddOn`, e.g. SERE and KoLeo).
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import ml_collections
import numpy as np

from sslx.errors import UserError
from sslx.methods.accumulation import LossStateRule

Forward = Callable[[Any, jax.Array], jax.Array]

# Batch entries every method's step may read: crops (or the canvas they are cut from on the
# device), their boxes and flips, the original image size and the block masks.
BASE_BATCH_KEYS = frozenset(
  {
    "global_crops",
    "local_crops",
    "canvas",
    "canvas_extent",
    "canvas_scale",
    "global_boxes",
    "global_flips",
    "local_boxes",
    "local_flips",
    "image_size",
    "global_masks",
    "local_masks",
  }
)
# The SERE overlap rectangles (sslx/data/overlap.py), made only when a method asks for them.
OVERLAP_KEYS = frozenset({"gg_rects", "gg_valid", "lg_rects", "lg_valid"})


class UnsupportedMode(UserError):
  """The method has no such piece (e.g. attention maps of a ResNet); the message says which."""


class MethodInterfaceError(TypeError):
  """A method class does not implement the interface; raised when it is registered."""


class Method(abc.ABC):
  """Base class of every method (see the module docstring for the contract)."""

  config: ml_collections.ConfigDict
  loss_state_rule: ClassVar[LossStateRule]
  has_teacher: ClassVar[bool] = True
  supports_addons: ClassVar[bool] = False
  is_classifier: ClassVar[bool] = False
  extra_batch_keys: ClassVar[frozenset[str]] = frozenset()

  def __init__(self, config: ml_collections.ConfigDict):
    # Methods are usually frozen dataclasses with `config` as their field, which replaces this.
    self.config = config

  # ---- required -------------------------------------------------------------------------
  @abc.abstractmethod
  def init(self, rng: jax.Array, image_shape: tuple[int, int, int]) -> tuple[Any, Any]:
    """(params, loss_state) for images of `image_shape` (H, W, C)."""

  @abc.abstractmethod
  def loss(
    self,
    params: Any,
    teacher_params: Any,
    loss_state: Any,
    views: Mapping[str, jax.Array],
    rng: jax.Array,
    sched: Mapping[str, jax.Array],
  ) -> tuple[jax.Array, tuple[Any, dict]]:
    """Total loss of one augmented batch -> (loss, (new loss state, metrics))."""

  @abc.abstractmethod
  def features(self, eval_params: Any, images: jax.Array) -> jax.Array:
    """[B, D] features of normalised float images (kNN, linear probe)."""

  # ---- optional -------------------------------------------------------------------------
  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> None:
    """Raises a UserError for settings the method cannot run with, before anything is built
    (the trainer calls it first); default: accepts all."""
    del config

  def teacher_params(self, params: Any) -> Any:
    """The part of `params` the EMA teacher tracks."""
    return params

  def schedules(self, steps_per_epoch: int, total_steps: int) -> dict[str, Any]:
    """The method's own schedules, functions of the step (e.g. DINO's teacher temperature)."""
    del steps_per_epoch, total_steps
    return {}

  def optimizer(self, params_shape: Any, steps_per_epoch: int, total_steps: int) -> Any:
    """(optax transformation, its logged schedules), or None for the trainer's AdamW recipe."""
    del params_shape, steps_per_epoch, total_steps
    return None

  def eval_params(self, params: Any, loss_state: Any) -> Any:
    """What `features` / `tokens` take, from the evaluated parameters and the loss state."""
    del loss_state
    return params

  def check_batch(self, batch: Mapping[str, np.ndarray]) -> None:
    """Raises a UserError for a host batch the step cannot use; default: accepts all."""
    del batch

  @property
  def batch_keys(self) -> frozenset[str]:
    """The batch entries sent to the device."""
    return BASE_BATCH_KEYS | self.extra_batch_keys

  def device_views(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> Any:
    """The views `loss` takes, made on the device from the batch; None: the trainer's
    multi-crop augmentation makes them."""
    del rng, batch
    return None

  def logits(self, eval_params: Any, images: jax.Array) -> jax.Array:
    """[B, K] class scores of normalised float images (methods with `is_classifier`)."""
    raise UnsupportedMode(f"config.method={self.config.method!r} has no classifier")

  def tokens(self, eval_params: Any, images: jax.Array) -> jax.Array:
    """[B, T, D] tokens, [CLS] first, for the attentive probe."""
    raise UnsupportedMode(
      f"config.method={self.config.method!r} has no token sequence for the "
      "attentive probe; use --mode=linear_probe or --mode=knn"
    )

  def export_backbone(
    self, params: Any, loss_state: Any, weights: str
  ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The backbone of `params` as a PyTorch state dict plus file metadata."""
    raise UnsupportedMode(f"no exporter for config.method={self.config.method!r}")

  def import_backbone(
    self, params: Any, loss_state: Any, state_dict: Mapping[str, np.ndarray]
  ) -> tuple[Any, Any]:
    """(params, loss_state) with the backbone taken from `state_dict` (export_backbone's layout).

    `params` / `loss_state` are a fresh init: everything that is not the backbone (heads,
    predictors, decoders, centres) keeps its initial value. Raises
    sslx.models.torch_layout.LayoutError listing every missing, unexpected or mis-shaped key.
    """
    del params, loss_state, state_dict
    raise UnsupportedMode(f"--init_from: no importer for config.method={self.config.method!r}")

  def start_weights(self) -> tuple[str, str] | None:
    """(file or workdir, network key) whose backbone a fresh run starts from, when the method's
    config names one (fine-tuning's pretrained network); --init_from overrides it. None: the
    method's own initialisation."""
    return None

  def import_head(self, params: Any, head_state_dict: Mapping[str, np.ndarray]) -> Any:
    """`params` with the projection head taken from an official checkpoint's `head.` entries
    (prefix stripped); raises LayoutError on any mismatch."""
    del params, head_state_dict
    raise UnsupportedMode(
      f"--init_from_head: no importer of official heads for config.method="
      f"{self.config.method!r}; drop --init_from_head"
    )

  def block_features(
    self, eval_params: Any, images: jax.Array, n_last_blocks: int, avgpool: bool
  ) -> jax.Array:
    """DINO's linear-protocol feature: the [CLS] of the last `n_last_blocks` blocks (each after
    the final norm), with `avgpool` also the mean patch token of the last block -> [B, D']."""
    del eval_params, images, n_last_blocks, avgpool
    raise UnsupportedMode(
      f"config.method={self.config.method!r} has no per-block [CLS] tokens for "
      "config.probe.protocol='dino'; use the default protocol ('cached')"
    )

  def attention(self) -> tuple[Forward, int]:
    """(forward(eval_params, images) -> last-block attention [B, h, 1+N, 1+N], patch size)."""
    raise UnsupportedMode(
      f"--mode=attention needs a ViT with a [CLS] token; "
      f"config.method={self.config.method!r} has none"
    )

  # ---- the split that add-ons build on ---------------------------------------------------
  def forward(
    self, params: Any, teacher_params: Any, views: Mapping[str, jax.Array], rng: jax.Array
  ) -> dict[str, Any]:
    """Network outputs of one batch, incl. 'student_global' / 'student_local' /
    'teacher_global' backbone outputs ([B * views, ...] dicts, example axis outermost)."""
    raise NotImplementedError(f"{type(self).__name__} does not support add-ons")

  def loss_terms(
    self,
    params: Any,
    teacher_params: Any,
    outputs: Mapping[str, Any],
    loss_state: Any,
    views: Mapping[str, jax.Array],
    sched: Mapping[str, jax.Array],
  ) -> tuple[jax.Array, tuple[Any, dict]]:
    """The loss computed from `forward`'s outputs -> (loss, (new loss state, metrics))."""
    raise NotImplementedError(f"{type(self).__name__} does not support add-ons")


def evaluated_params(method: Method, fields: Mapping[str, Any]) -> Any:
  """What `method.features` takes, from a train state's fields ('params', 'teacher_params',
  'loss_state'; a TrainState or a restored dict): the teacher's parameters, or the student's
  for a method without a teacher, through `method.eval_params`."""
  get = fields.get if isinstance(fields, Mapping) else lambda k: getattr(fields, k)
  params = get("teacher_params") if method.has_teacher else get("params")
  return method.eval_params(params, get("loss_state"))


def check_method_class(name: str, cls: type) -> None:
  """Raises MethodInterfaceError (one line) unless `cls` implements the interface."""
  if not (isinstance(cls, type) and issubclass(cls, Method)):
    raise MethodInterfaceError(
      f"method {name!r}: {cls!r} must derive from sslx.methods.base.Method"
    )
  missing = sorted(getattr(cls, "__abstractmethods__", ()))
  if inspect.isabstract(cls) and missing:
    raise MethodInterfaceError(
      f"method {name!r} ({cls.__name__}) does not implement: {', '.join(missing)}"
    )
  if not isinstance(getattr(cls, "loss_state_rule", None), LossStateRule):
    raise MethodInterfaceError(
      f"method {name!r} ({cls.__name__}) does not declare "
      "loss_state_rule (LossStateRule.MEAN or THREADED)"
    )


class AddOnError(UserError):
  """An add-on cannot wrap the configured method; the message says why and how to turn it off."""


class AddOn(Method):
  """A loss add-on around any method that `supports_addons`; itself a full `Method`.

  Everything is the base method's except what the add-on adds: its own parameters (`init_own`,
  drawn from a key folded from the run's init key, so the base network starts exactly as it
  would without the add-on), its loss terms (`loss_terms`, which calls the base's) and the batch
  entries it needs (`extra_batch_keys`). Add-ons stack: an add-on's base may be another add-on.
  """

  name: ClassVar[str]
  # Distinct per add-on: the fold-in salt of its parameter key.
  key_salt: ClassVar[int]

  def __init__(self, base: Method, config: ml_collections.ConfigDict):
    if not base.supports_addons:
      raise AddOnError(
        f"the {self.name} add-on needs a method that exposes its forward pass "
        f"(DINO, iBOT, MoCo v3); config.method={config.method!r} does not: set "
        f"--config.{self.name}.enabled=False"
      )
    self.base = base
    self.config = config

  # ---- the base method's, unchanged ----------------------------------------------------
  @property
  def loss_state_rule(self) -> LossStateRule:  # type: ignore[override]
    return self.base.loss_state_rule

  @property
  def has_teacher(self) -> bool:  # type: ignore[override]
    return self.base.has_teacher

  @property
  def supports_addons(self) -> bool:  # type: ignore[override]
    return True

  @property
  def is_classifier(self) -> bool:  # type: ignore[override]
    return self.base.is_classifier

  def device_views(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> Any:
    return self.base.device_views(rng, batch)

  def logits(self, eval_params: Any, images: jax.Array) -> jax.Array:
    return self.base.logits(eval_params, images)

  @property
  def batch_keys(self) -> frozenset[str]:
    return self.base.batch_keys | self.extra_batch_keys

  def teacher_params(self, params: Any) -> Any:
    return self.base.teacher_params(params)

  def schedules(self, steps_per_epoch: int, total_steps: int) -> dict[str, Any]:
    return self.base.schedules(steps_per_epoch, total_steps)

  def optimizer(self, params_shape: Any, steps_per_epoch: int, total_steps: int) -> Any:
    return self.base.optimizer(params_shape, steps_per_epoch, total_steps)

  def eval_params(self, params: Any, loss_state: Any) -> Any:
    return self.base.eval_params(params, loss_state)

  def check_batch(self, batch: Mapping[str, np.ndarray]) -> None:
    self.base.check_batch(batch)

  def features(self, eval_params: Any, images: jax.Array) -> jax.Array:
    return self.base.features(eval_params, images)

  def tokens(self, eval_params: Any, images: jax.Array) -> jax.Array:
    return self.base.tokens(eval_params, images)

  def export_backbone(
    self, params: Any, loss_state: Any, weights: str
  ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    return self.base.export_backbone(params, loss_state, weights)

  def import_backbone(
    self, params: Any, loss_state: Any, state_dict: Mapping[str, np.ndarray]
  ) -> tuple[Any, Any]:
    # Importers replace only the backbone, so the add-on's own parameters (e.g. SERE's heads)
    # pass through with their fresh init.
    return self.base.import_backbone(params, loss_state, state_dict)

  def import_head(self, params: Any, head_state_dict: Mapping[str, np.ndarray]) -> Any:
    return self.base.import_head(params, head_state_dict)

  def start_weights(self) -> tuple[str, str] | None:
    return self.base.start_weights()

  def block_features(
    self, eval_params: Any, images: jax.Array, n_last_blocks: int, avgpool: bool
  ) -> jax.Array:
    return self.base.block_features(eval_params, images, n_last_blocks, avgpool)

  def attention(self) -> tuple[Forward, int]:
    return self.base.attention()

  def forward(
    self, params: Any, teacher_params: Any, views: Mapping[str, jax.Array], rng: jax.Array
  ) -> dict[str, Any]:
    return self.base.forward(params, teacher_params, views, rng)

  # ---- what an add-on adds -------------------------------------------------------------
  def init(self, rng: jax.Array, image_shape: tuple[int, int, int]) -> tuple[Any, Any]:
    params, loss_state = self.base.init(rng, image_shape)  # the same key: the same base network
    own = self.init_own(jax.random.fold_in(rng, self.key_salt), params)
    clash = set(own) & set(params)
    if clash:
      raise MethodInterfaceError(
        f"add-on {self.name!r} parameters {sorted(clash)} clash with its base method's"
      )
    return {**params, **own}, loss_state

  def init_own(self, rng: jax.Array, base_params: Any) -> dict[str, Any]:
    """The add-on's own parameters (top-level keys of the params dict); default: none."""
    del rng, base_params
    return {}

  def loss(
    self,
    params: Any,
    teacher_params: Any,
    loss_state: Any,
    views: Mapping[str, jax.Array],
    rng: jax.Array,
    sched: Mapping[str, jax.Array],
  ) -> tuple[jax.Array, tuple[Any, dict]]:
    outputs = self.forward(params, teacher_params, views, rng)
    return self.loss_terms(params, teacher_params, outputs, loss_state, views, sched)

  @abc.abstractmethod
  def loss_terms(
    self,
    params: Any,
    teacher_params: Any,
    outputs: Mapping[str, Any],
    loss_state: Any,
    views: Mapping[str, jax.Array],
    sched: Mapping[str, jax.Array],
  ) -> tuple[jax.Array, tuple[Any, dict]]:
    """The base's terms (`self.base.loss_terms`) combined with the add-on's own."""
