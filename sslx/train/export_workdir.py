"""`main.py --mode=export`: a workdir's backbone as PyTorch weights (one safetensors file).

Writes `<workdir>/export/<weights>_backbone_step<N>.safetensors` from the latest checkpoint:
the backbone only (no heads, projectors, predictors, decoders or mask token), float32, in the
layouts of sslx/models/torch_layout.py (timm's / DINO's ViT names; torchvision's ResNet names,
BatchNorm running statistics included). The file's metadata says what it holds: `sslx.method`,
`sslx.weights`, `sslx.step`, `architecture`, and for ViTs `timm_kwargs` (a JSON dict for
`timm.models.vision_transformer.VisionTransformer`), for ResNets `torchvision_model`.

Which weights (`--weights`): 'teacher' (default) is what sslx's kNN and probes evaluate and what
DINO, iBOT and SERE release: the EMA teacher; for CAE, which has no EMA, the encoder; for BYOL and
SaGe the EMA target with its own BatchNorm statistics. 'student' is the network the optimiser
trains (the MoCo v3 and BYOL papers evaluate this one: the base / online encoder).
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from sslx.errors import UserError
from sslx.methods import enabled_addons, make_method
from sslx.train import checkpoint as ckpt_lib

WEIGHTS = ("teacher", "student")


class ExportError(UserError):
  """The workdir cannot be exported as asked (no checkpoint, unknown method, bad --weights)."""


def backbone_state_dict(
  config: ml_collections.ConfigDict, workdir: str, weights: str = "teacher"
) -> tuple[dict[str, np.ndarray], dict[str, str], int, str]:
  """The latest checkpoint's backbone as a PyTorch state dict (what `export` writes; what
  fine-tuning starts from) -> (state dict, metadata, step, weights actually read).

  Raises:
    ExportError: unknown `weights`, a method without an exporter, or no checkpoint in `workdir`.
  """
  if weights not in WEIGHTS:
    raise ExportError(f"--weights={weights!r}; valid: {', '.join(WEIGHTS)}")
  method = make_method(config)
  if weights == "student" and not method.has_teacher:
    weights = "teacher"  # one network: the student is what every evaluation reads
  key = "teacher_params" if weights == "teacher" and method.has_teacher else "params"
  step, parts = ckpt_lib.read_latest(workdir, (key, "loss_state"), ExportError)
  sd, meta = method.export_backbone(parts[key], parts["loss_state"], weights)
  return sd, meta, step, weights


def export(
  config: ml_collections.ConfigDict, workdir: str, weights: str = "teacher"
) -> dict[str, Any]:
  """Writes the latest checkpoint's backbone; returns {'path', 'step', 'tensors', 'weights'}.

  Raises:
    ExportError: unknown `weights`, a method without an exporter, or no checkpoint in `workdir`.
  """
  sd, meta, step, weights = backbone_state_dict(config, workdir, weights)
  path = os.path.join(workdir, "export", f"{weights}_backbone_step{step}.safetensors")
  metadata = {
    "format": "pt",
    "sslx.method": config.method,
    "sslx.weights": weights,
    "sslx.step": str(step),
    **meta,
  }
  for addon in enabled_addons(config):
    metadata[f"sslx.{addon}"] = "enabled"
  _write(path, sd, metadata)
  logging.info("export: %d tensors (%s backbone, step %d) -> %s", len(sd), weights, step, path)
  return {"path": path, "step": step, "tensors": len(sd), "weights": weights}


def _write(path: str, state_dict: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
  """Writes next to `path` and renames, so an interrupted export leaves no half-written file."""
  from safetensors.numpy import save_file

  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, tmp, metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600; give it the user's usual mode
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
