"""Orbax checkpoints of the TrainState together with the data-iterator state and the config.

Layout: `<workdir>/checkpoints/<step>/{state,data,config}`. Orbax writes each step to a
temporary directory and renames it when complete, so an interrupted save never
leaves a half-written checkpoint that a resume would pick up; the temporary
directories such an interruption leaves are removed when the next run starts.
`config` is the resolved run config (JSON), which a resume compares with its own
(sslx/train/faults.py). A checkpoint that cannot be read is moved to
`<workdir>/checkpoints_damaged/` by `set_aside`, so that no later run trips on it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from sslx import errors

CONFIG_ITEM = "config"
# The checkpoint item holding the data iterator's position (TrainIterator.get_state()).
DATA_ITEM = "data_order"


class CheckpointError(errors.UserError):
  """A checkpoint could not be written (disk full...) or none can be read."""


class Checkpointer:
  """Periodic + final saves, `max_to_keep`, automatic resume from the workdir."""

  def __init__(
    self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True, cleanup_tmp: bool = False
  ):
    """`cleanup_tmp`: remove (on the primary process) the unfinished '*.orbax-checkpoint-tmp*'
    folders a killed save left behind. For the training run that owns the workdir only: an
    evaluation of a workdir whose training is still running must not delete its save in flight."""
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    # The folder is made by the first save, not here: a run refused before training leaves none.
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=False,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=cleanup_tmp,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._saving: int | None = None  # the step of the last save started
    self._closed = False
    self.set_aside_steps: list[int] = []  # by this object, in order

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(
    self, step: int, state: Any, data_iter: Any | None, config: Mapping[str, Any] | None = None
  ) -> None:
    """Starts an (async) save of `state` and, if given, the grain iterator state and the
    run config (a JSON-able dict).

    Raises:
      CheckpointError: the disk is full (the previous checkpoints stay intact).
    """
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      # The data position is global (the next step and what fixes the order), the same on every
      # process: one JSON file, written by process 0, that any process count can read back.
      items[DATA_ITEM] = ocp.args.JsonSave(data_iter.get_state())
    if config is not None:
      items[CONFIG_ITEM] = ocp.args.JsonSave(dict(config))
    self._saving = step
    try:
      os.makedirs(self.directory, exist_ok=True)
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._raise_if_disk_full(e, step)
      raise
    logging.info("checkpoint: saving step %d to %s", step, self.directory)

  def _raise_if_disk_full(self, e: BaseException, step: int | None) -> None:
    """Turns a full disk into a CheckpointError naming the last complete checkpoint."""
    from sslx.train import faults  # pylint: disable=g-import-not-at-top

    if faults.is_disk_full(e):
      done = [s for s in self._manager.all_steps() if step is None or s < step]
      last = f"step {max(done)}" if done else "none"
      raise CheckpointError(
        f"disk full while writing checkpoint step {step} to "
        f"{self.directory}; the last complete checkpoint ({last}) is intact. Free space (or "
        "lower --config.checkpoint.max_to_keep) and rerun the same command to resume."
      ) from e

  def read_config(self, step: int) -> dict[str, Any] | None:
    """The config stored with step `step`, or None for a checkpoint written without one."""
    if not os.path.isdir(os.path.join(self.directory, str(step), CONFIG_ITEM)):
      return None
    restored = self._manager.restore(
      step, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()})
    )
    return dict(restored[CONFIG_ITEM])

  def set_aside(self, step: int) -> str:
    """Moves the unreadable checkpoint `step` out of the way; returns where it went.

    All processes call it; the primary one moves the folder between two barriers.
    """
    root = os.path.join(os.path.dirname(self.directory), "checkpoints_damaged")
    dest, n = os.path.join(root, str(step)), 1
    while os.path.exists(dest):
      n += 1
      dest = os.path.join(root, f"{step}-{n}")
    ocp.multihost.sync_global_processes("sslx_set_aside_start")
    if ocp.multihost.is_primary_host(0):
      os.makedirs(root, exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), dest)
    ocp.multihost.sync_global_processes("sslx_set_aside_done")
    self._manager.reload()
    self.set_aside_steps.append(step)
    return dest

  def reached_preemption(self, step: int) -> bool:
    """True on every process at the step JAX's preemption service agreed on (multi-process)."""
    return self._manager.reached_preemption(step)

  def restore(self, step: int, abstract_state: Any, data_iter: Any | None) -> Any:
    """Restores step `step` into the shapes/shardings of `abstract_state`.

    The data iterator, if given, is restored in place.
    """
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    has_data = os.path.isdir(os.path.join(self.directory, str(step), DATA_ITEM))
    if data_iter is not None and has_data:
      items[DATA_ITEM] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    if data_iter is not None:
      if has_data:
        data_iter.set_state(restored[DATA_ITEM])
      else:
        # Older checkpoints kept grain's per-process iterator files instead; the data order is a
        # function of the step, so the restored step says where to continue.
        logging.warning(
          "checkpoint %d has no %r item; continuing the data at its step", step, DATA_ITEM
        )
        data_iter.set_state(
          {**data_iter.get_state(), "step": int(jax.device_get(restored["state"].step))}
        )
    return restored["state"]

  def restore_teacher(self, step: int) -> Any:
    """Only the teacher parameters of step `step`, as host arrays (standalone evals)."""
    restored = self._manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
    )
    return restored["state"]["teacher_params"]

  def restore_parts(self, step: int, keys: tuple[str, ...]) -> dict[str, Any]:
    """The named TrainState fields of step `step` (e.g. teacher_params, loss_state), as host arrays."""
    restored = self._manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
    )
    return {k: restored["state"][k] for k in keys}

  def wait(self) -> None:
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  # an async save's error lands here
      self._raise_if_disk_full(e, self._saving)
      raise

  def close(self) -> None:
    """Waits for the last save (raising its error) and stops orbax's threads; idempotent."""
    if self._closed:
      return
    self._closed = True
    try:
      self.wait()
    finally:
      self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    """Closes on every way out. After an error, closing's own error is logged, not raised, so the
    run's error is the one the user sees; left open, orbax's background threads (the tmp-folder
    cleanup started by the constructor) can outlive the interpreter and print a traceback."""
    if exc_type is None:
      self.close()
      return
    try:
      self.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("closing %s after an error: %s", self.directory, e)


def read_latest(
  workdir: str, keys: tuple[str, ...], error: type[Exception] = FileNotFoundError
) -> tuple[int, dict[str, Any]]:
  """(step, {key: tree}) of the latest checkpoint of `workdir`, restoring only `keys` (e.g.
  the teacher for an evaluation); `error` naming the training command when there is none."""
  with Checkpointer(workdir, async_save=False) as ckpt:
    step = ckpt.latest_step()
    if step is None:
      raise error(
        f"no checkpoint under {ckpt.directory}; train first with "
        f"`python main.py --config=... --workdir={workdir}`"
      )
    return step, ckpt.restore_parts(step, keys)


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs with shardings, the restore target orbax needs."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )
