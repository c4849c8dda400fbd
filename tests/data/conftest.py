"""Shared fixtures for the data tests: configs and a small image folder of odd files."""

import os

import ml_collections
import numpy as np
import pytest
from absl import flags
from PIL import Image
from skimage import data as skdata

FMNIST_DIR = '/usr/share/datasets/fashion-mnist'

# grain's worker processes read absl flags; pytest never parses them.
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()


def make_cfg(**overrides) -> ml_collections.ConfigDict:
  """A small config.data for Fashion-MNIST; keyword overrides replace top-level keys."""
  cfg = ml_collections.ConfigDict(
    dict(
      source='fashion_mnist',
      path=FMNIST_DIR,
      tfds_name='',
      tfds_data_dir=None,
      train_split='train',
      eval_train_split='train',
      eval_test_split='test',
      global_crops=dict(number=2, size=32, scale=(0.4, 1.0)),
      local_crops=dict(number=3, size=16, scale=(0.05, 0.4)),
      interpolation='bicubic',
      eval_resize=28,
      eval_size=28,
      workers=0,
      prefetch_buffer=2,
      read_threads=2,
    )
  )
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


@pytest.fixture
def fmnist_cfg():
  if not os.path.isdir(FMNIST_DIR):
    pytest.skip('Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)')
  return make_cfg()


def _save(path, array_or_image, **kwargs):
  im = (
    array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
  )
  im.save(path, **kwargs)


@pytest.fixture(scope='session')
def image_folder(tmp_path_factory):
  """root/{animals,things}/... with JPEG/PNG photos, CMYK, RGBA, P+alpha, 16-bit, tiny, corrupt.

  Returns (root, dict name -> (relative path, expected original (H, W))).
  """
  root = tmp_path_factory.mktemp('folder')
  (root / 'animals').mkdir()
  (root / 'things').mkdir()
  files = {}

  def add(name, rel, image, size, **kwargs):
    _save(root / rel, image, **kwargs)
    files[name] = (rel, size)

  astronaut = skdata.astronaut()
  add('astronaut', 'things/astronaut.jpg', astronaut, astronaut.shape[:2], quality=90)
  chelsea = skdata.chelsea()
  add('chelsea', 'animals/chelsea.png', chelsea, chelsea.shape[:2])
  coffee = skdata.coffee()
  add('coffee', 'things/coffee.jpg', coffee, coffee.shape[:2], quality=90)
  camera = skdata.camera()  # grey, mode L
  add('camera', 'things/camera.png', camera, camera.shape[:2])
  cmyk = Image.fromarray(chelsea[:120, :160]).convert('CMYK')
  add('cmyk', 'animals/cmyk.jpg', cmyk, (120, 160), quality=90)
  rgba = np.zeros((40, 50, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[:, :25, 3] = 255  # left half opaque red, right half transparent
  add('rgba', 'animals/rgba.png', rgba, (40, 50))
  palette = Image.fromarray(chelsea[:30, :30]).convert('P')
  palette.info['transparency'] = 0
  add('palette', 'animals/palette.png', palette, (30, 30), transparency=0)
  sixteen = np.arange(24 * 36, dtype=np.uint16).reshape(24, 36) * 70
  add('sixteen', 'things/sixteen.png', Image.fromarray(sixteen), (24, 36))
  add('tiny', 'things/tiny.png', np.full((10, 10, 3), 77, np.uint8), (10, 10))
  (root / 'things' / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not a jpeg')
  files['broken'] = ('things/broken.jpg', None)
  (root / 'things' / 'notes.txt').write_text('not an image')
  return str(root), files


@pytest.fixture
def cfg_factory():
  """make_cfg as a fixture (test modules cannot import conftest reliably)."""
  return make_cfg


def _build_tiny_tfds(data_dir: str) -> None:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class SslxTinyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(num_classes=3),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(7), 'test': self._generate_examples(3)}

    def _generate_examples(self, n):
      for i in range(n):
        image = np.zeros((20 + i, 30, 3), np.uint8)
        image[..., 0] = 10 * i
        yield i, {'image': image, 'label': i % 3}

  SslxTinyImages(data_dir=data_dir, file_format='array_record').download_and_prepare()


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory):
  pytest.importorskip('tensorflow')
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  _build_tiny_tfds(data_dir)
  return data_dir
