"""The one trainer: every method runs through `run(config, workdir)`.

Phases, in order (as big_vision's train.py): mesh -> data -> method and shapes
(`jax.eval_shape`) -> shardings -> optimiser -> jit with donation -> resume ->
evaluators -> loop. A method supplies its networks, loss and schedules
(sslx/methods); everything else lives here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging as logging_std
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from sslx import errors, schedules
from sslx.data import augment, device_crops, pipeline
from sslx.eval import knn
from sslx.methods import enabled_addons, make_method
from sslx.methods.accumulation import LossStateRule
from sslx.methods.base import BASE_BATCH_KEYS, OVERLAP_KEYS, Method, evaluated_params
from sslx.train import checkpoint as ckpt_lib
from sslx.train import faults, optim, preemption, sharding
from sslx.train import flops as flops_lib
from sslx.train import metrics as metrics_lib
from sslx.train.prefetch import DevicePrefetcher, union_across_processes
from sslx.train.state import TrainState, ema_update, tree_l2

# Every batch entry some method's step may read (scripts and tests that build device batches by
# hand use it; the trainer sends each method's own `batch_keys`).
DEVICE_KEYS = tuple(sorted(BASE_BATCH_KEYS | OVERLAP_KEYS))


class TrainingDiverged(FloatingPointError):
  """The loss or the state became NaN/Inf; the message names the step window, the last finite
  checkpoint and the fixes that apply."""


def total_steps_of(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  return int(config.get("total_steps") or config.total_epochs * steps_per_epoch)


def make_schedules(config, steps_per_epoch: int, total_steps: int) -> dict[str, Callable]:
  """lr, weight decay and teacher momentum, all per iteration (docs/fidelity.md, Schedules)."""
  oc = config.optim
  warmup = int(round(oc.warmup_epochs * steps_per_epoch))
  base_lr = schedules.base_learning_rate(oc.lr_per_256, config.batch_size)
  return {
    "lr": schedules.cosine_schedule(base_lr, oc.min_lr, total_steps, warmup),
    "weight_decay": schedules.cosine_schedule(oc.weight_decay, oc.weight_decay_end, total_steps),
    "momentum": schedules.cosine_schedule(
      config.teacher.momentum, config.teacher.momentum_end, total_steps
    ),
  }


def default_optimizer(
  config, params_shape, steps_per_epoch: int, total_steps: int
) -> tuple[optax.GradientTransformation, dict[str, Callable]]:
  """AdamW from config.optim with the DINO schedules -> (tx, schedules)."""
  oc = config.optim
  scheds = make_schedules(config, steps_per_epoch, total_steps)
  tx = optim.make_optimizer(
    params_shape,
    lr=scheds["lr"],
    weight_decay=scheds["weight_decay"],
    b1=oc.b1,
    b2=oc.b2,
    eps=oc.eps,
    clip_grad=oc.clip_grad,
    freeze_steps=int(round(oc.freeze_last_layer_epochs * steps_per_epoch)),
    decay_biases=oc.decay_biases,
    decay_norms=oc.get("decay_norms", False),
    fixed=oc.get("frozen", ""),
  )
  return tx, scheds


def make_train_step(
  config, method, tx, scheds: dict[str, Callable], method_scheds: dict[str, Callable]
):
  """The pure update: augment on device -> loss -> grads -> optax -> EMA teacher.

  With config.optim.accum_steps = k > 1 the augmented batch is split into k micro-batches
  whose gradients are averaged (`_accumulate`) before the ONE optimiser update and the ONE
  EMA-teacher update of the step; the loss state combines by the method's `loss_state_rule`
  (sslx/methods/accumulation.py). k = 1 is the plain step.

  `scheds` are the optimiser's (lr, weight_decay, momentum: functions of the step, logged
  and, for momentum, used by the EMA teacher); `method_scheds` the
  method's own (e.g. DINO's teacher temperature), all functions of the step.
  """

  accum_steps = check_accumulation(config, method)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    rng, r_aug, r_model = jax.random.split(state.rng, 3)
    views = method.device_views(r_aug, batch)  # a method's own (fine-tuning), or:
    if views is None:
      if "canvas" in batch:  # config.data.crops_on = 'device'
        batch = device_crops.canvas_crops(
          batch,
          config.data.global_crops.size,
          config.data.local_crops.size,
          config.data.interpolation,
        )
      g, l = augment.augment_multicrop(
        r_aug, batch["global_crops"], batch["local_crops"], config.augment
      )
      views = {**batch, "global": g, "local": l}
    sched = {k: f(state.step) for k, f in method_scheds.items()}
    sched["step"] = state.step

    grad_fn = jax.value_and_grad(
      lambda params, loss_state, views, rng: method.loss(
        params, state.teacher_params, loss_state, views, rng, sched
      ),
      has_aux=True,
    )
    if accum_steps == 1:
      (loss, (loss_state, metrics)), grads = grad_fn(state.params, state.loss_state, views, r_model)
    else:
      loss, loss_state, metrics, grads = _accumulate(
        grad_fn, state.params, state.loss_state, views, r_model, accum_steps, method.loss_state_rule
      )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    momentum = scheds["momentum"](state.step)
    teacher = (
      ema_update(state.teacher_params, method.teacher_params(params), momentum)
      if method.has_teacher
      else None
    )
    metrics = dict(metrics)
    metrics.update(
      loss=loss,
      lr=scheds["lr"](state.step),
      weight_decay=scheds["weight_decay"](state.step),
      momentum=momentum,
      l2_grads=tree_l2(grads),
      l2_params=tree_l2(params),
      l2_updates=tree_l2(updates),
    )
    new_state = state.replace(
      step=state.step + 1,
      params=params,
      teacher_params=teacher,
      opt_state=opt_state,
      loss_state=loss_state,
      rng=rng,
    )
    return new_state, metrics

  return train_step


class AccumulationError(errors.UserError):
  """config.optim.accum_steps cannot be used with this batch size."""


def check_accumulation(config, method) -> int:
  """config.optim.accum_steps (default 1), validated; raised before anything compiles.

  Every method declares how its loss state combines over micro-batches (`loss_state_rule`, a
  `LossStateRule`); one that does not is a programming error (TypeError), not a user's.
  """
  k = int(config.optim.get("accum_steps", 1) or 1)
  if k == 1:
    return 1
  if k < 1 or config.batch_size % k:
    raise AccumulationError(
      f"config.optim.accum_steps={k} must be >= 1 and divide config.batch_size={config.batch_size}"
    )
  rule = method.loss_state_rule
  if not isinstance(rule, LossStateRule):
    raise TypeError(
      f"{type(method).__name__} must declare loss_state_rule (a "
      "sslx.methods.accumulation.LossStateRule) to run with accum_steps > 1"
    )
  return k


def _accumulate(grad_fn, params, loss_state, views, rng, k: int, rule: LossStateRule):
  """Mean loss, metrics and gradients over k micro-batches, scanned in order.

  Micro-batch j takes examples j, j + k, j + 2k, ... of every batch array, so each stays
  sharded over the devices like the full batch, and micro-batch j draws its randomness
  (drop path) from fold_in(rng, j). With per-example-mean losses and no BatchNorm the result
  equals the big-batch step; BatchNorm normalises each micro-batch with its own statistics,
  and in-batch negatives (MoCo v3) come from the micro-batch.

  The loss state follows `rule`: THREADED carries it through the micro-batches in order
  (k updates); MEAN runs every micro-batch from the step's state and returns start + the mean
  of the k increments (integer leaves: the mean increment rounded down). MEAN keeps a running
  sum of increments the size of the loss state (a frozen tokenizer kept there included).
  """

  def split(x):
    if not hasattr(x, "ndim") or x.ndim == 0:
      return None
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

  micro = jax.tree.map(split, views)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  threaded = rule == LossStateRule.THREADED

  def delta(new, old):
    if not (jnp.issubdtype(old.dtype, jnp.floating) or jnp.issubdtype(old.dtype, jnp.integer)):
      raise TypeError(f"LossStateRule.MEAN averages numbers; a loss state leaf is {old.dtype}")
    acc = jnp.float32 if jnp.issubdtype(old.dtype, jnp.floating) else old.dtype
    return new.astype(acc) - old.astype(acc)

  def body(carry, xs):
    state_or_sum, grads, loss = carry
    j, mb = xs
    start = state_or_sum if threaded else loss_state
    (l, (new_state, metrics)), g = grad_fn(params, start, mb, jax.random.fold_in(rng, j))
    if threaded:
      state_or_sum = new_state
    else:
      state_or_sum = jax.tree.map(
        lambda s, n, o: s + delta(n, o), state_or_sum, new_state, loss_state
      )
    grads = jax.tree.map(jnp.add, grads, g)
    return (state_or_sum, grads, loss + l), metrics

  if threaded:
    init = loss_state
  else:
    init = jax.tree.map(lambda x: jnp.zeros_like(delta(x, x)), loss_state)
  (state_or_sum, grads, loss), metrics = jax.lax.scan(
    body, (init, zero_grads, jnp.zeros([], jnp.float32)), (jnp.arange(k), micro)
  )
  if threaded:
    new_loss_state = state_or_sum
  else:

    def mean_update(old, total):
      step = total / k if jnp.issubdtype(total.dtype, jnp.floating) else total // k
      return (old.astype(total.dtype) + step).astype(old.dtype)

    new_loss_state = jax.tree.map(mean_update, loss_state, state_or_sum)
  mean = lambda x: x / k  # noqa: E731
  return (
    mean(loss),
    new_loss_state,
    jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics),
    jax.tree.map(mean, grads),
  )


def make_feature_fn(
  method, mesh, config, forward: Callable | None = None
) -> Callable[[Any, np.ndarray], np.ndarray]:
  """uint8 images (the full eval batch, same on every process) -> numpy features.

  Each process sends its own slice of the batch to its devices and gathers the
  result back, so evaluation works unchanged on one CPU and on several hosts.
  `forward` (default `method.features`): (eval params, normalised images) -> outputs, e.g.
  `method.logits`.
  """
  features = knn.eval_forward(
    forward or method.features, tuple(config.augment.mean), tuple(config.augment.std)
  )

  shard = sharding.batch_sharding(mesh)
  n, p = jax.process_count(), jax.process_index()

  def fn(params, images: np.ndarray) -> np.ndarray:
    per = images.shape[0] // n
    local = images[p * per : (p + 1) * per]
    feats = features(params, jax.make_array_from_process_local_data(shard, local))
    if n > 1:
      from jax.experimental import multihost_utils

      return np.asarray(multihost_utils.process_allgather(feats, tiled=True))
    return np.asarray(jax.device_get(feats))

  return fn


def eval_params_of(method, state) -> Any:
  """What `method.features` takes, from a TrainState (sslx/methods/base.py, evaluated_params)."""
  return evaluated_params(method, state)


def evaluate_knn(config, feature_fn, params, num_classes: int | None = None) -> dict[str, float]:
  """Weighted kNN (DINO protocol) of `params` on the labelled splits in config.data."""
  ec, dc = config.eval, config.data
  batches = lambda split: pipeline.eval_dataset(dc, split, batch_size=ec.batch_size)  # noqa: E731
  f = lambda images: feature_fn(params, images)  # noqa: E731
  return knn.run_knn(
    f,
    batches(dc.eval_train_split),
    batches(dc.eval_test_split),
    num_classes=num_classes or pipeline.eval_num_classes(dc),
    k=ec.knn_k,
    temperature=ec.knn_temperature,
  )


def evaluate_classifier(config, logits_fn, params) -> dict[str, float]:
  """Top-1 / top-5 (percent) of a classifier on config.data.eval_test_split (fine-tuning).

  `logits_fn(params, uint8 images) -> numpy [b, K]`; padded examples (mask False) are skipped.
  """
  dc = config.data
  hits1 = hits5 = total = 0
  for batch in pipeline.eval_dataset(dc, dc.eval_test_split, batch_size=config.eval.batch_size):
    logits = np.asarray(logits_fn(params, batch["image"]), np.float32)
    keep = np.asarray(batch["mask"], bool)
    labels = np.asarray(batch["label"])[keep]
    top = np.argsort(-logits[keep], axis=1)[:, :5]
    hits1 += int(np.sum(top[:, 0] == labels))
    hits5 += int(np.sum(np.any(top == labels[:, None], axis=1)))
    total += int(keep.sum())
  if not total:
    raise pipeline.DataError(f"the evaluation split {dc.eval_test_split!r} has no images")
  return {"top1": 100.0 * hits1 / total, "top5": 100.0 * hits5 / total, "num_test": total}


def _check_finite(window: list, first_step: int, config, last_finite: int | None) -> None:
  """Stops on a non-finite loss in `window` (the losses of steps first_step + 1, ...).

  With config.skip_nonfinite_updates such steps were skipped by the optimiser, so the run goes
  on; the state check before each save still guards what is written.
  """
  if not window or config.get("skip_nonfinite_updates", 0):
    return
  losses = np.asarray(jax.device_get(window), np.float64)
  bad = np.flatnonzero(~np.isfinite(losses))
  if bad.size:
    step = first_step + int(bad[0]) + 1
    raise TrainingDiverged(
      faults.divergence_message(
        config,
        what=f"the loss became {losses[bad[0]]}",
        window=(step, step),
        last_finite=last_finite,
      )
    )


def _check_state(state, config, window: tuple[int, int], last_finite: int | None) -> None:
  """Stops before a non-finite state is saved; `window` = (first, last) step it may stem from."""
  if not faults.state_is_finite(state):
    raise TrainingDiverged(
      faults.divergence_message(
        config,
        what="the parameters, teacher, optimiser or loss state became non-finite",
        window=window,
        last_finite=last_finite,
      )
    )


@dataclasses.dataclass(frozen=True)
class Built:
  """What `build` returns: the method, the state's shapes and shardings, the jitted step."""

  method: Any
  state_shape: Any
  state_sharding: Any
  train_step: Any  # jitted (state, batch) -> (state, metrics), state donated
  init: Callable[[int], TrainState]  # seed -> sharded initial state


def build(
  config, mesh, steps_per_epoch: int, total_steps: int, method: Method | None = None
) -> Built:
  """Method -> shapes (jax.eval_shape) -> shardings -> optimiser -> jitted step."""
  # Random bits that do not depend on how arrays are sharded: the same augmentation
  # on 1 or 8 devices.
  jax.config.update("jax_threefry_partitionable", True)
  method = method or make_method(config)
  gsize = config.data.global_crops.size
  image_shape = (gsize, gsize, 3)
  params_shape, _ = jax.eval_shape(lambda r: method.init(r, image_shape), jax.random.PRNGKey(0))
  # A method may bring its own optimiser (LARS, per-part optimisers...); the default is the
  # AdamW recipe of DINO/iBOT/SERE read from config.optim.
  tx_and_scheds = method.optimizer(params_shape, steps_per_epoch, total_steps)
  tx, scheds = tx_and_scheds or default_optimizer(
    config, params_shape, steps_per_epoch, total_steps
  )
  if config.get("skip_nonfinite_updates", 0):
    # Drops an update whose gradients are not finite (counted in the state), up to N in a row.
    tx = optax.apply_if_finite(tx, max_consecutive_errors=int(config.skip_nonfinite_updates))

  def init_state(rng):
    r_init, r_train = jax.random.split(rng)
    params, loss_state = method.init(r_init, image_shape)
    return TrainState(
      step=jnp.zeros([], jnp.int32),
      params=params,
      teacher_params=method.teacher_params(params) if method.has_teacher else None,
      opt_state=tx.init(params),
      loss_state=loss_state,
      rng=r_train,
    )

  state_shape = jax.eval_shape(init_state, jax.random.PRNGKey(0))
  state_sharding = sharding.param_sharding(mesh, state_shape, config.sharding.fsdp_min_size)
  method_scheds = method.schedules(steps_per_epoch, total_steps)
  train_step = jax.jit(
    make_train_step(config, method, tx, scheds, method_scheds),
    in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
    out_shardings=(state_sharding, sharding.replicated(mesh)),
    donate_argnums=(0,),
  )
  init_jit = jax.jit(init_state, out_shardings=state_sharding)
  return Built(
    method, state_shape, state_sharding, train_step, lambda seed: init_jit(jax.random.PRNGKey(seed))
  )


def model_flops_per_device(
  config, mesh, steps_per_epoch: int, total_steps: int, state, batch
) -> float | None:
  """Model FLOPs of one device's share of one train step, for MFU.

  Counted from the step's jaxpr (sslx/train/flops.py), since XLA's GPU cost analysis leaves out
  the products cuBLAS runs. A fused attention kernel is counted as the explicit attention it
  replaces (the step is traced once more with config.model.attention='xla'). None if that fails.
  """
  try:
    if config.model.get("attention", "xla") != "xla":
      config = copy.deepcopy(config)
      with config.unlocked():
        config.model.attention = "xla"
    step = build(config, mesh, steps_per_epoch, total_steps).train_step
    return flops_lib.function_flops(step, state, batch) / mesh.devices.size
  except Exception as e:  # pylint: disable=broad-except  # MFU is a diagnostic; never stop a run
    logging.warning("Could not count the step's FLOPs (%s); MFU from XLA's estimate.", e)
    return None


class _QuietLibraries(logging_std.Filter):
  """Keeps orbax's and jax's per-operation INFO chatter out of the training log."""

  NOISY = ("/orbax/", "/jax/_src/xla_bridge", "/jax/_src/distributed")

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or not any(
      n in record.pathname for n in self.NOISY
    )


def quiet_libraries() -> None:
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  stop_after: int | None = None,
  init_from: str | None = None,
  init_from_key: str = "auto",
  init_from_head: bool = False,
) -> dict[str, Any]:
  """Trains `config.method` in `workdir`, resuming from its latest checkpoint.

  `init_from` (a file, sslx/models/init_from.py) sets the backbone of the initial student and
  teacher of a fresh workdir (and with `init_from_head` the projection head, for DINO);
  `init_from_key` picks the network in files holding several. A workdir that has a checkpoint
  resumes from it and ignores `init_from` (logged), so the command that started a run also
  resumes it after a preemption.

  SIGTERM and SIGINT end the run after the current step with a checkpoint of it
  (sslx/train/preemption.py); the results then hold 'preempted': the signal's name.

  Args:
    stop_after: end this invocation (with a checkpoint) once this many steps are
      done, without changing the schedules; a later call resumes. For time-sliced
      jobs and the resume tests.

  Returns the last evaluation results and the final step (used by scripts/tests).
  """
  with preemption.StopOnSignal() as stop:
    return _run(config, workdir, stop_after, stop, (init_from, init_from_key, init_from_head))


def _resume_point(config, workdir: str, ckpt) -> None:
  """Refuses, before anything is built, a config that differs from the latest checkpoint's in
  keys a resume may not change (faults.RESUME_SAFE_KEYS); logs the allowed differences.

  A checkpoint whose config cannot be read is damaged: it is set aside with a warning and the
  previous one is compared instead.
  """
  for step in reversed(ckpt.all_steps()):
    try:
      old, where = ckpt.read_config(step), f"{ckpt.directory}/{step}/{ckpt_lib.CONFIG_ITEM}"
    except Exception as e:  # pylint: disable=broad-except  # any read failure = damaged
      _set_aside(ckpt, step, e)
      continue
    if old is None:  # written before configs were stored: config.json is the best record
      where = os.path.join(workdir, "config.json")
      if not os.path.exists(where):
        logging.warning(
          "checkpoint %d has no stored config and %s is missing: the config cannot be compared",
          step,
          where,
        )
        return
      with open(where) as f:
        old = json.load(f)
    allowed, unmatched = faults.check_resume_config(
      old, config, step=step, workdir=workdir, where=where
    )
    if allowed:
      logging.info(
        "resuming step %d with changed settings: %s", step, faults.describe_allowed(allowed)
      )
    if unmatched:
      logging.warning(
        "config keys in only one of the checkpoint's config and this one (a code change?): %s",
        ", ".join(unmatched),
      )
    return


def _set_aside(ckpt, step: int, error: BaseException) -> None:
  where = ckpt.set_aside(step)
  first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
  logging.warning(
    "checkpoint step %d cannot be used (%s); moved it to %s and falling back to "
    "the previous checkpoint",
    step,
    first,
    where,
  )


def _restore_latest(ckpt, abstract_state, data_iter):
  """(state, step) of the newest checkpoint that reads and is finite; (None, None) if none.

  Unreadable or non-finite checkpoints are set aside with a warning naming their step: a run
  never resumes from them silently.
  """
  for step in reversed(ckpt.all_steps()):
    logging.info("resuming from %s/%d", ckpt.directory, step)
    try:
      state = ckpt.restore(step, abstract_state, data_iter)
    except Exception as e:  # pylint: disable=broad-except  # truncated/corrupt files, any kind
      _set_aside(ckpt, step, e)
      continue
    if not faults.state_is_finite(state):
      _set_aside(ckpt, step, FloatingPointError("its state is not finite"))
      continue
    return state, step
  return None, None


def _run(
  config,
  workdir: str,
  stop_after: int | None,
  stop: preemption.StopOnSignal,
  init_from: tuple[str | None, str, bool] = (None, "auto", False),
) -> dict[str, Any]:
  quiet_libraries()
  # ---- Checks that need no compiling: settings, workdir, the checkpoint's config ------------
  faults.check_run_config(config)
  faults.check_workdir(workdir)
  # Closed on every way out (the loop's own close waits for the last save first): an open
  # orbax manager left at exit prints a traceback after a failed run's one-line error.
  with ckpt_lib.Checkpointer(
    workdir,
    max_to_keep=config.checkpoint.max_to_keep,
    async_save=config.checkpoint.get("async_save", True),
    cleanup_tmp=True,
  ) as ckpt:
    return _run_with(ckpt, config, workdir, stop_after, stop, init_from)


def _run_with(
  ckpt: ckpt_lib.Checkpointer,
  config,
  workdir: str,
  stop_after: int | None,
  stop: preemption.StopOnSignal,
  init_from: tuple[str | None, str, bool],
) -> dict[str, Any]:
  is_main = jax.process_index() == 0
  stop.set_sync_point(ckpt.reached_preemption)
  _resume_point(config, workdir, ckpt)
  method = make_method(config)
  init_path, init_key, init_head = init_from
  start = method.start_weights()  # e.g. fine-tuning's pretrained network
  if not init_path and start is not None:
    init_path, init_key = start
  if init_path and ckpt.latest_step() is not None:
    logging.info(
      "init_from: %s has a checkpoint (step %d): resuming from it, --init_from=%s ignored",
      workdir,
      ckpt.latest_step(),
      init_path,
    )
    init_path = None
  backbone = None
  if init_path:  # read before anything compiles: a bad file fails at once
    from sslx.models import init_from as init_from_lib

    backbone = init_from_lib.read_backbone(init_path, init_key)
    if init_head:
      init_from_lib.check_head(backbone, init_path)
  config_json = faults.config_as_json(config)
  if is_main:  # only now: a refused config must not replace the record of the run's own
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  # ---- Mesh ------------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh)
  per_process_batch = sharding.check_batch(config.batch_size, mesh)
  batch_shard = sharding.batch_sharding(mesh)
  logging.info(
    "mesh %s over %d devices (%s), %d process(es)",
    dict(mesh.shape),
    mesh.devices.size,
    jax.devices()[0].platform,
    jax.process_count(),
  )

  # ---- Data ------------------------------------------------------------------
  steps_per_epoch = pipeline.steps_per_epoch(config.data, config.batch_size)
  total_steps = total_steps_of(config, steps_per_epoch)
  ec = config.eval
  # Checked now: a kNN that cannot run should stop the run before it compiles, not hours in.
  eval_classes = pipeline.eval_num_classes(config.data) if ec.knn_every_steps else None
  train_ds = pipeline.train_dataset(
    config.data,
    seed=config.seed,
    batch_size=per_process_batch,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    patch_size=config.model.patch_size,
    overlaps=bool(method.batch_keys & OVERLAP_KEYS),
  )  # only an add-on such as SERE reads them

  # ---- Method, shapes, shardings, jit ----------------------------------------------
  built = build(config, mesh, steps_per_epoch, total_steps, method)
  # A method may check each host batch (e.g. CAE's exact mask counts) before it is sent.
  check = built.method.check_batch

  def put(batch):
    check(batch)
    return sharding.to_global(batch, batch_shard)

  data_iter = DevicePrefetcher(
    iter(train_ds),
    put,
    tuple(sorted(built.method.batch_keys)),
    size=config.get("device_prefetch", 2),
  )
  state_shape, state_sharding, train_step = (
    built.state_shape,
    built.state_sharding,
    built.train_step,
  )
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state_shape.params))
  name = "+".join([config.method, *enabled_addons(config)])
  logging.info(
    "%s: %.2fM student parameters, %d steps (%d per epoch)",
    name,
    n_params / 1e6,
    total_steps,
    steps_per_epoch,
  )
  state_memory = sharding.state_memory(state_shape, state_sharding, config.sharding.fsdp_min_size)
  logging.info("%s", state_memory.log_line())
  method = built.method

  # ---- Resume ------------------------------------------------------------------
  state, last_finite = _restore_latest(
    ckpt, ckpt_lib.abstract_like(state_shape, state_sharding), data_iter
  )
  if state is None and ckpt.set_aside_steps:
    # Starting afresh would also drop the old run's metrics: only when asked again.
    raise ckpt_lib.CheckpointError(
      f"no usable checkpoint in {ckpt.directory}: step(s) "
      f"{', '.join(map(str, ckpt.set_aside_steps))} could not be read and were moved to "
      f"{os.path.join(workdir, 'checkpoints_damaged')} (reasons in the log above). Rerun to "
      "train from the start in this workdir, or use another --workdir."
    )
  if state is None:
    state = built.init(config.seed)
    if backbone is not None and init_path:
      state = _with_backbone(
        method, state, state_sharding, backbone, init_path, init_key, workdir, init_head
      )
  start_step = int(jax.device_get(state.step))

  # ---- Evaluators ----------------------------------------------------------------
  # Rows past the resumed step were written by the interrupted run: dropped, so each step is once.
  writer = metrics_lib.create_writer(workdir, is_main_process=is_main, resume_step=start_step)
  if start_step == 0:
    writer.write_hparams({k: str(v) for k, v in _flatten(config.to_dict()).items()})
  # A classifier (fine-tuning) is evaluated by its own top-1 / top-5 instead of the kNN, on the
  # same schedule (config.eval.knn_every_steps).
  classifier = method.is_classifier
  eval_name = "eval" if classifier else "knn"
  feature_fn = make_feature_fn(method, mesh, config, method.logits if classifier else None)
  results: dict[str, Any] = {}

  def run_evals(step: int, params):
    t0 = time.time()
    if classifier:
      res = evaluate_classifier(config, feature_fn, params)
    else:
      res = evaluate_knn(config, feature_fn, params, eval_classes)
    scalars = {f"{eval_name}/{k}": v for k, v in res.items()}
    writer.write_scalars(step, scalars)
    logging.info(
      "step %d %s top-1 %.2f%% top-5 %.2f%% (%.1f s)",
      step,
      "classifier" if classifier else "kNN",
      res["top1"],
      res["top5"],
      time.time() - t0,
    )
    return res

  if ec.knn_every_steps and start_step == 0 and ec.get("knn_at_start", False):
    results[f"{eval_name}_init"] = run_evals(0, eval_params_of(method, state))

  # ---- Train loop -------------------------------------------------------------------
  compiled = None
  window: list = []
  window_start = start_step
  meter = None
  images_per_step = config.batch_size  # source images (all their crops) per step
  reported_bad: set[int] = set(data_iter.bad_indices)
  step = start_step
  checked = start_step  # the state after this step was checked finite
  try:
    for step in range(start_step, total_steps):
      if step == start_step and stop.stopped_before_start():
        break  # nothing new since the checkpoint: no step, no save
      batch = next(data_iter)
      if compiled is None:
        t0 = time.time()
        compiled = train_step.lower(state, batch).compile()
        flops = model_flops_per_device(
          config, mesh, steps_per_epoch, total_steps, state, batch
        ) or metrics_lib.step_flops(compiled)
        peak = metrics_lib.peak_flops_per_device(jax.devices()[0])
        logging.info(
          "compiled the train step in %.1f s (%s GFLOP/step)",
          time.time() - t0,
          f"{flops / 1e9:.1f}" if flops else "unknown",
        )
        # XLA counts one device's share of a sharded step: pair it with one device's peak.
        meter = metrics_lib.Throughput(
          global_batch_size=images_per_step,
          total_steps=total_steps,
          flops_per_step=flops,
          peak_flops=peak,
        )
        meter.update(step, time.time())
      state, step_metrics = compiled(state, batch)
      window.append(step_metrics["loss"])
      done = step + 1
      preempted = stop.should_stop(done)  # every process, every step (multi-process sync point)
      is_last = done == total_steps or done == stop_after or preempted
      if done % config.log_every_steps == 0 or is_last:
        _check_finite(window, window_start, config, last_finite)
        # One on-device reduction: narrows the window of a non-finite state to a log period.
        _check_state(state, config, (checked + 1, done), last_finite)
        checked = done
        window, window_start = [], done
        scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        reported_bad = _report_bad_files(data_iter, train_ds, reported_bad)
        scalars["data/skipped_images"] = float(len(data_iter.bad_indices))
        if config.get("skip_nonfinite_updates", 0):
          scalars["optim/skipped_updates"] = float(jax.device_get(state.opt_state.total_notfinite))
        assert meter is not None  # made with the compiled step
        progress = meter.update(done, time.time())
        for name, value in (
          ("perf/img_per_sec", progress.images_per_second),
          ("perf/step_time", progress.seconds_per_step),
          ("perf/mfu", progress.mfu),
        ):
          if value is not None:
            scalars[name] = value
        memory = metrics_lib.device_memory(jax.local_devices())
        scalars.update(memory)
        scalars.update(state_memory.metrics())
        writer.write_scalars(done, scalars)
        line = metrics_lib.format_progress(progress, {"loss": scalars["loss"], "lr": scalars["lr"]})
        if memory:
          line += f" | peak mem {memory['memory/peak_gib']:.1f} GiB"
          if "memory/limit_gib" in memory:
            line += f" of {memory['memory/limit_gib']:.1f}"
        logging.info("%s", line)
      if done % config.checkpoint.every_steps == 0 or is_last:
        _check_finite(window, window_start, config, last_finite)
        if checked != done:  # never write a non-finite state
          _check_state(state, config, (checked + 1, done), last_finite)
          checked = done
        reported_bad = _report_bad_files(data_iter, train_ds, reported_bad)
        ckpt.save(done, state, data_iter, config_json)
        last_finite = done
      if preempted:
        break  # no evaluation: the grace period before SIGKILL is for the save
      if ec.knn_every_steps and (done % ec.knn_every_steps == 0 or is_last):
        results[eval_name] = run_evals(done, eval_params_of(method, state))
      if done == stop_after:
        break
  finally:
    writer.flush()
    ckpt.close()  # waits for the last (async) save
    data_iter.close()
  results["step"] = int(jax.device_get(state.step))
  if stop.requested and results["step"] < total_steps:  # a signal after the end changes nothing
    results["preempted"] = stop.requested
    saved = (
      f"saved step {results['step']} to {ckpt.directory}"
      if results["step"] > start_step
      else f"no new step since {'step ' + str(start_step) if start_step else 'the start'}"
    )
    logging.warning(
      "stopped by %s: %s; rerun the same command to resume (exit status %d)",
      stop.requested,
      saved,
      preemption.PREEMPTED_EXIT_CODE,
    )
  return results


def _with_backbone(
  method, state, state_sharding, backbone, path: str, key: str, workdir: str, head: bool = False
):
  """The initial state with the student's and the teacher's backbone read from `path`."""
  from sslx.models import init_from as init_from_lib

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    params, loss_state = multihost_utils.process_allgather((state.params, state.loss_state))
  else:
    params, loss_state = jax.device_get((state.params, state.loss_state))
  params, loss_state, backbone = init_from_lib.apply_backbone(
    method, params, loss_state, backbone, path, head
  )

  def put(tree, shardings):
    return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: np.asarray(x)[i]),
      tree,
      shardings,
    )

  teacher = method.teacher_params(params) if method.has_teacher else None
  state = state.replace(
    params=put(params, state_sharding.params),
    loss_state=put(loss_state, state_sharding.loss_state),
    teacher_params=put(teacher, state_sharding.teacher_params) if teacher is not None else None,
  )
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "init_from.json"), "w") as f:
      json.dump(
        {
          "path": os.path.abspath(path),
          "key": key,
          "head": head,
          "source": backbone.source,
          "tensors": len(backbone.state_dict),
          "ignored": list(backbone.ignored),
        },
        f,
        indent=2,
      )
  return state


def _report_bad_files(data_iter: DevicePrefetcher, train_ds, reported: set[int]) -> set[int]:
  """Merges every process's bad-file indices (all processes call this at the same steps) and
  logs the files not reported before, once each; returns the set now reported."""
  data_iter.bad_indices = union_across_processes(data_iter.bad_indices)
  new = sorted(data_iter.bad_indices - reported)
  if new:
    names = ", ".join(train_ds.make.source.describe(i) for i in new[:5])
    more = f" and {len(new) - 5} more" if len(new) > 5 else ""
    logging.warning(
      "data: %d unreadable file(s) replaced by other records (%d distinct so far): %s%s",
      len(new),
      len(data_iter.bad_indices),
      names,
      more,
    )
  return set(data_iter.bad_indices)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Standalone kNN of the teacher in the latest checkpoint of `workdir`."""
  mesh = sharding.make_mesh(config.mesh)
  method = make_method(config)
  teacher_key = "teacher_params" if method.has_teacher else "params"
  step, parts = ckpt_lib.read_latest(workdir, (teacher_key, "loss_state"))
  params = evaluated_params(method, parts)
  res = evaluate_knn(config, make_feature_fn(method, mesh, config), params)
  logging.info("step %d kNN top-1 %.2f%% top-5 %.2f%%", step, res["top1"], res["top5"])
  return {"step": step, **res}
