"""Device mesh and sharding rules, expressed as data in the config.

`config.mesh` names the axes and their sizes, e.g. `{'data': -1, 'fsdp': 1}`
(-1 = all remaining devices). The batch is split over every axis (data and fsdp
both hold different examples, as in ZeRO/FSDP). The train state (student and teacher
parameters, optimiser moments, loss state) is replicated unless the fsdp axis is larger
than 1; then every tensor of at least `config.sharding.fsdp_min_size` elements is split
over it along its largest dimension divisible by the fsdp size (big_vision's `fsdp` rule),
never along the leading layer axis of blocks stacked by nn.scan (`fsdp_spec`). XLA gathers
a split tensor where the step needs it whole, so the maths is the data-parallel step's.
Under `jax.jit` on these global arrays every reduction (the DINO centre, BatchNorm
statistics, MoCo negatives) is a global-batch reduction with no hand-written
all-reduce, so losses do not depend on the number of devices.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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
  devices = sorted(
    jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id)
  )
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
      f"{len(devices)} are visible; set --config.mesh.data=-1"
    )
  # Plain Mesh (not jax.make_mesh): jax >= 0.10 would make explicit axes, which
  # ordinary model code (concatenating a CLS token) does not trace under.
  return Mesh(np.asarray(devices).reshape(sizes), AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (example) dimension split over every mesh axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# A path component naming blocks stacked by nn.scan (models/vit.py, scan_blocks=True): the
# tensors under it have a leading layer axis (optim.clip_per_tensor reads the same name).
STACKED = "blocks"


def _names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def fsdp_spec(names: Sequence[str], shape: Sequence[int], fsdp: int, min_size: int) -> P:
  """The PartitionSpec of one train-state tensor (path component names, shape) under FSDP.

  Replicated (P()) when fsdp == 1, when the tensor has fewer than `min_size` elements (the
  all-gather would cost more than the memory it saves) or when no eligible dimension is
  divisible by `fsdp`. Otherwise the largest divisible dimension (the first of equal ones) is
  split over the 'fsdp' axis; for a tensor under a STACKED ('blocks') path component the
  leading layer axis is not eligible, so a scanned block's kernel [L, D, 3D] splits a feature
  dimension as the unscanned [D, 3D] does, and each layer's slice stays whole in depth.
  """
  shape = tuple(shape)
  if fsdp == 1 or math.prod(shape) < min_size:
    return P()
  first = 1 if STACKED in names and len(shape) > 1 else 0
  dims = sorted(range(first, len(shape)), key=lambda i: -shape[i])
  for i in dims:
    if shape[i] % fsdp == 0:
      return P(*[("fsdp" if d == i else None) for d in range(len(shape))])
  return P()


def param_sharding(mesh: Mesh, shape_tree: Any, min_size: int = 2**14) -> Any:
  """NamedShardings for a tree of ShapeDtypeStructs (the whole train state), by `fsdp_spec`.

  Args:
    mesh: a Mesh (or AbstractMesh, to reason about shapes without devices) with an 'fsdp' axis.
    shape_tree: the state's shapes, e.g. from jax.eval_shape.
    min_size: config.sharding.fsdp_min_size; smaller tensors stay replicated.
  """
  fsdp = mesh.shape["fsdp"]
  return jax.tree_util.tree_map_with_path(
    lambda path, x: NamedSharding(
      mesh, fsdp_spec(_names(path), getattr(x, "shape", ()), fsdp, min_size)
    ),
    shape_tree,
  )


@dataclasses.dataclass(frozen=True)
class StateMemory:
  """Bytes of a sharded train state per device, from the shardings' shard shapes.

  Attributes:
    per_device: bytes one device holds, per top-level state field ('params', 'teacher_params',
      'opt_state', 'loss_state', ...) and 'total'.
    full: the same without sharding (every device holding everything).
    sharded, replicated: number of tensors split over devices / held whole on every device.
    indivisible: of the replicated tensors, those of at least `min_size` elements (so the rule
      wanted to split them) with no eligible dimension divisible by the fsdp size.
    replicated_bytes_fraction: share of the state's (unsharded) bytes held whole on every device.
  """

  per_device: dict[str, int]
  full: dict[str, int]
  sharded: int
  replicated: int
  indivisible: int
  replicated_bytes_fraction: float

  def log_line(self) -> str:
    """One start-up log line: per-device MiB by field, and what stayed replicated."""
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    parts = ", ".join(
      f"{k} {mib(v)}"
      for k, v in self.per_device.items()
      if k in ("params", "teacher_params", "opt_state", "loss_state")
    )
    return (
      f"train state per device: {mib(self.per_device['total'])} MiB of "
      f"{mib(self.full['total'])} ({parts}); {self.sharded} tensors sharded, "
      f"{self.replicated} replicated ({self.indivisible} of them large but with no eligible "
      f"dimension divisible by the fsdp size), {100 * self.replicated_bytes_fraction:.1f}% of the bytes "
      "replicated"
    )

  def metrics(self) -> dict[str, float]:
    """Scalars for the metrics writer: memory/<field>_bytes_per_device and the total."""
    out = {
      f"memory/{k}_bytes_per_device": float(v)
      for k, v in self.per_device.items()
      if k in ("params", "teacher_params", "opt_state")
    }
    out["memory/state_bytes_per_device"] = float(self.per_device["total"])
    return out


def state_memory(shape_tree: Any, sharding_tree: Any, min_size: int = 2**14) -> StateMemory:
  """Per-device bytes of `shape_tree` laid out by `sharding_tree` (`param_sharding`'s output),
  computed from `sharding.shard_shape(shape)`: no device is queried, so it works on shapes
  from jax.eval_shape and an AbstractMesh."""
  per_device: dict[str, int] = {}
  full: dict[str, int] = {}
  sharded = replicated = indivisible = 0
  replicated_bytes = 0
  leaves = jax.tree_util.tree_flatten_with_path(shape_tree)[0]
  shardings = jax.tree.leaves(sharding_tree, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, x), s in zip(leaves, shardings, strict=True):
    shape = tuple(getattr(x, "shape", ()))
    itemsize = np.dtype(x.dtype).itemsize
    field = _names(path[:1])[0] if path else "state"
    nbytes = math.prod(shape) * itemsize
    local = math.prod(s.shard_shape(shape)) * itemsize
    per_device[field] = per_device.get(field, 0) + local
    full[field] = full.get(field, 0) + nbytes
    if local < nbytes:
      sharded += 1
    else:
      replicated += 1
      replicated_bytes += nbytes
      if s.mesh.shape["fsdp"] > 1 and math.prod(shape) >= min_size:
        indivisible += 1
  per_device["total"], full["total"] = sum(per_device.values()), sum(full.values())
  return StateMemory(
    per_device, full, sharded, replicated, indivisible, replicated_bytes / max(full["total"], 1)
  )


def check_batch(global_batch_size: int, mesh: Mesh) -> int:
  """Validates the global batch against devices and processes; returns the per-process batch."""
  n_dev = mesh.devices.size
  n_proc = jax.process_count()
  if global_batch_size % n_dev:
    raise ShardingError(
      f"global batch {global_batch_size} is not divisible by the {n_dev} devices of the "
      f"mesh; choose --config.batch_size as a multiple of {n_dev}"
    )
  if global_batch_size % n_proc:
    raise ShardingError(f"global batch {global_batch_size} not divisible by {n_proc} processes")
  return global_batch_size // n_proc


def to_global(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles this process's slice of the batch into global jax.Arrays."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
