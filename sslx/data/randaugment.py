"""RandAugment on the host, one uint8 image at a time, with timm's `rand-m9-mstd0.5-inc1` policy.

This is the policy the BEiT, MAE, CAE and SERE fine-tuning recipes name (`--aa
rand-m9-mstd0.5-inc1`, as parsed by timm's `rand_augment_transform`): per image, draw
`num_ops` operations uniformly with replacement from the 15 "increasing" operations; each is
applied with probability 0.5 at a magnitude drawn from N(m, mstd) clipped to [0, 10], and every
signed operation (rotate, shear, translate, the enhancers) flips its sign with probability 0.5.

Why not a library's RandAugment: the candidates that fit the stack were checked.
`keras.layers.RandAugment` (Keras 3, installed with TensorFlow) draws ONE pair of operations per
call, so a batch shares them, runs all eleven of its operations on every image and selects two, has
another operation set and magnitude scale than timm's (no magnitude noise, no "increasing"
variants), and keeps its randomness in a stateful seed generator rather than the per-(seed, step,
row) generator that makes sslx's data order a property of the run; eager, one 28-px image took
about 0.14 s on the 2-core CPU. `tf-models-official` would add a large dependency tree for one
transform; `dm-pix` has the pixel operations but no policy; albumentations has no RandAugment.
The operations themselves are Pillow's (ImageOps, ImageEnhance, affine `Image.transform`), the
library timm calls, so each one is Pillow's own code; only the policy (which operations, which
magnitudes) is written here.

All randomness comes from the `np.random.Generator` passed in: the training pipeline hands every
record its own generator seeded with (seed, step, row), so the augmented batch of a step does not
depend on processes, workers or threads.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# timm's magnitude scale: a magnitude of 10 is the strongest setting of every operation.
MAX_LEVEL = 10.0


def _signed(rng: np.random.Generator, value: float) -> float:
  return -value if rng.random() < 0.5 else value


def _affine(img: Image.Image, matrix: tuple, ctx: _Context) -> Image.Image:
  return img.transform(img.size, Image.Transform.AFFINE, matrix, ctx.resample, fillcolor=ctx.fill)


@dataclasses.dataclass(frozen=True)
class _Context:
  resample: Image.Resampling
  fill: tuple[int, ...]


def _rotate(img, level, rng, ctx):
  return img.rotate(_signed(rng, level / MAX_LEVEL * 30.0), ctx.resample, fillcolor=ctx.fill)


def _shear_x(img, level, rng, ctx):
  return _affine(img, (1, _signed(rng, level / MAX_LEVEL * 0.3), 0, 0, 1, 0), ctx)


def _shear_y(img, level, rng, ctx):
  return _affine(img, (1, 0, 0, _signed(rng, level / MAX_LEVEL * 0.3), 1, 0), ctx)


def _translate_x(img, level, rng, ctx):
  # Relative translation: up to 45% of the width at magnitude 10.
  return _affine(img, (1, 0, _signed(rng, level / MAX_LEVEL * 0.45) * img.size[0], 0, 1, 0), ctx)


def _translate_y(img, level, rng, ctx):
  return _affine(img, (1, 0, 0, 0, 1, _signed(rng, level / MAX_LEVEL * 0.45) * img.size[1]), ctx)


def _enhancer(kind):
  def op(img, level, rng, ctx):
    # "Increasing": the factor moves away from 1 (no change) as the magnitude grows.
    return kind(img).enhance(1.0 + _signed(rng, level / MAX_LEVEL * 0.9))

  return op


def _posterize(img, level, rng, ctx):
  bits = 4 - int(level / MAX_LEVEL * 4)  # fewer bits kept at higher magnitude
  return img if bits >= 8 else ImageOps.posterize(img, bits)


def _solarize(img, level, rng, ctx):
  return ImageOps.solarize(img, 256 - int(level / MAX_LEVEL * 256))


def _solarize_add(img, level, rng, ctx):
  add = int(level / MAX_LEVEL * 110)
  lut = [min(255, i + add) if i < 128 else i for i in range(256)]
  return img.point(lut * len(img.getbands()))


OPS: dict[str, Callable] = {
  'AutoContrast': lambda img, level, rng, ctx: ImageOps.autocontrast(img),
  'Equalize': lambda img, level, rng, ctx: ImageOps.equalize(img),
  'Invert': lambda img, level, rng, ctx: ImageOps.invert(img),
  'Rotate': _rotate,
  'PosterizeIncreasing': _posterize,
  'SolarizeIncreasing': _solarize,
  'SolarizeAdd': _solarize_add,
  'ColorIncreasing': _enhancer(ImageEnhance.Color),
  'ContrastIncreasing': _enhancer(ImageEnhance.Contrast),
  'BrightnessIncreasing': _enhancer(ImageEnhance.Brightness),
  'SharpnessIncreasing': _enhancer(ImageEnhance.Sharpness),
  'ShearX': _shear_x,
  'ShearY': _shear_y,
  'TranslateXRel': _translate_x,
  'TranslateYRel': _translate_y,
}


class RandAugmentError(ValueError):
  """A RandAugment policy string that cannot be parsed; the message shows the expected form."""


@dataclasses.dataclass(frozen=True)
class RandAugment:
  """Picklable host transform: uint8 [H, W, 3] image + generator -> augmented uint8 image.

  Attributes:
    magnitude: mean magnitude m (0..10).
    num_ops: operations per image (n).
    magnitude_std: standard deviation of the per-operation magnitude (mstd); 0 = fixed.
    prob: probability that each drawn operation is applied (timm: 0.5).
    fill: grey level per channel for pixels that geometric operations uncover (timm uses the
      normalisation mean in 0..255).
    interpolation: PIL resampling of the geometric operations ('bicubic' in the recipes).
  """

  magnitude: float = 9.0
  num_ops: int = 2
  magnitude_std: float = 0.5
  prob: float = 0.5
  fill: tuple[int, ...] = (124, 116, 104)
  interpolation: str = 'bicubic'

  @classmethod
  def from_policy(
    cls, policy: str, fill: Sequence[int] = (124, 116, 104), interpolation: str = 'bicubic'
  ) -> RandAugment:
    """Parses timm's policy string 'rand-m9-n2-mstd0.5-inc1' (sections in any order after 'rand').

    Only the increasing operation set is implemented, so 'inc1' is required; 'mmax' and 'w'
    (custom maxima and weights) are not supported.

    Raises:
      RandAugmentError: the string is not of that form.
    """
    parts = policy.strip().split('-')
    expected = "'rand-m<magnitude>[-n<ops>][-mstd<std>]-inc1', e.g. 'rand-m9-mstd0.5-inc1'"
    if parts[0] != 'rand':
      raise RandAugmentError(f'RandAugment policy {policy!r}: expected {expected}')
    kw: dict = dict(fill=tuple(int(v) for v in fill), interpolation=interpolation)
    inc = False
    for part in parts[1:]:
      m = re.fullmatch(r'(mstd|m|n|inc)([0-9.]+)', part)
      if m is None:
        raise RandAugmentError(f'RandAugment policy {policy!r}: unknown part {part!r}; {expected}')
      key, value = m.groups()
      if key == 'm':
        kw['magnitude'] = float(value)
      elif key == 'n':
        kw['num_ops'] = int(value)
      elif key == 'mstd':
        kw['magnitude_std'] = float(value)
      else:
        inc = bool(int(float(value)))
    if not inc:
      raise RandAugmentError(
        f"RandAugment policy {policy!r}: only the increasing set is implemented; add '-inc1'"
      )
    return cls(**kw)

  def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Augments one uint8 [H, W, C] image; draws: the operations, then per operation whether it
    applies, its magnitude and (for signed operations) its sign."""
    from sslx.data.crops import resample_filter  # pylint: disable=g-import-not-at-top

    names = list(OPS)
    chosen = rng.integers(0, len(names), size=self.num_ops)
    ctx = _Context(resample_filter(self.interpolation), tuple(self.fill))
    img = Image.fromarray(np.ascontiguousarray(image))
    if img.mode == 'RGB' and len(ctx.fill) == 1:
      ctx = _Context(ctx.resample, ctx.fill * 3)
    for index in chosen:
      if rng.random() > self.prob:
        continue
      level = self.magnitude
      if self.magnitude_std > 0:
        level = rng.normal(self.magnitude, self.magnitude_std)
      level = float(np.clip(level, 0.0, MAX_LEVEL))
      img = OPS[names[int(index)]](img, level, rng, ctx)
    return np.asarray(img, dtype=np.uint8)


def fill_from_mean(mean: Sequence[float]) -> tuple[int, ...]:
  """The fill grey levels timm derives from the normalisation mean: round(255 * mean), <= 255."""
  return tuple(min(255, round(255 * float(m))) for m in mean)
