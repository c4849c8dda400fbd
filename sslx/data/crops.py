"""Host-side crop geometry and multi-crop (numpy + PIL), one image at a time.

Conventions: a box is (x0, y0, w, h) in ORIGINAL image pixels, x0 = left column, y0 = top row. Crops
are resized non-uniformly to a square and may be mirrored horizontally after resizing; the flip is
recorded, never folded into the box. The geometry functions are pure (all randomness comes from the
``np.random.Generator`` passed in) so the overlap code for SERE can reuse them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from PIL import Image

DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_RESAMPLE = {
  'nearest': Image.Resampling.NEAREST,
  'bilinear': Image.Resampling.BILINEAR,
  'bicubic': Image.Resampling.BICUBIC,
  'lanczos': Image.Resampling.LANCZOS,
  'box': Image.Resampling.BOX,
  'hamming': Image.Resampling.HAMMING,
}


@dataclasses.dataclass(frozen=True)
class CropSpec:
  """One kind of crop: how many, output side in pixels, and the area-fraction range."""

  number: int
  size: int
  scale: tuple[float, float]

  def __post_init__(self):
    if self.number < 0 or self.size <= 0:
      raise ValueError(f'CropSpec needs number >= 0 and size > 0, got {self}.')
    lo, hi = self.scale
    if not 0.0 < lo <= hi <= 1.0:
      raise ValueError(f'CropSpec.scale must satisfy 0 < low <= high <= 1, got {self.scale}.')


def resample_filter(interpolation: str) -> Image.Resampling:
  """PIL filter for a name ('bicubic', 'bilinear', 'nearest', 'lanczos', 'box', 'hamming')."""
  try:
    return _RESAMPLE[interpolation.lower()]
  except KeyError:
    raise ValueError(
      f'Unknown interpolation {interpolation!r}; set config.data.interpolation to '
      f'one of {sorted(_RESAMPLE)}.'
    ) from None


def random_resized_crop_box(
  rng: np.random.Generator,
  height: int,
  width: int,
  scale: tuple[float, float],
  ratio: tuple[float, float] = DEFAULT_RATIO,
) -> tuple[int, int, int, int]:
  """Samples a RandomResizedCrop box (torchvision semantics).

  Up to 10 tries draw an area fraction ~ U(scale) and an aspect w/h log-uniform in ``ratio``; the
  first box that fits is placed uniformly. Otherwise the largest centred box whose aspect is the
  image's clamped into ``ratio``.

  Returns:
    (x0, y0, w, h) Python ints with 0 <= x0, x0 + w <= width, 0 <= y0, y0 + h <= height, w, h >= 1.
  """
  area = float(height * width)
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      y0 = int(rng.integers(0, height - h + 1))
      x0 = int(rng.integers(0, width - w + 1))
      return x0, y0, w, h
  image_aspect = width / height
  if image_aspect < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif image_aspect > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  w, h = max(1, min(w, width)), max(1, min(h, height))
  return (width - w) // 2, (height - h) // 2, w, h


def resize_box(
  image: Image.Image,
  box: tuple[float, float, float, float],
  size: int,
  interpolation: str = 'bicubic',
  decode_scale: float = 1.0,
) -> np.ndarray:
  """Cuts ``box`` (original pixels) out of ``image`` and resizes it to ``size`` x ``size``.

  Args:
    image: the decoded PIL image, possibly reduced by ``decode_scale`` (JPEG draft).
    box: (x0, y0, w, h) in original pixels; mapped to decoded pixels as x * decode_scale, so a
      draft decode samples the same region (PIL resamples from a fractional box).
    size: output side; smaller boxes are simply upsampled.
  Returns:
    uint8 [size, size, 3].
  """
  x0, y0, w, h = (float(v) * decode_scale for v in box)
  out = image.resize((size, size), resample_filter(interpolation), box=(x0, y0, x0 + w, y0 + h))
  return np.asarray(out, dtype=np.uint8)


def sample_boxes(
  rng: np.random.Generator,
  height: int,
  width: int,
  spec: CropSpec,
  ratio: tuple[float, float] = DEFAULT_RATIO,
) -> tuple[np.ndarray, np.ndarray]:
  """The boxes and flips of ``spec.number`` crops; draws per crop: box, then flip (p = 0.5).

  Returns:
    (boxes float32 [N, 4] (x0, y0, w, h) in original pixels, flips bool [N]).
  """
  boxes = np.zeros((spec.number, 4), np.float32)
  flips = np.zeros((spec.number,), bool)
  for i in range(spec.number):
    boxes[i] = random_resized_crop_box(rng, height, width, spec.scale, ratio)
    flips[i] = bool(rng.random() < 0.5)
  return boxes, flips


def multi_crop_boxes(
  rng: np.random.Generator,
  image_size: tuple[int, int] | Any,
  global_spec: CropSpec,
  local_spec: CropSpec,
  *,
  ratio: tuple[float, float] = DEFAULT_RATIO,
) -> dict[str, np.ndarray]:
  """The geometry of ``multi_crop`` without the pixels (for crops resampled on the device).

  Draws exactly what ``multi_crop`` draws, so both give the same boxes and flips for one seed.

  Returns:
    'global_boxes' float32 [Ng, 4], 'global_flips' bool [Ng], 'local_boxes', 'local_flips'.
  """
  height, width = int(image_size[0]), int(image_size[1])
  out = {}
  for prefix, spec in (('global', global_spec), ('local', local_spec)):
    out[f'{prefix}_boxes'], out[f'{prefix}_flips'] = sample_boxes(rng, height, width, spec, ratio)
  return out


def multi_crop(
  rng: np.random.Generator,
  image: np.ndarray,
  image_size: tuple[int, int] | Any,
  global_spec: CropSpec,
  local_spec: CropSpec,
  *,
  interpolation: str = 'bicubic',
  ratio: tuple[float, float] = DEFAULT_RATIO,
  decode_scale: float = 1.0,
) -> dict[str, np.ndarray]:
  """Global then local RandomResizedCrop + horizontal flip (p = 0.5) views of one image.

  Args:
    rng: the record's generator; draws per crop: box, then flip; all globals before locals
      (the draws of ``multi_crop_boxes``).
    image: uint8 [h, w, 3], possibly decoded at ``decode_scale`` of the original.
    image_size: (height, width) of the original image; boxes are sampled in these pixels.
  Returns:
    'global_crops' uint8 [Ng, G, G, 3], 'global_boxes' float32 [Ng, 4] (x0, y0, w, h, original
    pixels), 'global_flips' bool [Ng], and the same three 'local_*' keys ([Nl, L, L, 3] etc.;
    Nl may be 0).
  """
  geometry = multi_crop_boxes(rng, image_size, global_spec, local_spec, ratio=ratio)
  pil = Image.fromarray(np.ascontiguousarray(image), 'RGB')
  out = {}
  for prefix, spec in (('global', global_spec), ('local', local_spec)):
    boxes, flips = geometry[f'{prefix}_boxes'], geometry[f'{prefix}_flips']
    crops = np.zeros((spec.number, spec.size, spec.size, 3), np.uint8)
    for i in range(spec.number):
      crop = resize_box(pil, tuple(boxes[i]), spec.size, interpolation, decode_scale)
      crops[i] = crop[:, ::-1] if flips[i] else crop
    out[f'{prefix}_crops'], out[f'{prefix}_boxes'], out[f'{prefix}_flips'] = crops, boxes, flips
  return out


def resize_center_crop(
  image: np.ndarray,
  resize: int,
  size: int,
  interpolation: str = 'bicubic',
) -> np.ndarray:
  """Evaluation view: shorter side to ``resize`` (aspect kept), then the centred ``size`` square.

  Args:
    image: uint8 [h, w, 3] (a draft-decoded image is fine: only the aspect matters).
  Returns:
    uint8 [size, size, 3].
  """
  if size > resize:
    raise ValueError(
      f'eval_size {size} > eval_resize {resize}: set config.data.eval_resize >= '
      'config.data.eval_size.'
    )
  h, w = image.shape[:2]
  if h <= w:
    new_h, new_w = resize, max(size, int(resize * w / h))
  else:
    new_h, new_w = max(size, int(resize * h / w)), resize
  if (new_h, new_w) != (h, w):
    image = np.asarray(
      Image.fromarray(np.ascontiguousarray(image), 'RGB').resize(
        (new_w, new_h), resample_filter(interpolation)
      ),
      dtype=np.uint8,
    )
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  return np.ascontiguousarray(image[top : top + size, left : left + size])


def fit_image(
  image: Image.Image | np.ndarray,
  canvas_size: int,
  interpolation: str = 'bicubic',
) -> tuple[np.ndarray, tuple[float, float]]:
  """Host side of ``crops_on='device'``: an image that fits a ``canvas_size`` square.

  An image larger than the canvas on either side is shrunk (aspect kept) with PIL; most ImageNet
  images (about 500 x 375) fit a 512 canvas untouched. Given a PIL image, the shrink skips a round
  trip through numpy.

  Args:
    image: an RGB PIL image or uint8 [h, w, 3].
  Returns:
    (uint8 [h', w', 3] with h', w' <= canvas_size, (sy, sx) its pixels per input pixel).
  """
  if isinstance(image, Image.Image):
    w, h = image.size
  else:
    h, w = image.shape[:2]
  if max(h, w) <= canvas_size:
    return np.asarray(image, dtype=np.uint8), (1.0, 1.0)
  f = canvas_size / max(h, w)
  nh, nw = max(1, min(canvas_size, int(round(h * f)))), max(1, min(canvas_size, int(round(w * f))))
  if not isinstance(image, Image.Image):
    image = Image.fromarray(np.ascontiguousarray(image), 'RGB')
  image = image.resize((nw, nh), resample_filter(interpolation), reducing_gap=3.0)
  return np.asarray(image, dtype=np.uint8), (nh / h, nw / w)


def stack_canvases(
  images: list[np.ndarray],
  canvas_size: int,
  out: np.ndarray | None = None,
) -> np.ndarray:
  """uint8 [B, C, C, 3]: each fitted image at the top left of its zero canvas. Written straight
  into the batch (a canvas per image, then stacking, would copy every pixel twice).

  Args:
    images: uint8 [h_i, w_i, 3] with h_i, w_i <= C (``fit_image``'s output).
    canvas_size: C.
    out: optional uint8 [B, C, C, 3] to write into (e.g. shared memory); any prior content is
      overwritten, padding included.
  """
  if out is None:
    out = np.empty((len(images), canvas_size, canvas_size, 3), np.uint8)
  for i, image in enumerate(images):
    h, w = image.shape[:2]
    out[i, :h, :w] = image
    out[i, :h, w:] = 0
    out[i, h:] = 0
  return out


def canvas_of(
  image: Image.Image | np.ndarray,
  canvas_size: int,
  interpolation: str = 'bicubic',
) -> tuple[np.ndarray, tuple[int, int], tuple[float, float]]:
  """One image's canvas: ``fit_image``, then zero-padded to [C, C, 3].

  Returns:
    (canvas uint8 [C, C, 3], valid (height, width), (sy, sx) canvas pixels per image pixel).
  """
  fitted, scale = fit_image(image, canvas_size, interpolation)
  return stack_canvases([fitted], canvas_size)[0], fitted.shape[:2], scale
