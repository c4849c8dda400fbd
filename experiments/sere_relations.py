r"""How invariant are a backbone's self-relations to the crop? (SERE paper, Fig. 5 and 6.)

  python experiments/sere_relations.py --workdirs=/tmp/dino_fmnist,/tmp/sere_fmnist \
      --out=experiments/fashion_mnist/sere_relations.png [--num_images=500] [--image_index=0]

For every workdir the teacher backbone of the latest checkpoint is restored and built from the
workdir's config.json. Every test image i gets two global views drawn with the generator
np.random.default_rng([seed, i]) and the crop settings of the FIRST workdir's config (box, then flip,
per view; no photometric augmentation, so only geometry changes), so every run sees the same pairs.
Tokens are the last block's output before the final LayerNorm without [CLS] ('prenorm'[:, 1:]), i.e.
backbone features only: DINO and DINO+SERE checkpoints are compared on equal terms (no SERE heads).

Differences, per pair of views a, b that overlap (pairs that do not are left out):
  spatial  mean over heads m, query points p and key points k of |P_a[m,p,k] - P_b[m,p,k]| with
           P = softmax_k(R~), R~ = the M-head spatial self-relation of W f (= W R W^T), W sampling the
           view's tokens on the S x S grid of the overlap (S = token side - 1, at least 2), M = the
           backbone's heads. Rows hold S^2 probabilities, so values scale like 1 / S^2.
  channel  mean over (c, d) of |P_a[c,d] - P_b[c,d]| with P = softmax_d(f^T f / N) over all N tokens.
Both at temperature 1. Prints a table and writes <out stem>.json; the PNG shows one image: the two
views (overlap in red, three query points as coloured dots) and per run the spatial self-relation row
of each point over each view's token grid (mean over heads of the softmax rows).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from sslx.data import augment, crops, overlap, sources  # noqa: E402
from sslx.losses import sere as sere_losses  # noqa: E402
from sslx.models.build import build_backbone  # noqa: E402
from sslx.train.checkpoint import Checkpointer  # noqa: E402

DEFINITIONS = {
  "spatial": "mean over heads, overlap-grid query points and key points of |softmax_k(Ra) - softmax_k(Rb)|, "
  "R = multi-head spatial self-relation of the prenorm tokens sampled on the S x S overlap grid "
  "(W f, S = token side - 1, >= 2), temperature 1",
  "channel": "mean over (c, d) of |softmax_d(Ra) - softmax_d(Rb)|, R = f^T f / N over all N prenorm tokens, "
  "temperature 1",
  "pairs": "two global views per test image (config crop boxes + flips, fixed seed, no photometric "
  "augmentation); only overlapping pairs count",
}
# Query points of the picture, as fractions (x, y) of the overlap in image coordinates.
POINT_FRACTIONS = ((0.3, 0.3), (0.7, 0.45), (0.45, 0.75))
POINT_COLOURS = ((0, 255, 255), (0, 255, 0), (255, 0, 255))
OVERLAP_COLOUR = (255, 0, 0)
TILE_TARGET = 224  # views are upscaled by an integer factor to about this many pixels
GAP = 8
TEXT_HEIGHT = 16
HEAT_COLUMNS = 2 * len(POINT_FRACTIONS)
# Piecewise-linear dark -> bright ramp for heat maps (kept away from pure red, the overlap colour).
_RAMP = np.array(
  [[0, 0, 4], [60, 15, 110], [150, 40, 110], [230, 100, 40], [250, 200, 60], [252, 255, 200]],
  np.float32,
)


@dataclasses.dataclass(frozen=True)
class Run:
  """One workdir's teacher backbone.

  Attributes:
    name: label used in the table, JSON and picture.
    workdir: where it came from.
    step: the checkpoint step restored.
    config: the run's resolved config (config.json).
    backbone: the ViT module (no drop path).
    params: its parameters (teacher_params['backbone'] of the checkpoint).
  """

  name: str
  workdir: str
  step: int
  config: ml_collections.ConfigDict
  backbone: Any
  params: Any

  @property
  def num_heads(self) -> int:
    return int(self.backbone.num_heads)

  def token_grid(self, view_size: int) -> tuple[int, int]:
    """(H, W) of the token grid of a square view of ``view_size`` pixels."""
    side = view_size // self.backbone.patch_size
    return side, side


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a training run wrote to ``<workdir>/config.json``."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path} not found: pass --workdirs of training runs (main.py writes "
      "config.json into its --workdir)."
    )
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_run(workdir: str, name: str | None = None) -> Run:
  """Restores the teacher backbone of the latest checkpoint in ``workdir``."""
  config = load_config(workdir)
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileNotFoundError(
      f"no checkpoints/ under {workdir}; train first with "
      f"`python main.py --config=... --workdir={workdir}`."
    )
  ckpt = Checkpointer(workdir, async_save=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(
        f"no checkpoint under {ckpt.directory}; train first with "
        f"`python main.py --config=... --workdir={workdir}`."
      )
    teacher = ckpt.restore_teacher(step)
  finally:
    ckpt.close()
  if "backbone" not in teacher:
    raise ValueError(
      f"{workdir}: the teacher parameters have no 'backbone' ({sorted(teacher)}); "
      "this script reads ViT methods built by sslx.methods."
    )
  backbone = build_backbone(config.model, drop_path=False)
  return Run(
    name or os.path.basename(os.path.normpath(workdir)),
    workdir,
    int(step),
    config,
    backbone,
    teacher["backbone"],
  )


def draw_pairs(
  config: ml_collections.ConfigDict,
  indices: np.ndarray | list[int],
  *,
  seed: int = 0,
  split: str | None = None,
  source: Any = None,
) -> dict[str, np.ndarray]:
  """Two global views of each image ``indices[i]``, reproducibly (generator default_rng([seed, i])).

  Args:
    config: a run config; config.data picks the dataset, global crop size / scale, aspect range and
      interpolation.
    indices: image indices in ``split`` (default config.data.eval_test_split).
    source: an already built source for that split (skips building one).

  Returns:
    'views' uint8 [B, 2, G, G, 3] (flipped where flagged), 'boxes' float32 [B, 2, 4] (x0, y0, w, h,
    original pixels), 'flips' bool [B, 2], 'rects' float32 [B, 2, 4] (overlap in each view's
    normalised coordinates, sslx.data.overlap), 'valid' bool [B] (the views overlap), 'indices' int64 [B].
  """
  dc = config.data
  if source is None:
    source = sources.make_source(dc, split or dc.eval_test_split)
  spec = crops.CropSpec(
    2, int(dc.global_crops.size), tuple(float(s) for s in dc.global_crops.scale)
  )
  no_locals = crops.CropSpec(0, 1, (1.0, 1.0))
  ratio = tuple(float(r) for r in dc.get("crop_ratio", crops.DEFAULT_RATIO))
  out = {"views": [], "boxes": [], "flips": []}
  indices = np.asarray(indices, np.int64)
  for i in indices:
    record = source[int(i)]
    views = crops.multi_crop(
      np.random.default_rng([seed, int(i)]),
      record["image"],
      record["image_size"],
      spec,
      no_locals,
      interpolation=dc.get("interpolation", "bicubic"),
      ratio=ratio,
      decode_scale=float(record["decode_scale"]),
    )
    out["views"].append(views["global_crops"])
    out["boxes"].append(views["global_boxes"])
    out["flips"].append(views["global_flips"])
  pairs = {k: np.stack(v) for k, v in out.items()}
  ov = overlap.batch_overlaps(pairs["boxes"], pairs["flips"])
  pairs["rects"] = ov["gg_rects"][:, 0, 1]
  pairs["valid"] = ov["gg_valid"][:, 0, 1]
  pairs["indices"] = indices
  return pairs


def relation_differences(
  tokens_a: jax.Array,
  tokens_b: jax.Array,
  rect_a: jax.Array,
  rect_b: jax.Array,
  valid: jax.Array,
  *,
  num_heads: int,
  grid: int,
  hw: tuple[int, int],
) -> dict[str, jax.Array]:
  """Spatial and channel self-relation differences of two views of the same images (pure, jittable).

  Args:
    tokens_a, tokens_b: float [B, N, C] tokens of each view, N = H * W row-major, no [CLS].
    rect_a, rect_b: float [B, 4] the overlap in each view's normalised coordinates.
    valid: bool [B] whether the views overlap.
    num_heads: M, relation heads (divides C).
    grid: S >= 2, overlap grid points per side.
    hw: (H, W) token grid.

  Returns:
    float32 [B] arrays 'spatial' and 'channel' (definitions in the module docstring); pairs that do not
    overlap give 0 for 'spatial' (both sides uniform) and must be dropped by the caller via ``valid``.
  """
  h, w = hw
  w_a = sere_losses.sampling_matrix(rect_a, valid, grid, h, w)  # [B, S^2, N]
  w_b = sere_losses.sampling_matrix(rect_b, valid, grid, h, w)
  hi = jax.lax.Precision.HIGHEST
  f_a = jnp.einsum("bpn,bnc->bpc", w_a, tokens_a.astype(jnp.float32), precision=hi)
  f_b = jnp.einsum("bpn,bnc->bpc", w_b, tokens_b.astype(jnp.float32), precision=hi)
  p_a = jax.nn.softmax(sere_losses.spatial_relation(f_a, num_heads), axis=-1)  # [B, M, S^2, S^2]
  p_b = jax.nn.softmax(sere_losses.spatial_relation(f_b, num_heads), axis=-1)
  c_a = jax.nn.softmax(sere_losses.channel_relation(tokens_a), axis=-1)  # [B, C, C]
  c_b = jax.nn.softmax(sere_losses.channel_relation(tokens_b), axis=-1)
  return {
    "spatial": jnp.mean(jnp.abs(p_a - p_b), axis=(1, 2, 3)),
    "channel": jnp.mean(jnp.abs(c_a - c_b), axis=(1, 2)),
  }


def point_relation_maps(
  tokens: jax.Array,
  points: jax.Array,
  *,
  num_heads: int,
  hw: tuple[int, int],
) -> jax.Array:
  """Spatial self-relation rows of query points over one view's token grid.

  Args:
    tokens: float [N, C] one view's tokens (N = H * W row-major, no [CLS]).
    points: float [P, 2] (x, y) query points in the view's normalised coordinates (bilinearly sampled).
    num_heads: M relation heads.
    hw: (H, W) token grid.

  Returns:
    float32 [P, H, W]: per point, the mean over heads of softmax over keys of the relation row.
  """
  h, w = hw
  queries = sere_losses.bilinear_weights(points, h, w) @ tokens.astype(jnp.float32)  # [P, C]
  n_points = queries.shape[0]
  rel = sere_losses.spatial_relation(jnp.concatenate([queries, tokens], axis=0), num_heads)
  rows = jax.nn.softmax(rel[:, :n_points, n_points:], axis=-1)  # [M, P, N]
  return jnp.mean(rows, axis=0).reshape(n_points, h, w)


def overlap_grid(run: Run, view_size: int) -> int:
  """S = token side - 1, at least 2 (13 for 224 px views at patch 16)."""
  return max(run.token_grid(view_size)[0] - 1, 2)


def _tokens_fn(run: Run):
  mean = tuple(float(v) for v in run.config.augment.mean)
  std = tuple(float(v) for v in run.config.augment.std)

  def tokens(params, views):
    """uint8 [B, V, G, G, 3] -> prenorm tokens float32 [B, V, N, C]."""
    b, v = views.shape[:2]
    x = augment.normalize(augment.to_float(views.reshape((b * v,) + views.shape[2:])), mean, std)
    out = run.backbone.apply({"params": params}, x, train=False)["prenorm"][:, 1:]
    return out.reshape((b, v) + out.shape[1:])

  return tokens


def measure(
  run: Run, pairs: dict[str, np.ndarray], *, batch_size: int = 250
) -> dict[str, np.ndarray]:
  """Per-pair differences of ``run`` on ``pairs`` (from draw_pairs), jitted in fixed-size chunks.

  Returns:
    'spatial', 'channel' float32 [B] and 'valid' bool [B] (copied from pairs).
  """
  view_size = pairs["views"].shape[2]
  hw = run.token_grid(view_size)
  grid = overlap_grid(run, view_size)
  tokens = _tokens_fn(run)

  @jax.jit
  def chunk(params, views, rects, valid):
    t = tokens(params, views)
    return relation_differences(
      t[:, 0], t[:, 1], rects[:, 0], rects[:, 1], valid, num_heads=run.num_heads, grid=grid, hw=hw
    )

  n = pairs["views"].shape[0]
  size = max(1, min(batch_size, n))
  results = {"spatial": [], "channel": []}
  for start in range(0, n, size):
    part = {k: pairs[k][start : start + size] for k in ("views", "rects", "valid")}
    m = part["views"].shape[0]
    if m < size:  # pad the last chunk so one compiled shape serves every chunk
      part = {k: np.concatenate([v, np.repeat(v[-1:], size - m, axis=0)]) for k, v in part.items()}
    out = jax.device_get(chunk(run.params, part["views"], part["rects"], part["valid"]))
    for k in results:
      results[k].append(np.asarray(out[k][:m], np.float32))
  return {
    **{k: np.concatenate(v) for k, v in results.items()},
    "valid": np.asarray(pairs["valid"], bool),
  }


def summarize(run: Run, diffs: dict[str, np.ndarray], view_size: int) -> dict[str, Any]:
  """JSON-ready summary of measure(): means, standard deviations and errors over overlapping pairs."""
  valid = diffs["valid"]
  n = int(valid.sum())
  out: dict[str, Any] = {
    "name": run.name,
    "workdir": os.path.abspath(run.workdir),
    "step": run.step,
    "num_pairs": n,
    "num_heads": run.num_heads,
    "grid": overlap_grid(run, view_size),
    "token_grid": list(run.token_grid(view_size)),
  }
  for key in ("spatial", "channel"):
    values = diffs[key][valid].astype(np.float64)
    mean = float(values.mean()) if n else float("nan")
    std = float(values.std()) if n else float("nan")
    out[f"{key}_mean"] = mean
    out[f"{key}_std"] = std
    out[f"{key}_sem"] = std / math.sqrt(n) if n else float("nan")
  return out


def format_table(rows: list[dict[str, Any]]) -> str:
  """A small fixed-width table of summarize() outputs."""
  lines = [f"{'run':<24} {'step':>7} {'pairs':>6} {'spatial diff':>22} {'channel diff':>22}"]
  for r in rows:
    lines.append(
      f"{r['name'][:24]:<24} {r['step']:>7d} {r['num_pairs']:>6d} "
      f"{r['spatial_mean']:>11.4e} ± {r['spatial_sem']:.1e} "
      f"{r['channel_mean']:>11.4e} ± {r['channel_sem']:.1e}"
    )
  return "\n".join(lines)


# ---- picture -------------------------------------------------------------------------------------


def tile_size(view_size: int) -> int:
  """Displayed side of a view / heat map: the view upscaled by an integer factor (x8 for 28 px)."""
  return view_size * max(1, TILE_TARGET // view_size)


def picture_size(num_runs: int, view_size: int) -> tuple[int, int]:
  """(width, height) of draw_picture's image."""
  d = tile_size(view_size)
  return GAP + HEAT_COLUMNS * (d + GAP), GAP + (1 + num_runs) * (TEXT_HEIGHT + d + GAP)


def query_points(rects: np.ndarray) -> np.ndarray:
  """float32 [2, P, 2]: POINT_FRACTIONS of the overlap in each view's coordinates (same image spots)."""
  rects = np.asarray(rects, np.float32)  # [2, 4]
  frac = np.asarray(POINT_FRACTIONS, np.float32)  # [P, 2]
  start, end = rects[:, None, :2], rects[:, None, 2:]
  return start + frac[None] * (end - start)


def _heat_rgb(values: np.ndarray, scale: float) -> np.ndarray:
  t = np.clip(values / max(scale, 1e-12), 0.0, 1.0) * (len(_RAMP) - 1)
  lo = np.floor(t).astype(int).clip(0, len(_RAMP) - 2)
  frac = (t - lo)[..., None]
  return (_RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac).astype(np.uint8)


def _dot(draw: ImageDraw.ImageDraw, xy: tuple[float, float], colour, radius: int) -> None:
  x, y = xy
  draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour, outline=(0, 0, 0))


def _rect_px(rect: np.ndarray, d: int) -> tuple[float, float, float, float]:
  xs, ys = sorted((rect[0] * d, rect[2] * d)), sorted((rect[1] * d, rect[3] * d))
  return xs[0], ys[0], xs[1] - 1, ys[1] - 1


def draw_picture(
  runs: list[Run],
  pairs: dict[str, np.ndarray],
  row: int,
  per_run: list[dict[str, np.ndarray]] | None = None,
) -> Image.Image:
  """The Fig. 5-style picture of pair ``row`` of ``pairs`` (its views must overlap).

  Layout: a header row with the two views (overlap in red, query points as coloured dots) and a
  legend, then one row per run: for each point, its relation map in view 1 then view 2 (each pair of
  maps shares one colour scale), labelled with the run, step and this pair's differences.

  Args:
    runs: the runs to show, one row each.
    pairs: draw_pairs output; ``row`` picks the image.
    per_run: measure() output of each run on ``pairs`` (for the per-row differences); computed on
      this pair alone when None.
  Returns:
    RGB PIL image of picture_size(len(runs), view_size).
  """
  if not bool(pairs["valid"][row]):
    raise ValueError(
      f"the two views of image {int(pairs['indices'][row])} do not overlap; pick another "
      "--image_index or --seed."
    )
  views, rects = pairs["views"][row], pairs["rects"][row]
  view_size = views.shape[1]
  d = tile_size(view_size)
  radius = max(3, d // 40)
  points = query_points(rects)  # [2, P, 2]
  font = ImageFont.load_default()
  canvas = Image.new("RGB", picture_size(len(runs), view_size), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)

  def tile_xy(r: int, col: int) -> tuple[int, int]:
    return GAP + col * (d + GAP), GAP + r * (TEXT_HEIGHT + d + GAP) + TEXT_HEIGHT

  for v in range(2):
    tile = Image.fromarray(views[v]).resize((d, d), Image.Resampling.NEAREST)
    td = ImageDraw.Draw(tile)
    td.rectangle(_rect_px(rects[v], d), outline=OVERLAP_COLOUR, width=max(1, d // 112))
    for p, colour in enumerate(POINT_COLOURS):
      _dot(td, tuple(points[v, p] * d), colour, radius)
    x, y = tile_xy(0, v)
    canvas.paste(tile, (x, y))
    flip = " (flipped)" if pairs["flips"][row, v] else ""
    draw.text((x, y - TEXT_HEIGHT + 2), f"view {v + 1}{flip}", fill=(0, 0, 0), font=font)
  legend = [
    f"image {int(pairs['indices'][row])}: two global views, overlap in red",
    "maps, per dot: its spatial self-relation row in view 1, then",
    "in view 2 (prenorm tokens, softmax over that view's tokens,",
    "mean over heads; the two maps share a colour scale)",
    "diff = mean |softmax(R_view1) - softmax(R_view2)|:",
    "  spatial on the overlap grid, channel over all tokens",
  ]
  x, y = tile_xy(0, 2)
  for i, line in enumerate(legend):
    draw.text((x, y + i * 14), line, fill=(0, 0, 0), font=font)

  for r, run in enumerate(runs, start=1):
    hw = run.token_grid(view_size)
    t = jax.device_get(jax.jit(_tokens_fn(run))(run.params, views[None]))[0]  # [2, N, C]
    maps = np.stack(
      [
        np.asarray(point_relation_maps(t[v], points[v], num_heads=run.num_heads, hw=hw))
        for v in range(2)
      ]
    )  # [2, P, H, W]
    if per_run is not None:
      diff = {k: float(per_run[r - 1][k][row]) for k in ("spatial", "channel")}
    else:
      one = {k: pairs[k][row : row + 1] for k in ("views", "rects", "valid")}
      res = measure(run, one)
      diff = {k: float(res[k][0]) for k in ("spatial", "channel")}
    x0, y0 = tile_xy(r, 0)
    draw.text(
      (x0, y0 - TEXT_HEIGHT + 2),
      f"{run.name} (step {run.step}): diff spatial {diff['spatial']:.3e}, "
      f"channel {diff['channel']:.3e}",
      fill=(0, 0, 0),
      font=font,
    )
    for p, colour in enumerate(POINT_COLOURS):
      scale = float(maps[:, p].max())
      for v in range(2):
        tile = Image.fromarray(_heat_rgb(maps[v, p], scale)).resize(
          (d, d), Image.Resampling.NEAREST
        )
        td = ImageDraw.Draw(tile)
        td.rectangle(_rect_px(rects[v], d), outline=(255, 255, 255), width=1)
        _dot(td, tuple(points[v, p] * d), colour, radius)
        canvas.paste(tile, tile_xy(r, 2 * p + v))
  return canvas


# ---- command line --------------------------------------------------------------------------------


def _check_compatible(runs: list[Run]) -> None:
  ref = runs[0].config.data
  keys = ("source", "path", "tfds_name", "global_crops")
  for run in runs[1:]:
    other = run.config.data
    differ = [k for k in keys if str(ref.get(k)) != str(other.get(k))]
    if differ:
      print(
        f"note: {run.name} was trained with other data.{'/'.join(differ)} than {runs[0].name}; the "
        f"views come from {runs[0].name}'s config.",
        file=sys.stderr,
      )


def run_all(
  workdirs: list[str],
  out: str,
  *,
  names: list[str] | None = None,
  num_images: int = 500,
  image_index: int = 0,
  seed: int = 0,
  split: str = "",
  batch_size: int = 250,
) -> dict[str, Any]:
  """Loads the runs, measures them, prints the table, writes ``out`` (PNG) and its .json; returns the JSON."""
  if names and len(names) != len(workdirs):
    raise ValueError(
      f"--names has {len(names)} entries for {len(workdirs)} --workdirs; give one name "
      "per workdir or none."
    )
  if num_images < 1:
    raise ValueError("--num_images must be >= 1.")
  runs = [load_run(w, names[i] if names else None) for i, w in enumerate(workdirs)]
  _check_compatible(runs)
  config = runs[0].config
  split = split or config.data.eval_test_split
  source = sources.make_source(config.data, split)
  if num_images > len(source) or not 0 <= image_index < len(source):
    raise ValueError(
      f"split {split!r} has {len(source)} images: use --num_images <= {len(source)} "
      f"and 0 <= --image_index < {len(source)}."
    )
  pairs = draw_pairs(config, np.arange(num_images), seed=seed, source=source)
  view_size = pairs["views"].shape[2]
  per_run = [measure(run, pairs, batch_size=batch_size) for run in runs]
  rows = [summarize(run, diffs, view_size) for run, diffs in zip(runs, per_run)]
  print(format_table(rows))

  if image_index < num_images:
    picture = draw_picture(runs, pairs, image_index, per_run)
  else:
    one = draw_pairs(config, [image_index], seed=seed, source=source)
    picture = draw_picture(runs, one, 0)
  os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
  picture.save(out)
  result = {
    "definition": DEFINITIONS,
    "split": split,
    "num_images": num_images,
    "num_overlapping": int(pairs["valid"].sum()),
    "seed": seed,
    "image_index": image_index,
    "view_size": view_size,
    "picture": os.path.abspath(out),
    "runs": rows,
  }
  json_path = os.path.splitext(out)[0] + ".json"
  with open(json_path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {out} and {json_path}")
  return result


def main(argv) -> None:
  del argv
  from absl import flags, logging

  logging.set_verbosity(logging.WARNING)  # orbax logs every restore step at INFO
  f = flags.FLAGS
  try:
    run_all(
      f.workdirs,
      f.out,
      names=f.names,
      num_images=f.num_images,
      image_index=f.image_index,
      seed=f.seed,
      split=f.split,
      batch_size=f.batch_size,
    )
  except (FileNotFoundError, ValueError, sources.DataError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_list("workdirs", None, "Training workdirs to compare (comma-separated).")
  flags.DEFINE_list("names", None, "Labels, one per workdir (default: the workdir's basename).")
  flags.DEFINE_string("out", "sere_relations.png", "PNG to write; the JSON goes next to it.")
  flags.DEFINE_integer("num_images", 500, "Test images (pairs of views) to measure.")
  flags.DEFINE_integer("image_index", 0, "Test image shown in the picture.")
  flags.DEFINE_integer("seed", 0, "Seed of the views.")
  flags.DEFINE_string("split", "", "Dataset split (default: config.data.eval_test_split).")
  flags.DEFINE_integer("batch_size", 250, "Pairs per jitted chunk.")
  flags.mark_flags_as_required(["workdirs"])
  app.run(main)
