"""Orbax checkpoints of the TrainState together with the data-iterator state.

Layout: `<workdir>/checkpoints/<step>/{state,data}`. Orbax writes each step to a
temporary directory and renames it when complete, so an interrupted save never
leaves a half-written checkpoint that a resume would pick up.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

# The checkpoint item holding the data iterator's position (TrainIterator.get_state()).
DATA_ITEM = "data_order"


class Checkpointer:
  """Periodic + final saves, `max_to_keep`, automatic resume from the workdir."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iter: Any | None) -> None:
    """Starts an (async) save of `state` and, if given, the grain iterator state."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      # The data position is global (the next step and what fixes the order), the same on every
      # process: one JSON file, written by process 0, that any process count can read back.
      items[DATA_ITEM] = ocp.args.JsonSave(data_iter.get_state())
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    logging.info("checkpoint: saving step %d to %s", step, self.directory)

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
        logging.warning("checkpoint %d has no %r item; continuing the data at its step", step,
                        DATA_ITEM)
        data_iter.set_state({**data_iter.get_state(),
                             "step": int(jax.device_get(restored["state"].step))})
    return restored["state"]

  def restore_teacher(self, step: int) -> Any:
    """Only the teacher parameters of step `step`, as host arrays (standalone evals)."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored["state"]["teacher_params"]

  def restore_parts(self, step: int, keys: tuple[str, ...]) -> dict[str, Any]:
    """The named TrainState fields of step `step` (e.g. teacher_params, loss_state), as host arrays."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return {k: restored["state"][k] for k in keys}

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs with shardings, the restore target orbax needs."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
