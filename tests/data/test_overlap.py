"""SERE crop overlap rects: hand cases, batch layout and consistency, speed, bad input."""

import time

import numpy as np
import pytest

from sslx.data.overlap import batch_overlaps, overlap_rects


def _random_boxes(rng, shape, height=180, width=240):
  """Integer RandomResizedCrop-like boxes (x0, y0, w, h) inside a height x width image, float32."""
  w = rng.integers(8, width + 1, size=shape)
  h = rng.integers(8, height + 1, size=shape)
  x0 = rng.integers(0, width - w + 1)
  y0 = rng.integers(0, height - h + 1)
  return np.stack([x0, y0, w, h], axis=-1).astype(np.float32)


def test_identical_crops_give_the_full_crop():
  rq, rk, valid = overlap_rects((10, 20, 30, 40), False, (10, 20, 30, 40), False)
  assert valid
  np.testing.assert_array_equal(rq, [0, 0, 1, 1])
  np.testing.assert_array_equal(rk, [0, 0, 1, 1])
  assert rq.dtype == np.float32


def test_flip_mirrors_x_in_that_crop_only():
  rq, rk, valid = overlap_rects((10, 20, 30, 40), True, (10, 20, 30, 40), False)
  assert valid
  np.testing.assert_array_equal(rq, [1, 0, 0, 1])
  np.testing.assert_array_equal(rk, [0, 0, 1, 1])


@pytest.mark.parametrize(
  'box_k', [(10, 0, 10, 10), (0, 10, 10, 10), (10, 10, 5, 5), (30, 30, 4, 4)]
)
def test_touching_or_disjoint_crops_are_invalid(box_k):
  rq, rk, valid = overlap_rects((0, 0, 10, 10), False, box_k, True)
  assert not valid
  np.testing.assert_array_equal(rq, np.zeros(4))
  np.testing.assert_array_equal(rk, np.zeros(4))


def test_partial_overlap_by_hand():
  # q spans x [0, 100], y [0, 50]; k spans x [50, 150], y [25, 125] -> overlap x [50, 100], y [25, 50].
  rq, rk, valid = overlap_rects((0, 0, 100, 50), False, (50, 25, 100, 100), False)
  assert valid
  np.testing.assert_allclose(rq, [0.5, 0.5, 1.0, 1.0])
  np.testing.assert_allclose(rk, [0.0, 0.0, 0.5, 0.25])
  # Flipping k mirrors its x range: [0, 0.5] -> [1, 0.5].
  rq2, rk2, _ = overlap_rects((0, 0, 100, 50), False, (50, 25, 100, 100), True)
  np.testing.assert_allclose(rq2, rq)
  np.testing.assert_allclose(rk2, [1.0, 0.0, 0.5, 0.25])
  # Swapping the roles swaps the rects.
  rk3, rq3, _ = overlap_rects((50, 25, 100, 100), False, (0, 0, 100, 50), False)
  np.testing.assert_array_equal(rq3, rq)
  np.testing.assert_array_equal(rk3, rk)


def test_float_boxes_nested_overlap():
  # k = (2.5, 1.25, 5, 2.5) lies inside q = (0, 0, 10, 5): in q's coords [0.25, 0.25, 0.75, 0.75].
  rq, rk, valid = overlap_rects((0.0, 0.0, 10.0, 5.0), True, (2.5, 1.25, 5.0, 2.5), False)
  assert valid
  np.testing.assert_allclose(rq, [0.75, 0.25, 0.25, 0.75])
  np.testing.assert_array_equal(rk, [0, 0, 1, 1])


def test_batch_layout_matches_pairwise_calls():
  rng = np.random.default_rng(0)
  b, ng, nl = 5, 3, 4
  gb, lb = (
    _random_boxes(rng, (b, ng)),
    _random_boxes(
      rng,
      (b, nl),
    )
    * np.float32([1, 1, 0.4, 0.4]),
  )
  gf, lf = rng.random((b, ng)) < 0.5, rng.random((b, nl)) < 0.5
  out = batch_overlaps(gb, gf, lb, lf)
  assert out['gg_rects'].shape == (b, ng, ng, 2, 4) and out['gg_rects'].dtype == np.float32
  assert out['gg_valid'].shape == (b, ng, ng) and out['gg_valid'].dtype == bool
  assert out['lg_rects'].shape == (b, nl, ng, 2, 4) and out['lg_valid'].shape == (b, nl, ng)
  for i in range(b):
    for q in range(ng):
      for k in range(ng):
        rq, rk, valid = overlap_rects(gb[i, q], gf[i, q], gb[i, k], gf[i, k])
        assert out['gg_valid'][i, q, k] == valid
        np.testing.assert_array_equal(out['gg_rects'][i, q, k, 0], rq)
        np.testing.assert_array_equal(out['gg_rects'][i, q, k, 1], rk)
      for v in range(nl):
        rl, rg, valid = overlap_rects(lb[i, v], lf[i, v], gb[i, q], gf[i, q])
        assert out['lg_valid'][i, v, q] == valid
        np.testing.assert_array_equal(out['lg_rects'][i, v, q, 0], rl)
        np.testing.assert_array_equal(out['lg_rects'][i, v, q, 1], rg)
  # The diagonal is the whole crop (mirrored when flipped); (q, k) and (k, q) swap the two rects.
  diag = out['gg_rects'][:, np.arange(ng), np.arange(ng), 0]
  full = np.where(gf[..., None], np.float32([1, 0, 0, 1]), np.float32([0, 0, 1, 1]))
  np.testing.assert_array_equal(diag, full)
  np.testing.assert_array_equal(
    out['gg_rects'][..., 0, :], np.swapaxes(out['gg_rects'][..., 1, :], 1, 2)
  )
  # Random small locals must sometimes miss a global, or this test checks nothing about invalid pairs.
  assert 0 < out['lg_valid'].sum() < out['lg_valid'].size
  assert np.all(out['lg_rects'][~out['lg_valid']] == 0)


def test_single_record_and_no_locals():
  rng = np.random.default_rng(1)
  gb, gf = _random_boxes(rng, (2,)), np.array([True, False])
  one = batch_overlaps(gb, gf)
  assert one['gg_rects'].shape == (2, 2, 2, 4) and one['lg_rects'].shape == (0, 2, 2, 4)
  batched = batch_overlaps(gb[None], gf[None])
  np.testing.assert_array_equal(batched['gg_rects'][0], one['gg_rects'])


def test_rects_lie_in_the_unit_square_and_flip_orders_x():
  rng = np.random.default_rng(2)
  gb = _random_boxes(rng, (64, 2))
  gf = rng.random((64, 2)) < 0.5
  out = batch_overlaps(gb, gf)
  r, valid = out['gg_rects'], out['gg_valid']
  assert valid.mean() > 0.5
  assert np.all((r >= 0) & (r <= 1))
  rv = r[valid]  # [P, 2, 4]
  flips = np.stack(
    [
      np.broadcast_to(gf[:, :, None], valid.shape)[valid],
      np.broadcast_to(gf[:, None, :], valid.shape)[valid],
    ],
    axis=1,
  )
  assert np.all((rv[..., 0] > rv[..., 2]) == flips)
  assert np.all(rv[..., 1] < rv[..., 3])


def test_fast_enough_per_record():
  rng = np.random.default_rng(3)
  gb, lb = _random_boxes(rng, (256, 2)), _random_boxes(rng, (256, 10))
  gf, lf = rng.random((256, 2)) < 0.5, rng.random((256, 10)) < 0.5
  best = min(_timed(lambda: batch_overlaps(gb, gf, lb, lf)) for _ in range(3))
  assert best / 256 < 1e-3, f'{best / 256 * 1e6:.0f} us per record'
  best_one = min(_timed(lambda: batch_overlaps(gb[0], gf[0], lb[0], lf[0])) for _ in range(3))
  assert best_one < 1e-3, f'{best_one * 1e6:.0f} us for one record'


def _timed(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def test_bad_input_names_the_fix():
  with pytest.raises(ValueError, match='w, h > 0'):
    overlap_rects((0, 0, 0, 10), False, (0, 0, 10, 10), False)
  with pytest.raises(ValueError, match=r'\[\.\.\., 4\]'):
    batch_overlaps(np.zeros((2, 2, 3)), np.zeros((2, 2), bool))
  with pytest.raises(ValueError, match='both local_boxes and local_flips'):
    batch_overlaps(np.ones((2, 2, 4)), np.zeros((2, 2), bool), np.ones((2, 3, 4)))
  with pytest.raises(ValueError, match='leading'):
    batch_overlaps(
      np.ones((2, 2, 4)), np.zeros((2, 2), bool), np.ones((3, 3, 4)), np.zeros((3, 3), bool)
    )
