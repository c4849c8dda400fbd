"""Linear and attentive probes: they learn separable data, attend where the signal is, and run
on checkpoints of any method (CAE and DINO smoke workdirs)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx.eval import probe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = probe.ProbeSettings(lr=0.5, batch_size=64, epochs=8, warmup_epochs=1.0)


def _batches(x, y, bs=100, pad=True):
  """Eval-style batches; the last one padded with mask=False rows like pipeline.eval_dataset."""
  out = []
  for i in range(0, len(x), bs):
    xb, yb = x[i : i + bs], y[i : i + bs]
    mask = np.ones(len(yb), bool)
    if pad and len(yb) < bs:
      extra = bs - len(yb)
      xb = np.concatenate([xb, np.zeros((extra,) + xb.shape[1:], xb.dtype)])
      yb = np.concatenate([yb, -np.ones(extra, yb.dtype)])
      mask = np.concatenate([mask, np.zeros(extra, bool)])
    out.append({"image": xb, "label": yb, "mask": mask})
  return out


def test_linear_probe_separates_gaussian_blobs_and_drops_padding():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(4, 16)) * 3
  y = rng.integers(0, 4, 650).astype(np.int32)
  x = (centers[y] + rng.normal(size=(650, 16))).astype(np.float32)
  res = probe.linear_probe(
    lambda a: a,
    _batches(x[:500], y[:500]),
    _batches(x[500:], y[500:]),
    num_classes=4,
    settings=FAST,
  )
  assert res["num_train"] == 500 and res["num_test"] == 150  # padding rows dropped
  assert res["top1"] > 95.0


def test_attentive_probe_finds_the_informative_token_that_averaging_misses():
  # Class = sign pattern hidden in one token whose position varies; the other tokens are noise
  # with the same marginal statistics. A "marker" dimension flags the informative token, so a
  # query can find it by attention; a linear probe on the token average cannot.
  rng = np.random.default_rng(1)
  n, t, d = 1200, 16, 16
  y = rng.integers(0, 2, n).astype(np.int32)
  x = rng.normal(size=(n, t, d)).astype(np.float32)
  pos = rng.integers(0, t, n)
  x[np.arange(n), pos, 0] = 6.0  # marker
  x[np.arange(n), pos, 1] = np.where(y == 1, 3.0, -3.0)
  s = probe.ProbeSettings(lr=0.1, batch_size=64, epochs=10, warmup_epochs=1.0)
  att = probe.attentive_probe(
    lambda a: a,
    _batches(x[:1000], y[:1000]),
    _batches(x[1000:], y[1000:]),
    num_classes=2,
    settings=s,
  )
  lin = probe.linear_probe(
    lambda a: a.mean(1),
    _batches(x[:1000], y[:1000]),
    _batches(x[1000:], y[1000:]),
    num_classes=2,
    settings=s,
  )
  assert att["top1"] > 90.0
  assert lin["top1"] < att["top1"] - 10.0


def test_probe_heads_have_batchnorm_without_affine():
  head = probe.AttentiveHead(num_classes=3, num_heads=2)
  v = jax.eval_shape(lambda: head.init(jax.random.PRNGKey(0), jnp.zeros((2, 5, 8)), train=False))
  assert "bn" not in v["params"] and set(v["batch_stats"]["bn"]) == {"mean", "var"}
  assert v["params"]["query_token"].shape == (1, 1, 8)
  assert "bias" not in v["params"]["cross_attn"]["k"]
  with pytest.raises(ValueError, match="optimizer"):
    probe.train_and_score(
      probe.LinearHead(2),
      np.zeros((4, 3), np.float32),
      np.zeros(4, np.int32),
      np.zeros((2, 3), np.float32),
      np.zeros(2, np.int32),
      probe.ProbeSettings(optimizer="adam"),
    )


# Probes on real checkpoints of every method: tests/train/test_every_mode.py.
