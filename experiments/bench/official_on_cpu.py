"""The official DINO code on a CPU: its modules imported from a fetched folder, with stand-ins for
what a CPU lacks. Shared by the torch-side workers (experiments/bench/official_dino_step.py,
experiments/parity/official_dino_fmnist.py); runs under a Python with torch, never sslx's.

Stand-ins: `.cuda()` returns the tensor or module itself, `torch.cuda.synchronize` does nothing,
a one-process gloo group serves DINOLoss's all_reduce, the metric logger's end-of-epoch sync
across processes (a CUDA tensor, not part of the step) is skipped, and `NoDDP` is what
DistributedDataParallel adds to a module here: the `.module` attribute.
"""

import os
import sys
import tempfile
import types

import torch
import torch.distributed as dist
from torch import nn


class NoDDP(nn.Module):
  def __init__(self, module: nn.Module):
    super().__init__()
    self.module = module

  def forward(self, x):
    return self.module(x)


def _stub_torchvision() -> None:
  tv = types.ModuleType("torchvision")
  for name in ("datasets", "transforms", "models"):
    sub = types.ModuleType(f"torchvision.{name}")
    setattr(tv, name, sub)
    sys.modules[f"torchvision.{name}"] = sub
  sys.modules["torchvision"] = tv


def import_official(
  folder: str, *, stub_torchvision: bool = False, with_knn: bool = False
) -> types.SimpleNamespace:
  """main_dino, utils, vision_transformer (and eval_knn with `with_knn`) from `folder`.

  stub_torchvision: replace torchvision by empty modules (only the official data loading uses it;
  eval_knn needs the real one).
  """
  if stub_torchvision:
    _stub_torchvision()
  sys.path.insert(0, os.path.abspath(folder))
  import main_dino  # noqa: PLC0415  (the official code, from `folder`)
  import utils  # noqa: PLC0415
  import vision_transformer  # noqa: PLC0415

  torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
  nn.Module.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
  torch.cuda.synchronize = lambda *args, **kwargs: None
  utils.MetricLogger.synchronize_between_processes = lambda self: None
  if not dist.is_initialized():
    init_file = os.path.join(tempfile.mkdtemp(), "pg")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
  eval_knn = None
  if with_knn:
    import eval_knn  # noqa: PLC0415
  return types.SimpleNamespace(
    main_dino=main_dino, utils=utils, vits=vision_transformer, eval_knn=eval_knn
  )
