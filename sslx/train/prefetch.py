"""Moves host batches onto the devices ahead of the step, in a background thread.

The data-iterator state saved in a checkpoint must be the state *after the last
batch the step consumed*, not after the batches already prefetched. Each queued
batch therefore carries the iterator state read right after it was drawn, and
`get_state` returns the state of the last batch handed out. The object speaks
grain's `get_state`/`set_state`, so grain's own orbax handler saves it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

_DONE = object()


class DevicePrefetcher:
  """Iterator of device batches over a stateful host iterator.

  Args:
    host_iter: a grain iterator (anything with __next__, get_state, set_state).
    put: maps a host batch (dict of numpy) to device arrays (e.g. `sharding.to_global`).
    keys: the batch entries sent to the device; the others stay on the host.
    size: how many device batches to keep ready.
  """

  def __init__(
    self,
    host_iter: Any,
    put: Callable[[Mapping[str, np.ndarray]], Any],
    keys: tuple[str, ...],
    size: int = 2,
  ):
    self._it = host_iter
    self._put = put
    self._keys = keys
    self._size = size
    self._queue: queue.Queue | None = None
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()
    self._state = None
    self.host_info: dict[str, Any] = {}
    # Distinct source indices of unreadable files met so far (carried across resume in the
    # state, so a resumed run keeps counting each bad file once).
    self.bad_indices: set[int] = set()

  # -- the data position saved with each checkpoint (a JSON-able dict) ------------------
  def get_state(self) -> dict[str, Any]:
    """The host iterator's state after the last batch handed out (not after those queued),
    with the distinct bad-file indices seen so far."""
    state = self._state if self._state is not None else self._it.get_state()
    return {**state, "bad_indices": sorted(self.bad_indices)}

  def set_state(self, state: dict[str, Any]) -> None:
    if self._thread is not None:
      raise RuntimeError("set_state after prefetching started; restore before the first batch")
    state = dict(state)
    self.bad_indices = {int(i) for i in state.pop("bad_indices", [])}
    self._it.set_state(state)
    self._state = self._it.get_state()

  # -- iteration --------------------------------------------------------------
  def _work(self):
    try:
      while not self._stop.is_set():
        batch = next(self._it)
        state = self._it.get_state()
        bad = batch.get("bad_indices")
        info = {"bad_indices": np.unique(bad[bad >= 0]).tolist() if bad is not None else []}
        device = self._put({k: batch[k] for k in self._keys if k in batch})
        self._queue.put((device, state, info))
    except StopIteration:
      self._queue.put(_DONE)
    except BaseException as e:  # Surface pipeline errors in the training thread.
      self._queue.put(e)

  def __iter__(self) -> Iterator[Any]:
    return self

  def __next__(self):
    if self._thread is None:
      self._queue = queue.Queue(maxsize=self._size)
      self._thread = threading.Thread(target=self._work, daemon=True, name="prefetch")
      self._thread.start()
    item = self._queue.get()
    if item is _DONE:
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    device, self._state, self.host_info = item
    self.bad_indices.update(self.host_info["bad_indices"])
    return device

  def close(self) -> None:
    self._stop.set()
    if self._thread is not None and self._queue is not None:
      try:  # Unblock a producer waiting on a full queue.
        while True:
          self._queue.get_nowait()
      except queue.Empty:
        pass
    close = getattr(self._it, "close", None)
    if close is not None:
      close()


def union_across_processes(indices: set[int], width: int = 256) -> set[int]:
  """The union of every process's `indices` (a collective: all processes must call it at the same
  point). Up to `width` of each process's smallest indices travel; a process with more than that
  many bad files reports that many, which still says the data is broken."""
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_count() == 1:
    return indices
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  local = np.full([width], -1, np.int64)
  chosen = sorted(indices)[:width]
  local[: len(chosen)] = chosen
  gathered = np.asarray(multihost_utils.process_allgather(local))
  return {int(i) for i in gathered.ravel() if i >= 0}
