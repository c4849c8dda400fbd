"""Multi-host start-up: `jax.distributed.initialize()` when the environment asks for it."""

from __future__ import annotations

import os

from absl import logging

# Variables set by the launchers jax.distributed knows how to read (SLURM, Open MPI,
# Cloud TPU pods) or by a user who wires the coordinator by hand.
_MULTI_HOST_HINTS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE",
                     "MEGASCALE_COORDINATOR_ADDRESS")


def wants_distributed(env=os.environ) -> bool:
  """True when this process is one of several (SLURM, MPI, TPU pod, explicit opt-in)."""
  if env.get("SSLX_DISTRIBUTED", "").lower() in ("1", "true", "yes"):
    return True
  if env.get("SSLX_DISTRIBUTED", "").lower() in ("0", "false", "no"):
    return False
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
    return True
  return any(env.get(k) for k in _MULTI_HOST_HINTS)


def maybe_initialize() -> None:
  """Calls jax.distributed.initialize() once, before any other jax call, if wanted."""
  if not wants_distributed():
    return
  import jax
  jax.distributed.initialize()
  logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
