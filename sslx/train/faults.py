"""Checks that keep a run from persisting, resuming or starting in a bad state.

- `check_run_config`: settings that would fail late (after compiling) or do nothing, refused first.
- `check_workdir`: the workdir can be created and written, else one line says why.
- `config_changes` / `check_resume_config`: which config changes a resumed run may make. The rule
  is data (`RESUME_SAFE_KEYS`): keys that change neither shapes nor the maths of a step nor its
  schedules may differ from the checkpoint's config; any other difference is refused before
  anything compiles.
- `state_is_finite` / `divergence_message`: a non-finite TrainState is never written; the message
  names the step window, the last finite checkpoint and only the fixes that apply to this config.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from sslx import errors

# Config keys (exact names, or prefixes ending in '.') whose value may change when a run resumes:
# they decide how often things are logged, evaluated or saved, where data is read from, how it is
# fed, and how the same global step is laid out on the devices, none of which changes the
# parameters' shapes, the method, the loss or the schedules. Any other difference is refused.
RESUME_SAFE_KEYS: tuple[str, ...] = (
  "log_every_steps",
  "checkpoint.",  # every_steps, max_to_keep, async_save
  "eval.",  # kNN frequency, k, temperature, batch size
  "device_prefetch",
  "mesh.",  # same global batch on another device layout (e.g. 8 -> 4 GPUs)
  "optim.accum_steps",  # same global batch in micro-batches (memory knob)
  "model.attention",  # fused or explicit attention: same maths
  "model.recompute_elementwise",  # recompute in the backward pass: same maths
  "data.workers",
  "data.read_threads",
  "data.prefetch_buffer",
  "data.path",
  "data.tfds_data_dir",  # the same data on another machine
  "data.eval_train_split",
  "data.eval_test_split",
  "data.eval_resize",
  "data.eval_size",
  "probe.",  # probe settings: evaluation only
)


class RunConfigError(errors.UserError):
  """A setting that cannot work (e.g. a step interval of 0)."""


class WorkdirError(errors.UserError):
  """--workdir cannot be created or written."""


class ResumeConfigError(errors.UserError):
  """The config differs from the checkpoint's in keys that a resumed run may not change."""


# ---- Settings ----------------------------------------------------------------------------------


def check_run_config(config: ml_collections.ConfigDict) -> None:
  """Refuses settings that would fail only after compiling, or train nothing."""
  from sslx.methods import METHODS  # pylint: disable=g-import-not-at-top

  if config.method not in METHODS:
    raise RunConfigError(
      f"config.method={config.method!r} is not a method; valid: {', '.join(sorted(METHODS))}"
    )
  METHODS[config.method].check_config(config)  # the method's own settings (e.g. fine-tuning's)
  positive = {
    "batch_size": config.batch_size,
    "log_every_steps": config.log_every_steps,
    "checkpoint.every_steps": config.checkpoint.every_steps,
    "checkpoint.max_to_keep": config.checkpoint.max_to_keep,
    "device_prefetch": config.get("device_prefetch", 2),
  }
  for key, value in positive.items():
    if not isinstance(value, int) or value < 1:
      raise RunConfigError(f"config.{key}={value!r}; it must be an integer >= 1")
  total_steps, total_epochs = config.get("total_steps") or 0, config.total_epochs
  if total_steps < 0:
    raise RunConfigError(
      f"config.total_steps={total_steps}; it must be > 0 (or 0 to train "
      f"config.total_epochs={total_epochs} epochs)"
    )
  if not total_steps and not total_epochs > 0:
    raise RunConfigError(
      f"config.total_epochs={total_epochs} with config.total_steps=0 trains "
      "nothing; set one of them > 0"
    )
  knn = config.eval.knn_every_steps
  if not isinstance(knn, int) or knn < 0:
    raise RunConfigError(f"config.eval.knn_every_steps={knn!r}; it must be >= 0 (0: no kNN)")
  skip = config.get("skip_nonfinite_updates", 0)
  if not isinstance(skip, int) or skip < 0:
    raise RunConfigError(
      f"config.skip_nonfinite_updates={skip!r}; it must be >= 0 (0: stop at "
      "the first non-finite state)"
    )


def check_workdir(workdir: str) -> None:
  """Creates `workdir` and proves it writable, or raises WorkdirError with the reason."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except FileExistsError as e:
    raise WorkdirError(
      f"--workdir={workdir} exists and is not a directory; pass a directory "
      "(new or of an earlier run)"
    ) from e
  except NotADirectoryError as e:
    raise WorkdirError(f"--workdir={workdir}: a parent of it is a file; pass a directory") from e
  except OSError as e:
    raise WorkdirError(f"cannot create --workdir={workdir}: {e.strerror or e}") from e
  try:
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-test-"):
      pass
  except OSError as e:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
      raise WorkdirError(
        f"--workdir={workdir}: no space left on its disk; free some or pass another workdir"
      ) from e
    raise WorkdirError(
      f"--workdir={workdir} is not writable ({e.strerror or e}); fix its "
      "permissions or pass another workdir"
    ) from e


def is_disk_full(e: BaseException) -> bool:
  """True for the ways a full disk or quota surfaces from Python, orbax and tensorstore."""
  if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
    return True
  text = str(e)
  return any(
    s in text for s in ("RESOURCE_EXHAUSTED", "No space left on device", "Disk quota exceeded")
  )


# ---- Config changes on resume ------------------------------------------------------------------


def config_as_json(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  """The config as plain JSON data (tuples become lists), as stored with each checkpoint."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def is_resume_safe(key: str) -> bool:
  return any(key == s or (s.endswith(".") and key.startswith(s)) for s in RESUME_SAFE_KEYS)


def config_changes(
  old: Mapping[str, Any], new: Mapping[str, Any]
) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]], list[str]]:
  """(refused, allowed, unmatched) differences between two JSON configs.

  refused/allowed map a key to its (old, new) values; unmatched lists keys that exist in only one
  of them (added or removed by a code change; they are reported, not refused).
  """
  a, b = _flatten(config_as_json(old)), _flatten(config_as_json(new))
  refused: dict[str, tuple[Any, Any]] = {}
  allowed: dict[str, tuple[Any, Any]] = {}
  for key in sorted(a.keys() & b.keys()):
    if a[key] != b[key]:
      (allowed if is_resume_safe(key) else refused)[key] = (a[key], b[key])
  return refused, allowed, sorted(a.keys() ^ b.keys())


def _show(changes: Mapping[str, tuple[Any, Any]], limit: int = 8) -> str:
  items = [f"{k} ({json.dumps(o)} -> {json.dumps(n)})" for k, (o, n) in changes.items()]
  more = f" and {len(items) - limit} more" if len(items) > limit else ""
  return ", ".join(items[:limit]) + more


def check_resume_config(
  old: Mapping[str, Any], new: ml_collections.ConfigDict, *, step: int, workdir: str, where: str
) -> tuple[dict, list[str]]:
  """Raises ResumeConfigError for a refused change; returns (allowed changes, unmatched keys).

  Args:
    old: the config stored with the checkpoint (or <workdir>/config.json for older checkpoints).
    where: where `old` was read from, named in the message.
  """
  refused, allowed, unmatched = config_changes(old, new)
  if refused:
    raise ResumeConfigError(
      f"--workdir={workdir} holds a checkpoint at step {step} written with another config: "
      f"{_show(refused)}. These keys change shapes, the method or the schedules, so the run "
      f"cannot continue with them. Either rerun with the checkpoint's config (stored in {where}) "
      "or train the new config in a new --workdir. (Keys a resume may change: "
      f"{', '.join(k + '*' if k.endswith('.') else k for k in RESUME_SAFE_KEYS)})"
    )
  return allowed, unmatched


def describe_allowed(allowed: Mapping[str, tuple[Any, Any]]) -> str:
  return _show(allowed, limit=len(allowed))


# ---- Finite state --------------------------------------------------------------------------------


@jax.jit
def _all_finite(trees) -> jax.Array:
  # One reduction per leaf, then one bool: what leaves the device is a single byte.
  flags = [
    jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trees) if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def state_is_finite(state: Any) -> bool:
  """True when params, teacher params, optimiser state and loss state are all finite."""
  return bool(
    jax.device_get(
      _all_finite((state.params, state.teacher_params, state.opt_state, state.loss_state))
    )
  )


def divergence_message(
  config: ml_collections.ConfigDict, *, what: str, window: tuple[int, int], last_finite: int | None
) -> str:
  """One message for a diverged run: what went non-finite, when, what is safe, what may help.

  Only the remedies that apply to `config` are suggested (no 'use float32' to a float32 run, no
  'tighten clipping' when clipping is already tight, ...).
  """
  first, last = window
  steps = f"step {first}" if first == last else f"steps [{first}, {last}]"
  if last_finite is None:
    kept = "No checkpoint was written for it, and there is no earlier one: a rerun starts afresh."
  else:
    kept = (
      f"No checkpoint was written for it; the last checkpoint, step {last_finite}, is finite "
      "and a rerun resumes from it."
    )
  oc = config.get("optim") or ml_collections.ConfigDict()
  hints = []
  if "lr_per_256" in oc:
    hints.append(f"lower the lr (--config.optim.lr_per_256, now {oc.lr_per_256:g})")
  if "warmup_epochs" in oc and not oc.warmup_epochs:
    hints.append("warm the lr up (--config.optim.warmup_epochs)")
  if "clip_grad" in oc:
    if not oc.clip_grad:
      hints.append("clip gradients (--config.optim.clip_grad=3.0)")
    elif oc.clip_grad > 1.0:
      hints.append(f"tighten clipping (--config.optim.clip_grad, now {oc.clip_grad:g})")
  dtype = str(config.get("model", {}).get("dtype", "float32"))
  if dtype != "float32":
    hints.append(f"compute in float32 (--config.model.dtype=float32, now {dtype})")
  if not config.get("skip_nonfinite_updates", 0):
    hints.append("skip the odd non-finite update (--config.skip_nonfinite_updates=N)")
  advice = (" To continue: " + "; ".join(hints) + ".") if hints else ""
  return f"{what} at {steps}; training stopped. {kept}{advice}"
