"""RandomResizedCrop resampling on the accelerator (``config.data.crops_on = 'device'``).

Why: on the host, PIL's resampling of 12 crops takes about three quarters of the time per image
(experiments/bench/RESULTS.md), so the host cannot feed a GPU. In device mode the host only decodes
each image into a fixed ``canvas`` and samples the boxes; the crops are resampled here, batched,
as two matrix products per crop (columns, then rows).

The weights are PIL's (``Resample.c``): for output pixel i of a box [b0, b0 + n) resized to S
pixels, scale = n / S, the filter is stretched by max(scale, 1) (antialiasing when shrinking), the
sample centre is b0 + (i + 0.5) * scale, taps outside the image's valid extent are dropped and the
rest renormalised; like PIL, columns are resampled first and rounded to uint8 before the rows.
PIL's weights are fixed-point, ours float32, so results differ from ``crops.resize_box`` by at
most one grey level (tests/data/test_device_crops.py).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def _bicubic(x: Array) -> Array:
  a = -0.5  # PIL's (and torchvision's antialiased) Keys cubic
  x = jnp.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def _bilinear(x: Array) -> Array:
  return jnp.maximum(1.0 - jnp.abs(x), 0.0)


def _box(x: Array) -> Array:
  return ((x > -0.5) & (x <= 0.5)).astype(x.dtype)


def _hamming(x: Array) -> Array:
  x = jnp.abs(x)
  px = jnp.pi * jnp.maximum(x, 1e-12)
  w = jnp.sin(px) / px * (0.54 + 0.46 * jnp.cos(px))
  return jnp.where(x == 0.0, 1.0, jnp.where(x < 1.0, w, 0.0))


def _lanczos(x: Array) -> Array:
  def sinc(v):
    pv = jnp.pi * jnp.where(v == 0.0, 1.0, v)
    return jnp.where(v == 0.0, 1.0, jnp.sin(pv) / pv)

  return jnp.where(jnp.abs(x) < 3.0, sinc(x) * sinc(x / 3.0), 0.0)


# name -> (kernel, support in output pixels at scale 1), as PIL defines them.
FILTERS: dict[str, tuple[Callable[[Array], Array], float]] = {
  'bicubic': (_bicubic, 2.0),
  'bilinear': (_bilinear, 1.0),
  'box': (_box, 0.5),
  'hamming': (_hamming, 1.0),
  'lanczos': (_lanczos, 3.0),
}


def resample_weights(
  start: Array,
  length: Array,
  extent: Array,
  out_size: int,
  in_size: int,
  interpolation: str = 'bicubic',
) -> Array:
  """Dense 1-D resampling matrices, PIL's coefficients.

  Args:
    start, length: [...] float, the box along this axis in canvas pixels.
    extent: [...] int, valid pixels along this axis (the rest of the canvas is padding).
    out_size: output pixels S.
    in_size: canvas pixels C.
    interpolation: a key of FILTERS.
  Returns:
    float32 [..., S, C]; each row sums to 1 over the valid pixels (0 elsewhere).
  """
  kernel, support = FILTERS[interpolation.lower()]
  start, length = start[..., None, None], length[..., None, None]
  scale = length / out_size
  stretch = jnp.maximum(scale, 1.0)
  centre = start + (jnp.arange(out_size, dtype=jnp.float32)[:, None] + 0.5) * scale
  j = jnp.arange(in_size, dtype=jnp.float32)
  offset = j + 0.5 - centre
  w = kernel(offset / stretch)
  # PIL's tap window [round(centre - support), round(centre + support)), clipped to the image.
  reach = support * stretch
  inside = (
    (j >= jnp.floor(centre - reach + 0.5))
    & (j < jnp.floor(centre + reach + 0.5))
    & (j < extent[..., None, None])
  )
  w = jnp.where(inside, w, 0.0)
  total = jnp.sum(w, axis=-1, keepdims=True)
  return w / jnp.where(total == 0.0, 1.0, total)


def _pixel_einsum(spec: str, weights: Array, pixels: Array) -> Array:
  """einsum of float32 filter weights with integer pixel values in [0, 255], at float32 accuracy.

  GPUs run a default-precision float32 product as TF32 (10-bit mantissa), which put crops up to
  2 grey levels off PIL on an H100. 0..255 are exact in bfloat16, so the weights are split into
  three bfloat16 pieces (8 + 8 + 8 mantissa bits, float32's 24) and the product runs as three
  16-bit tensor-core passes with float32 accumulation; on a CPU it equals the float32 product.
  """
  px = pixels.astype(jnp.bfloat16)
  rest = weights.astype(jnp.float32)
  terms = []
  for _ in range(3):
    piece = rest.astype(jnp.bfloat16)
    rest = rest - piece.astype(jnp.float32)
    terms.append(jnp.einsum(spec, piece, px, preferred_element_type=jnp.float32))
  return terms[0] + terms[1] + terms[2]


def _round_half_up(x: Array) -> Array:
  return jnp.floor(x + 0.5)  # PIL's fixed-point rounding; jnp.round would round half to even


def crop_resize(
  canvas: Array,
  extent: Array,
  boxes: Array,
  flips: Array,
  size: int,
  interpolation: str = 'bicubic',
) -> Array:
  """Crops and resizes boxes of canvases, then mirrors the flipped ones.

  Args:
    canvas: uint8 [B, C, C, 3]; image b occupies [0, extent[b, 0]) x [0, extent[b, 1]).
    extent: int32 [B, 2] valid (height, width).
    boxes: float32 [B, N, 4] (x0, y0, w, h) in canvas pixels.
    flips: bool [B, N].
    size: output side S.
  Returns:
    uint8 [B, N, S, S, 3], rounded like PIL's output.
  """
  c = canvas.shape[1]
  wy = resample_weights(boxes[..., 1], boxes[..., 3], extent[:, None, 0], size, c, interpolation)
  wx = resample_weights(boxes[..., 0], boxes[..., 2], extent[:, None, 1], size, c, interpolation)
  # Columns first, then uint8 rounding and clipping, then rows: PIL's order, which matters
  # because bicubic and lanczos overshoot [0, 255] at edges.
  cols = jnp.clip(_round_half_up(_pixel_einsum('bnxw,bhwc->bnhxc', wx, canvas)), 0.0, 255.0)
  out = _pixel_einsum('bnyh,bnhxc->bnyxc', wy, cols)
  out = jnp.where(flips[:, :, None, None, None], out[:, :, :, ::-1], out)
  return jnp.clip(_round_half_up(out), 0, 255).astype(jnp.uint8)


def canvas_crops(
  batch: dict[str, Array], global_size: int, local_size: int, interpolation: str = 'bicubic'
) -> dict[str, Array]:
  """'global_crops' and 'local_crops' of a device-mode batch (see ``pipeline.train_dataset``).

  Args:
    batch: with 'canvas' uint8 [B, C, C, 3], 'canvas_extent' int32 [B, 2], 'canvas_scale'
      float32 [B, 2] (canvas pixels per original pixel along y, x), and the crops' original-pixel
      'global_boxes' / 'local_boxes' [B, N, 4] and 'global_flips' / 'local_flips' [B, N].
  Returns:
    The batch with the canvas keys replaced by 'global_crops' uint8 [B, Ng, G, G, 3] and
    'local_crops' [B, Nl, L, L, 3].
  """
  sy, sx = batch['canvas_scale'][:, None, 0], batch['canvas_scale'][:, None, 1]
  out = {k: v for k, v in batch.items() if not k.startswith('canvas')}
  for prefix, size in (('global', global_size), ('local', local_size)):
    boxes = batch[f'{prefix}_boxes']
    if boxes.shape[1] == 0:
      b = boxes.shape[0]
      out[f'{prefix}_crops'] = jnp.zeros((b, 0, size, size, 3), jnp.uint8)
      continue
    scaled = jnp.stack(
      [boxes[..., 0] * sx, boxes[..., 1] * sy, boxes[..., 2] * sx, boxes[..., 3] * sy], axis=-1
    )
    out[f'{prefix}_crops'] = crop_resize(
      batch['canvas'], batch['canvas_extent'], scaled, batch[f'{prefix}_flips'], size, interpolation
    )
  return out


def flops_per_image(canvas_size: int, specs: list[tuple[int, int]]) -> float:
  """Multiply-adds x 2 of ``crop_resize`` per source image for [(number, size), ...] crops.

  Counts the three bfloat16 passes `_pixel_einsum` makes of each of the two products.
  """
  c = canvas_size
  return float(sum(3 * 2 * n * 3 * (s * c * c + s * s * c) for n, s in specs if n))
