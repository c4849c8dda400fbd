"""Random-access image sources for grain: Fashion-MNIST, an image folder, a prepared TFDS dataset.

Every source is a picklable object with ``__len__`` and ``__getitem__`` (so ``grain.MapDataset.source``
takes it directly and worker processes can receive it). A record is a dict of numpy values:

  'image'      uint8 [h, w, 3]  RGB pixels. For encoded sources a large JPEG may be decoded at a
                                reduced size (JPEG draft mode, 1/2, 1/4 or 1/8); ``h, w`` are then smaller
                                than the original.
  'image_size' int32 [2]        (height, width) of the ORIGINAL image. Crop boxes are always expressed in
                                these original pixels.
  'decode_scale' float64 []     decoded pixels per original pixel (1, 1/2, 1/4 or 1/8): original
                                coordinate x lands at x * decode_scale in 'image'.
  'label'      int32 []         class index, -1 when unknown.
  'skipped'    int32 []         how many unreadable records were passed over to produce this one.
  'index'      int64 []         the requested record index (before any substitution).

After ``source.set_canvas(C)`` (crops resampled on the device, sslx/data/device_crops.py) 'image' is
shrunk (aspect kept) when larger than C on either side, so that it fits a C x C canvas, and
'canvas_scale' float64 [2] gives its pixels per decoded pixel along y, x (1 when not shrunk).

Unreadable or corrupt images are not fatal: the record at index+1, index+2, ... (modulo len) is
substituted, deterministically, and a warning naming the bad file is logged.
"""

from __future__ import annotations

import gzip
import io
import os
import threading
from typing import Any

from absl import logging
import numpy as np
from PIL import Image

from sslx import errors
from sslx.data import crops as crops_lib

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
_FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}


class DataError(errors.UserError):
  """A data source is missing, empty or misconfigured; the message says how to fix it."""


Record = dict[str, np.ndarray]


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


def decode_image(source: str | bytes | os.PathLike, min_side: int | None = None,
                 ) -> tuple[np.ndarray, np.ndarray, float]:
  """Decodes an encoded image (a path or the file's bytes) to RGB; see ``_decode``.

  Returns:
    (image uint8 [h, w, 3], original size int32 [2] = (height, width), scale).
  """
  image, size, scale = _decode(source, min_side)
  return np.asarray(image, dtype=np.uint8), size, scale


def _decode(source: str | bytes | os.PathLike, min_side: int | None = None,
            ) -> tuple[Image.Image | np.ndarray, np.ndarray, float]:
  """Decodes an encoded image (a path or the file's bytes) to RGB.

  Args:
    source: a file path or the encoded bytes.
    min_side: if set and the file is a JPEG at least twice this size on both sides, decode it at
      1/2, 1/4 or 1/8 scale (PIL draft mode) while keeping both sides >= ``min_side``.
  Returns:
    (image: RGB PIL image or uint8 [h, w, 3], original size int32 [2] = (height, width), scale)
    where scale = 1/s for a draft decode at 1/s (decoded column j covers original columns
    [j*s, (j+1)*s); h, w are rounded up, so use ``scale`` rather than the shape ratio), else 1.0.
  Raises:
    Any PIL / OS error for unreadable data (the sources catch it and substitute another record).
  """
  fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
  with Image.open(fp) as im:
    width, height = im.size
    scale = 1.0
    if min_side and im.format == 'JPEG' and min(width, height) >= 2 * min_side:
      drafted = im.draft(None, (min_side, min_side))
      if drafted is not None:
        scale = drafted[1][2] / width
    im.load()
    rgb = _rgb_image(im)
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

  def _read(self, index: int) -> tuple[np.ndarray, np.ndarray, float, int]:
    raise NotImplementedError

  def _describe(self, index: int) -> str:
    return f'record {index}'

  def __getitem__(self, index: int) -> Record:
    n = len(self)
    index = int(index) % n
    for skipped in range(n):
      current = (index + skipped) % n
      try:
        image, size, scale, label = self._read(current)
      except Exception as e:  # pylint: disable=broad-except
        # Corrupt files happen in big folders; one bad JPEG must not stop a long run.
        logging.warning('sslx.data: skipping unreadable image %s (%s: %s)',
                        self._describe(current), type(e).__name__, e)
        continue
      return {
          **self._record_image(image),
          'image_size': size,
          'decode_scale': np.float64(scale),
          'label': np.int32(label),
          'skipped': np.int32(skipped),
          'index': np.int64(index),
      }
    raise DataError(f'{self!r}: none of its {n} images could be decoded.')


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
    raise DataError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}; "
                    'fix config.data.train_split / eval_train_split / eval_test_split.')
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
            'IDX files.')
      images, labels = (_read_idx(f) for f in files)
      if images.shape[0] != labels.shape[0]:
        raise DataError(f'Fashion-MNIST {split}: {images.shape[0]} images but '
                        f'{labels.shape[0]} labels in {path}; the files are damaged.')
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
    return {'path': self.path, 'split': self.split,
            'canvas': (self.canvas_size, self.canvas_interpolation)}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state['path'], state['split'])
    self.set_canvas(*state['canvas'])

  def __len__(self) -> int:
    return int(self._labels.shape[0])

  def _read(self, index: int) -> tuple[np.ndarray, np.ndarray, float, int]:
    grey = self._images[index]
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    return rgb, np.array(grey.shape, np.int32), 1.0, int(self._labels[index])

  def __repr__(self) -> str:
    return f'FashionMnistSource({self.path!r}, {self.split!r})'


def _is_image_file(name: str) -> bool:
  return not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: str) -> list[str]:
  """Image files under ``folder`` (recursively, hidden entries skipped), in sorted order."""
  found = []
  for root, dirs, files in os.walk(folder, followlinks=True):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    found.extend(os.path.join(root, f) for f in sorted(files) if _is_image_file(f))
  return found


_LISTING_CACHE: dict[str, tuple[Any, bytes, np.ndarray, np.ndarray]] = {}
_LISTING_LOCK = threading.Lock()


def _scan_folder(root: str) -> tuple[tuple[str, ...] | None, bytes, np.ndarray, np.ndarray]:
  """(class names or None, relative paths as one utf-8 blob, blob offsets [N+1], labels [N])."""
  subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
  paths: list[str] = []
  labels: list[int] = []
  classes = None
  if subdirs:
    classes = tuple(subdirs)
    for label, name in enumerate(subdirs):
      found = list_images(os.path.join(root, name))
      paths.extend(found)
      labels.extend([label] * len(found))
    loose = [f for f in os.listdir(root) if _is_image_file(f)]
    if loose:
      logging.warning('sslx.data: %d images directly in %s are ignored (class sub-folders '
                      'found).', len(loose), root)
  else:
    paths = [os.path.join(root, f) for f in sorted(os.listdir(root)) if _is_image_file(f)]
    labels = [-1] * len(paths)
  if not paths:
    raise DataError(f'Image folder {root!r} holds no images ({", ".join(IMAGE_EXTENSIONS)}); '
                    'set --config.data.path to a folder of class sub-folders of JPEG/PNG files.')
  # One bytes blob + offsets pickles fast to worker processes even for ~1M paths.
  encoded = [os.path.relpath(p, root).encode('utf-8') for p in paths]
  offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
  return classes, b''.join(encoded), offsets, np.asarray(labels, np.int32)


class ImageFolderSource(_SubstitutingSource):
  """Images under a folder: ``root/<class>/**/*.jpg`` (labels = sorted class index) or a flat
  ``root/*.jpg`` (labels -1).

  Args:
    root: the folder.
    min_side: JPEG draft target (see ``decode_image``); None decodes at full size.
  Raises:
    DataError: the folder is missing or holds no images.
  The listing is scanned once per process and folder (cached), then pickled with the source.
  """

  def __init__(self, root: str, min_side: int | None = None):
    if not os.path.isdir(root):
      raise DataError(f'Image folder {root!r} does not exist; set --config.data.path to a folder '
                      'of class sub-folders (or of images).')
    self.root = root
    self.min_side = min_side
    key = os.path.abspath(root)
    with _LISTING_LOCK:
      if key not in _LISTING_CACHE:
        _LISTING_CACHE[key] = _scan_folder(root)
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

  def _describe(self, index: int) -> str:
    return self.path(index)

  def _read(self, index: int) -> tuple[np.ndarray, np.ndarray, float, int]:
    image, size, scale = _decode(self.path(index), self.min_side)
    return image, size, scale, int(self._labels[index])

  def __repr__(self) -> str:
    return f'ImageFolderSource({self.root!r})'


def tfds_prepare_hint(name: str, data_dir: str | None) -> str:
  """How to prepare a TFDS dataset for random access (array_record)."""
  where = data_dir or '~/tensorflow_datasets'
  hint = (f'Prepare it with `tfds build {name} --data_dir={where} --file_format=array_record` '
          'and set --config.data.tfds_data_dir to that folder.')
  if name.split('/')[0].split(':')[0] == 'imagenet2012':
    hint = (f'For imagenet2012 place ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in '
            f'{where}/downloads/manual, then run `tfds build imagenet2012 --data_dir={where} '
            '--file_format=array_record`, and set --config.data.tfds_data_dir accordingly.')
  return hint


class TfdsSource(_SubstitutingSource):
  """A prepared TFDS dataset (array_record or parquet) read with random access.

  tensorflow_datasets is imported lazily here, so importing sslx.data needs neither it nor TF.
  Images are decoded by us (encoded bytes -> PIL, with JPEG draft mode); features that are already
  arrays are used as they are (grey [h, w, 1] replicated to RGB).

  Raises:
    DataError: the dataset is not prepared, not in a random-access format, or has no such split.
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None,
               min_side: int | None = None):
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
      raise DataError(f'TFDS dataset {self.name!r} is not prepared under '
                      f'{self.data_dir or "the default data_dir"}. '
                      f'{tfds_prepare_hint(self.name, self.data_dir)}') from e
    file_format = str(getattr(builder.info.file_format, 'value', builder.info.file_format))
    if file_format not in ('array_record', 'parquet'):
      raise DataError(f'TFDS dataset {self.name!r} at {builder.data_dir} is stored as '
                      f'{file_format}, which has no random access. '
                      f'{tfds_prepare_hint(self.name, self.data_dir)}')
    if self.split not in builder.info.splits:
      raise DataError(f'TFDS dataset {self.name!r} has splits {sorted(builder.info.splits)}, not '
                      f'{self.split!r}; fix config.data.train_split / eval_*_split.')
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

  def _describe(self, index: int) -> str:
    return f'{self.name}/{self.split}[{index}]'

  def _read(self, index: int) -> tuple[np.ndarray, np.ndarray, float, int]:
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
      raise DataError(f'{self._describe(index)}: expected a uint8 [H, W, 1|3|4] image, got '
                      f'{image.dtype} {image.shape}.')
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] == 4:
      image = _to_rgb(Image.fromarray(image, 'RGBA'))
    return image, np.array(image.shape[:2], np.int32), 1.0, label

  def __repr__(self) -> str:
    return f'TfdsSource({self.name!r}, {self.split!r}, data_dir={self.data_dir!r})'


def make_source(data_cfg: Any, split: str, *, min_side: int | None = None) -> _SubstitutingSource:
  """Builds the source named by ``data_cfg.source`` for ``split``.

  Image folders: ``<path>/<split>`` when that folder exists, else ``<path>`` itself for the
  training split. ``min_side`` is the JPEG draft target for encoded sources.
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
      return ImageFolderSource(split_dir, min_side)
    if split == data_cfg.get('train_split', 'train'):
      return ImageFolderSource(root, min_side)
    raise DataError(f'No folder {split_dir!r} for split {split!r}; an image folder used for '
                    'evaluation needs <path>/<split>/<class>/... sub-folders.')
  if kind == 'tfds':
    return TfdsSource(data_cfg.tfds_name, split, data_cfg.get('tfds_data_dir') or None, min_side)
  raise DataError(f"Unknown config.data.source {kind!r}; use 'fashion_mnist', 'image_folder' or "
                  "'tfds'.")


def source_num_classes(source: Any) -> int | None:
  """The number of classes a source declares, or None."""
  return getattr(source, 'num_classes', None)


