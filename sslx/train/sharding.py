"""Device mesh and sharding rules, expressed as data in the config.

`config.mesh` names the axes and their sizes, e.g. `{'data': -1, 'fsdp': 1}`
(-1 = all remaining devices). The batch is split over every axis (data and fsdp
both hold different examples, as in ZeRO/FSDP). Parameters are replicated unless
the fsdp axis is larger than 1, in which case each tensor's largest dimension
divisible by the fsdp size is split over it (big_vision's `fsdp` rule).
Under `jax.jit` on these global arrays every reduction (the DINO centre, BatchNorm
statistics, MoCo negatives) is a global-batch reduction with no hand-written
all-reduce, so losses do not depend on the number of devices.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sslx import errors

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


class ShardingError(errors.UserError):
  """An impossible device / batch combination, raised before anything compiles."""


def make_mesh(mesh_cfg: Mapping[str, int], devices=None) -> Mesh:
  """Builds a Mesh with axes ('data', 'fsdp') over all (or the given) devices.

  Args:
    mesh_cfg: axis name -> size; one size may be -1 (filled with what is left).
    devices: defaults to `jax.devices()`.
  """
  # Process-major order: process p's devices then hold rows [p * B / P, (p + 1) * B / P) of
  # every global batch, the rows its input pipeline builds (sslx/data/pipeline.py).
  devices = sorted(jax.devices() if devices is None else devices,
                   key=lambda d: (d.process_index, d.id))
  unknown = set(mesh_cfg) - set(AXES)
  if unknown:
    raise ShardingError(f"config.mesh has unknown axes {sorted(unknown)}; valid axes: {AXES}")
  sizes = [int(mesh_cfg.get(a, 1)) for a in AXES]
  if sizes.count(-1) > 1:
    raise ShardingError("config.mesh: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ShardingError(f"config.mesh {dict(mesh_cfg)} does not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ShardingError(
        f"config.mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices but "
        f"{len(devices)} are visible; set --config.mesh.data=-1")
  # Plain Mesh (not jax.make_mesh): jax >= 0.10 would make explicit axes, which
  # ordinary model code (concatenating a CLS token) does not trace under.
  return Mesh(np.asarray(devices).reshape(sizes), AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (example) dimension split over every mesh axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_sharding(mesh: Mesh, shape_tree: Any, min_size: int = 2**14) -> Any:
  """Shardings for a tree of ShapeDtypeStructs: replicated, or fsdp-split if fsdp > 1.

  Small tensors (< `min_size` elements) stay replicated; gathering them costs more
  than it saves.
  """
  fsdp = mesh.shape["fsdp"]

  def rule(x):
    shape = getattr(x, "shape", ())
    if fsdp == 1 or int(np.prod(shape)) < min_size:
      return replicated(mesh)
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
      if shape[i] % fsdp == 0:
        spec = [None] * len(shape)
        spec[i] = "fsdp"
        return NamedSharding(mesh, P(*spec))
    return replicated(mesh)

  return jax.tree.map(rule, shape_tree)


def check_batch(global_batch_size: int, mesh: Mesh) -> int:
  """Validates the global batch against devices and processes; returns the per-process batch."""
  n_dev = mesh.devices.size
  n_proc = jax.process_count()
  if global_batch_size % n_dev:
    raise ShardingError(
        f"global batch {global_batch_size} is not divisible by the {n_dev} devices of the "
        f"mesh; choose --config.batch_size as a multiple of {n_dev}")
  if global_batch_size % n_proc:
    raise ShardingError(f"global batch {global_batch_size} not divisible by {n_proc} processes")
  return global_batch_size // n_proc


def to_global(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles this process's slice of the batch into global jax.Arrays."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
