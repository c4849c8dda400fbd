"""Last-layer [CLS] attention maps of a ViT, as DINO's `visualize_attention.py` shows them.

Pure numpy on the host: the attention comes from `ViT(..., return_attention=True)`; these
functions turn it into per-head maps over the patch grid, DINO's "keep the top patches that
hold a fraction of the mass" masks, a focus statistic, and one picture (a row per image: the
image, each head's map, the head-mean mask over the image).
"""

from __future__ import annotations

import numpy as np


def cls_attention(attention: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
  """The [CLS] query's attention over the patches, per head, laid out on the patch grid.

  Args:
    attention: [B, heads, 1 + N, 1 + N] softmax rows of the last block (token 0 is [CLS]).
    grid: (rows, cols) of the patch grid, rows * cols = N (patches are row-major, as the ViT
      flattens them).

  Returns:
    float32 [B, heads, rows, cols]; each head's map sums to 1 - (its [CLS]-to-[CLS] weight).
  """
  attention = np.asarray(attention, np.float32)
  rows, cols = grid
  if (
    attention.ndim != 4
    or attention.shape[2] != attention.shape[3]
    or attention.shape[2] != 1 + rows * cols
  ):
    raise ValueError(
      f"attention must be [B, heads, 1 + N, 1 + N] with N = {rows}x{cols}, got {attention.shape}"
    )
  return attention[:, :, 0, 1:].reshape(attention.shape[:2] + (rows, cols))


def mass_mask(maps: np.ndarray, keep: float = 0.6) -> np.ndarray:
  """DINO's thresholded attention: per map, the highest patches that together hold ``keep``.

  Patches are sorted by weight; the lowest ones are dropped while their share of the map's total
  stays at or below 1 - keep, so the kept set is the smallest top set with share >= keep (DINO's
  `--threshold`, 0.6 in its figures).

  Args:
    maps: [..., rows, cols] non-negative weights.
    keep: share of the mass to keep, in (0, 1].

  Returns:
    bool [..., rows, cols], True on kept patches.
  """
  if not 0.0 < keep <= 1.0:
    raise ValueError(f"keep must be in (0, 1], got {keep}")
  maps = np.asarray(maps, np.float64)
  flat = maps.reshape(maps.shape[:-2] + (-1,))
  order = np.argsort(flat, axis=-1)
  ascending = np.take_along_axis(flat, order, axis=-1)
  share = np.cumsum(ascending, axis=-1) / np.maximum(ascending.sum(-1, keepdims=True), 1e-30)
  kept_sorted = share > 1.0 - keep
  kept = np.empty_like(kept_sorted)
  np.put_along_axis(kept, order, kept_sorted, axis=-1)
  return kept.reshape(maps.shape)


def kept_fraction(maps: np.ndarray, keep: float = 0.6) -> np.ndarray:
  """Share of the patches in each map's ``mass_mask``: how spread the attention is.

  A uniform map needs about ``keep`` of the patches; a head that looks at one object needs few.

  Returns:
    float [...] (the map axes reduced).
  """
  return mass_mask(maps, keep).mean(axis=(-2, -1))


def _hot(t: np.ndarray) -> np.ndarray:
  """[0, 1] -> uint8 RGB on the black-red-yellow-white 'hot' ramp."""
  rgb = np.stack([3 * t, 3 * t - 1, 3 * t - 2], axis=-1)
  return (255 * np.clip(rgb, 0.0, 1.0)).round().astype(np.uint8)


def _upsample(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Nearest-neighbour [rows, cols, ...] -> [H, W, ...] (each patch becomes its pixel block)."""
  rows = np.arange(size[0]) * x.shape[0] // size[0]
  cols = np.arange(size[1]) * x.shape[1] // size[1]
  return x[rows][:, cols]


def attention_figure(
  images: np.ndarray, maps: np.ndarray, keep: float = 0.6, scale: int = 1, gap: int = 2
) -> np.ndarray:
  """One picture: a row per image with the image, each head's map, and the head-mean mask.

  Each head's map is stretched to its own [min, max] and drawn on the 'hot' ramp, every patch a
  block of pixels. The last column is the image with the patches outside the head-mean map's
  ``mass_mask`` dimmed to a quarter.

  Args:
    images: uint8 [B, H, W, 3] (the images the network saw, before normalisation).
    maps: [B, heads, rows, cols] from `cls_attention`.
    keep: mass share of the mask column.
    scale: integer magnification of every panel (small images such as 28 px need 4 or more).
    gap: white pixels between panels.

  Returns:
    uint8 [B * (H * scale + gap) - gap, (heads + 2) * (W * scale + gap) - gap, 3].
  """
  images = np.asarray(images)
  maps = np.asarray(maps, np.float32)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 [B, H, W, 3], got {images.dtype} {images.shape}")
  if maps.ndim != 4 or maps.shape[0] != images.shape[0]:
    raise ValueError(
      f"maps must be [B, heads, rows, cols] with B = {images.shape[0]}, got {maps.shape}"
    )
  b, h, w, _ = images.shape
  heads = maps.shape[1]
  ph, pw = h * scale, w * scale
  canvas = np.full((b * (ph + gap) - gap, (heads + 2) * (pw + gap) - gap, 3), 255, np.uint8)
  lo = maps.min(axis=(-2, -1), keepdims=True)
  hi = maps.max(axis=(-2, -1), keepdims=True)
  stretched = (maps - lo) / np.maximum(hi - lo, 1e-12)
  mean_mask = mass_mask(maps.mean(axis=1), keep)
  for i in range(b):
    big = _upsample(images[i], (ph, pw))
    dim = np.where(_upsample(mean_mask[i], (ph, pw))[..., None], big, big // 4).astype(np.uint8)
    panels = [big] + [_hot(_upsample(stretched[i, j], (ph, pw))) for j in range(heads)] + [dim]
    y = i * (ph + gap)
    for k, panel in enumerate(panels):
      x = k * (pw + gap)
      canvas[y : y + ph, x : x + pw] = panel
  return canvas
