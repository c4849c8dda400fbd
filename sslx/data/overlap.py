"""Overlap of two crops in each crop's own normalised coordinates (SERE region alignment; numpy, host side).

Conventions (shared with ``sslx.losses.sere.grid_points``):
  * A box is (x0, y0, w, h) in ORIGINAL image pixels (x0 = left column, y0 = top row), as recorded by the
    crop sampler; a flip flag says the resized crop was mirrored horizontally afterwards.
  * A crop's normalised coordinates are (x, y) in [0, 1]^2 over its (displayed, i.e. flipped if flagged)
    square image; they map linearly onto its token grid because resizing is non-uniform.
  * An overlap rect is (x_start, y_start, x_end, y_end) in those coordinates: the S x S sampling grid is
    point (r, s) = (x_start + s (x_end - x_start) / (S - 1), y_start + r (y_end - y_start) / (S - 1)),
    endpoints included. A flipped crop has x <- 1 - x applied, so x_start > x_end there.
This is the SERE ``get_grid`` (MCG-NKU/SERE transforms_overlap.py) split into an S-independent rect (here)
and the grid itself (in the loss). The pixel-space overlap and the crop-relative offsets are computed in
float64 like the reference's Python floats and rounded to float32 once at the end, so grids agree with
the reference to a few float32 ulps (not bit for bit: the reference builds x = ox + s*ow/(S-1), then flips,
an order an endpoint encoding cannot replay).
Touching crops (zero-width or zero-height overlap) count as NOT overlapping (strict test, as the reference).
"""

from __future__ import annotations

import numpy as np


def _check_boxes(boxes: np.ndarray, flips: np.ndarray, name: str) -> None:
  if boxes.shape[-1:] != (4,) or boxes.shape[:-1] != flips.shape:
    raise ValueError(
      f'{name}_boxes must be [..., 4] (x0, y0, w, h) and {name}_flips the matching [...], '
      f'got {boxes.shape} and {flips.shape}; pass the batch keys {name}_boxes / '
      f'{name}_flips unchanged.'
    )
  if not np.all(np.isfinite(boxes)) or np.any(boxes[..., 2:] <= 0):
    raise ValueError(
      f'{name}_boxes need finite values and w, h > 0 (x0, y0, w, h in original pixels); '
      'got a degenerate box. Check the crop sampler output.'
    )


def _relative_rects(overlap: np.ndarray, box: np.ndarray, flip: np.ndarray) -> np.ndarray:
  """Pixel overlap (X0, Y0, X1, Y1) float64 -> rect in the crop's coords, float64 [..., 4] (flip applied)."""
  x0, y0, w, h = np.moveaxis(box, -1, 0)
  ox = (overlap[..., 0] - x0) / w
  oy = (overlap[..., 1] - y0) / h
  ox_end = ox + (overlap[..., 2] - overlap[..., 0]) / w
  oy_end = oy + (overlap[..., 3] - overlap[..., 1]) / h
  # Mirroring is x <- 1 - x inside the crop, applied after the overlap is found (pixel boxes are unflipped).
  x_start = np.where(flip, 1.0 - ox, ox)
  x_end = np.where(flip, 1.0 - ox_end, ox_end)
  return np.stack([x_start, oy, x_end, oy_end], axis=-1)


def _pairwise(
  box_a: np.ndarray, flip_a: np.ndarray, box_b: np.ndarray, flip_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Broadcasting core: boxes float64 [..., 4], flips bool [...] -> rect_a, rect_b float32 [..., 4], valid."""
  a_end = box_a[..., :2] + box_a[..., 2:]
  b_end = box_b[..., :2] + box_b[..., 2:]
  lo = np.maximum(box_a[..., :2], box_b[..., :2])
  hi = np.minimum(a_end, b_end)
  valid = np.all(lo < hi, axis=-1)
  overlap = np.concatenate([lo, hi], axis=-1)
  rect_a = _relative_rects(overlap, box_a, flip_a)
  rect_b = _relative_rects(overlap, box_b, flip_b)
  keep = valid[..., None]
  return (
    np.where(keep, rect_a, 0.0).astype(np.float32),
    np.where(keep, rect_b, 0.0).astype(np.float32),
    valid,
  )


def overlap_rects(box_q, flip_q, box_k, flip_k) -> tuple[np.ndarray, np.ndarray, bool]:
  """Overlap of crops q and k, in each crop's own normalised coordinates.

  Args:
    box_q, box_k: (x0, y0, w, h) in original-image pixels (any float/int sequence of 4).
    flip_q, flip_k: whether that crop was mirrored horizontally.

  Returns:
    (rect_q float32 [4], rect_k float32 [4], valid bool): rects are (x_start, y_start, x_end, y_end) as in the
    module docstring; when the crops do not overlap (touching counts as not overlapping) both rects are
    zeros and valid is False.
  """
  bq = np.asarray(box_q, np.float64)
  bk = np.asarray(box_k, np.float64)
  fq = np.asarray(flip_q, bool)
  fk = np.asarray(flip_k, bool)
  _check_boxes(bq, fq, 'q')
  _check_boxes(bk, fk, 'k')
  if bq.shape != (4,) or bk.shape != (4,):
    raise ValueError(
      f'overlap_rects takes one box per crop, got {bq.shape} and {bk.shape}; use '
      'batch_overlaps for arrays of crops.'
    )
  rect_q, rect_k, valid = _pairwise(bq, fq, bk, fk)
  return rect_q, rect_k, bool(valid)


def batch_overlaps(
  global_boxes: np.ndarray,
  global_flips: np.ndarray,
  local_boxes: np.ndarray | None = None,
  local_flips: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
  """All global-global and local-global overlap rects of a batch (or of one record).

  Leading dims ``...`` are free: [B] for a batch, [] for a single record.

  Args:
    global_boxes: float [..., Ng, 4] (x0, y0, w, h) in original pixels.
    global_flips: bool [..., Ng].
    local_boxes: float [..., Nl, 4] or None (no local crops; Nl = 0 outputs).
    local_flips: bool [..., Nl] or None.

  Returns:
    dict of numpy arrays:
      'gg_rects' float32 [..., Ng, Ng, 2, 4]: ordered pair (q, k); [..., 0, :] is the overlap in crop q's
        coords, [..., 1, :] in crop k's. The diagonal is the whole crop ([0, 0, 1, 1], or [1, 0, 0, 1] flipped).
      'gg_valid' bool [..., Ng, Ng].
      'lg_rects' float32 [..., Nl, Ng, 2, 4]: local v vs global q; [..., 0, :] in the local crop's coords,
        [..., 1, :] in the global crop's coords.
      'lg_valid' bool [..., Nl, Ng].
    Non-overlapping pairs have zero rects and valid False.
  """
  gb = np.asarray(global_boxes, np.float64)
  gf = np.asarray(global_flips, bool)
  _check_boxes(gb, gf, 'global')
  if gb.ndim < 2:
    raise ValueError(f'global_boxes must be [..., Ng, 4], got {gb.shape}.')
  if (local_boxes is None) != (local_flips is None):
    raise ValueError('Pass both local_boxes and local_flips, or neither.')
  if local_boxes is None:
    lb = np.zeros(gb.shape[:-2] + (0, 4))
    lf = np.zeros(gb.shape[:-2] + (0,), bool)
  else:
    lb = np.asarray(local_boxes, np.float64)
    lf = np.asarray(local_flips, bool)
    _check_boxes(lb, lf, 'local')
    if lb.ndim != gb.ndim or lb.shape[:-2] != gb.shape[:-2]:
      raise ValueError(
        f'local_boxes {lb.shape} and global_boxes {gb.shape} must share leading (batch) dims.'
      )

  # Axis -2 of the first operand pairs with axis -3 of the second: result [..., N_first, Ng].
  gq, gk, gg_valid = _pairwise(
    gb[..., :, None, :], gf[..., :, None], gb[..., None, :, :], gf[..., None, :]
  )
  lq, lk, lg_valid = _pairwise(
    lb[..., :, None, :], lf[..., :, None], gb[..., None, :, :], gf[..., None, :]
  )
  return {
    'gg_rects': np.stack([gq, gk], axis=-2),
    'gg_valid': gg_valid,
    'lg_rects': np.stack([lq, lk], axis=-2),
    'lg_valid': lg_valid,
  }
