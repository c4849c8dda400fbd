"""What each grain worker process runs first (`mp_prefetch(worker_init_fn=...)`).

grain 0.2.18 spawns its workers as ordinary child processes and has no option to end them with
their parent: when the trainer is killed (SIGKILL, OOM killer, a crashed host process) they live
on, each holding its dataset copy and shared-memory buffers. `init_worker` gives each worker:

- a daemon thread that ends the worker once its parent is gone (the parent pid changes when the
  parent dies and the worker is re-parented); a poll rather than Linux's PR_SET_PDEATHSIG, which
  fires when the *thread* that started the worker ends, and grain starts workers from a
  prefetch thread;
- SIGINT ignored: Ctrl-C reaches the whole process group, and the trainer, not each worker, decides
  how to stop (it saves a checkpoint and closes the pipeline, which stops the workers).
"""

from __future__ import annotations

import os
import signal
import threading
import time

POLL_SECONDS = 1.0


def _exit_when_orphaned(parent: int, poll: float) -> None:
  while os.getppid() == parent:
    time.sleep(poll)
  os._exit(1)  # no cleanup to wait for: the parent that consumed our output is gone


def init_worker(
  worker_index: int = 0, worker_count: int = 1, *, poll_seconds: float = POLL_SECONDS
) -> None:
  """grain `worker_init_fn`: exit when the parent dies; leave Ctrl-C to the parent."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  parent = os.getppid()
  threading.Thread(
    target=_exit_when_orphaned, args=(parent, poll_seconds), daemon=True, name="exit-with-parent"
  ).start()
