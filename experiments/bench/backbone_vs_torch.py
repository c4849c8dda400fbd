r"""The demo's ViT backbone alone, forward + backward, sslx (jax) against the official DINO ViT (torch).

  python experiments/bench/backbone_vs_torch.py --official=/tmp/dino \
      --torch_python=/tmp/tvenv/bin/python --rounds=3 --core=1

Both sides run the same work on one pinned core (`taskset -c CORE`, torch with one thread): the
4-block, width-64, 2-head, 4-px-patch ViT on 128 crops of 28 px and 384 of 12 px (the demo's
batch of 64 with 2 global and 6 local crops), loss = sum of squared [CLS] outputs, gradients of
every parameter. sslx's side is `sslx.models.vit.ViT` with the demo's `recompute_elementwise`; the
official side is `vision_transformer.VisionTransformer` from the folder passed as --official.
Each round starts one fresh process per side (the order alternates) that compiles / warms up, then
reports the median of 3 repeats of 4 calls, in CPU seconds per call (steadier than wall time on a
shared machine). `--what=dense` times the three products of one Dense layer instead
([10240, K] x [K, M], forward, input gradient and weight gradient) for the block's shapes.
"""

import argparse  # not absl: the torch side runs under the bench-only torch environment
import json
import os
import subprocess
import sys
import time

PARSER = argparse.ArgumentParser(description=__doc__.split("\n")[0])
PARSER.add_argument("--official", default="", help="Folder of the fetched official DINO code.")
PARSER.add_argument("--torch_python", default="", help="A Python with torch.")
PARSER.add_argument("--rounds", type=int, default=3, help="Rounds (fresh processes per side).")
PARSER.add_argument("--core", type=int, default=0, help="The CPU core both sides are pinned to.")
PARSER.add_argument("--what", choices=["backbone", "dense"], default="backbone")
PARSER.add_argument("--side", default="", help="Internal: run one side ('jax' or 'torch').")
FLAGS = argparse.Namespace()

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GLOBAL, LOCAL = (128, 28), (384, 12)  # (crops, side) of the demo's batch of 64
DENSE_SHAPES = [(64, 192), (64, 64), (64, 256), (256, 64)]  # qkv, proj, fc1, fc2
TOKENS = GLOBAL[0] * (1 + (GLOBAL[1] // 4) ** 2) + LOCAL[0] * (1 + (LOCAL[1] // 4) ** 2)


def _median_cpu(fn, calls: int = 4, repeats: int = 3) -> float:
  fn()
  times = []
  for _ in range(repeats):
    c0 = time.process_time()
    for _ in range(calls):
      fn()
    times.append((time.process_time() - c0) / calls)
  return sorted(times)[len(times) // 2]


def jax_side(what: str) -> dict:
  sys.path.insert(0, ROOT)
  import jax
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(0)
  if what == "dense":
    out = {}
    for k, m in DENSE_SHAPES:
      x, w, gy = (
        jnp.asarray(rng.random(s, np.float32)) for s in ((TOKENS, k), (k, m), (TOKENS, m))
      )
      for name, f, args in (
        ("fwd", jax.jit(lambda x, w: x @ w), (x, w)),
        ("dx", jax.jit(lambda gy, w: gy @ w.T), (gy, w)),
        ("dw", jax.jit(lambda x, gy: x.T @ gy), (x, gy)),
      ):
        out[f"{k}x{m} {name}"] = _median_cpu(lambda f=f, a=args: jax.block_until_ready(f(*a)))
    return out
  from sslx.models import vit

  model = vit.ViT(
    patch_size=4, embed_dim=64, depth=4, num_heads=2, pos_grid=7, recompute_elementwise=True
  )
  g = jnp.asarray(rng.random((GLOBAL[0], GLOBAL[1], GLOBAL[1], 3), np.float32))
  loc = jnp.asarray(rng.random((LOCAL[0], LOCAL[1], LOCAL[1], 3), np.float32))
  params = model.init(jax.random.key(0), g[:2], train=False)["params"]

  def loss(p):
    a = model.apply({"params": p}, g, train=False)["cls"]
    b = model.apply({"params": p}, loc, train=False)["cls"]
    return jnp.sum(a**2) + jnp.sum(b**2)

  grad = jax.jit(jax.value_and_grad(loss))
  fwd = jax.jit(loss)
  return {
    "fwd+bwd": _median_cpu(lambda: jax.block_until_ready(grad(params))),
    "fwd": _median_cpu(lambda: jax.block_until_ready(fwd(params))),
  }


def torch_side(what: str) -> dict:
  import torch

  torch.set_num_threads(1)
  torch.manual_seed(0)
  if what == "dense":
    out = {}
    for k, m in DENSE_SHAPES:
      x, w, gy = torch.rand(TOKENS, k), torch.rand(k, m), torch.rand(TOKENS, m)
      out[f"{k}x{m} fwd"] = _median_cpu(lambda: x @ w)
      out[f"{k}x{m} dx"] = _median_cpu(lambda: gy @ w.T)
      out[f"{k}x{m} dw"] = _median_cpu(lambda: x.T @ gy)
    return out
  sys.path.insert(0, FLAGS.official)
  import vision_transformer as official_vit  # the official model code, not in this repository

  model = official_vit.VisionTransformer(
    img_size=[GLOBAL[1]], patch_size=4, embed_dim=64, depth=4, num_heads=2, qkv_bias=True
  )
  g = torch.rand(GLOBAL[0], 3, GLOBAL[1], GLOBAL[1])
  loc = torch.rand(LOCAL[0], 3, LOCAL[1], LOCAL[1])

  def step():
    model.zero_grad()
    ((model(g) ** 2).sum() + (model(loc) ** 2).sum()).backward()

  def forward():
    with torch.no_grad():
      (model(g) ** 2).sum() + (model(loc) ** 2).sum()

  return {"fwd+bwd": _median_cpu(step), "fwd": _median_cpu(forward)}


def main():
  PARSER.parse_args(namespace=FLAGS)
  if FLAGS.side:
    out = jax_side(FLAGS.what) if FLAGS.side == "jax" else torch_side(FLAGS.what)
    print(json.dumps(out))
    return
  if not (FLAGS.torch_python and (FLAGS.official or FLAGS.what == "dense")):
    sys.exit("error: pass --torch_python (and --official for --what=backbone)")
  python = {"jax": sys.executable, "torch": FLAGS.torch_python}
  results: dict[str, list[dict]] = {"jax": [], "torch": []}
  for r in range(FLAGS.rounds):
    for side in ("jax", "torch") if r % 2 == 0 else ("torch", "jax"):
      cmd = ["taskset", "-c", str(FLAGS.core), python[side], os.path.abspath(__file__)]
      cmd += [f"--side={side}", f"--what={FLAGS.what}", f"--official={FLAGS.official}"]
      env = dict(os.environ, OMP_NUM_THREADS="1")
      out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
      if out.returncode:
        sys.exit(f"error: the {side} side failed:\n{out.stderr[-2000:]}")
      results[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
      print(f"round {r + 1} {side}: {results[side][-1]}", flush=True)
  print("median CPU seconds per call (jax / torch = ratio):")
  for key in results["jax"][0]:
    j = sorted(x[key] for x in results["jax"])[FLAGS.rounds // 2]
    t = sorted(x[key] for x in results["torch"])[FLAGS.rounds // 2]
    print(f"  {key:12s} jax {j * 1e3:8.1f} ms  torch {t * 1e3:8.1f} ms  ratio {j / t:.2f}")


if __name__ == "__main__":
  main()
