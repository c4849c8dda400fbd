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

import json
import os
from typing import Any, Callable

import ml_collections
import numpy as np
from absl import logging

from sslx.errors import UserError
from sslx.methods import make_method
from sslx.models import beit, torch_layout, vit
from sslx.train import checkpoint as ckpt_lib

WEIGHTS = ("teacher", "student")


class ExportError(UserError):
  """The workdir cannot be exported as asked (no checkpoint, unknown method, bad --weights)."""


def _fixed_positions(table: np.ndarray) -> np.ndarray:
  """[N, D] patch positions -> timm's [1, 1 + N, D] table with the zero CLS position."""
  return np.concatenate([np.zeros((1, table.shape[1]), np.float32), table])[None]


def _vit(config, method, tree, loss_state, weights):
  del loss_state, weights
  from sslx.methods.dino import build_backbone
  m = build_backbone(config.model, drop_path=False)
  pos = _fixed_positions(vit.sincos_2d(m.pos_grid, m.pos_grid, m.embed_dim)) \
      if m.pos_embed == "sincos" else None
  sd = torch_layout.vit_to_torch(tree["backbone"], pos_embed=pos)
  kwargs = dict(img_size=m.pos_grid * m.patch_size, patch_size=m.patch_size,
                in_chans=int(sd["patch_embed.proj.weight"].shape[1]), embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
                mlp_ratio=m.mlp_ratio, qkv_bias=True, num_classes=0)
  return sd, {"architecture": "vit", "timm_kwargs": json.dumps(kwargs)}


def _cae(config, method, tree, loss_state, weights):
  del loss_state, weights
  net = method.network()
  grid = config.data.global_crops.size // net.patch_size
  pos = _fixed_positions(beit.sincos_pos_embed(grid, grid, net.embed_dim))
  sd = torch_layout.vit_to_torch(tree["encoder"], pos_embed=pos)
  kwargs = dict(img_size=grid * net.patch_size, patch_size=net.patch_size,
                in_chans=int(sd["patch_embed.proj.weight"].shape[1]), embed_dim=net.embed_dim,
                depth=net.depth, num_heads=net.num_heads, mlp_ratio=net.mlp_ratio, qkv_bias=True,
                init_values=net.init_values, num_classes=0)
  return sd, {"architecture": "vit", "timm_kwargs": json.dumps(kwargs)}


def _resnet(config, method, tree, loss_state, weights):
  del method
  stats = (loss_state["target_stats"] if weights == "teacher"
           else loss_state["online_stats"]["net"])["encoder"]
  sd = torch_layout.resnet_to_torch(tree["encoder"], stats)
  mc = config.model
  meta = {"architecture": "resnet", "torchvision_model": f"resnet{mc.depth}"}
  if mc.width != 64 or mc.stem != "imagenet":
    # torchvision builds only the 64-wide ImageNet stem; the names still follow it.
    meta["note"] = (f"width {mc.width}, stem {mc.stem!r}: torchvision's resnet{mc.depth} has "
                    "width 64 and the ImageNet stem, so build a matching model to load this.")
  return sd, meta


# config.method -> (config, method, params tree, loss_state, weights) -> (state dict, metadata)
BACKBONES: dict[str, Callable[..., tuple[dict[str, np.ndarray], dict[str, str]]]] = {
    "dino": _vit, "ibot": _vit, "mocov3": _vit, "cae": _cae, "byol": _resnet, "sage": _resnet,
}


def export(config: ml_collections.ConfigDict, workdir: str, weights: str = "teacher") -> dict[str, Any]:
  """Writes the latest checkpoint's backbone; returns {'path', 'step', 'tensors', 'weights'}.

  Raises:
    ExportError: unknown `weights`, a method without an exporter, or no checkpoint in `workdir`.
  """
  if weights not in WEIGHTS:
    raise ExportError(f"--weights={weights!r}; valid: {', '.join(WEIGHTS)}")
  if config.method not in BACKBONES:
    raise ExportError(f"no exporter for config.method={config.method!r}; "
                      f"sslx exports {', '.join(sorted(BACKBONES))}")
  method = make_method(config)
  ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise ExportError(f"no checkpoint under {ckpt.directory}; train first with "
                        f"`python main.py --config=... --workdir={workdir}`")
    parts = ckpt.restore_parts(step, ("params" if weights == "student" else "teacher_params",
                                      "loss_state"))
  finally:
    ckpt.close()
  tree = parts["params" if weights == "student" else "teacher_params"]
  sd, meta = BACKBONES[config.method](config, method, tree, parts["loss_state"], weights)
  path = os.path.join(workdir, "export", f"{weights}_backbone_step{step}.safetensors")
  metadata = {"format": "pt", "sslx.method": config.method, "sslx.weights": weights,
              "sslx.step": str(step), **meta}
  if config.get("sere") is not None and config.sere.enabled:
    metadata["sslx.sere"] = "enabled"
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
