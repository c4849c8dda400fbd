"""BatchNorm variance as torch computes it (mean of (x - mean)^2), not Flax's fast E[x^2] - E[x]^2.

Inputs whose channels sit far from zero relative to their spread (ViT residual tokens, which SERE
normalises) are where the fast form loses every digit in float32; these cases would fail with it.
"""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sslx.models import heads, resnet

SSLX = pathlib.Path(__file__).resolve().parents[2] / "sslx"


def _offset_tokens(shape=(8, 16, 12), offset=3000.0, seed=0) -> np.ndarray:
  """Per-channel offsets of size ``offset`` around unit-scale noise, in float32."""
  rng = np.random.default_rng(seed)
  centres = offset * (1.0 + rng.random(shape[-1]))
  return (centres + rng.normal(size=shape)).astype(np.float32)


def _reference_bn(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
  """Train-mode BatchNorm over every axis but the last, in float64 (torch's maths)."""
  x64 = x.astype(np.float64)
  axes = tuple(range(x.ndim - 1))
  mean = x64.mean(axes)
  var = ((x64 - mean) ** 2).mean(axes)
  return (x64 - mean) / np.sqrt(var + eps)


def test_fast_variance_really_fails_on_these_inputs():
  """Guards the test's premise: Flax's default BatchNorm is far off on the same inputs."""
  x = _offset_tokens()
  fast = nn.BatchNorm(use_running_average=False, epsilon=1e-5)
  y, _ = fast.init_with_output(jax.random.key(0), jnp.asarray(x))
  assert np.max(np.abs(np.asarray(y) - _reference_bn(x))) > 0.1


def test_sere_projection_matches_two_pass_batchnorm():
  x = _offset_tokens()
  y, _ = heads.SereProjection().init_with_output(jax.random.key(0), jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y), np.maximum(_reference_bn(x), 0.0), atol=2e-3)


def test_resnet_batch_norm_matches_two_pass_batchnorm():
  x = _offset_tokens(shape=(4, 5, 5, 6))
  y, _ = resnet.batch_norm(train=True).init_with_output(jax.random.key(0), jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y), _reference_bn(x), atol=2e-3)


def test_every_batchnorm_in_sslx_uses_the_two_pass_variance():
  """A new nn.BatchNorm(...) anywhere in the library must say use_fast_variance=False."""
  calls = []
  for path in SSLX.rglob("*.py"):
    text = path.read_text()
    for m in re.finditer(r"nn\.BatchNorm\(", text):
      # The call's arguments: up to the matching closing parenthesis.
      depth, i = 1, m.end()
      while depth:
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
      calls.append((path.name, text[m.end() : i]))
  assert len(calls) >= 6, calls
  bad = [name for name, args in calls if "use_fast_variance=False" not in args]
  assert not bad, f"nn.BatchNorm without use_fast_variance=False in {bad}"
