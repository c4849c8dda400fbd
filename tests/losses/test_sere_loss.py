"""SERE sampling, relations and losses against independent numpy references (grid_sample, get_grid, loops)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx.data.overlap import batch_overlaps
from sslx.losses.sere import (
  align_relation,
  bilinear_weights,
  channel_relation,
  grid_points,
  relation_ce,
  sampling_matrix,
  sere_channel_loss,
  sere_spatial_loss,
  spatial_relation,
)

IMG_H, IMG_W = 150, 200
# Jitted once per static configuration: eager dispatch would compile every small op separately.
_spatial_jit = jax.jit(
  sere_spatial_loss, static_argnames=('num_heads', 'grid_gg', 'grid_lg', 'temps_on')
)
_channel_jit = jax.jit(sere_channel_loss, static_argnames=('temps_on',))


# ----------------------------------------------------------------------------------------------- references


def _ref_get_grid(rect_q, rect_k, size):
  """The reference get_grid in float32 with its operation order; rects are (x, y, w, h, flip)."""
  ov = [
    max(rect_q[0], rect_k[0]),
    max(rect_q[1], rect_k[1]),
    min(rect_q[0] + rect_q[2], rect_k[0] + rect_k[2]),
    min(rect_q[1] + rect_q[3], rect_k[1] + rect_k[3]),
  ]
  if not (ov[0] < ov[2] and ov[1] < ov[3]):
    return [np.full((size, size, 2), -2, np.float32)] * 2
  grids = []
  for r in (rect_q, rect_k):
    o = np.float32(
      [(ov[0] - r[0]) / r[2], (ov[1] - r[1]) / r[3], (ov[2] - ov[0]) / r[2], (ov[3] - ov[1]) / r[3]]
    )
    xs = np.array([o[0] + i * o[2] / np.float32(size - 1) for i in range(size)], np.float32)
    ys = np.array([o[1] + i * o[3] / np.float32(size - 1) for i in range(size)], np.float32)
    g = np.zeros((size, size, 2), np.float32)
    g[:, :, 0] = xs[None, :]
    g[:, :, 1] = ys[:, None]
    if r[4]:
      g[:, :, 0] = np.float32(1) - g[:, :, 0]
    grids.append(np.float32(2) * g - np.float32(1))
  return grids


def _ref_grid_sample(image, grid):
  """grid_sample(bilinear, align_corners=False, zeros) point by point: image [C, H, W], grid [P, 2] in [-1, 1]."""
  ch, h, w = image.shape
  out = np.zeros((grid.shape[0], ch))
  for p, (gx, gy) in enumerate(np.asarray(grid, np.float64)):
    ix, iy = ((gx + 1) * w - 1) / 2, ((gy + 1) * h - 1) / 2
    x0, y0 = math.floor(ix), math.floor(iy)
    for xx, yy in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
      if 0 <= xx < w and 0 <= yy < h:
        out[p] += (1 - abs(ix - xx)) * (1 - abs(iy - yy)) * image[:, yy, xx]
  return out


def _ref_two_stage(relation, grid_q, grid_k):
  """The reference's relation sampling: key axis first, then query axis. relation [M, N, N] -> [M, Pq, Pk]."""
  m, n, _ = relation.shape
  side = math.isqrt(n)
  keyed = _ref_grid_sample(relation.reshape(m * n, side, side), grid_k)  # [Pk, M*N]
  keyed = keyed.T.reshape(m, n, -1).transpose(0, 2, 1)  # [M, Pk, N]
  both = _ref_grid_sample(keyed.reshape(-1, side, side), grid_q)  # [Pq, M*Pk]
  return both.T.reshape(m, -1, grid_q.shape[0]).transpose(0, 2, 1)


def _np_ce(t, s, tt, ts):
  t = np.asarray(t, np.float64) / tt
  s = np.asarray(s, np.float64) / ts
  p = np.exp(t - t.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  log_q = s - s.max(-1, keepdims=True)
  log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
  return np.mean(-(p * log_q).sum(-1))


def _boxes(rng, shape, scale=(0.3, 1.0)):
  area = rng.uniform(*scale, size=shape) * IMG_H * IMG_W
  aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), size=shape))
  w = np.clip(np.round(np.sqrt(area * aspect)), 4, IMG_W)
  h = np.clip(np.round(np.sqrt(area / aspect)), 4, IMG_H)
  x0 = np.floor(rng.random(shape) * (IMG_W - w + 1))
  y0 = np.floor(rng.random(shape) * (IMG_H - h + 1))
  return np.stack([x0, y0, w, h], -1).astype(np.float32)


# ---------------------------------------------------------------------------------------- grid and sampling


@pytest.mark.parametrize('size', [13, 6])
def test_grid_points_reproduce_reference_get_grid(size):
  rng = np.random.default_rng(size)
  boxes = _boxes(rng, (40, 2), scale=(0.05, 0.4))
  flips = rng.random((40, 2)) < 0.5
  out = batch_overlaps(boxes[:, :1], flips[:, :1], boxes[:, 1:], flips[:, 1:])
  rects, valid = out['lg_rects'][:, 0, 0], out['lg_valid'][:, 0, 0]  # [40, 2, 4]: (crop 1, crop 0)
  assert 0 < valid.sum() < len(valid)
  ours = 2 * np.asarray(grid_points(rects, size)) - 1  # [40, 2, S*S, 2]
  for i in range(len(boxes)):
    rect_l = tuple(boxes[i, 1].tolist()) + (int(flips[i, 1]),)
    rect_g = tuple(boxes[i, 0].tolist()) + (int(flips[i, 0]),)
    ref_l, ref_g = _ref_get_grid(rect_l, rect_g, size)
    assert bool(valid[i]) == bool(ref_l[0, 0, 0] != -2)
    if valid[i]:
      # A few float32 ulps: the endpoint encoding cannot replay the reference's exact rounding.
      np.testing.assert_allclose(ours[i, 0], ref_l.reshape(-1, 2), rtol=0, atol=1e-6)
      np.testing.assert_allclose(ours[i, 1], ref_g.reshape(-1, 2), rtol=0, atol=1e-6)


def test_bilinear_weights_match_grid_sample_reference():
  rng = np.random.default_rng(0)
  h, w, c = 5, 7, 3
  image = rng.normal(size=(c, h, w))
  edges = np.array(
    [
      [0, 0],
      [1, 1],
      [0, 1],
      [1, 0],
      [0.5, 0],
      [0, 0.5],
      [1, 0.3],
      [-0.5, -0.5],
      [1.2, 0.5],
      [0.5 / w, 0.5 / h],
      [-0.1, 0.5],
      [0.5, 1.05],
    ]
  )
  points = np.concatenate([rng.uniform(-0.3, 1.3, size=(60, 2)), edges]).astype(np.float32)
  weights = np.asarray(bilinear_weights(points, h, w))
  assert weights.shape == (len(points), h * w)
  ours = weights @ image.reshape(c, -1).T
  np.testing.assert_allclose(ours, _ref_grid_sample(image, 2 * points - 1), atol=1e-5)
  # The reference's "no overlap" value (grid -2, i.e. u = -0.5) samples nothing.
  assert np.all(weights[len(points) - len(edges) + 7] == 0)


def test_border_points_half_and_corners_quarter_attenuated():
  w = np.asarray(sampling_matrix(jnp.float32([0, 0, 1, 1]), True, 5, 4, 4)).sum(-1).reshape(5, 5)
  expected = np.ones((5, 5))
  expected[0, :] = expected[-1, :] = expected[:, 0] = expected[:, -1] = 0.5
  expected[0, 0] = expected[0, -1] = expected[-1, 0] = expected[-1, -1] = 0.25
  np.testing.assert_allclose(w, expected, atol=1e-6)
  invalid = sampling_matrix(jnp.float32([0.2, 0.2, 0.8, 0.8]), False, 5, 4, 4)
  assert invalid.shape == (25, 16) and not np.any(np.asarray(invalid))


def _coordinate_tokens(box, flip, side):
  """Token grid of a crop whose features are the ORIGINAL-image (X, Y) of each token centre: [side^2, 2]."""
  x0, y0, w, h = np.asarray(box, np.float64)
  u = (np.arange(side) + 0.5) / side
  u_orig = 1 - u if flip else u  # displayed column c shows original column 1 - u when mirrored
  xx = np.broadcast_to(x0 + u_orig * w, (side, side))
  yy = np.broadcast_to((y0 + u * h)[:, None], (side, side))
  return np.stack([xx, yy], -1).reshape(-1, 2)


def test_sampled_coordinates_agree_inside_the_overlap():
  rng = np.random.default_rng(4)
  n_pairs, size, side_q, side_k = 60, 6, 14, 6
  box_q = _boxes(rng, (n_pairs,), (0.3, 1.0))
  box_k = _boxes(rng, (n_pairs,), (0.05, 0.4))
  flip_q, flip_k = rng.random(n_pairs) < 0.5, rng.random(n_pairs) < 0.5
  out = batch_overlaps(box_q[:, None], flip_q[:, None], box_k[:, None], flip_k[:, None])
  rects, valid = out['lg_rects'][:, 0, 0], out['lg_valid'][:, 0, 0]
  assert valid.sum() >= 10
  w_k = np.asarray(sampling_matrix(rects[:, 0], valid, size, side_k, side_k))
  w_q = np.asarray(sampling_matrix(rects[:, 1], valid, size, side_q, side_q))
  checked_interior = 0
  for i in np.flatnonzero(valid):
    lo = np.maximum(box_q[i, :2], box_k[i, :2]).astype(np.float64)
    hi = np.minimum(box_q[i, :2] + box_q[i, 2:], box_k[i, :2] + box_k[i, 2:])
    t = np.arange(size) / (size - 1)
    expect = np.stack(
      np.broadcast_arrays(
        lo[0] + t[None, :] * (hi[0] - lo[0]), lo[1] + t[:, None] * (hi[1] - lo[1])
      ),
      -1,
    ).reshape(-1, 2)
    sampled = {}
    for name, wm, box, flip, side in (
      ('q', w_q[i], box_q[i], flip_q[i], side_q),
      ('k', w_k[i], box_k[i], flip_k[i], side_k),
    ):
      feats = _coordinate_tokens(box, flip, side)
      mass = wm.sum(-1)
      normalised = (wm @ feats) / mass[:, None]
      cell = np.asarray(box[2:], np.float64) / side
      # Interior points (full bilinear support, mass 1) reproduce a linear field exactly; points in the
      # outer half cell see the zero padding, and after normalising read the edge token's centre.
      interior = np.isclose(mass, 1.0, atol=1e-5)
      np.testing.assert_allclose((wm @ feats)[interior], expect[interior], atol=2e-3)
      assert np.all(np.abs(normalised - expect) <= 0.5 * cell + 2e-3)
      assert np.all(mass > 0.2)
      sampled[name] = (normalised, interior)
      checked_interior += interior.sum()
    both = sampled['q'][1] & sampled['k'][1]
    np.testing.assert_allclose(sampled['q'][0][both], sampled['k'][0][both], atol=4e-3)
  assert checked_interior > 100


# ---------------------------------------------------------------------------------------------- relations


def test_relations_match_numpy_and_softmax_rows_are_distributions():
  rng = np.random.default_rng(5)
  f = rng.normal(size=(2, 9, 12)).astype(np.float32)
  spatial = np.asarray(spatial_relation(f, 3))
  assert spatial.shape == (2, 3, 9, 9)
  for m in range(3):
    fm = f[:, :, 4 * m : 4 * (m + 1)].astype(np.float64)
    np.testing.assert_allclose(
      spatial[:, m], fm @ fm.transpose(0, 2, 1) / 2.0, rtol=1e-5, atol=1e-5
    )
  channel = np.asarray(channel_relation(f))
  np.testing.assert_allclose(
    channel, f.transpose(0, 2, 1).astype(np.float64) @ f / 9, rtol=1e-5, atol=1e-5
  )
  for rel in (spatial, channel):
    probs = np.asarray(jax.nn.softmax(jnp.asarray(rel) / 0.1, axis=-1))
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  with pytest.raises(ValueError, match='divisible by num_heads'):
    spatial_relation(f, 5)


def test_align_relation_equals_reference_two_stage_sampling():
  rng = np.random.default_rng(6)
  m, side, size = 2, 4, 3
  relation = rng.normal(size=(m, side * side, side * side)).astype(np.float32)
  rq = np.float32([0.1, 0.2, 0.9, 0.7])
  rk = np.float32([1.0, 0.0, 0.3, 0.95])  # a mirrored crop
  wq = sampling_matrix(rq, True, size, side, side)
  wk = sampling_matrix(rk, True, size, side, side)
  ours = np.asarray(align_relation(relation, wq, wk))
  ref = _ref_two_stage(
    relation, 2 * np.asarray(grid_points(rq, size)) - 1, 2 * np.asarray(grid_points(rk, size)) - 1
  )
  assert ours.shape == (m, size * size, size * size)
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  # Sampling the relation on both axes with one W equals the relation of the sampled features.
  f = rng.normal(size=(side * side, 6)).astype(np.float32)
  direct = align_relation(spatial_relation(f, 2), wq, wq)
  factored = spatial_relation(wq @ f, 2)
  np.testing.assert_allclose(np.asarray(direct), np.asarray(factored), atol=1e-5)


def test_relation_ce_matches_numpy_and_stops_teacher_gradient():
  rng = np.random.default_rng(7)
  t, s = (
    rng.normal(size=(2, 3, 5)).astype(np.float32),
    rng.normal(size=(2, 3, 5)).astype(np.float32),
  )
  loss = relation_ce(t, s, teacher_temp=0.5, student_temp=1.0)
  np.testing.assert_allclose(float(loss), _np_ce(t, s, 0.5, 1.0), rtol=1e-6)
  g_t, g_s = jax.grad(
    lambda a, b: relation_ce(a, b, teacher_temp=0.5, student_temp=1.0), argnums=(0, 1)
  )(jnp.asarray(t), jnp.asarray(s))
  assert not np.any(np.asarray(g_t))
  assert np.abs(np.asarray(g_s)).max() > 1e-3


# ------------------------------------------------------------------------------------------------- losses


def _views(rng, ng=2, nl=3, b=2, n_global=16, n_local=9, c=8, overlap=True):
  gb = _boxes(rng, (b, ng))
  lb = _boxes(rng, (b, nl), (0.05, 0.4))
  if (
    not overlap
  ):  # globals side by side, exactly touching (still disjoint); locals in a strip below
    gb = np.stack([np.stack([[30 * k, 0, 30, 30] for k in range(ng)])] * b).astype(np.float32)
    lb = np.stack([np.stack([[10 * k, 31, 8, 8] for k in range(nl)])] * b).astype(np.float32)
  flips_g, flips_l = rng.random((b, ng)) < 0.5, rng.random((b, nl)) < 0.5
  geometry = batch_overlaps(gb, flips_g, lb, flips_l)
  feats = dict(
    sg=rng.normal(size=(ng, b, n_global, c)).astype(np.float32),
    tg=rng.normal(size=(ng, b, n_global, c)).astype(np.float32),
    sl=rng.normal(size=(nl, b, n_local, c)).astype(np.float32),
  )
  return feats, geometry


def _ref_spatial(feats, geo, heads, s_gg, s_lg, tt, ts):
  """The reference loops in numpy: sample the FULL relations on both axes (W R W^T), CE per pair."""
  sg, tg, sl = (feats[k].astype(np.float64) for k in ('sg', 'tg', 'sl'))
  ng, nl = sg.shape[0], sl.shape[0]
  side_g, side_l = math.isqrt(sg.shape[2]), math.isqrt(sl.shape[2])
  w_gg = np.asarray(
    sampling_matrix(geo['gg_rects'], geo['gg_valid'][..., None], s_gg, side_g, side_g)
  )
  w_lg_l = np.asarray(
    sampling_matrix(geo['lg_rects'][..., 0, :], geo['lg_valid'], s_lg, side_l, side_l)
  )
  w_lg_g = np.asarray(
    sampling_matrix(geo['lg_rects'][..., 1, :], geo['lg_valid'], s_lg, side_g, side_g)
  )

  def relation(f):  # [B, N, C] -> [B, M, N, N]
    fh = f.reshape(f.shape[:2] + (heads, -1))
    return np.einsum('bnmd,bkmd->bmnk', fh, fh) / math.sqrt(fh.shape[-1])

  def aligned(rel, w):  # [B, M, N, N], [B, P, N] -> [B, M, P, P]
    return np.einsum('bpi,bmik->bmpk', w, np.einsum('bmij,bkj->bmik', rel, w))

  terms = []
  for q in range(ng):
    for v in range(ng):
      if q != v:
        terms.append(
          _np_ce(
            aligned(relation(tg[q]), w_gg[:, q, v, 0]),
            aligned(relation(sg[v]), w_gg[:, q, v, 1]),
            tt,
            ts,
          )
        )
  for q in range(ng):
    for v in range(nl):
      terms.append(
        _np_ce(
          aligned(relation(tg[q]), w_lg_g[:, v, q]),
          aligned(relation(sl[v]), w_lg_l[:, v, q]),
          tt,
          ts,
        )
      )
  return np.mean(terms)


def _ref_channel(feats, tt, ts):
  sg, tg, sl = feats['sg'], feats['tg'], feats['sl']
  rel = lambda f: np.einsum('bnc,bnd->bcd', f.astype(np.float64), f.astype(np.float64)) / f.shape[1]
  terms = [
    _np_ce(rel(tg[q]), rel(s), tt, ts)
    for q in range(tg.shape[0])
    for v, s in enumerate(list(sg) + list(sl))
    if v != q
  ]
  return np.mean(terms)


@pytest.mark.parametrize('temps_on', ['teacher', 'student'])
def test_spatial_loss_matches_reference_loops(temps_on):
  rng = np.random.default_rng(8)
  feats, geo = _views(rng, ng=3, nl=2)
  loss, metrics = _spatial_jit(
    feats['sg'],
    feats['tg'],
    feats['sl'],
    geo['gg_rects'],
    geo['gg_valid'],
    geo['lg_rects'],
    geo['lg_valid'],
    num_heads=2,
    grid_gg=5,
    grid_lg=3,
    temp=0.5,
    other_temp=1.0,
    temps_on=temps_on,
  )
  tt, ts = (0.5, 1.0) if temps_on == 'teacher' else (1.0, 0.5)
  np.testing.assert_allclose(float(loss), _ref_spatial(feats, geo, 2, 5, 3, tt, ts), rtol=1e-5)
  assert set(metrics) == {'spatial_gg', 'spatial_lg', 'overlap_gg', 'overlap_lg'}
  off_diag = ~np.eye(3, dtype=bool)
  np.testing.assert_allclose(float(metrics['overlap_gg']), geo['gg_valid'][:, off_diag].mean())
  np.testing.assert_allclose(float(metrics['overlap_lg']), geo['lg_valid'].mean())
  # Six global-global terms and six global-local terms: the loss is their plain mean.
  np.testing.assert_allclose(
    float(loss), (float(metrics['spatial_gg']) + float(metrics['spatial_lg'])) / 2, rtol=1e-6
  )


def test_spatial_loss_accepts_lists_and_realistic_grids():
  rng = np.random.default_rng(9)
  feats, geo = _views(rng, ng=2, nl=2, b=1, n_global=196, n_local=36, c=12)
  args = (geo['gg_rects'], geo['gg_valid'], geo['lg_rects'], geo['lg_valid'])
  stacked, _ = _spatial_jit(feats['sg'], feats['tg'], feats['sl'], *args, num_heads=3)
  listed, _ = _spatial_jit(
    list(feats['sg']), list(feats['tg']), list(feats['sl']), *args, num_heads=3
  )
  np.testing.assert_allclose(float(stacked), float(listed), rtol=1e-6)
  np.testing.assert_allclose(
    float(stacked), _ref_spatial(feats, geo, 3, 13, 6, 0.5, 1.0), rtol=1e-5
  )


@pytest.mark.parametrize('temps_on', ['teacher', 'student'])
def test_channel_loss_matches_reference_loops(temps_on):
  rng = np.random.default_rng(10)
  feats, _ = _views(rng, ng=3, nl=2, n_global=16, n_local=4)
  loss, metrics = _channel_jit(feats['sg'], feats['tg'], feats['sl'], temp=0.1, temps_on=temps_on)
  tt, ts = (0.1, 1.0) if temps_on == 'teacher' else (1.0, 0.1)
  np.testing.assert_allclose(float(loss), _ref_channel(feats, tt, ts), rtol=1e-5)
  np.testing.assert_allclose(
    float(loss), (float(metrics['channel_gg']) + float(metrics['channel_lg'])) / 2, rtol=1e-6
  )
  only_globals, _ = _channel_jit(feats['sg'], feats['tg'], None, temps_on=temps_on)
  np.testing.assert_allclose(float(only_globals), float(metrics['channel_gg']), rtol=1e-6)


def test_no_overlap_gives_constant_log_s2_and_zero_gradient():
  rng = np.random.default_rng(11)
  feats, geo = _views(rng, ng=2, nl=3, overlap=False)
  assert not geo['gg_valid'][:, 0, 1].any() and not geo['lg_valid'].any()

  def spatial(sg, sl):
    return _spatial_jit(
      sg,
      feats['tg'],
      sl,
      geo['gg_rects'],
      geo['gg_valid'],
      geo['lg_rects'],
      geo['lg_valid'],
      num_heads=2,
      grid_gg=5,
      grid_lg=3,
    )

  (loss, metrics), grads = jax.value_and_grad(spatial, argnums=(0, 1), has_aux=True)(
    jnp.asarray(feats['sg']), jnp.asarray(feats['sl'])
  )
  # 2 global-global terms at log 25 and 6 global-local terms at log 9, all kept in the mean (up to XLA's
  # float32 softmax rounding, ~1e-5 on CPU under jit).
  np.testing.assert_allclose(float(metrics['spatial_gg']), math.log(25), rtol=3e-5)
  np.testing.assert_allclose(float(metrics['spatial_lg']), math.log(9), rtol=3e-5)
  np.testing.assert_allclose(float(loss), (2 * math.log(25) + 6 * math.log(9)) / 8, rtol=3e-5)
  # Constant: other features give bit-identical values.
  other, _ = spatial(jnp.asarray(feats['sg']) * 3 + 1, jnp.asarray(feats['sl']) - 2)
  assert float(other) == float(loss)
  assert float(metrics['overlap_gg']) == 0 and float(metrics['overlap_lg']) == 0
  for g in grads:
    assert not np.any(np.asarray(g))
  channel, _ = _channel_jit(feats['sg'], feats['tg'], feats['sl'])
  assert np.isfinite(float(channel)) and float(channel) > 0


def test_overlapping_batch_has_student_gradient_and_jits():
  rng = np.random.default_rng(12)
  feats, geo = _views(rng)
  fn = jax.jit(
    lambda sg, sl, tg: _spatial_jit(
      sg,
      tg,
      sl,
      geo['gg_rects'],
      geo['gg_valid'],
      geo['lg_rects'],
      geo['lg_valid'],
      num_heads=2,
      grid_gg=5,
      grid_lg=3,
    )[0]
  )
  g_s, g_l, g_t = jax.grad(fn, argnums=(0, 1, 2))(feats['sg'], feats['sl'], feats['tg'])
  assert np.abs(np.asarray(g_s)).max() > 0 and np.all(np.isfinite(np.asarray(g_s)))
  assert np.abs(np.asarray(g_l)).max() > 0
  assert not np.any(np.asarray(g_t))
  g_c = jax.grad(lambda tg: _channel_jit(feats['sg'], tg, feats['sl'])[0])(feats['tg'])
  assert not np.any(np.asarray(g_c))


def test_bad_input_names_the_fix():
  rng = np.random.default_rng(13)
  feats, geo = _views(rng)
  with pytest.raises(ValueError, match='temps_on'):
    sere_channel_loss(feats['sg'], feats['tg'], temps_on='both')
  with pytest.raises(ValueError, match='not a square grid'):
    sere_spatial_loss(
      feats['sg'][:, :, :15],
      feats['tg'][:, :, :15],
      None,
      geo['gg_rects'],
      geo['gg_valid'],
      num_heads=2,
    )
  with pytest.raises(ValueError, match='lg_rects'):
    sere_spatial_loss(
      feats['sg'], feats['tg'], feats['sl'], geo['gg_rects'], geo['gg_valid'], num_heads=2
    )
  with pytest.raises(ValueError, match='batch_overlaps'):
    sere_spatial_loss(
      feats['sg'], feats['tg'], None, geo['gg_rects'][:, :1], geo['gg_valid'], num_heads=2
    )
  with pytest.raises(ValueError, match='at least one'):
    sere_channel_loss(feats['sg'][:1], feats['tg'][:1], None)
