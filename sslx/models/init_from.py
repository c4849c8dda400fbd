"""`--init_from=FILE`: start training or evaluation from published backbone weights.

Accepted files (read without torch: sslx/models/torch_pickle.py, or safetensors):
* a plain backbone state dict in timm / DINO names (DINO's `dino_deitsmall16_pretrain.pth`,
  a timm ViT, an sslx `--mode=export` file) or torchvision ResNet names;
* DINO / iBOT / SERE training checkpoints: `teacher` and `student` state dicts whose keys carry
  `module.` (the DDP student) and `backbone.` / `head.` (the multi-crop wrapper);
* iBOT's extracted weights (`state_dict` holding the backbone);
* MoCo v3 checkpoints: `state_dict` with `module.base_encoder.`, `module.momentum_encoder.` and
  `module.predictor.`; the encoders' `head.` is the projector;
* CAE checkpoints: `model` with `encoder.` (BEiT names: `attn.q_bias` / `attn.v_bias`, layer
  scale `gamma_1` / `gamma_2`) next to the regressor, decoder and alignment encoder.

Which network (`key`): 'auto' takes what the official evaluations read: DINO's and iBOT's
`teacher` (their eval scripts' default `checkpoint_key`), MoCo v3's `base_encoder` (its
`main_lincls.py`), CAE's `encoder`. 'teacher' / 'student' choose in files holding both (for
MoCo v3: the momentum / base encoder); any other value names a top-level entry of the file
(e.g. 'model_ema').

The rules, in order: pick the entry, strip `module.`, keep the chosen sub-network's keys and strip
its prefix (`backbone.`, `base_encoder.` / `momentum_encoder.`, `encoder.`), drop what is not
part of a backbone (heads, projectors, predictors, classifier, mask tokens; listed in the log),
rename BEiT-style blocks to timm's, then the method maps the result strictly
(sslx/models/torch_layout.py): every missing, unexpected or mis-shaped key is listed in one
`InitFromError`. A learned position grid of another size is resized (logged).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

from sslx.errors import UserError
from sslx.models import torch_layout, torch_pickle

KEYS = ("auto", "teacher", "student")
# Top-level entries that hold a network, in the order 'auto' tries them.
_CONTAINERS = ("teacher", "state_dict", "model", "student", "model_ema")
# First name components that are never part of a backbone: DINO / iBOT heads and a timm
# classifier ('head'), torchvision's 'fc', MoCo v3's 'predictor', iBOT's mask token
# ('masked_embed'), timm's pooled-feature norm and pre-logits, SERE's heads (which its
# release keeps inside the backbone).
_NOT_BACKBONE = frozenset(
  {"head", "fc", "predictor", "projector", "masked_embed", "mask_token", "fc_norm", "pre_logits"}
  | {"channel_sere", "pixel_sere", "channel_sere_local", "pixel_sere_local"}
)


class InitFromError(UserError):
  """--init_from cannot be used as given; the message names the file and every mismatch."""


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A backbone state dict read from a file, and how it was found."""

  state_dict: dict[str, np.ndarray]  # timm / torchvision names, float arrays
  source: str  # e.g. "entry 'teacher', prefix 'backbone.'"
  ignored: tuple[str, ...]  # keys of the chosen entry that are not part of the backbone
  # The projection head next to the backbone in DINO / iBOT / SERE checkpoints ('head.' of the
  # same entry, prefix stripped); empty for other files.
  head: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def _is_array(x: Any) -> bool:
  return isinstance(x, np.ndarray | np.generic)


def _is_state_dict(x: Any) -> bool:
  return isinstance(x, Mapping) and bool(x) and all(_is_array(v) for v in x.values())


def read_file(path: str) -> Any:
  """The object stored in `path` (.safetensors, or a torch.save file), tensors as numpy."""
  if not os.path.isfile(path):
    raise InitFromError(f"--init_from={path}: no such file")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file

    return load_file(path)
  try:
    return torch_pickle.load(path)
  except torch_pickle.TorchFileError as e:
    raise InitFromError(f"--init_from={path}: {e}") from e


def _pick_entry(obj: Any, key: str, path: str) -> tuple[dict[str, Any], str, str]:
  """(state dict, its description, the network choice left for prefixes) from a file's object."""
  if _is_state_dict(obj):
    return dict(obj), "the file's state dict", key
  if not isinstance(obj, Mapping):
    raise InitFromError(
      f"--init_from={path}: holds a {type(obj).__name__}, not a state dict or a checkpoint dict"
    )
  entries = [k for k, v in obj.items() if isinstance(v, Mapping) and _is_state_dict(v)]
  if key not in KEYS:
    if key not in entries:
      raise InitFromError(
        f"--init_from_key={key!r} is not an entry of {path}; its state dicts: "
        f"{', '.join(entries) or 'none'}"
      )
    return dict(obj[key]), f"entry {key!r}", "auto"
  if key in ("teacher", "student") and key in entries:
    return dict(obj[key]), f"entry {key!r}", "auto"
  for name in _CONTAINERS:
    if name in entries and not (name == "student" and key == "teacher"):
      return dict(obj[name]), f"entry {name!r}", key
  raise InitFromError(
    f"--init_from={path}: no network found; top-level entries: {', '.join(map(str, obj))} "
    "(name one with --init_from_key)"
  )


def _strip(sd: dict[str, Any], prefix: str) -> dict[str, Any]:
  return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in sd.items()}


def _sub_network(sd: dict[str, Any], key: str) -> tuple[str, str | None]:
  """The key prefix of the chosen sub-network ('' for none) and a note when `key` had no say."""
  heads = {k.split(".", 1)[0] for k in sd}
  if "base_encoder" in heads:  # MoCo v3: the base encoder is the student, momentum the teacher
    return ("momentum_encoder." if key == "teacher" else "base_encoder."), None
  if "backbone" in heads:  # DINO / iBOT / SERE's multi-crop wrapper
    return "backbone.", None
  if "encoder" in heads:  # CAE (no teacher: its alignment encoder is the same network)
    return "encoder.", None
  if key in ("teacher", "student"):
    return "", f"--init_from_key={key} does not apply: the file holds one network"
  return "", None


_BEIT_BLOCK = re.compile(r"^blocks\.(\d+)\.(attn\.q_bias|attn\.v_bias|gamma_1|gamma_2)$")


def _beit_to_timm(sd: dict[str, Any]) -> dict[str, Any]:
  """BEiT / CAE block names -> timm's: q and v biases fused with a zero k bias, gamma -> ls."""
  out, q_bias, v_bias = {}, {}, {}
  for k, v in sd.items():
    m = _BEIT_BLOCK.match(k)
    if not m:
      out[k] = v
    elif m.group(2) == "attn.q_bias":
      q_bias[m.group(1)] = v
    elif m.group(2) == "attn.v_bias":
      v_bias[m.group(1)] = v
    else:
      out[f"blocks.{m.group(1)}.ls{m.group(2)[-1]}.gamma"] = v
  for i in sorted(set(q_bias) | set(v_bias), key=int):
    if i in q_bias and i in v_bias:
      q = np.asarray(q_bias[i], np.float32)
      out[f"blocks.{i}.attn.qkv.bias"] = np.concatenate([q, np.zeros_like(q), v_bias[i]])
    else:  # one without the other: left as is, so the strict check names it
      for name, part in (("q_bias", q_bias), ("v_bias", v_bias)):
        if i in part:
          out[f"blocks.{i}.attn.{name}"] = part[i]
  return out


def read_workdir(path: str, key: str = "auto") -> Backbone:
  """The backbone of an sslx workdir's latest checkpoint, as `--mode=export` writes it: the
  teacher ('auto', 'teacher') or the student ('student'), in the workdir's own config."""
  import json

  import ml_collections

  from sslx.train import export_workdir  # here: the train package imports this module

  if key not in KEYS:
    raise InitFromError(f"--init_from={path} is a workdir: --init_from_key must be one of {KEYS}")
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise InitFromError(
      f"--init_from={path} is a folder but not an sslx workdir (no config.json); pass a "
      "workdir of a training run or a weights file"
    )
  with open(cfg_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  weights = "student" if key == "student" else "teacher"
  try:
    sd, _, step, weights = export_workdir.backbone_state_dict(config, path, weights)
  except UserError as e:
    raise InitFromError(f"--init_from={path}: {e}") from e
  return Backbone(sd, f"workdir, step {step}, {weights}", ())


def read_backbone(path: str, key: str = "auto") -> Backbone:
  """The backbone state dict of `path` by the rules of this module's docstring; a folder is read
  as an sslx workdir (`read_workdir`).

  Raises:
    InitFromError: a missing or unreadable file, an unknown `key`, or no network in the file.
  """
  if os.path.isdir(path):
    return read_workdir(path, key)
  obj = read_file(path)
  sd, where, choice = _pick_entry(obj, key, path)
  sd = _strip(sd, "module.")
  prefix, note = _sub_network(sd, choice)
  if note:
    logging.info("init_from: %s", note)
  kept = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
  ignored = [k for k in sd if not k.startswith(prefix)]
  for k in list(kept):
    if k.split(".", 1)[0] in _NOT_BACKBONE:
      ignored.append(prefix + k)
      del kept[k]
  if not kept:
    raise InitFromError(f"--init_from={path}: {where} has no backbone keys under {prefix!r}")
  kept = {
    k: np.asarray(v, np.float32) if np.issubdtype(np.asarray(v).dtype, np.floating) else v
    for k, v in _beit_to_timm(kept).items()
  }
  source = where + (f", prefix {prefix!r}" if prefix else "")
  head = {}
  if prefix == "backbone.":  # the multi-crop wrapper keeps its head beside the backbone
    head = {k[len("head.") :]: np.asarray(v) for k, v in sd.items() if k.startswith("head.")}
  return Backbone(kept, source, tuple(sorted(ignored)), head)


def _one_line(e: Exception) -> str:
  return " ".join(str(e).split("\n"))


def init_params(
  method: Any, params: Any, loss_state: Any, path: str, key: str = "auto", head: bool = False
) -> tuple[Any, Any, Backbone]:
  """A method's fresh (params, loss_state) with the backbone of `path` -> (params, loss_state,
  what was read). Logs where the weights came from and what was ignored. With `head`, the
  file's projection head too (`Method.import_head`; DINO's).

  Raises:
    InitFromError: the file cannot be read, or its backbone does not fit the config (one
      message listing every missing, unexpected and mis-shaped key).
  """
  return apply_backbone(method, params, loss_state, read_backbone(path, key), path, head)


def check_head(backbone: Backbone, path: str) -> None:
  """Raises InitFromError when --init_from_head asks for a head the file does not have."""
  if not backbone.head:
    raise InitFromError(
      f"--init_from_head: {path} ({backbone.source}) has no projection head next to the "
      "backbone (only DINO / iBOT / SERE training checkpoints do); drop --init_from_head"
    )


def apply_backbone(
  method: Any, params: Any, loss_state: Any, backbone: Backbone, path: str, head: bool = False
) -> tuple[Any, Any, Backbone]:
  """`init_params` for a backbone already read (`read_backbone`) from `path`."""
  if head:
    check_head(backbone, path)
  try:
    params, loss_state = method.import_backbone(params, loss_state, backbone.state_dict)
    if head:
      params = method.import_head(params, backbone.head)
      logging.info("init_from: the projection head too (%d tensors)", len(backbone.head))
  except torch_layout.LayoutError as e:
    raise InitFromError(f"--init_from={path} ({backbone.source}): {_one_line(e)}") from e
  logging.info(
    "init_from: %d backbone tensors from %s (%s)", len(backbone.state_dict), path, backbone.source
  )
  if backbone.ignored:
    shown = ", ".join(backbone.ignored[:20])
    more = f" and {len(backbone.ignored) - 20} more" if len(backbone.ignored) > 20 else ""
    logging.info(
      "init_from: ignored %d non-backbone keys: %s%s", len(backbone.ignored), shown, more
    )
  return params, loss_state, backbone


def load_backbone(path: str, config: Any, *, key: str = "auto") -> dict:
  """Backbone parameters for `sslx.models.build.build_backbone(config.model)` from a file.

  The entry point for code that builds the backbone itself (fine-tuning): a ViT from
  `config.model` (patch size, width, depth, positions...), its parameters a dict of float32
  numpy arrays shaped as that module's 'params' collection (blocks scanned or not, as
  config.model.scan_blocks says). A learned position grid of another size is resized.

  Raises:
    InitFromError: as `init_params`.
  """
  import jax
  import jax.numpy as jnp

  from sslx.models.build import build_backbone
  from sslx.models.vit import sincos_2d

  model = build_backbone(config.model, drop_path=False)
  size = model.pos_grid * model.patch_size
  like = jax.eval_shape(
    lambda r: model.init(r, jnp.zeros((1, size, size, 3), jnp.float32), train=False),
    jax.random.PRNGKey(0),
  )["params"]
  like = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), like)
  backbone = read_backbone(path, key)
  try:
    sd, note = torch_layout.fit_pos_embed(backbone.state_dict, like)
    if note:
      logging.info("init_from: %s", note)
    side = torch_layout.pos_grid_of(sd)
    pos = None
    if "pos_embed" not in like and side is not None:
      table = sincos_2d(side, side, model.embed_dim)
      pos = np.concatenate([np.zeros((1, model.embed_dim), np.float32), table])[None]
    return torch_layout.vit_from_torch(sd, like, pos_embed=pos)
  except torch_layout.LayoutError as e:
    raise InitFromError(f"--init_from={path} ({backbone.source}): {_one_line(e)}") from e
