"""Reads PyTorch checkpoints (`torch.save` files) into numpy arrays, without torch.

Why our own reader: no maintained pure-Python reader of torch's format exists on PyPI (readers
of torch files either import torch or are static pickle scanners), and sslx has no torch at run
time. The format is small: since PyTorch 1.6 `torch.save` writes a zip archive holding
`<name>/data.pkl` (a pickle of the object, protocol 2) and one raw little-endian file
`<name>/data/<key>` per storage. The pickle refers to a storage by a persistent id
('storage', storage class, key, device, numel) and rebuilds a tensor with
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`.

Safety: the unpickler never imports anything. It knows the handful of globals a checkpoint
needs (tensor and parameter rebuilders, storage classes, OrderedDict) and turns every other
global (argparse.Namespace in `args`, optimiser or scaler classes, numpy scalars...) into an
inert `Opaque` record of its name and arguments, so loading a file cannot run its code.
The legacy (pre-1.6, non-zip) format is refused with a message saying how to re-save the file.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from typing import Any

import numpy as np


class TorchFileError(ValueError):
  """The file is not a readable torch checkpoint; the message says why and what to do."""


# storage class name -> numpy dtype (bfloat16 through ml_dtypes, which jax installs)
def _dtypes() -> dict[str, np.dtype]:
  import ml_dtypes

  return {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
  }


class Opaque:
  """Stands for an object of a class the reader does not rebuild (e.g. argparse.Namespace).

  Keeps the qualified name, the constructor arguments and the pickled state, for inspection.
  """

  def __init__(self, name: str, args: tuple = (), kwargs: dict | None = None):
    self.name, self.args, self.kwargs, self.state = name, args, kwargs or {}, None

  def __setstate__(self, state: Any) -> None:
    self.state = state

  def __repr__(self) -> str:
    return f"Opaque({self.name})"


def _opaque_class(name: str) -> Any:
  """A callable standing for global `name`: calling it, or `cls.__new__(cls)`, gives an Opaque."""

  class _Stand(Opaque):
    # Returns the base class on purpose: unpickling calls cls.__new__(cls) and must get a plain
    # Opaque record, not an instance of this stand-in.
    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:  # type: ignore[misc]
      return Opaque(name, args, kwargs)

  _Stand.__qualname__ = _Stand.__name__ = name
  return _Stand


class _Storage:
  """One storage: its dtype and its bytes (read lazily from the archive)."""

  def __init__(self, array: np.ndarray):
    self.array = array


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, *_: Any) -> Any:
  base = storage.array
  if not size:
    return np.array(base[offset])
  itemsize = base.dtype.itemsize
  need = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
  if any(n == 0 for n in size):
    return np.zeros(size, base.dtype)
  if need > base.size:
    raise TorchFileError(f"a tensor reads past its storage ({need} > {base.size} elements)")
  view = np.lib.stride_tricks.as_strided(
    base[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
  )
  return np.array(view)  # a contiguous copy, independent of the storage


def _rebuild_parameter(data: Any, requires_grad: bool = True, *_: Any) -> Any:
  del requires_grad
  return data


def _rebuild_parameter_with_state(data: Any, requires_grad: bool, hooks: Any, state: Any) -> Any:
  del requires_grad, hooks, state
  return data


_KNOWN = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("torch._utils", "_rebuild_tensor"): lambda s, o, size, stride: _rebuild_tensor(
    s, o, size, stride
  ),
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
  ("builtins", "set"): set,
  ("builtins", "frozenset"): frozenset,
  ("builtins", "slice"): slice,
  ("builtins", "complex"): complex,
}


class _Unpickler(pickle.Unpickler):
  def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str):
    super().__init__(file)
    self.archive, self.prefix = archive, prefix
    self.storages: dict[str, _Storage] = {}
    self.dtypes = _dtypes()

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _KNOWN:
      return _KNOWN[(module, name)]
    if module == "torch" and name in self.dtypes:
      return name  # a storage class: only its name is needed
    return _opaque_class(f"{module}.{name}")

  def persistent_load(self, pid: Any) -> Any:
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise TorchFileError(f"unsupported persistent id {pid!r:.80}")
    kind, key = pid[1], str(pid[2])
    if key not in self.storages:
      name = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
      if name not in self.dtypes:
        raise TorchFileError(f"storage of unsupported type {name}")
      raw = self.archive.read(f"{self.prefix}data/{key}")
      self.storages[key] = _Storage(np.frombuffer(raw, self.dtypes[name]))
    return self.storages[key]


def load(path: str) -> Any:
  """The object `torch.save` wrote to `path`, tensors as numpy arrays (contiguous copies).

  Raises:
    TorchFileError: not a zip-format torch file (e.g. the legacy format, or a truncated file).
  """
  if not zipfile.is_zipfile(path):
    raise TorchFileError(
      f"{path} is not a zip-format torch checkpoint (torch >= 1.6 writes one); a legacy file "
      "can be re-saved with `torch.save(torch.load(f), f)` in an environment with torch"
    )
  try:
    with zipfile.ZipFile(path) as archive:
      pkls = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
      if len(pkls) != 1:
        raise TorchFileError(f"{path}: expected one data.pkl in the archive, found {len(pkls)}")
      prefix = pkls[0][: -len("data.pkl")]
      order = f"{prefix}byteorder"
      if order in archive.namelist() and archive.read(order).strip() != b"little":
        raise TorchFileError(f"{path} was written big-endian; re-save it on a little-endian host")
      with archive.open(pkls[0]) as f:
        return _Unpickler(f, archive, prefix).load()
  except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, KeyError) as e:
    raise TorchFileError(f"{path} cannot be read as a torch checkpoint ({e})") from e
