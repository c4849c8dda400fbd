"""sslx backbones <-> the PyTorch state-dict layouts the rest of the field loads.

* ViTs (DINO/iBOT/MoCo v3/SERE backbones, and CAE's BEiT-style encoder) use the key names of
  timm's `VisionTransformer`, which are also those of facebookresearch/dino's
  `vision_transformer.py` and of its released checkpoints: `cls_token`, `pos_embed`,
  `patch_embed.proj.*`, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`,
  `norm.*`, plus `blocks.{i}.ls{1,2}.gamma` for layer scale (CAE). A state dict from here loads
  into `timm.models.vision_transformer.VisionTransformer(..., num_classes=0)` with
  `load_state_dict(strict=True)`, except for a CAE fine-tuning encoder's relative position bias
  (`blocks.{i}.attn.relative_position_bias_table`, BEiT's name), which that class lacks.
* ResNets (BYOL/SaGe) use torchvision's `resnet{18,34,50,101}` names (`conv1`, `bn1`,
  `layer{1-4}.{j}.{conv,bn}{1,2,3}`, `downsample.{0,1}`), running statistics included; the
  classifier `fc` is not part of a backbone.

Tensors are float32 numpy arrays in PyTorch's axis order: a Flax Dense kernel [in, out] becomes a
Linear weight [out, in], a conv kernel [kh, kw, in, out] becomes [out, in, kh, kw]. Conversions are
exact (transposes and copies only) and go both ways; loading is strict: a key that is missing,
unexpected or of the wrong shape is an error listing all of them (never a silent partial load).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

Params = Mapping[str, Any]
StateDict = dict[str, np.ndarray]


class LayoutError(ValueError):
  """A state dict or parameter tree does not fit the layout; the message lists every mismatch."""


# ---- leaf transforms (flax -> torch, torch -> flax) --------------------------------------
def _f32(x: Any) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def _linear_out(kernel: Any) -> np.ndarray:
  return _f32(np.asarray(kernel).T)


def _conv_out(kernel: Any) -> np.ndarray:
  return _f32(np.transpose(np.asarray(kernel), (3, 2, 0, 1)))


def _conv_in(weight: np.ndarray) -> np.ndarray:
  return _f32(np.transpose(weight, (2, 3, 1, 0)))


_OUT: dict[str, Callable[[Any], np.ndarray]] = {
  "copy": _f32,
  "linear": _linear_out,
  "conv": _conv_out,
}
_IN: dict[str, Callable[[np.ndarray], np.ndarray]] = {
  "copy": _f32,
  "linear": _linear_out,
  "conv": _conv_in,
}

# (torch key, flax path, transform) rows; a path is a tuple of nested dict keys.
Row = tuple[str, tuple[str, ...], str]


def _get(tree: Params, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _has(tree: Params, path: tuple[str, ...]) -> bool:
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      return False
    tree = tree[key]
  return True


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _paths(tree: Params, prefix: tuple[str, ...] = ()) -> Iterable[tuple[str, ...]]:
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _paths(value, prefix + (key,))
    else:
      yield prefix + (key,)


def _check_keys(
  state_dict: Mapping[str, Any], wants: Mapping[str, tuple[int, ...] | None], what: str
) -> None:
  """Raises LayoutError naming every missing, unexpected and wrongly shaped key.

  `wants` maps each expected key to its torch shape (None: any shape).
  """
  missing = sorted(set(wants) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(wants))
  bad_shape = [
    f"{key}: got {list(np.shape(state_dict[key]))}, want {list(want)}"
    for key, want in wants.items()
    if key in state_dict and want is not None and tuple(np.shape(state_dict[key])) != want
  ]
  if missing or unexpected or bad_shape:
    parts = [f"the state dict does not fit this {what}:"]
    if missing:
      parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
      parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if bad_shape:
      parts.append(f"wrong shapes ({len(bad_shape)}): {'; '.join(bad_shape)}")
    parts.append("check that the config (variant, patch size, depth, ...) matches the weights.")
    raise LayoutError("\n  ".join(parts))


def _torch_shape(kind: str, leaf: Any) -> tuple[int, ...]:
  shape = tuple(np.shape(leaf))
  if kind == "linear":
    return shape[::-1]
  if kind == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  return shape


# ---- ViT ------------------------------------------------------------------------------------
# BEiT's per-block relative position bias [(2h - 1)(2w - 1) + 3, heads] (sslx.models.beit), kept
# under BEiT's key `blocks.{i}.attn.relative_position_bias_table`; timm's VisionTransformer has
# no such parameter (its Beit model has, with BEiT's other names).
REL_POS_TABLE = "relative_position_bias_table"


def _vit_block_paths(params: Params) -> list[tuple[str, ...] | tuple[str, int]]:
  """Where each block lives: ('block_i',) or ('blocks', i) for blocks stacked by nn.scan."""
  out: list = []
  if "blocks" in params:  # sslx ViT with scan_blocks: blocks 0..n-1 stacked, the last apart
    n = int(
      np.shape(_get(params["blocks"]["block"], next(iter(_paths(params["blocks"]["block"])))))[0]
    )
    out += [("blocks", i) for i in range(n)]
  i = len(out)
  while f"block_{i}" in params:
    out.append((f"block_{i}",))
    i += 1
  if not out:
    raise LayoutError("no transformer blocks ('block_0' or 'blocks') in these ViT parameters.")
  return out


def _block_tree(params: Params, where: tuple) -> Params:
  if where[0] == "blocks":
    i = where[1]
    return _map_tree(params["blocks"]["block"], lambda a: np.asarray(a)[i])
  return params[where[0]]


def _map_tree(tree: Params, fn: Callable[[Any], Any]) -> dict:
  return {k: _map_tree(v, fn) if isinstance(v, Mapping) else fn(v) for k, v in tree.items()}


def _vit_block_rows(block: Params, i: int) -> list[Row]:
  """Rows of one block; the DINO block has fc1/fc2 directly, the BEiT block under 'mlp'."""
  t = f"blocks.{i}."
  mlp = ("mlp",) if "mlp" in block else ()
  rows: list[Row] = [
    (t + "norm1.weight", ("norm1", "scale"), "copy"),
    (t + "norm1.bias", ("norm1", "bias"), "copy"),
    (t + "attn.qkv.weight", ("attn", "qkv", "kernel"), "linear"),
    (t + "attn.proj.weight", ("attn", "proj", "kernel"), "linear"),
    (t + "attn.proj.bias", ("attn", "proj", "bias"), "copy"),
    (t + "norm2.weight", ("norm2", "scale"), "copy"),
    (t + "norm2.bias", ("norm2", "bias"), "copy"),
    (t + "mlp.fc1.weight", mlp + ("fc1", "kernel"), "linear"),
    (t + "mlp.fc1.bias", mlp + ("fc1", "bias"), "copy"),
    (t + "mlp.fc2.weight", mlp + ("fc2", "kernel"), "linear"),
    (t + "mlp.fc2.bias", mlp + ("fc2", "bias"), "copy"),
  ]
  if _has(block, ("attn", "qkv", "bias")):
    rows.append((t + "attn.qkv.bias", ("attn", "qkv", "bias"), "copy"))
  if "gamma_1" in block:
    rows += [(t + "ls1.gamma", ("gamma_1",), "copy"), (t + "ls2.gamma", ("gamma_2",), "copy")]
  if _has(block, ("attn", REL_POS_TABLE)):  # BEiT's name (CAE fine-tuning)
    rows.append((t + "attn." + REL_POS_TABLE, ("attn", REL_POS_TABLE), "copy"))
  return rows


_VIT_TOP: list[Row] = [
  ("cls_token", ("cls_token",), "copy"),
  ("patch_embed.proj.weight", ("patch_embed", "kernel"), "conv"),
  ("patch_embed.proj.bias", ("patch_embed", "bias"), "copy"),
  ("norm.weight", ("norm", "scale"), "copy"),
  ("norm.bias", ("norm", "bias"), "copy"),
]

# Parameters a backbone may carry that have no place in timm's ViT (iBOT's mask token).
VIT_DROPPED = ("mask_token",)


def _beit_qkv_bias(block: Params) -> np.ndarray | None:
  """BEiT/CAE attention: learned q and v biases, k bias fixed at zero -> timm's fused qkv bias."""
  attn = block["attn"]
  if "q_bias" not in attn:
    return None
  q = _f32(attn["q_bias"])
  return np.concatenate([q, np.zeros_like(q), _f32(attn["v_bias"])])


def vit_to_torch(params: Params, *, pos_embed: np.ndarray | None = None) -> StateDict:
  """A ViT's parameters as a timm / DINO `VisionTransformer` state dict.

  Args:
    params: the backbone's Flax parameters (sslx.models.vit.ViT, blocks scanned or not, or
      sslx.models.cae.CAEEncoder).
    pos_embed: float [1, 1 + N, D] positions for backbones with fixed (sin-cos) positions, which
      have no `pos_embed` parameter; timm keeps them as a parameter. Ignored when `params` has one.

  Returns:
    {torch key: float32 numpy array}, in block order. Parameters listed in `VIT_DROPPED` are left
    out; anything else without a timm counterpart raises LayoutError.
  """
  rows = list(_VIT_TOP)
  out: StateDict = {}
  if "pos_embed" in params:
    rows.append(("pos_embed", ("pos_embed",), "copy"))
  elif pos_embed is None:
    raise LayoutError("this ViT has fixed positions (no 'pos_embed' parameter): pass pos_embed=.")
  else:
    out["pos_embed"] = _f32(pos_embed)
  for key, path, kind in rows:
    out[key] = _OUT[kind](_get(params, path))
  used: set[str] = {path[0] for _, path, _ in rows} | set(VIT_DROPPED) | {"blocks"}
  for i, where in enumerate(_vit_block_paths(params)):
    block = _block_tree(params, where)
    block_rows = _vit_block_rows(block, i)
    for key, path, kind in block_rows:
      out[key] = _OUT[kind](_get(block, path))
    bias = _beit_qkv_bias(block)
    if bias is not None:
      out[f"blocks.{i}.attn.qkv.bias"] = bias
    mapped = {path for _, path, _ in block_rows} | {("attn", "q_bias"), ("attn", "v_bias")}
    unmapped = [p for p in _paths(block) if p not in mapped]
    if unmapped:
      raise LayoutError(
        f"block {i} has parameters with no timm counterpart: {['/'.join(p) for p in unmapped]}"
      )
    used.add(where[0])
  extra = sorted(set(params) - used)
  if extra:
    raise LayoutError(f"ViT parameters with no timm counterpart: {extra}")
  return out


def vit_from_torch(
  state_dict: Mapping[str, Any], like: Params, *, pos_embed: np.ndarray | None = None
) -> dict:
  """The inverse of `vit_to_torch`: fills a ViT parameter tree shaped like `like`.

  Args:
    state_dict: timm / DINO ViT keys -> arrays (numpy or anything np.asarray takes).
    like: the target backbone's parameters (e.g. a fresh init); fixes the layout (scanned
      blocks, BEiT attention, layer scale) and the shapes. Entries of `VIT_DROPPED` are kept
      from `like`.
    pos_embed: for a backbone with fixed positions (no `pos_embed` parameter), the [1, 1 + N, D]
      table it computes; the state dict's `pos_embed` must equal it (to 1e-5), since sslx cannot
      load other positions into such a backbone.

  Returns:
    A new nested dict of float32 numpy arrays with `like`'s structure.

  Raises:
    LayoutError: listing every missing, unexpected or wrongly shaped key; also for positions that
      a fixed-position backbone cannot hold and for a BEiT encoder's non-zero k bias (it has none).
  """
  sd = dict(state_dict)
  rows = list(_VIT_TOP)
  if "pos_embed" in like:
    rows.append(("pos_embed", ("pos_embed",), "copy"))
  elif "pos_embed" in sd:
    given = np.asarray(sd.pop("pos_embed"), np.float32)
    if (
      pos_embed is None
      or given.shape != np.shape(pos_embed)
      or not np.allclose(given, pos_embed, atol=1e-5)
    ):
      raise LayoutError(
        "this ViT uses fixed sin-cos positions, but the state dict's pos_embed "
        "differs from them (or no table was given to compare): these weights "
        "need a config with learned positions (config.model.pos_embed='learned')."
      )
  wants = {key: _torch_shape(kind, _get(like, path)) for key, path, kind in rows}
  blocks = []
  for i, where in enumerate(_vit_block_paths(like)):
    block = _block_tree(like, where)
    block_rows = _vit_block_rows(block, i)
    wants.update({key: _torch_shape(kind, _get(block, path)) for key, path, kind in block_rows})
    beit = _beit_qkv_bias(block)
    if beit is not None:
      wants[f"blocks.{i}.attn.qkv.bias"] = beit.shape
    blocks.append((where, block_rows, beit is not None))
  _check_keys(sd, wants, "ViT")

  out: dict = {k: _f32(like[k]) for k in VIT_DROPPED if k in like}
  for key, path, kind in rows:
    _set(out, path, _IN[kind](np.asarray(sd[key])))
  stacked: list[dict] = []
  for i, (where, block_rows, fused_bias) in enumerate(blocks):
    new: dict = {}
    for key, path, kind in block_rows:
      _set(new, path, _IN[kind](np.asarray(sd[key])))
    if fused_bias:  # split timm's fused bias back into q and v
      bias = _f32(sd[f"blocks.{i}.attn.qkv.bias"])
      d = bias.shape[0] // 3
      if np.any(bias[d : 2 * d] != 0):
        raise LayoutError(
          f"blocks.{i}.attn.qkv.bias has a non-zero k part; this BEiT-style "
          "encoder has no k bias and cannot hold it."
        )
      new["attn"]["q_bias"], new["attn"]["v_bias"] = bias[:d], bias[2 * d :]
    if where[0] == "blocks":
      stacked.append(new)
    else:
      out[where[0]] = new
  if stacked:
    out["blocks"] = {"block": _stack(stacked)}
  return out


def _stack(trees: list[dict]) -> dict:
  first = trees[0]
  return {
    k: _stack([t[k] for t in trees]) if isinstance(v, Mapping) else np.stack([t[k] for t in trees])
    for k, v in first.items()
  }


# ---- ResNet (torchvision) ---------------------------------------------------------------------
def _bn_rows(
  torch_prefix: str, flax_name: tuple[str, ...]
) -> list[tuple[str, str, tuple[str, ...]]]:
  """(torch key, collection, path) of one BatchNorm."""
  return [
    (torch_prefix + ".weight", "params", flax_name + ("scale",)),
    (torch_prefix + ".bias", "params", flax_name + ("bias",)),
    (torch_prefix + ".running_mean", "batch_stats", flax_name + ("mean",)),
    (torch_prefix + ".running_var", "batch_stats", flax_name + ("var",)),
  ]


def _resnet_rows(params: Params) -> list[tuple[str, str, tuple[str, ...]]]:
  rows = [("conv1.weight", "params", ("stem_conv", "kernel"))] + _bn_rows("bn1", ("stem_bn",))
  for stage in range(4):
    j = 0
    while f"c{stage + 2}_block{j}" in params:
      name = f"c{stage + 2}_block{j}"
      block = params[name]
      t = f"layer{stage + 1}.{j}."
      for k in (1, 2, 3):
        if f"conv{k}" in block:
          rows.append((t + f"conv{k}.weight", "params", (name, f"conv{k}", "kernel")))
          rows += _bn_rows(t + f"bn{k}", (name, f"bn{k}"))
      if "down_conv" in block:
        rows.append((t + "downsample.0.weight", "params", (name, "down_conv", "kernel")))
        rows += _bn_rows(t + "downsample.1", (name, "down_bn"))
      j += 1
  return rows


def resnet_to_torch(params: Params, batch_stats: Params) -> StateDict:
  """A ResNet's parameters and BatchNorm statistics as a torchvision state dict (no `fc`).

  Every BatchNorm also gets `num_batches_tracked` = 0 (torchvision's strict load expects the key;
  it matters only for BN with momentum=None, which torchvision's ResNets do not use).

  Args:
    params: sslx.models.resnet.ResNet parameters.
    batch_stats: its 'batch_stats' collection (running mean and var).
  """
  trees = {"params": params, "batch_stats": batch_stats}
  out: StateDict = {}
  for key, collection, path in _resnet_rows(params):
    leaf = _get(trees[collection], path)
    out[key] = _conv_out(leaf) if key.endswith(".weight") and np.ndim(leaf) == 4 else _f32(leaf)
    if key.endswith(".running_var"):
      out[key[: -len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
  return out


def resnet_from_torch(state_dict: Mapping[str, Any], like_params: Params) -> tuple[dict, dict]:
  """The inverse of `resnet_to_torch`: (params, batch_stats) shaped like `like_params`.

  `num_batches_tracked` entries are accepted and dropped; a state dict with a classifier (`fc.*`)
  must have it removed first. Raises LayoutError listing every mismatch.
  """
  rows = _resnet_rows(like_params)
  sd = {k: v for k, v in state_dict.items() if not k.endswith(".num_batches_tracked")}
  _check_keys(sd, {k: None for k, _, _ in rows}, "ResNet")
  out: dict[str, dict] = {"params": {}, "batch_stats": {}}
  bad = []
  for key, collection, path in rows:
    value = np.asarray(sd[key])
    value = _conv_in(value) if value.ndim == 4 else _f32(value)
    if collection == "params" and value.shape != np.shape(_get(like_params, path)):
      bad.append(f"{key}: got {list(np.shape(sd[key]))}")
    _set(out[collection], path, value)
  if bad:
    raise LayoutError(
      "wrong shapes for this ResNet: "
      + "; ".join(bad)
      + "\n  check config.model.depth, width and stem against the weights."
    )
  return out["params"], out["batch_stats"]


def pos_grid_of(state_dict: Mapping[str, Any]) -> int | None:
  """The side of the square patch grid of a timm state dict's `pos_embed` [1, 1 + n*n, D]."""
  if "pos_embed" not in state_dict:
    return None
  tokens = int(np.shape(state_dict["pos_embed"])[1]) - 1
  side = int(round(tokens**0.5))
  if side * side != tokens:
    raise LayoutError(f"pos_embed has {tokens} patch positions, not a square grid.")
  return side


def fit_pos_embed(state_dict: Mapping[str, Any], like: Params) -> tuple[StateDict, str | None]:
  """Resizes a learned `pos_embed` to the grid of `like`'s, as DINO's ViT does at run time.

  Weights trained at another resolution (e.g. 224 px / 16 = 14 patches per side) meet a config
  with another `pos_grid`; the patch positions are resampled with DINO's bicubic
  (sslx.models.vit.interpolate_pos_grid) and the [CLS] position is kept.

  Returns:
    (the state dict, resized if needed; a note for the log, or None when nothing changed).
    A `like` without a `pos_embed` parameter (fixed positions) leaves the state dict alone.
  """
  sd = dict(state_dict)
  if "pos_embed" not in like or "pos_embed" not in sd:
    return sd, None
  want = int(np.shape(like["pos_embed"])[1]) - 1
  side_want = int(round(want**0.5))
  side = pos_grid_of(sd)
  table = np.asarray(sd["pos_embed"], np.float32)
  if side is None or side == side_want or table.shape[-1] != np.shape(like["pos_embed"])[-1]:
    return sd, None  # same grid, or a width mismatch that the strict check reports
  import jax.numpy as jnp

  from sslx.models import vit  # here: vit is heavy and only this path needs it

  d = table.shape[-1]
  grid = vit.interpolate_pos_grid(
    jnp.asarray(table[0, 1:].reshape(side, side, d)), (side_want, side_want)
  )
  sd["pos_embed"] = np.concatenate(
    [table[:, :1], np.asarray(grid, np.float32).reshape(1, side_want * side_want, d)], axis=1
  )
  return sd, f"pos_embed resized from a {side}x{side} to a {side_want}x{side_want} patch grid"


# ---- DINO head (facebookresearch/dino vision_transformer.py DINOHead) ----------------------
def dino_head_from_torch(state_dict: Mapping[str, Any], like: Params) -> dict:
  """An official DINOHead state dict (keys `mlp.{i}.*`, `last_layer.weight_g/_v`) -> the params
  of sslx.models.heads.DINOHead shaped like `like`.

  The official MLP is an nn.Sequential of Linear / GELU layers, so its Linears sit at indices
  0, 2, 4, ... (`mlp.weight` for a one-layer MLP); they map to `mlp_0`, `mlp_1`, ... in order.
  The weight-normalised last layer's direction `weight_v` [out, in] becomes `kernel` [in, out];
  its magnitude `weight_g` becomes `g`, or, for a head with `norm_last_layer` (no `g`), must be 1.

  Raises:
    LayoutError: listing every missing, unexpected or mis-shaped key; also for a head with
      BatchNorm (not imported) and for a learned magnitude that the config fixes at 1.
  """
  if any(k.startswith("bn_") for k in like):
    raise LayoutError("heads with BatchNorm (config.head.use_bn) are not imported; drop it")
  layers = sorted((k for k in like if k.startswith("mlp_")), key=lambda k: int(k[4:]))
  if len(layers) == 1:
    names = {"mlp": layers[0]}
  else:
    names = {f"mlp.{2 * i}": name for i, name in enumerate(layers)}
  wants: dict[str, tuple[int, ...] | None] = {}
  for torch_name, name in names.items():
    wants[f"{torch_name}.weight"] = _torch_shape("linear", like[name]["kernel"])
    wants[f"{torch_name}.bias"] = tuple(np.shape(like[name]["bias"]))
  v_shape = _torch_shape("linear", like["last_layer"]["kernel"])
  wants["last_layer.weight_v"] = v_shape
  wants["last_layer.weight_g"] = (v_shape[0], 1)
  _check_keys(state_dict, wants, "DINO head")
  out: dict = {}
  for torch_name, name in names.items():
    out[name] = {
      "kernel": _linear_out(state_dict[f"{torch_name}.weight"]),
      "bias": _f32(state_dict[f"{torch_name}.bias"]),
    }
  g = _f32(state_dict["last_layer.weight_g"])[:, 0]
  out["last_layer"] = {"kernel": _linear_out(state_dict["last_layer.weight_v"])}
  if "g" in like["last_layer"]:
    out["last_layer"]["g"] = g
  elif not np.allclose(g, 1.0):
    raise LayoutError(
      "the head's last layer has a learned magnitude (weight_g != 1): set "
      "config.head.norm_last_layer=False to load it"
    )
  return out
