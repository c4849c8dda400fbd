r"""Bytes a ViT keeps from its forward pass for the backward pass, per image and crop size.

  python experiments/bench/saved_activations.py                       # ViT-S/16, bf16, 224 and 96
  python experiments/bench/saved_activations.py --recompute_elementwise

Traces (does not run) the gradient of the backbone for one image and sums the residuals autodiff
saves (``jax.ad_checkpoint``'s saved_residuals), grouped by dtype. Activation memory and the HBM
traffic of writing and re-reading it scale with this number. The attention path is the explicit
one ('xla'): cuDNN's fused kernel saves no [T, T] scores, so the rows without them are printed too.
"""

import argparse
import collections
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from jax._src.ad_checkpoint import saved_residuals  # noqa: E402  pylint: disable=g-import-not-at-top

from sslx.models import vit  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="small")
  parser.add_argument("--patch", type=int, default=16)
  parser.add_argument("--sizes", default="224,96")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--recompute_elementwise", action="store_true")
  args = parser.parse_args()
  model = vit.ViT(
    patch_size=args.patch,
    drop_path_rate=0.1,
    dtype=jnp.dtype(args.dtype),
    attention="xla",
    recompute_elementwise=args.recompute_elementwise,
    **vit.vit_kwargs(args.variant),
  )
  for size in (int(s) for s in args.sizes.split(",")):
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))["params"]
    params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), params)

    def loss(p, x=x):
      out = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(1)})
      return jnp.sum(out["cls"]) + jnp.sum(out["patch"])

    by_dtype, scores = collections.Counter(), 0
    for aval, _ in saved_residuals(loss, params):
      if aval.ndim >= 3:  # activations (parameters and their bf16 copies are 2-D or less)
        by_dtype[str(aval.dtype)] += aval.size * aval.dtype.itemsize
        if aval.ndim == 4 and aval.shape[-1] == aval.shape[-2]:
          scores += aval.size * aval.dtype.itemsize
    total = sum(by_dtype.values())
    parts = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in sorted(by_dtype.items()))
    print(
      f"{size}px, recompute_elementwise={args.recompute_elementwise}: "
      f"{total / 2**20:.2f} MiB per image ({parts}); "
      f"without the [T, T] attention scores {(total - scores) / 2**20:.2f} MiB"
    )


if __name__ == "__main__":
  main()
