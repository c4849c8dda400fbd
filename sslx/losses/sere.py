"""SERE feature self-relation losses: region-aligned sampling, spatial/channel relations, cross-entropy (pure JAX).

Layout: features are stacked per view, ``[V, B, N, C]`` with N = H*W tokens in row-major order (no [CLS]).
Student features are the predictor outputs p of each view, teacher features the projection outputs z (the
caller applies the heads). The teacher sees only the Ng global views. Rects and valid flags come from
``sslx.data.overlap.batch_overlaps`` (overlap of two crops in each crop's own normalised coordinates).

Sampling follows PyTorch ``grid_sample(bilinear, align_corners=False, padding_mode='zeros')`` as used by the
reference (MCG-NKU/SERE): a crop-normalised coordinate u lands on the continuous token coordinate u*size - 0.5,
and neighbours outside the token grid contribute zero, so grid points on the overlap border are
half-attenuated and corner points quartered. Sampling is linear, so sampling a relation on both axes,
W R W^T, equals the relation of the sampled features, (W f)(W f)^T; the losses use the latter (it never
forms the N x N relation and matches the paper's formula), ``align_relation`` provides the former.

Everything is float32. Matmuls use HIGHEST precision: the channel teacher temperature (0.1) magnifies
reduced-precision (TF32) errors in the logits tenfold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_HI = jax.lax.Precision.HIGHEST
_TEMPS_ON = ('teacher', 'student')


def grid_points(rects: Array, size: int) -> Array:
  """The S x S sampling grid of overlap rects, in crop-normalised coordinates.

  Point (r, s) = (x_start + s * (x_end - x_start) / (S - 1), y_start + r * (y_end - y_start) / (S - 1)),
  endpoints included; a flipped crop has x_start > x_end.

  Args:
    rects: float [..., 4] = (x_start, y_start, x_end, y_end) (see ``sslx.data.overlap``).
    size: S >= 2, points per side.

  Returns:
    float32 [..., S*S, 2] of (x, y), row-major: index r * S + s (row r outer, column s inner).
  """
  if size < 2:
    raise ValueError(
      f'The sampling grid needs size >= 2 points per side (endpoints included), got {size}.'
    )
  rects = jnp.asarray(rects, jnp.float32)
  if rects.shape[-1] != 4:
    raise ValueError(f'rects must be [..., 4] (x_start, y_start, x_end, y_end), got {rects.shape}.')
  steps = jnp.arange(size, dtype=jnp.float32)
  start, end = rects[..., :2], rects[..., 2:]
  # Same order as the reference: start + (i * extent) / (S - 1).
  axis = start[..., None, :] + steps[:, None] * (end - start)[..., None, :] / jnp.float32(size - 1)
  x = jnp.broadcast_to(axis[..., None, :, 0], rects.shape[:-1] + (size, size))
  y = jnp.broadcast_to(axis[..., :, None, 1], rects.shape[:-1] + (size, size))
  return jnp.stack([x, y], axis=-1).reshape(rects.shape[:-1] + (size * size, 2))


def bilinear_weights(points: Array, height: int, width: int) -> Array:
  """Bilinear interpolation matrix of ``points`` on an height x width token grid (zero padding).

  ``W @ F.reshape(h * w, C)`` equals PyTorch ``grid_sample(F, 2 * points - 1, mode='bilinear',
  align_corners=False, padding_mode='zeros')``: x = u * w - 0.5 on columns, y = v * h - 0.5 on rows, and
  each token's weight is the tent (1 - |x - col|)_+ (1 - |y - row|)_+. Points further than one cell outside
  the grid get an all-zero row (e.g. u = -0.5, the reference's "no overlap" grid value -2).

  Args:
    points: float [..., P, 2] of (x, y) crop-normalised coordinates ([0, 1] covers the crop).
    height, width: token grid shape (H, W).

  Returns:
    float32 [..., P, H*W], token index row * W + col.
  """
  points = jnp.asarray(points, jnp.float32)
  if points.shape[-1] != 2:
    raise ValueError(f'points must be [..., P, 2] (x, y), got {points.shape}.')
  px = points[..., 0] * width - 0.5
  py = points[..., 1] * height - 0.5
  wx = jax.nn.relu(1.0 - jnp.abs(px[..., None] - jnp.arange(width, dtype=jnp.float32)))
  wy = jax.nn.relu(1.0 - jnp.abs(py[..., None] - jnp.arange(height, dtype=jnp.float32)))
  w = wy[..., :, None] * wx[..., None, :]
  return w.reshape(points.shape[:-1] + (height * width,))


def sampling_matrix(rects: Array, valid: Array, size: int, height: int, width: int) -> Array:
  """Interpolation matrices of overlap rects; all-zero for invalid (non-overlapping) pairs.

  Zeroing invalid pairs reproduces the reference's -2 grid: every sampled value, hence every relation
  logit, is 0.

  Args:
    rects: float [..., 4] overlap rects in the crop's coordinates.
    valid: bool [...].
    size: S, grid points per side.
    height, width: the crop's token grid shape.

  Returns:
    float32 [..., S*S, H*W].
  """
  w = bilinear_weights(grid_points(rects, size), height, width)
  return w * jnp.asarray(valid, jnp.float32)[..., None, None]


def spatial_relation(f: Array, num_heads: int) -> Array:
  """Multi-head spatial self-relation R_m = f_m f_m^T / sqrt(C / M).

  Args:
    f: float [..., N, C]; channels split into M contiguous groups of d = C / M.
    num_heads: M (the backbone's head count in SERE).

  Returns:
    float32 [..., M, N, N].
  """
  f = jnp.asarray(f, jnp.float32)
  c = f.shape[-1]
  if c % num_heads:
    raise ValueError(
      f'Feature width C={c} must be divisible by num_heads={num_heads}; set the SERE head '
      'count to a divisor of the embedding dim.'
    )
  d = c // num_heads
  fh = f.reshape(f.shape[:-1] + (num_heads, d))
  return jnp.einsum('...nmd,...kmd->...mnk', fh, fh, precision=_HI) / jnp.sqrt(jnp.float32(d))


def channel_relation(f: Array) -> Array:
  """Channel self-relation R = f^T f / N over the N = H*W tokens.

  The reference divides by a hard-coded side (14 / 6) squared; here N comes from the actual token grid
  (identical at 224/96 px with patch 16, correct at other resolutions).

  Args:
    f: float [..., N, C].

  Returns:
    float32 [..., C, C].
  """
  f = jnp.asarray(f, jnp.float32)
  return jnp.einsum('...nc,...nd->...cd', f, f, precision=_HI) / jnp.float32(f.shape[-2])


def align_relation(relation: Array, w_query: Array, w_key: Array) -> Array:
  """Region-aligned sampling of a spatial relation on both axes: Wq R Wk^T.

  Equal to the reference's two grid_sample passes (key axis first, then query axis), since both are linear.

  Args:
    relation: float [..., M, N, N] (query tokens, key tokens).
    w_query: float [..., Pq, N] interpolation matrix for the query axis.
    w_key: float [..., Pk, N] interpolation matrix for the key axis.

  Returns:
    float32 [..., M, Pq, Pk].
  """
  keyed = jnp.einsum('...mij,...kj->...mik', relation, w_key, precision=_HI)
  return jnp.einsum('...pi,...mik->...mpk', w_query, keyed, precision=_HI)


def relation_ce(
  teacher_logits: Array,
  student_logits: Array,
  *,
  teacher_temp: Array | float,
  student_temp: Array | float,
) -> Array:
  """Mean over all leading axes of -sum_last softmax(t / tau_t) * log_softmax(s / tau_s).

  The teacher side is under stop_gradient (no centering: temperature is the only teacher transform).

  Args:
    teacher_logits: float [..., K].
    student_logits: float [..., K], same shape.
    teacher_temp, student_temp: positive temperatures (floats or traced scalars).

  Returns:
    float32 scalar.
  """
  if teacher_logits.shape != student_logits.shape:
    raise ValueError(
      f'teacher {teacher_logits.shape} and student {student_logits.shape} relations must '
      'have the same shape.'
    )
  t = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32))
  p_t = jax.nn.softmax(t / jnp.asarray(teacher_temp, jnp.float32), axis=-1)
  log_p_s = jax.nn.log_softmax(
    jnp.asarray(student_logits, jnp.float32) / jnp.asarray(student_temp, jnp.float32), axis=-1
  )
  return jnp.mean(-jnp.sum(p_t * log_p_s, axis=-1))


def _stack_views(views: Array | Sequence[Array] | None, name: str) -> Array | None:
  if views is None:
    return None
  if isinstance(views, (list, tuple)):
    if not views:
      return None
    views = jnp.stack([jnp.asarray(v) for v in views], axis=0)
  views = jnp.asarray(views, jnp.float32)
  if views.ndim != 4:
    raise ValueError(
      f'{name} must be [V, B, N, C] (views stacked first) or a list of [B, N, C], got '
      f'{views.shape}.'
    )
  return views if views.shape[0] else None


def _token_grid(n: int, hw: tuple[int, int] | None, name: str) -> tuple[int, int]:
  if hw is not None:
    if hw[0] * hw[1] != n:
      raise ValueError(
        f'{name} token grid {hw} does not hold N={n} tokens; drop [CLS] and pass (H, W) '
        'of the patch grid.'
      )
    return int(hw[0]), int(hw[1])
  side = math.isqrt(n)
  if side * side != n:
    raise ValueError(
      f'{name} has N={n} tokens, not a square grid; pass its (H, W) explicitly '
      '(and drop the [CLS] token).'
    )
  return side, side


def _temps(temp, other_temp, temps_on: str) -> tuple:
  if temps_on not in _TEMPS_ON:
    raise ValueError(
      f"temps_on must be one of {_TEMPS_ON} ('teacher' = released code, 'student' = the "
      f"paper's placement), got {temps_on!r}."
    )
  return (temp, other_temp) if temps_on == 'teacher' else (other_temp, temp)


def _check_views(student_global, teacher_global, student_local) -> None:
  if student_global.shape != teacher_global.shape:
    raise ValueError(
      f'student_global {student_global.shape} and teacher_global {teacher_global.shape} '
      'must both be [Ng, B, N, C].'
    )
  if student_local is not None and (
    student_local.shape[1] != student_global.shape[1]
    or student_local.shape[3] != student_global.shape[3]
  ):
    raise ValueError(
      f'student_local {student_local.shape} must share B and C with the global views '
      f'{student_global.shape}.'
    )
  n_global = student_global.shape[0]
  if n_global < 2 and student_local is None:
    raise ValueError(
      'SERE needs at least one (teacher global, student view) pair: give >= 2 global '
      'views or some local views.'
    )


def _check_pairs(rects, valid, shape: tuple[int, ...], name: str) -> tuple[Array, Array]:
  rects = jnp.asarray(rects, jnp.float32)
  valid = jnp.asarray(valid, bool)
  if rects.shape != shape + (2, 4) or valid.shape != shape:
    raise ValueError(
      f'{name}_rects / {name}_valid must be {shape + (2, 4)} / {shape}, got {rects.shape} / '
      f'{valid.shape}; pass the batch keys from sslx.data.overlap.batch_overlaps.'
    )
  return rects, valid


def _prepare(student_global, teacher_global, student_local, temp, other_temp, temps_on):
  """Stacks and checks the views; returns (sg, tg, sl, teacher_temp, student_temp)."""
  sg = _stack_views(student_global, 'student_global')
  tg = _stack_views(teacher_global, 'teacher_global')
  sl = _stack_views(student_local, 'student_local')
  _check_views(sg, tg, sl)
  return (sg, tg, sl) + tuple(_temps(temp, other_temp, temps_on))


def _global_pairs(n_global: int) -> tuple[list[int], list[int]]:
  pairs = [(q, v) for q in range(n_global) for v in range(n_global) if q != v]
  return [q for q, _ in pairs], [v for _, v in pairs]


def _sampled(w: Array, f: Array, spec: str) -> Array:
  return jnp.einsum(spec, w, f, precision=_HI)


def _mean_over_terms(parts: list[tuple[Array, int]]) -> Array:
  total = sum((loss * n for loss, n in parts), jnp.zeros((), jnp.float32))
  return total / sum(n for _, n in parts)


def sere_spatial_loss(
  student_global: Array | Sequence[Array],
  teacher_global: Array | Sequence[Array],
  student_local: Array | Sequence[Array] | None,
  gg_rects: Array,
  gg_valid: Array,
  lg_rects: Array | None = None,
  lg_valid: Array | None = None,
  *,
  num_heads: int,
  grid_gg: int = 13,
  grid_lg: int = 6,
  temp: Array | float = 0.5,
  other_temp: Array | float = 1.0,
  temps_on: str = 'teacher',
  global_hw: tuple[int, int] | None = None,
  local_hw: tuple[int, int] | None = None,
) -> tuple[Array, dict[str, Array]]:
  """SERE spatial self-relation loss L_p over region-aligned relations.

  Terms (each the mean over B, M and query points of the key-axis cross-entropy):
    * global-global: teacher view q vs student view v != q, both sampled on a grid_gg^2 grid of their
      overlap (teacher in q's coords, student in v's), Ng (Ng - 1) terms;
    * global-local: every teacher global q vs every student local v, grid_lg^2 grids on both maps (the
      teacher's full global token grid and the student's local one), Ng * Nl terms.
  No local-local and no same-view terms. L_p is the plain mean over all terms. A non-overlapping pair is NOT
  masked out: its interpolation matrices are zero, both relations are all-zero logits, both softmaxes are
  uniform, so the term is the constant log(S^2) with zero gradient and still counts in the mean (as the
  reference does; masking it would change the loss scale).

  Args:
    student_global: float [Ng, B, Ng_tok, C] (or a list of Ng [B, N, C]) student predictor outputs p.
    teacher_global: float [Ng, B, Ng_tok, C] teacher projection outputs z of the same global views.
    student_local: float [Nl, B, Nl_tok, C] student predictor outputs of the local views, or None.
    gg_rects: float [B, Ng, Ng, 2, 4], gg_valid bool [B, Ng, Ng] (batch_overlaps).
    lg_rects: float [B, Nl, Ng, 2, 4], lg_valid bool [B, Nl, Ng]; required iff student_local is given.
    num_heads: M relation heads (C divisible by M).
    grid_gg, grid_lg: sampling grid sides (13 and 6 in SERE).
    temp: the sharpening temperature (0.5 in SERE); other_temp: the other side's temperature (1.0).
    temps_on: 'teacher' (released code: teacher / temp, student / other_temp) or 'student' (paper's wording:
      student / temp, teacher / other_temp).
    global_hw, local_hw: token grid shapes; default square sqrt(N).

  Returns:
    (loss float32 scalar, metrics dict of float32 scalars: 'spatial_gg', 'spatial_lg' (mean over those
    terms; 0 when there are none), 'overlap_gg', 'overlap_lg' (fraction of overlapping pairs used)).
  """
  sg, tg, sl, teacher_temp, student_temp = _prepare(
    student_global, teacher_global, student_local, temp, other_temp, temps_on
  )
  n_global, batch, n_tok, _ = sg.shape
  gh, gw = _token_grid(n_tok, global_hw, 'global views')
  parts, metrics = [], {}

  qs, vs = _global_pairs(n_global)
  gg_rects, gg_valid = _check_pairs(gg_rects, gg_valid, (batch, n_global, n_global), 'gg')
  if qs:
    rect_t, rect_s = gg_rects[:, qs, vs, 0], gg_rects[:, qs, vs, 1]  # [B, P, 4]
    valid = gg_valid[:, qs, vs]  # [B, P]
    w_t = sampling_matrix(rect_t, valid, grid_gg, gh, gw)  # [B, P, S2, N]
    w_s = sampling_matrix(rect_s, valid, grid_gg, gh, gw)
    t_rel = spatial_relation(_sampled(w_t, tg[np.asarray(qs)], 'bpkn,pbnc->pbkc'), num_heads)
    s_rel = spatial_relation(_sampled(w_s, sg[np.asarray(vs)], 'bpkn,pbnc->pbkc'), num_heads)
    loss_gg = relation_ce(t_rel, s_rel, teacher_temp=teacher_temp, student_temp=student_temp)
    parts.append((loss_gg, len(qs)))
    metrics['spatial_gg'] = loss_gg
    metrics['overlap_gg'] = jnp.mean(valid.astype(jnp.float32))
  else:
    metrics['spatial_gg'] = jnp.float32(0.0)
    metrics['overlap_gg'] = jnp.float32(0.0)

  if sl is not None:
    if lg_rects is None or lg_valid is None:
      raise ValueError(
        'student_local is given but lg_rects / lg_valid are not; pass the batch keys from '
        'sslx.data.overlap.batch_overlaps.'
      )
    n_local, _, n_ltok, _ = sl.shape
    lh, lw = _token_grid(n_ltok, local_hw, 'local views')
    lg_rects, lg_valid = _check_pairs(lg_rects, lg_valid, (batch, n_local, n_global), 'lg')
    w_l = sampling_matrix(lg_rects[..., 0, :], lg_valid, grid_lg, lh, lw)  # [B, Nl, Ng, S2, Nl_tok]
    w_g = sampling_matrix(lg_rects[..., 1, :], lg_valid, grid_lg, gh, gw)  # [B, Nl, Ng, S2, Ng_tok]
    t_rel = spatial_relation(_sampled(w_g, tg, 'bvqkn,qbnc->vqbkc'), num_heads)
    s_rel = spatial_relation(_sampled(w_l, sl, 'bvqkn,vbnc->vqbkc'), num_heads)
    loss_lg = relation_ce(t_rel, s_rel, teacher_temp=teacher_temp, student_temp=student_temp)
    parts.append((loss_lg, n_local * n_global))
    metrics['spatial_lg'] = loss_lg
    metrics['overlap_lg'] = jnp.mean(lg_valid.astype(jnp.float32))
  else:
    metrics['spatial_lg'] = jnp.float32(0.0)
    metrics['overlap_lg'] = jnp.float32(0.0)
  return _mean_over_terms(parts), metrics


def sere_channel_loss(
  student_global: Array | Sequence[Array],
  teacher_global: Array | Sequence[Array],
  student_local: Array | Sequence[Array] | None = None,
  *,
  temp: Array | float = 0.1,
  other_temp: Array | float = 1.0,
  temps_on: str = 'teacher',
) -> tuple[Array, dict[str, Array]]:
  """SERE channel self-relation loss L_c (no spatial alignment: C x C relations are crop-independent).

  Terms (each the mean over B and the C relation rows of the cross-entropy over the last axis): teacher
  global q vs student global v != q (Ng (Ng - 1) terms) and teacher global q vs every student local v
  (Ng * Nl terms); L_c is the plain mean over all terms. Relations are f^T f / N with N each view's own
  token count.

  Args:
    student_global: float [Ng, B, Ng_tok, C] (or a list) student predictor outputs p of the global views.
    teacher_global: float [Ng, B, Ng_tok, C] teacher projection outputs z.
    student_local: float [Nl, B, Nl_tok, C] student predictor outputs of the local views, or None.
    temp: the sharpening temperature (0.1 in SERE); other_temp: the other side's (1.0).
    temps_on: 'teacher' (released code) or 'student' (paper's wording), see sere_spatial_loss.

  Returns:
    (loss float32 scalar, metrics dict: 'channel_gg', 'channel_lg' (means over those terms; 0 if none)).
  """
  sg, tg, sl, teacher_temp, student_temp = _prepare(
    student_global, teacher_global, student_local, temp, other_temp, temps_on
  )
  n_global, batch, _, channels = sg.shape
  t_rel = jax.lax.stop_gradient(channel_relation(tg))
  p_t = jax.nn.softmax(t_rel / jnp.asarray(teacher_temp, jnp.float32), axis=-1)  # [Ng, B, C, C]
  rows = batch * channels

  def cross(student_views: Array) -> Array:
    log_p_s = jax.nn.log_softmax(
      channel_relation(student_views) / jnp.asarray(student_temp, jnp.float32), axis=-1
    )
    # ce[q, v] = mean over (b, row) of the cross-entropy of teacher view q against student view v.
    return -jnp.einsum('qbcd,vbcd->qv', p_t, log_p_s, precision=_HI) / rows

  parts, metrics = [], {}
  n_gg = n_global * (n_global - 1)
  if n_gg:
    ce = cross(sg)
    loss_gg = jnp.sum(jnp.where(jnp.eye(n_global, dtype=bool), 0.0, ce)) / n_gg
    parts.append((loss_gg, n_gg))
    metrics['channel_gg'] = loss_gg
  else:
    metrics['channel_gg'] = jnp.float32(0.0)
  if sl is not None:
    loss_lg = jnp.mean(cross(sl))
    parts.append((loss_lg, n_global * sl.shape[0]))
    metrics['channel_lg'] = loss_lg
  else:
    metrics['channel_lg'] = jnp.float32(0.0)
  return _mean_over_terms(parts), metrics
