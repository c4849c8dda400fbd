"""ResNet stage shapes, cross-device BatchNorm, SaGe decoder shape and range."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx.models.decoders import SageDecoder
from sslx.models.mlp import MLP
from sslx.models.resnet import ResNet, stage_channels

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _shapes(model, size):
  x = jnp.zeros((2, size, size, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))
  return {k: v.shape for k, v in out.items()}, n


def test_resnet50_imagenet_stages_and_size():
  shapes, n = _shapes(ResNet(depth=50), 224)
  assert shapes == {
    "c2": (2, 56, 56, 256),
    "c3": (2, 28, 28, 512),
    "c4": (2, 14, 14, 1024),
    "c5": (2, 7, 7, 2048),
    "pooled": (2, 2048),
  }
  assert n == 23_508_032  # torchvision resnet50 without fc: 25,557,032 - 2,049,000


def test_resnet18_stages_and_size():
  shapes, n = _shapes(ResNet(depth=18), 224)
  assert shapes["c5"] == (2, 7, 7, 512) and shapes["c2"] == (2, 56, 56, 64)
  assert n == 11_176_512  # torchvision resnet18 without fc: 11,689,512 - 513,000


def test_cifar_stem_narrow_resnet18_at_32px():
  shapes, _ = _shapes(ResNet(depth=18, width=8, stem="cifar"), 32)
  assert [shapes[k][1:] for k in ("c2", "c3", "c4", "c5")] == [
    (32, 32, 8),
    (16, 16, 16),
    (8, 8, 32),
    (4, 4, 64),
  ]
  assert stage_channels(18, 8) == (8, 16, 32, 64)
  assert stage_channels(50) == (256, 512, 1024, 2048)


def test_unknown_depth_or_stem_is_a_clear_error():
  with pytest.raises(ValueError, match="config.model.depth"):
    _shapes(ResNet(depth=19), 32)
  with pytest.raises(ValueError, match="config.model.stem"):
    _shapes(ResNet(depth=18, stem="nope"), 32)


def test_train_mode_uses_batch_statistics_and_updates_running_stats():
  # ResNet, decoder and MLP share sslx.models.resnet.batch_norm; the MLP compiles fastest.
  model = MLP(hidden_dim=16, out_dim=4)
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 6)) * 3 + 2
  v = model.init(jax.random.PRNGKey(0), x, train=False)
  train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  _, upd = train(v, x)
  assert not np.allclose(v["batch_stats"]["bn1"]["mean"], upd["batch_stats"]["bn1"]["mean"])
  # Batch statistics: the same examples give different outputs in a different batch.
  out2, _ = train(v, jnp.concatenate([x[:4], x[:4] * 0.5]))
  out3, _ = train(v, jnp.concatenate([x[:4], x[4:]]))
  assert not np.allclose(out2[:4], out3[:4], atol=1e-4)
  # Eval mode uses the running statistics: per-example, batch-independent.
  ev = jax.jit(lambda v, x: model.apply(v, x, train=False))
  np.testing.assert_allclose(ev(v, x)[:4], ev(v, x[:4]), rtol=1e-5, atol=1e-6)


BN_SCRIPT = r"""
import json, os, sys
n = int(sys.argv[1])
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, sys.argv[2])
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from sslx.models.mlp import MLP
model = MLP(hidden_dim=16, out_dim=4)
x = jax.random.normal(jax.random.PRNGKey(1), (8, 6)) * 2 + 1
v = model.init(jax.random.PRNGKey(0), x, train=False)
mesh = Mesh(np.array(jax.devices()), ("data",))
xs = jax.device_put(x, NamedSharding(mesh, P("data")))
f = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
out, upd = f(v, xs)
print(json.dumps({"shards": len(xs.sharding.device_set), "out": np.asarray(out).tolist(),
                  "mean": np.asarray(upd["batch_stats"]["bn1"]["mean"]).tolist()}))
"""


def test_batchnorm_statistics_are_global_over_devices():
  """Under jit on a batch sharded over 4 devices, BN normalises with the global batch
  (the per-device statistics of 2 examples would differ from the 8-example ones)."""
  runs = []
  for n in (1, 4):
    r = subprocess.run(
      [sys.executable, "-c", BN_SCRIPT, str(n), ROOT], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
  assert runs[1]["shards"] == 4
  np.testing.assert_allclose(runs[0]["out"], runs[1]["out"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(runs[0]["mean"], runs[1]["mean"], rtol=1e-4, atol=1e-6)


def test_mlp_shapes():
  m = MLP(hidden_dim=16, out_dim=8)
  v = m.init(jax.random.PRNGKey(0), jnp.ones((4, 12)), train=False)
  assert v["params"]["fc1"]["kernel"].shape == (12, 16)
  assert "bn1" in v["batch_stats"] and "fc2" in v["params"] and "bn2" not in v["params"]
  out, _ = m.apply(v, jnp.ones((4, 12)), train=True, mutable=["batch_stats"])
  assert out.shape == (4, 8)


def test_decoder_paper_geometry():
  dec = SageDecoder()
  c5 = jnp.zeros((2, 7, 7, 2048))
  v = jax.eval_shape(lambda: dec.init(jax.random.PRNGKey(0), c5, train=False))
  out = jax.eval_shape(lambda v: dec.apply(v, c5, train=False), v)
  assert out.shape == (2, 224, 224, 3)
  p = v["params"]
  assert p["conv_code"]["kernel"].shape == (7, 7, 2048, 512)
  assert p["deconv_stem"]["kernel"].shape == (7, 7, 512, 256)
  assert [p[f"deconv{i}"]["kernel"].shape[-1] for i in range(5)] == [512, 256, 128, 64, 32]
  assert "bias" not in p["deconv0"]


def test_decoder_transposed_convs_take_torchs_fan_in():
  """torch's ConvTranspose2d weight is [in, out, k, k]; kaiming fan_in is out * k^2 there."""
  dec = SageDecoder(bottleneck_dim=64, stem_channels=32, up_channels=(16,))
  v = dec.init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 3, 8)), train=False)["params"]
  for name, out, k in (("deconv_stem", 32, 3), ("deconv0", 16, 4)):
    std = float(np.std(np.asarray(v[name]["kernel"])))
    assert std == pytest.approx(np.sqrt(2.0 / (out * k * k)), rel=0.1), name
  std = float(np.std(np.asarray(v["conv_code"]["kernel"])))  # a plain conv: in * k^2
  assert std == pytest.approx(np.sqrt(2.0 / (8 * 9)), rel=0.1)


def test_decoder_small_output_shape_and_range():
  dec = SageDecoder(bottleneck_dim=8, stem_channels=4, up_channels=(4, 4))
  c5 = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 2, 8)) * 50
  v = jax.jit(lambda c5: dec.init(jax.random.PRNGKey(1), c5, train=False))(c5)
  out, _ = jax.jit(lambda v, c5: dec.apply(v, c5, train=True, mutable=["batch_stats"]))(v, c5)
  assert out.shape == (3, 8, 8, 3)
  assert float(jnp.max(jnp.abs(out))) <= 1.0
  assert float(jnp.std(out)) > 0.05  # not a constant image
