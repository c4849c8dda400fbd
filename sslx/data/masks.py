"""Block-wise patch masks for masked image modelling, drawn on the host in numpy.

Two generators, as released (docs/fidelity.md, Block masks):

* `block_mask(..., scheme="beit")`: BEiT's generator. Blocks of area ~U(min_area,
  budget) and log-uniform aspect are placed until `num_masked` cells are masked;
  BEiT gives up after 10 failed placements in a row (so it can stop short), while
  `exact=True` (CAE) keeps trying until the count is exactly `num_masked`.
* `block_mask(..., scheme="ibot")`: iBOT's variant: the minimum block area is
  (min(H, W) // 3)^2, there is no per-block cap, the target may be fractional and
  the mask ends at or below floor(target).

`ibot_mask_ratio` draws iBOT's per-crop ratio (`pred_ratio` / `pred_ratio_var`
lists: one candidate per entry, one picked uniformly), and `MaskSpec` bundles the
per-crop choice the pipeline makes. All draws use the numpy Generator the
pipeline derives per record, so masks are deterministic per (seed, record, epoch).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
  # Python's random.uniform(lo, hi) accepts lo > hi (returns a value between them); the
  # released generators rely on that when the remaining budget is below the minimum area.
  return lo + (hi - lo) * rng.random()


def block_mask(
  rng: np.random.Generator,
  grid: tuple[int, int],
  num_masked: float,
  *,
  scheme: str = "beit",
  min_area: int = 16,
  max_area: int | None = None,
  aspect: float = 0.3,
  exact: bool = False,
  max_rounds: int = 10_000,
) -> np.ndarray:
  """A boolean [H, W] mask with about `num_masked` cells set, in rectangular blocks.

  Args:
    rng: the per-record generator.
    grid: (H, W) patch grid.
    num_masked: target count. BEiT/CAE use an integer; iBOT passes ratio * H * W.
    scheme: 'beit' (blocks of at least `min_area`, at most `max_area` cells) or
      'ibot' (min area (min(H, W)//3)^2, no cap; `min_area`/`max_area` ignored).
    aspect: block aspect ratios are log-uniform in [aspect, 1/aspect].
    exact: keep placing blocks until exactly int(num_masked) cells are masked (CAE);
      otherwise stop after a round of 10 failed placements (BEiT, iBOT).
    max_rounds: safety bound for `exact` on impossible requests.

  Returns:
    bool [H, W]; True = masked.
  """
  if scheme not in ("beit", "ibot"):
    raise ValueError(f"mask scheme {scheme!r}; valid: 'beit', 'ibot'")
  h_grid, w_grid = grid
  target = float(num_masked)
  if exact:
    target = float(int(num_masked))
  if target > h_grid * w_grid:
    raise ValueError(f"cannot mask {num_masked} of {h_grid}x{w_grid} patches")
  if scheme == "ibot":
    min_area, max_area = (min(h_grid, w_grid) // 3) ** 2, None
  lo_log, hi_log = math.log(aspect), math.log(1.0 / aspect)
  mask = np.zeros((h_grid, w_grid), bool)
  count = 0
  rounds = 0
  while count < target:
    budget = target - count
    if max_area is not None:
      budget = min(budget, max_area)
    added = 0
    for _ in range(10):
      area = _uniform(rng, min_area, budget)
      ratio = math.exp(_uniform(rng, lo_log, hi_log))
      h = int(round(math.sqrt(area * ratio)))
      w = int(round(math.sqrt(area / ratio)))
      if h < h_grid and w < w_grid:
        top = int(rng.integers(0, h_grid - h + 1))
        left = int(rng.integers(0, w_grid - w + 1))
        box = mask[top : top + h, left : left + w]
        new = h * w - int(box.sum())
        if 0 < new <= budget:
          box[...] = True
          added = new
          break
    count += added
    rounds += 1
    if added == 0 and not exact:
      break
    if rounds >= max_rounds:
      raise RuntimeError(
        f"block_mask: no exact {int(target)}-cell mask found on {grid} after "
        f"{max_rounds} rounds; lower min_area or the count"
      )
  return mask


def ibot_mask_ratio(
  rng: np.random.Generator, ratios: Sequence[float], ratio_vars: Sequence[float]
) -> float:
  """iBOT's per-crop mask ratio: one candidate per (ratio, var) entry, one picked uniformly.

  A candidate is U(ratio - var, ratio + var) when var > 0, else ratio. With the SERE/iBOT
  recipe ratios (0, 0.3) and vars (0, 0.2), half the crops are unmasked and the rest
  get a ratio ~U(0.1, 0.5).
  """
  if len(ratios) != len(ratio_vars):
    raise ValueError(
      f"mask ratios {tuple(ratios)} and ratio_vars {tuple(ratio_vars)} must have the same length"
    )
  candidates = []
  for r, v in zip(ratios, ratio_vars):
    if v > r:
      raise ValueError(f"mask ratio_var {v} exceeds its ratio {r}; need var <= ratio")
    candidates.append(_uniform(rng, r - v, r + v) if v > 0 else float(r))
  return candidates[int(rng.integers(len(candidates)))]


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """How the pipeline masks each global crop (config.data.masks).

  scheme: 'none' | 'ibot' | 'beit'. For 'ibot', ratios/ratio_vars give the per-crop
  ratio; for 'beit', num_masked cells per crop (exact=True: CAE's exact count).
  """

  scheme: str = "none"
  ratios: tuple[float, ...] = (0.0, 0.3)
  ratio_vars: tuple[float, ...] = (0.0, 0.2)
  num_masked: int = 75
  min_area: int = 16
  max_area: int = 0  # 0 = no cap
  aspect: float = 0.3
  exact: bool = False

  @classmethod
  def from_config(cls, cfg) -> MaskSpec:
    if cfg is None:
      return cls()
    spec = cls(
      scheme=str(cfg.scheme),
      ratios=tuple(float(x) for x in cfg.ratios),
      ratio_vars=tuple(float(x) for x in cfg.ratio_vars),
      num_masked=int(cfg.num_masked),
      min_area=int(cfg.min_area),
      max_area=int(cfg.max_area),
      aspect=float(cfg.aspect),
      exact=bool(cfg.exact),
    )
    if spec.scheme not in ("none", "ibot", "beit"):
      raise ValueError(f"config.data.masks.scheme={spec.scheme!r}; valid: 'none', 'ibot', 'beit'")
    return spec

  def draw(self, rng: np.random.Generator, grid: tuple[int, int]) -> np.ndarray:
    """One crop's bool [H, W] mask."""
    if self.scheme == "none":
      return np.zeros(grid, bool)
    if self.scheme == "ibot":
      ratio = ibot_mask_ratio(rng, self.ratios, self.ratio_vars)
      return block_mask(rng, grid, ratio * grid[0] * grid[1], scheme="ibot", aspect=self.aspect)
    return block_mask(
      rng,
      grid,
      self.num_masked,
      scheme="beit",
      min_area=self.min_area,
      max_area=self.max_area or None,
      aspect=self.aspect,
      exact=self.exact,
    )
