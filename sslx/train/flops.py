"""Matrix-product FLOPs of a JAX function, counted from its jaxpr (the same on every backend).

XLA's cost analysis depends on the backend: on GPUs the matrix products that become cuBLAS or
cuDNN custom calls are left out (an H100 reported 11 of DINO ViT-S/16's 126 GFLOP per image), so
MFU computed from it is meaningless there. Counting `dot_general` and `conv_general_dilated` in the
traced program gives the model FLOPs that MFU is defined on (2 per multiply-add; elementwise work,
normalisation and softmax are not counted, as is usual for MFU).

Fused kernels that are not a `dot_general` (cuDNN flash attention) are not seen: count a variant
of the model with explicit attention when those FLOPs matter (experiments/bench.py does).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core as jex_core


def _dot_flops(eqn: Any) -> float:
  (contract_lhs, _), _ = eqn.params["dimension_numbers"]
  # Each output element (batch x lhs-free x rhs-free) is a dot of prod(contracted) terms.
  contract = math.prod(eqn.invars[0].aval.shape[d] for d in contract_lhs)
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * contract


def _conv_flops(eqn: Any) -> float:
  rhs = eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  spec = eqn.params["dimension_numbers"]
  # rhs_spec = (out-feature dim, in-feature dim, *spatial dims) as axis indices of the kernel.
  rhs_spec = spec.rhs_spec
  in_features = rhs[rhs_spec[1]]
  window = math.prod(rhs[d] for d in rhs_spec[2:])
  return 2.0 * math.prod(out) * in_features * window


def _sub_jaxprs(value: Any) -> list:
  if isinstance(value, jex_core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jex_core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def jaxpr_flops(jaxpr: Any) -> float:
  """FLOPs of the matrix products and convolutions in a (Closed)Jaxpr, sub-programs included.

  A `scan` counts its body `length` times; a `cond` its most expensive branch; a `while` loop its
  body once (its trip count is not static).
  """
  if isinstance(jaxpr, jex_core.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "cond":
      total += max((jaxpr_flops(b) for b in eqn.params["branches"]), default=0.0)
    elif name == "scan":
      total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"])
    else:
      for value in eqn.params.values():
        for sub in _sub_jaxprs(value):
          total += jaxpr_flops(sub)
  return total


def function_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
  """Matrix-product FLOPs of one call of `fn(*args, **kwargs)` (arrays or ShapeDtypeStructs).

  For a function jitted over a mesh this is the whole (global) program: divide by the number of
  devices for one device's share.
  """
  return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs))
