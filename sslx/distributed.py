"""Multi-process start-up: `jax.distributed.initialize` from the launcher's environment.

One process runs per host (TPU pods) or per GPU/host (SLURM, MPI, hand-launched clusters). Three
ways to say "you are process i of n", checked in this order:

1. `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`, and
   optionally `JAX_LOCAL_DEVICE_IDS` (comma-separated; which local accelerators this process owns).
   All three of the first must be set together; they are passed to `jax.distributed.initialize`.
2. A launcher JAX detects by itself: SLURM with more than one task (`srun`), Open MPI (`mpirun`),
   Cloud TPU pods (`gcloud ... tpu-vm ssh --worker=all`). `jax.distributed.initialize()` reads
   their variables.
3. Nothing: a single process.

`SSLX_DISTRIBUTED=0` forces a single process (e.g. one SLURM task per node running its own job);
`SSLX_DISTRIBUTED=1` forces initialisation with JAX's detection. `SSLX_INIT_TIMEOUT` (seconds,
default 300) bounds the wait for the other processes. Every problem is a `LaunchError` whose
message names the variable to fix; main.py prints it as one line.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Mapping

from absl import logging

from sslx import errors

EXPLICIT_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


class LaunchError(errors.UserError):
  """The environment describes an impossible or incomplete multi-process launch."""


def _int_var(env: Mapping[str, str], name: str) -> int:
  value = env[name].strip()
  try:
    return int(value)
  except ValueError:
    raise LaunchError(f"{name}={value!r} is not an integer") from None


def explicit_arguments(env: Mapping[str, str] = os.environ) -> dict | None:
  """The `jax.distributed.initialize` arguments given by the JAX_* variables, or None if unset.

  Raises:
    LaunchError: only some of the three variables are set, or they contradict each other.
  """
  present = [v for v in EXPLICIT_VARS if env.get(v, "").strip()]
  if not present:
    if env.get("JAX_LOCAL_DEVICE_IDS", "").strip():
      raise LaunchError(
        "JAX_LOCAL_DEVICE_IDS is set but JAX_COORDINATOR_ADDRESS, "
        "JAX_NUM_PROCESSES and JAX_PROCESS_ID are not; set all three"
      )
    return None
  missing = [v for v in EXPLICIT_VARS if v not in present]
  if missing:
    raise LaunchError(
      f"{', '.join(present)} set but {' and '.join(missing)} missing: a "
      f"multi-process launch needs all of {', '.join(EXPLICIT_VARS)}"
    )
  address = env["JAX_COORDINATOR_ADDRESS"].strip()
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise LaunchError(
      f"JAX_COORDINATOR_ADDRESS={address!r} must be host:port of process 0 (e.g. 10.0.0.1:1234)"
    )
  count = _int_var(env, "JAX_NUM_PROCESSES")
  index = _int_var(env, "JAX_PROCESS_ID")
  if count < 1:
    raise LaunchError(f"JAX_NUM_PROCESSES={count} must be >= 1")
  if not 0 <= index < count:
    raise LaunchError(f"JAX_PROCESS_ID={index} must be in [0, JAX_NUM_PROCESSES={count})")
  kwargs = {"coordinator_address": address, "num_processes": count, "process_id": index}
  ids = env.get("JAX_LOCAL_DEVICE_IDS", "").strip()
  if ids:
    try:
      kwargs["local_device_ids"] = [int(i) for i in ids.split(",")]
    except ValueError:
      raise LaunchError(f"JAX_LOCAL_DEVICE_IDS={ids!r} must be comma-separated integers") from None
  return kwargs


def _detected_launcher(env: Mapping[str, str]) -> str | None:
  """The name of a multi-process launcher JAX detects by itself, or None."""
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and env.get("SLURM_JOB_ID"):
    return "SLURM"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return "Open MPI"
  if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "Cloud TPU"
  return None


def launch_arguments(env: Mapping[str, str] = os.environ) -> dict | None:
  """What `maybe_initialize` passes to `jax.distributed.initialize`; None for one process.

  `{}` means "let JAX detect the cluster" (SLURM, Open MPI, TPU pods).
  """
  force = env.get("SSLX_DISTRIBUTED", "").strip().lower()
  if force in ("0", "false", "no"):
    return None
  explicit = explicit_arguments(env)
  if explicit is not None:
    return explicit
  if force in ("1", "true", "yes") or _detected_launcher(env):
    return {}
  return None


def _reachable(address: str, seconds: float = 1.0) -> bool:
  host, _, port = address.rpartition(":")
  try:
    with socket.create_connection((host.strip("[]"), int(port)), timeout=seconds):
      return True
  except OSError:
    return False


def _timeout_message(kwargs: dict, timeout: int) -> str:
  """Why the other processes were not met within `timeout` seconds, as precisely as we can."""
  if kwargs and kwargs["process_id"] != 0 and not _reachable(kwargs["coordinator_address"]):
    return (
      f"the coordinator JAX_COORDINATOR_ADDRESS={kwargs['coordinator_address']} was not "
      f"reachable within {timeout} s: start process 0 there (it listens on that port), or "
      "fix the address or the firewall (SSLX_INIT_TIMEOUT sets the wait)"
    )
  count = kwargs.get("num_processes", "all")
  return (
    f"not all {count} processes joined within {timeout} s: start every process with the "
    "same JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES and a distinct JAX_PROCESS_ID "
    "(SSLX_INIT_TIMEOUT sets the wait)"
  )


def maybe_initialize(env: Mapping[str, str] = os.environ) -> None:
  """Calls `jax.distributed.initialize` once, before any other jax call, when launched as one of
  several processes; a no-op for a single process.

  JAX's coordination client aborts the whole process (no Python exception) when the coordinator
  or the other processes do not answer in time, so a watchdog thread prints the one-line reason
  and exits with status 1 just before that would happen.

  Raises:
    LaunchError: bad variables, or an error JAX raises while connecting.
  """
  kwargs = launch_arguments(env)
  if kwargs is None:
    return
  timeout = _int_var(env, "SSLX_INIT_TIMEOUT") if env.get("SSLX_INIT_TIMEOUT") else 300
  if timeout < 1:
    raise LaunchError(f"SSLX_INIT_TIMEOUT={timeout} must be >= 1 (seconds)")
  import jax  # pylint: disable=g-import-not-at-top

  where = (
    f"coordinator {kwargs['coordinator_address']}, process {kwargs['process_id']} of "
    f"{kwargs['num_processes']}"
    if kwargs
    else "cluster detected by JAX"
  )
  joined = threading.Event()

  def watchdog():
    if not joined.wait(timeout):
      print(f"error: {_timeout_message(kwargs, timeout)}", file=sys.stderr, flush=True)
      os._exit(1)  # pylint: disable=protected-access  # the main thread is stuck inside C++

  threading.Thread(target=watchdog, daemon=True, name="distributed-watchdog").start()
  try:
    jax.distributed.initialize(initialization_timeout=timeout + 60, **kwargs)
  except Exception as e:  # pylint: disable=broad-except  # every failure here is the launch's
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise LaunchError(f"jax.distributed.initialize failed ({where}): {first[:300]}") from None
  finally:
    joined.set()
  logging.info(
    "jax.distributed: process %d of %d (%s), %d local device(s), %d in all",
    jax.process_index(),
    jax.process_count(),
    where,
    jax.local_device_count(),
    jax.device_count(),
  )
