"""The DALL-E d-VAE encoder (openai/DALL-E `dall_e/encoder.py`, shipped in Atten4Vis/CAE) in Flax,
and a loader for its weights from a user-supplied file.

CAE's token targets are argmax ids of this encoder on a 112-px view (8x downsampling -> 14x14
for ViT-B/16), with pixels mapped x -> 0.8 x + 0.1 (`map_pixels`; docs/fidelity.md, CAE).

Layer structure (group_count 4, defaults n_hid 256, n_blk_per_group 2, vocab 8192):
  input  conv 7x7 (C -> n_hid)
  group_g, g = 1..4: n_blk_per_group EncoderBlocks to width n_hid * (1, 2, 4, 8)[g-1],
         then a 2x2 max-pool after groups 1-3
  output ReLU, conv 1x1 (8 n_hid -> vocab)
EncoderBlock(n_in, n_out): id_path (1x1 conv if n_in != n_out, else identity) + (1 / n_layers^2)
  * res_path(relu, conv3x3 -> n_out/4, relu, conv3x3, relu, conv3x3, relu, conv1x1 -> n_out),
  n_layers = group_count * n_blk_per_group. Convs pad (k - 1) // 2 and keep torch's OIHW layout.

Weights file: an .npz (or a .pkl of a dict) of the encoder's torch `state_dict()` arrays under
their torch names ('blocks.input.w', 'blocks.group_1.block_1.res_path.conv_1.b', ...). The
official `encoder.pkl` is a pickled torch module (it needs torch to open), so convert it once:

  import numpy as np, torch
  enc = torch.load("encoder.pkl", map_location="cpu")
  np.savez("dalle_encoder.npz", **{k: v.float().numpy() for k, v in enc.state_dict().items()})
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sslx import errors

GROUP_COUNT = 4
_WIDTHS = (1, 2, 4, 8)


class TokenizerWeightsError(errors.UserError):
  """The tokenizer weights file is missing, unreadable or not a DALL-E encoder state dict."""


class _Conv(nn.Module):
  """dall_e.utils.Conv2d: weight 'w' [out, in, k, k] (OIHW), bias 'b' [out], 'same' padding."""

  n_out: int
  kw: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = x.shape[-1]
    w = self.param(
      "w",
      nn.initializers.normal(1.0 / np.sqrt(n_in * self.kw**2)),
      (self.n_out, n_in, self.kw, self.kw),
      jnp.float32,
    )
    b = self.param("b", nn.initializers.zeros, (self.n_out,), jnp.float32)
    pad = (self.kw - 1) // 2
    y = jax.lax.conv_general_dilated(
      x, w, (1, 1), [(pad, pad), (pad, pad)], dimension_numbers=("NHWC", "OIHW", "NHWC")
    )
    return y + b


class _EncoderBlock(nn.Module):
  n_out: int
  n_layers: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    hid = self.n_out // 4
    skip = x if x.shape[-1] == self.n_out else _Conv(self.n_out, 1, name="id_path")(x)
    convs = ((hid, 3), (hid, 3), (hid, 3), (self.n_out, 1))
    return skip + _ResPath(convs, name="res_path")(x) / self.n_layers**2


class _ResPath(nn.Module):
  convs: tuple

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    for i, (n, k) in enumerate(self.convs, start=1):
      h = _Conv(n, k, name=f"conv_{i}")(jax.nn.relu(h))
    return h


class DalleEncoder(nn.Module):
  """DALL-E d-VAE encoder: images [B, H, W, C] in [0, 1] -> logits [B, H/8, W/8, vocab].

  Apply `map_pixels` first (the caller does, as the official code). Parameter tree mirrors the
  torch names: 'input', 'group_g/block_i/{id_path,res_path/conv_j}', 'output/conv'.
  """

  n_hid: int = 256
  n_blk_per_group: int = 2
  vocab_size: int = 8192

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n_layers = GROUP_COUNT * self.n_blk_per_group
    x = _Conv(self.n_hid, 7, name="input")(x.astype(jnp.float32))
    for g, width in enumerate(_WIDTHS, start=1):
      x = _Group(
        width * self.n_hid, self.n_blk_per_group, n_layers, pool=g < GROUP_COUNT, name=f"group_{g}"
      )(x)
    return _Output(self.vocab_size, name="output")(x)


class _Group(nn.Module):
  n_out: int
  n_blk: int
  n_layers: int
  pool: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(1, self.n_blk + 1):
      x = _EncoderBlock(self.n_out, self.n_layers, name=f"block_{i}")(x)
    return nn.max_pool(x, (2, 2), strides=(2, 2)) if self.pool else x


class _Output(nn.Module):
  vocab_size: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _Conv(self.vocab_size, 1, name="conv")(jax.nn.relu(x))


def map_pixels(x: jax.Array, eps: float = 0.1) -> jax.Array:
  """DALL-E's input map for [0, 1] pixels: (1 - 2 eps) x + eps."""
  return (1.0 - 2.0 * eps) * x + eps


def expected_shapes(
  n_hid: int, n_blk_per_group: int, input_channels: int = 3, vocab_size: int = 8192
) -> dict[str, tuple[int, ...]]:
  """torch state_dict name -> shape of a DALL-E encoder of this size."""
  shapes: dict[str, tuple[int, ...]] = {}

  def conv(name: str, n_in: int, n_out: int, k: int) -> None:
    shapes[f"{name}.w"] = (n_out, n_in, k, k)
    shapes[f"{name}.b"] = (n_out,)

  conv("blocks.input", input_channels, n_hid, 7)
  n_in = n_hid
  for g, width in enumerate(_WIDTHS, start=1):
    n_out = width * n_hid
    for i in range(1, n_blk_per_group + 1):
      name = f"blocks.group_{g}.block_{i}"
      if n_in != n_out:
        conv(f"{name}.id_path", n_in, n_out, 1)
      hid = n_out // 4
      for j, (a, c, k) in enumerate(
        ((n_in, hid, 3), (hid, hid, 3), (hid, hid, 3), (hid, n_out, 1)), 1
      ):
        conv(f"{name}.res_path.conv_{j}", a, c, k)
      n_in = n_out
  conv("blocks.output.conv", 8 * n_hid, vocab_size, 1)
  return shapes


def _read(path: str) -> dict[str, np.ndarray]:
  if not path or not os.path.exists(path):
    raise TokenizerWeightsError(
      f"tokenizer weights {path!r} not found; set config.cae.tokenizer_path to an .npz of the "
      "DALL-E encoder state dict (see sslx/models/dalle.py for the one-off conversion), or use "
      "config.cae.target='pixels'."
    )
  try:
    if path.endswith(".npz"):
      with np.load(path, allow_pickle=False) as f:
        return {k: np.asarray(f[k]) for k in f.files}
    with open(path, "rb") as f:
      obj = pickle.load(f)
  except Exception as e:  # noqa: BLE001 - any unreadable file gets the same actionable message
    raise TokenizerWeightsError(
      f"cannot read tokenizer weights {path!r} ({type(e).__name__}: {e}); expected an .npz (or a "
      "pickled dict) of numpy arrays. The official encoder.pkl is a torch module: convert it as "
      "sslx/models/dalle.py describes."
    ) from e
  if not isinstance(obj, dict):
    raise TokenizerWeightsError(
      f"{path!r} holds a {type(obj).__name__}, not a dict of arrays; "
      "convert the torch module's state_dict() (see sslx/models/dalle.py)."
    )
  return {k: np.asarray(v) for k, v in obj.items()}


def load_dalle_encoder(path: str) -> tuple[DalleEncoder, dict[str, Any]]:
  """Reads and validates DALL-E encoder weights.

  Returns:
    (module sized from the file, Flax params {'params': ...} usable with module.apply).
  Raises:
    TokenizerWeightsError: missing file, unreadable, missing/unexpected keys or wrong shapes.
  """
  arrays = _read(path)
  for key in ("blocks.input.w", "blocks.output.conv.w"):
    if key not in arrays:
      raise TokenizerWeightsError(
        f"{path!r} has no {key!r}; it is not a DALL-E encoder state dict "
        f"(keys start with {sorted(arrays)[:3]})."
      )
  n_hid, in_ch = arrays["blocks.input.w"].shape[:2]
  vocab = arrays["blocks.output.conv.w"].shape[0]
  blocks = {
    int(m.group(1)) for k in arrays if (m := re.match(r"blocks\.group_1\.block_(\d+)\.", k))
  }
  n_blk = max(blocks) if blocks else 0
  want = expected_shapes(int(n_hid), n_blk, int(in_ch), int(vocab))
  problems = [f"missing {k}" for k in want if k not in arrays]
  problems += [f"unexpected {k}" for k in arrays if k not in want]
  problems += [
    f"{k}: shape {tuple(arrays[k].shape)}, expected {s}"
    for k, s in want.items()
    if k in arrays and tuple(arrays[k].shape) != s
  ]
  if n_blk < 1 or problems:
    raise TokenizerWeightsError(
      f"{path!r} is not a DALL-E encoder (n_hid={n_hid}, {n_blk} blocks per group, vocab "
      f"{vocab} inferred): "
      + "; ".join(problems[:5] or ["no group_1 blocks"])
      + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
    )
  params: dict[str, Any] = {}
  for key, value in arrays.items():
    node = params
    parts = key.split(".")[1:]  # drop 'blocks'
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = jnp.asarray(value, jnp.float32)
  module = DalleEncoder(n_hid=int(n_hid), n_blk_per_group=n_blk, vocab_size=int(vocab))
  return module, {"params": params}
