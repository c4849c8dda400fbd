"""Random-access image sources for grain: Fashion-MNIST, an image folder, a prepared TFDS dataset.

Every source is a picklable object with ``__len__`` and ``__getitem__`` (so ``grain.MapDataset.source``
takes it directly and worker processes can receive it). A record is a dict of numpy values:

  'image'      uint8 [h, w, 3]  RGB pixels. For encoded sources a large JPEG may be decoded at a
                                reduced size (JPEG draft mode, 1/2, 1/4 or 1/8); ``h, w`` are then smaller
                                than the original.
  'image_size' int32 [2]        (height, width) of the ORIGINAL image, upright (after its EXIF
                                orientation). Crop boxes are always in these original pixels.
  'decode_scale' float64 []     decoded pixels per original pixel (1, 1/2, 1/4 or 1/8): original
                                coordinate x lands at x * decode_scale in 'image'.
  'label'      int32 []         class index, -1 when unknown.
  'skipped'    int32 []         how many failed reads were passed over to produce this one.
  'bad_indices' int64 [MAX_ATTEMPTS]  the source indices whose reads failed for this record, in
                                order, padded with -1 (the first 'skipped' are >= 0). A bad file
                                fails again in other records and epochs: count DISTINCT indices
                                (named by ``source.describe(i)``) to know how many files are bad.
  'index'      int64 []         the requested record index (before any substitution).

After ``source.set_canvas(C)`` (crops resampled on the device, sslx/data/device_crops.py) 'image' is
shrunk (aspect kept) when larger than C on either side, so that it fits a C x C canvas, and
'canvas_scale' float64 [2] gives its pixels per decoded pixel along y, x (1 when not shrunk).

Encoded images are turned upright by their EXIF orientation tag (``PIL.ImageOps.exif_transpose``).

Unreadable or corrupt images are not fatal: another record, drawn from (index, attempt) alone
(``substitute``: uniform over the source, the same in every process), is read in its place, up to
MAX_ATTEMPTS reads in a row before a ``DataError``. Each process warns once per bad file.
"""

from __future__ import annotations

import gzip
import io
import os
import threading
from typing import Any

import numpy as np
from absl import logging
from PIL import ExifTags, Image, ImageOps

from sslx import errors
from sslx.data import crops as crops_lib

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
_FASHION_MNIST_FILES = {
  'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
  'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}


# Failed reads in a row after which a record gives up (``DataError``): with a fraction f of bad
# files a record fails this often with probability ~f**16, so only a broken data set gets there.
MAX_ATTEMPTS = 16


class DataError(errors.UserError):
  """A data source is missing, empty or misconfigured; the message says how to fix it."""


Record = dict[str, np.ndarray | np.generic]


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def _to_rgb(im: Image.Image) -> np.ndarray:
  """Converts a PIL image of any mode to uint8 [h, w, 3]; alpha is composited over white."""
  return np.asarray(_rgb_image(im), dtype=np.uint8)


def _rgb_image(im: Image.Image) -> Image.Image | np.ndarray:
  """``_to_rgb`` without the final copy to numpy: an RGB PIL image where the pixels are 8-bit
  (``crops.fit_image`` can then shrink it without a copy to numpy), else uint8 [h, w, 3]."""
  if im.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I'):
    # PIL's own convert would clip 16-bit values at 255 instead of rescaling them. A 32-bit 'I'
    # image whose values all fit in 8 bits is taken as 8-bit.
    grey = np.asarray(im).astype(np.float64)
    if im.mode != 'I' or (grey.size and grey.max() > 255):
      grey = grey / 257.0
    return np.repeat(np.clip(np.round(grey), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
  if im.mode == 'F':
    grey = np.asarray(im, dtype=np.float64)
    if grey.size and grey.max() <= 1.0:
      grey = grey * 255.0
    return np.repeat(np.clip(np.round(grey), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
  has_alpha = im.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in im.info
  if has_alpha:
    rgba = im.convert('RGBA')
    background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    im = Image.alpha_composite(background, rgba)
  if im.mode != 'RGB':
    im = im.convert('RGB')
  return im


# EXIF orientations (1 = upright) whose transpose swaps the sides, and those that keep them.
_SWAPS_SIDES = frozenset((5, 6, 7, 8))
_KEEPS_SIDES = frozenset((2, 3, 4))


def _orientation(im: Image.Image) -> int:
  """The image's EXIF orientation tag (1-8), 1 when absent or unreadable."""
  try:
    value = im.getexif().get(ExifTags.Base.Orientation, 1)
    return int(value)
  except Exception:  # pylint: disable=broad-except
    # Damaged metadata must not reject pixels that decode fine: the image is used as stored.
    return 1


def decode_image(
  source: str | bytes | bytearray | os.PathLike,
  min_side: int | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
  """Decodes an encoded image (a path or the file's bytes) to RGB; see ``_decode``.

  Returns:
    (image uint8 [h, w, 3], original size int32 [2] = (height, width), scale).
  """
  image, size, scale = _decode(source, min_side)
  return np.asarray(image, dtype=np.uint8), size, scale


def _decode(
  source: str | bytes | bytearray | os.PathLike,
  min_side: int | None = None,
) -> tuple[Image.Image | np.ndarray, np.ndarray, float]:
  """Decodes an encoded image (a path or the file's bytes) to RGB, turned upright.

  An EXIF orientation tag other than 1 is applied as ``PIL.ImageOps.exif_transpose`` does (a phone
  photo tagged "rotate 90" comes out upright); the returned size is then the upright one, so crop
  boxes in original pixels refer to the upright image.

  Args:
    source: a file path or the encoded bytes.
    min_side: if set and the file is a JPEG at least twice this size on both sides, decode it at
      1/2, 1/4 or 1/8 scale (PIL draft mode) while keeping both sides >= ``min_side``.
  Returns:
    (image: RGB PIL image or uint8 [h, w, 3], original upright size int32 [2] = (height, width),
    scale)
    where scale = 1/s for a draft decode at 1/s (decoded column j covers original columns
    [j*s, (j+1)*s); h, w are rounded up, so use ``scale`` rather than the shape ratio), else 1.0.
  Raises:
    Any PIL / OS error for unreadable data (the sources catch it and substitute another record).
  """
  fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
  # PIL opens paths and file objects alike.
  with Image.open(fp) as im:
    width, height = im.size
    scale = 1.0
    if min_side and im.format == 'JPEG' and min(width, height) >= 2 * min_side:
      drafted = im.draft(None, (min_side, min_side))
      if drafted is not None:
        scale = drafted[1][2] / width
    im.load()
    upright: Image.Image = im
    orientation = _orientation(im)
    if orientation in _SWAPS_SIDES or orientation in _KEEPS_SIDES:
      # After the (draft) decode: the transpose then works on the reduced pixels, and a draft
      # scale applies to both axes alike, so it stays the same in the upright frame.
      upright = ImageOps.exif_transpose(im)
      if orientation in _SWAPS_SIDES:
        width, height = height, width
    rgb = _rgb_image(upright)
  return rgb, np.array([height, width], np.int32), scale


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


class _SubstitutingSource:
  """Base class: subclasses implement ``_read(index) -> (image, size, scale, label)`` or raise;
  ``image`` may be an RGB PIL image or uint8 [h, w, 3]. ``canvas_size`` > 0 fits record images to a
  canvas (module docstring)."""

  canvas_size: int = 0
  canvas_interpolation: str = 'bicubic'

  def set_canvas(self, canvas_size: int, interpolation: str = 'bicubic') -> None:
    """Records fit a ``canvas_size`` square (0: untouched); larger images are shrunk with
    ``interpolation`` (``crops.fit_image``)."""
    self.canvas_size, self.canvas_interpolation = int(canvas_size), interpolation

  def _record_image(self, image: Image.Image | np.ndarray) -> dict[str, np.ndarray]:
    if not self.canvas_size:
      return {'image': np.asarray(image, dtype=np.uint8)}
    fitted, canvas_scale = crops_lib.fit_image(image, self.canvas_size, self.canvas_interpolation)
    return {'image': fitted, 'canvas_scale': np.asarray(canvas_scale, np.float64)}

  def __len__(self) -> int:
    raise NotImplementedError

  def _read(self, index: int) -> tuple[Image.Image | np.ndarray, np.ndarray, float, int]:
    raise NotImplementedError

  def describe(self, index: int) -> str:
    """A human-readable name of record ``index`` for logs and errors (a path for a folder)."""
    return f'{self!r}[{index}]'

  def substitute(self, index: int, attempt: int) -> int:
    """The record read instead of ``index`` after its ``attempt``-th failed read (0-based).

    Drawn uniformly from the other records, from (index, attempt) alone: every process and
    worker substitutes alike (the data order stays a property of the run seed), and the
    substitutes of one bad file spread over the data rather than over-sampling a neighbour.
    """
    n = len(self)
    if n < 2:
      return index
    return (index + 1 + int(np.random.default_rng([index, attempt]).integers(n - 1))) % n

  def __getitem__(self, index: int) -> Record:
    n = len(self)
    index = int(index) % n
    bad = np.full(MAX_ATTEMPTS, -1, np.int64)
    current = index
    error = ''
    for attempt in range(MAX_ATTEMPTS):
      try:
        image, size, scale, label = self._read(current)
      except Exception as e:  # pylint: disable=broad-except
        # Corrupt files happen in big folders; one bad JPEG must not stop a long run.
        bad[attempt] = current
        error = _one_line(e)
        _warn_once(self.describe(current), error)
        current = self.substitute(index, attempt)
        continue
      return {
        **self._record_image(image),
        'image_size': size,
        'decode_scale': np.float64(scale),
        'label': np.int32(label),
        'skipped': np.int32(attempt),
        'bad_indices': bad,
        'index': np.int64(index),
      }
    names = list(dict.fromkeys(self.describe(int(i)) for i in bad))
    raise DataError(
      f'{MAX_ATTEMPTS} images in a row could not be decoded for record {index} of {self!r} '
      f'({", ".join(names[:3])}{", ..." if len(names) > 3 else ""}; last error: {error}); '
      'the data looks broken, check these files.'
    )


# Paths (``describe``) of the records that failed to decode in this process: each is warned
# about once, not at every substitution (a bad file is met again every epoch).
_WARNED: set[str] = set()
_WARNED_LOCK = threading.Lock()


def _one_line(error: Exception) -> str:
  """``Type: first line of the message``."""
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0] if lines else ""}'


def _warn_once(name: str, error: str) -> None:
  with _WARNED_LOCK:
    if name in _WARNED:
      return
    _WARNED.add(name)
  logging.warning(
    'sslx.data: unreadable image %s (%s); other records are read in its place.', name, error
  )


_FMNIST_CACHE: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
_FMNIST_LOCK = threading.Lock()


def _read_idx(path: str) -> np.ndarray:
  with gzip.open(path, 'rb') as f:
    data = f.read()
  ndim = data[3]
  dims = np.frombuffer(data, dtype='>u4', count=ndim, offset=4).astype(np.int64)
  return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Loads a Fashion-MNIST split (cached per process).

  Returns:
    (images uint8 [N, 28, 28] grey, labels int32 [N]); N = 60000 for 'train', 10000 for 'test'.
  Raises:
    DataError: unknown split or missing files.
  """
  if split not in _FASHION_MNIST_FILES:
    raise DataError(
      f"Fashion-MNIST has splits 'train' and 'test', not {split!r}; "
      'fix config.data.train_split / eval_train_split / eval_test_split.'
    )
  key = (os.path.abspath(path), split)
  with _FMNIST_LOCK:
    if key not in _FMNIST_CACHE:
      files = [os.path.join(path, name) for name in _FASHION_MNIST_FILES[split]]
      missing = [f for f in files if not os.path.isfile(f)]
      if missing:
        raise DataError(
          f'Fashion-MNIST files not found: {", ".join(missing)}. Install them with '
          '`apt-get install dataset-fashion-mnist` (Debian, files land in '
          f'{FASHION_MNIST_DIR}) or point --config.data.path at a folder holding the gzipped '
          'IDX files.'
        )
      images, labels = (_read_idx(f) for f in files)
      if images.shape[0] != labels.shape[0]:
        raise DataError(
          f'Fashion-MNIST {split}: {images.shape[0]} images but '
          f'{labels.shape[0]} labels in {path}; the files are damaged.'
        )
      _FMNIST_CACHE[key] = (images, labels.astype(np.int32))
    return _FMNIST_CACHE[key]


class FashionMnistSource(_SubstitutingSource):
  """Fashion-MNIST from the gzipped IDX files; grey replicated to RGB (28x28x3), 10 classes.

  Only the path and split are pickled; each process parses the files once (< 1 s).
  """

  num_classes = 10

  def __init__(self, path: str = FASHION_MNIST_DIR, split: str = 'train'):
    self.path = path
    self.split = split
    self._images, self._labels = load_fashion_mnist(path, split)

  def __getstate__(self) -> dict[str, Any]:
    return {
      'path': self.path,
      'split': self.split,
      'canvas': (self.canvas_size, self.canvas_interpolation),
    }

  def __setstate__(self, state: dict[str, Any]) -> None:
    FashionMnistSource.__init__(self, state['path'], state['split'])
    self.set_canvas(*state['canvas'])

  def __len__(self) -> int:
    return int(self._labels.shape[0])

  def _read(self, index: int) -> tuple[Image.Image | np.ndarray, np.ndarray, float, int]:
    grey = self._images[index]
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    return rgb, np.array(grey.shape, np.int32), 1.0, int(self._labels[index])

  def __repr__(self) -> str:
    return f'FashionMnistSource({self.path!r}, {self.split!r})'


def _is_image_file(name: str) -> bool:
  return not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: str) -> list[str]:
  """Image files under ``folder`` (recursively, hidden entries skipped), in sorted order."""
  found: list[str] = []
  for root, dirs, files in os.walk(folder, followlinks=True):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    found.extend(os.path.join(root, f) for f in sorted(files) if _is_image_file(f))
  return found


def _holds_images(folder: str) -> bool:
  """Whether ``list_images(folder)`` is non-empty. Reads entries lazily and stops at the first
  image file (os.walk would list each whole folder first: ~1M entries for ImageNet's train)."""
  subdirs = []
  with os.scandir(folder) as entries:
    for entry in entries:
      if entry.name.startswith('.'):
        continue
      if entry.is_dir():
        subdirs.append(entry.path)
      elif _is_image_file(entry.name):
        return True
  return any(_holds_images(d) for d in subdirs)


def _subfolders(root: str) -> list[str]:
  return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))


def class_folders(root: str) -> tuple[str, ...] | None:
  """The class names of an image folder: its sub-folders that hold images, sorted; None for a
  flat folder (no such sub-folder). Cheap: stops in each sub-folder at its first image."""
  names = tuple(name for name in _subfolders(root) if _holds_images(os.path.join(root, name)))
  return names or None


_LISTING_CACHE: dict[tuple[str, Any], tuple[Any, bytes, np.ndarray, np.ndarray]] = {}
_LISTING_LOCK = threading.Lock()


def _scan_folder(
  root: str,
  classes: tuple[str, ...] | None,
) -> tuple[tuple[str, ...] | None, bytes, np.ndarray, np.ndarray]:
  """(class names or None, relative paths as one utf-8 blob, blob offsets [N+1], labels [N]).

  ``classes``: the label order to use (``ImageFolderSource``); None: this folder's own classes.
  """
  subdirs = _subfolders(root)
  paths: list[str] = []
  labels: list[int] = []
  found = {name: list_images(os.path.join(root, name)) for name in subdirs}
  empty = [name for name in subdirs if not found[name]]
  if empty:
    # An empty folder made a class would shift the labels of every class after it.
    logging.warning(
      'sslx.data: %d sub-folder(s) of %s hold no images and are ignored: %s',
      len(empty),
      root,
      ', '.join(empty),
    )
  if classes is None:
    classes = tuple(name for name in subdirs if found[name]) or None
  if classes is not None:
    others = [name for name in subdirs if found[name] and name not in classes]
    if others:
      logging.warning(
        'sslx.data: %d class folder(s) of %s are not among the %d classes used and are ignored: %s',
        len(others),
        root,
        len(classes),
        ', '.join(others),
      )
    for label, name in enumerate(classes):
      paths.extend(found.get(name, ()))
      labels.extend([label] * len(found.get(name, ())))
    loose = [f for f in os.listdir(root) if _is_image_file(f)]
    if loose:
      logging.warning(
        'sslx.data: %d images directly in %s are ignored (class sub-folders found).',
        len(loose),
        root,
      )
  else:
    paths = [os.path.join(root, f) for f in sorted(os.listdir(root)) if _is_image_file(f)]
    labels = [-1] * len(paths)
  if not paths:
    raise DataError(
      f'Image folder {root!r} holds no images ({", ".join(IMAGE_EXTENSIONS)}); '
      'set --config.data.path to a folder of class sub-folders of JPEG/PNG files.'
    )
  # One bytes blob + offsets pickles fast to worker processes even for ~1M paths.
  encoded = [os.path.relpath(p, root).encode('utf-8') for p in paths]
  offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
  return classes, b''.join(encoded), offsets, np.asarray(labels, np.int32)


class ImageFolderSource(_SubstitutingSource):
  """Images under a folder: ``root/<class>/**/*.jpg`` (labels = sorted class index) or a flat
  ``root/*.jpg`` (labels -1).

  Sub-folders without image files are not classes (a warning names them): labels index the
  sorted non-empty class folders, and ``num_classes`` counts those.

  Args:
    root: the folder.
    min_side: JPEG draft target (see ``decode_image``); None decodes at full size.
    classes: the class names whose positions are the labels, to label several splits alike
      (``make_source``); a name without a folder here just has no records, and class folders
      not named are ignored with a warning. None: the non-empty class folders of ``root``.
  Raises:
    DataError: the folder is missing or holds no images.
  The listing is scanned once per process and folder (cached), then pickled with the source.
  """

  def __init__(
    self, root: str, min_side: int | None = None, classes: tuple[str, ...] | None = None
  ):
    if not os.path.isdir(root):
      raise DataError(
        f'Image folder {root!r} does not exist; set --config.data.path to a folder '
        'of class sub-folders (or of images).'
      )
    self.root = root
    self.min_side = min_side
    key = (os.path.abspath(root), None if classes is None else tuple(classes))
    with _LISTING_LOCK:
      if key not in _LISTING_CACHE:
        _LISTING_CACHE[key] = _scan_folder(root, key[1])
      self.classes, self._blob, self._offsets, self._labels = _LISTING_CACHE[key]

  @property
  def num_classes(self) -> int | None:
    return None if self.classes is None else len(self.classes)

  def __len__(self) -> int:
    return int(self._labels.shape[0])

  def path(self, index: int) -> str:
    """The file path of record ``index``."""
    start, stop = self._offsets[index], self._offsets[index + 1]
    return os.path.join(self.root, self._blob[start:stop].decode('utf-8'))

  def describe(self, index: int) -> str:
    """The file path of record ``index``."""
    return self.path(index)

  def _read(self, index: int) -> tuple[Image.Image | np.ndarray, np.ndarray, float, int]:
    image, size, scale = _decode(self.path(index), self.min_side)
    return image, size, scale, int(self._labels[index])

  def __repr__(self) -> str:
    return f'ImageFolderSource({self.root!r})'


def tfds_prepare_hint(name: str, data_dir: str | None) -> str:
  """How to prepare a TFDS dataset for random access (array_record)."""
  where = data_dir or '~/tensorflow_datasets'
  hint = (
    f'Prepare it with `tfds build {name} --data_dir={where} --file_format=array_record` '
    'and set --config.data.tfds_data_dir to that folder.'
  )
  if name.split('/')[0].split(':')[0] == 'imagenet2012':
    hint = (
      f'For imagenet2012 place ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in '
      f'{where}/downloads/manual, then run `tfds build imagenet2012 --data_dir={where} '
      '--file_format=array_record`, and set --config.data.tfds_data_dir accordingly.'
    )
  return hint


class TfdsSource(_SubstitutingSource):
  """A prepared TFDS dataset (array_record or parquet) read with random access.

  tensorflow_datasets is imported lazily here, so importing sslx.data needs neither it nor TF.
  Images are decoded by us (encoded bytes -> PIL, with JPEG draft mode); features that are already
  arrays are used as they are (grey [h, w, 1] replicated to RGB).

  Raises:
    DataError: the dataset is not prepared, not in a random-access format, or has no such split.
  """

  def __init__(
    self, name: str, split: str, data_dir: str | None = None, min_side: int | None = None
  ):
    self.name = name
    self.split = split
    self.data_dir = data_dir
    self.min_side = min_side
    self._source = None
    self._open()

  def _open(self) -> None:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from tensorflow_datasets.core import read_only_builder  # pylint: disable=g-import-not-at-top

    try:
      # Not tfds.data_source: on a missing dataset that starts a download/build instead of failing.
      builder = read_only_builder.builder_from_files(self.name, data_dir=self.data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise DataError(
        f'TFDS dataset {self.name!r} is not prepared under '
        f'{self.data_dir or "the default data_dir"}. '
        f'{tfds_prepare_hint(self.name, self.data_dir)}'
      ) from e
    file_format = str(getattr(builder.info.file_format, 'value', builder.info.file_format))
    if file_format not in ('array_record', 'parquet'):
      raise DataError(
        f'TFDS dataset {self.name!r} at {builder.data_dir} is stored as '
        f'{file_format}, which has no random access. '
        f'{tfds_prepare_hint(self.name, self.data_dir)}'
      )
    if self.split not in builder.info.splits:
      raise DataError(
        f'TFDS dataset {self.name!r} has splits {sorted(builder.info.splits)}, not '
        f'{self.split!r}; fix config.data.train_split / eval_*_split.'
      )
    features = builder.info.features
    decoders = None
    if isinstance(features['image'], tfds.features.Image):
      decoders = {'image': tfds.decode.SkipDecoding()}
    label = features['label'] if 'label' in features else None
    self.num_classes = getattr(label, 'num_classes', None)
    self._source = builder.as_data_source(split=self.split, decoders=decoders)

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state['_source'] = None
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)

  def _data(self):
    if self._source is None:
      self._open()
    return self._source

  def __len__(self) -> int:
    return len(self._data())

  def describe(self, index: int) -> str:
    """``name/split[index]``."""
    return f'{self.name}/{self.split}[{index}]'

  def _read(self, index: int) -> tuple[Image.Image | np.ndarray, np.ndarray, float, int]:
    example = self._data()[index]
    image = example['image']
    label = int(example['label']) if 'label' in example else -1
    if isinstance(image, (bytes, bytearray)):
      rgb, size, scale = _decode(image, self.min_side)
      return rgb, size, scale, label
    image = np.asarray(image)
    if image.ndim == 2:
      image = image[..., None]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
      raise DataError(
        f'{self.describe(index)}: expected a uint8 [H, W, 1|3|4] image, got '
        f'{image.dtype} {image.shape}.'
      )
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] == 4:
      image = _to_rgb(Image.fromarray(image, 'RGBA'))
    return image, np.array(image.shape[:2], np.int32), 1.0, label

  def __repr__(self) -> str:
    return f'TfdsSource({self.name!r}, {self.split!r}, data_dir={self.data_dir!r})'


_WARNED_SPLITS: set[tuple[str, ...]] = set()


def _split_classes(data_cfg: Any, root: str, split: str) -> tuple[str, ...] | None:
  """The classes that label ``<root>/<split>``: the sorted union of the non-empty class folders
  of the config's split folders (train, eval train, eval test), so that a class name has the
  same label in every split. None when ``<root>/<split>`` is flat."""
  own = class_folders(os.path.join(root, split))
  if own is None:
    return None
  names = dict.fromkeys(
    (
      data_cfg.get('train_split', 'train'),
      data_cfg.get('eval_train_split'),
      data_cfg.get('eval_test_split'),
      split,
    )
  )
  folders = {
    own_split: class_folders(os.path.join(root, own_split))
    for own_split in names
    if own_split and os.path.isdir(os.path.join(root, own_split))
  }
  per_split = {name: set(found) for name, found in folders.items() if found is not None}
  union = tuple(sorted(set().union(*per_split.values())))
  key = (os.path.abspath(root),) + tuple(sorted(per_split))
  if any(found != set(union) for found in per_split.values()) and key not in _WARNED_SPLITS:
    _WARNED_SPLITS.add(key)
    lacking = '; '.join(
      f'{name} lacks {", ".join(sorted(set(union) - found))}'
      for name, found in sorted(per_split.items())
      if found != set(union)
    )
    logging.warning(
      'sslx.data: the splits of %s have different classes (%s). Every split is labelled by '
      'the %d classes of all of them, so a class keeps one label everywhere; test images of a '
      'class missing from the kNN\'s train split can never be classified right.',
      root,
      lacking,
      len(union),
    )
  return union


def make_source(data_cfg: Any, split: str, *, min_side: int | None = None) -> _SubstitutingSource:
  """Builds the source named by ``data_cfg.source`` for ``split``.

  Image folders: ``<path>/<split>`` when that folder exists, else ``<path>`` itself for the
  training split. ``min_side`` is the JPEG draft target for encoded sources. When the split
  folders (``train_split``, ``eval_train_split``, ``eval_test_split``) have different sets of
  non-empty class folders, every split is labelled by the sorted union of them (a warning
  names the differences): the kNN's train and test labels then agree, ``num_classes`` is the
  same for all splits, and test images of a class absent from the kNN's train split simply
  count as errors (no neighbour can carry their label).
  Raises:
    DataError: unknown source kind, or the source's own errors.
  """
  kind = data_cfg.source
  if kind == 'fashion_mnist':
    return FashionMnistSource(data_cfg.get('path', None) or FASHION_MNIST_DIR, split)
  if kind == 'image_folder':
    root = data_cfg.path
    if not root:
      raise DataError('config.data.path must name the image folder for source=image_folder.')
    split_dir = os.path.join(root, split)
    if os.path.isdir(split_dir):
      return ImageFolderSource(split_dir, min_side, _split_classes(data_cfg, root, split))
    if split == data_cfg.get('train_split', 'train'):
      return ImageFolderSource(root, min_side)
    raise DataError(
      f'No folder {split_dir!r} for split {split!r}; an image folder used for '
      'evaluation needs <path>/<split>/<class>/... sub-folders.'
    )
  if kind == 'tfds':
    return TfdsSource(data_cfg.tfds_name, split, data_cfg.get('tfds_data_dir') or None, min_side)
  raise DataError(
    f"Unknown config.data.source {kind!r}; use 'fashion_mnist', 'image_folder' or 'tfds'."
  )


def source_num_classes(source: Any) -> int | None:
  """The number of classes a source declares, or None."""
  return getattr(source, 'num_classes', None)
