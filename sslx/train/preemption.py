"""Stop cleanly on SIGTERM / SIGINT: finish the step, save, exit with PREEMPTED_EXIT_CODE.

Schedulers (SLURM, Kubernetes, spot and preemptible TPU/GPU VMs) announce a preemption with SIGTERM
and a grace period; Ctrl-C sends SIGINT. Both only set a flag here: the trainer finishes the step
it is in, writes a checkpoint of that step (state and data iterator) and returns, and main.py exits
with PREEMPTED_EXIT_CODE. Later signals are logged and otherwise ignored until the process exits,
so a second Ctrl-C cannot raise in the middle of the save (orbax's write-to-tmp-then-rename keeps
even a SIGKILL from leaving a half checkpoint that a resume would read).

With several processes (jax.distributed initialised), all of them must save the same step. There
the decision is JAX's preemption sync point (orbax `CheckpointManager.reached_preemption`): the
coordination service hears of a SIGTERM on any process and names a step that every process
reaches. SIGTERM is then left to JAX's own handler; a SIGINT is turned into a SIGTERM of this
process so that it takes the same path.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import jax
from absl import logging

# sysexits.h EX_TEMPFAIL: "a temporary failure; the user is invited to retry". Not 0, so that a
# scheduler or wrapper that restarts failed jobs (Kubernetes, `until python main.py ...; do`) runs
# the same command again, which resumes; not 1, so that it can be told from an error.
PREEMPTED_EXIT_CODE = 75

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal:
  """Context manager: while active, SIGTERM/SIGINT request a stop instead of killing the process.

  `requested` names the first signal received (or None); `should_stop(step)` is what the train
  loop asks after each step, on every process, with the step just finished.
  """

  def __init__(self, reached_sync_point: Callable[[int], bool] | None = None):
    self.requested: str | None = None
    self._reached_sync_point = reached_sync_point
    self._previous: dict[int, Any] = {}
    self._multi = False

  def __enter__(self) -> StopOnSignal:
    if threading.current_thread() is not threading.main_thread():
      return self  # Python delivers signals to the main thread only; nothing to install.
    self._multi = jax.process_count() > 1
    for sig in _SIGNALS:
      if self._multi and sig == signal.SIGTERM:
        continue  # JAX's preemption notifier owns SIGTERM on multi-process runs.
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def set_sync_point(self, reached_sync_point: Callable[[int], bool]) -> None:
    """The multi-process agreement (e.g. `Checkpointer.reached_preemption`)."""
    self._reached_sync_point = reached_sync_point

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.requested is not None:
      logging.warning(
        "%s received while stopping after %s: ignored; the checkpoint is being "
        "written (SIGKILL abandons it and keeps the previous one)",
        name,
        self.requested,
      )
      return
    self.requested = name
    logging.warning(
      "%s received: finishing the current step, then saving a checkpoint and exiting (status %d)",
      name,
      PREEMPTED_EXIT_CODE,
    )
    if self._multi and signum != signal.SIGTERM:
      # Let JAX's preemption service tell the other processes.
      os.kill(os.getpid(), signal.SIGTERM)

  def should_stop(self, step: int) -> bool:
    """True when training should stop after `step` (the same answer on every process)."""
    if self._multi and self._reached_sync_point is not None:
      if self._reached_sync_point(step):
        self.requested = self.requested or "SIGTERM"
        return True
      return False
    return self.requested is not None

  def stopped_before_start(self) -> bool:
    """A stop asked for before the first step; single process only (multi: the sync point)."""
    return not self._multi and self.requested is not None
