"""Host RandAugment (sslx/data/randaugment.py): policy parsing, determinism, every operation."""

import numpy as np
import pytest

from sslx.data import randaugment


def test_policy_string():
  ra = randaugment.RandAugment.from_policy("rand-m9-mstd0.5-inc1")
  assert (ra.magnitude, ra.num_ops, ra.magnitude_std) == (9.0, 2, 0.5)
  ra = randaugment.RandAugment.from_policy("rand-n3-m7-inc1")
  assert (ra.magnitude, ra.num_ops, ra.magnitude_std) == (7.0, 3, 0.5)
  for bad in ("auto", "rand-m9", "rand-m9-x1-inc1"):
    with pytest.raises(randaugment.RandAugmentError, match="rand-m"):
      randaugment.RandAugment.from_policy(bad)


def test_same_generator_same_image():
  img = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
  ra = randaugment.RandAugment.from_policy("rand-m9-mstd0.5-inc1")
  a = ra(img, np.random.default_rng([0, 1, 2]))
  b = ra(img, np.random.default_rng([0, 1, 2]))
  np.testing.assert_array_equal(a, b)
  assert a.dtype == np.uint8 and a.shape == img.shape
  outs = [ra(img, np.random.default_rng([0, 1, s])) for s in range(8)]
  assert any(not np.array_equal(o, img) for o in outs)


@pytest.mark.parametrize("name", sorted(randaugment.OPS))
def test_every_operation_keeps_shape_and_dtype(name):
  img = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  from PIL import Image

  ctx = randaugment._Context(Image.Resampling.BICUBIC, (124, 116, 104))
  out = np.asarray(randaugment.OPS[name](Image.fromarray(img), 9.0, np.random.default_rng(0), ctx))
  assert out.shape == img.shape and out.dtype == np.uint8


def test_fill_from_mean():
  assert randaugment.fill_from_mean((0.485, 0.456, 0.406)) == (124, 116, 104)
