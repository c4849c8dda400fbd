"""Sources: Fashion-MNIST, image folders (odd modes, corrupt files, draft decoding), TFDS."""

import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from sslx.data import sources

FMNIST_DIR = sources.FASHION_MNIST_DIR


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------------------------


def test_fashion_mnist_records_and_load_time(fmnist_cfg):
  sources._FMNIST_CACHE.clear()
  start = time.perf_counter()
  train = sources.FashionMnistSource(FMNIST_DIR, 'train')
  assert time.perf_counter() - start < 1.5  # target: < 1 s; slack for a loaded CI box
  test = sources.FashionMnistSource(FMNIST_DIR, 'test')
  assert (len(train), len(test)) == (60000, 10000)
  record = train[123]
  assert record['image'].shape == (28, 28, 3) and record['image'].dtype == np.uint8
  np.testing.assert_array_equal(record['image'][..., 0], record['image'][..., 2])
  assert record['image_size'].tolist() == [28, 28]
  assert record['label'].dtype == np.int32 and 0 <= record['label'] < 10
  assert int(record['skipped']) == 0 and int(record['index']) == 123
  assert sorted(np.unique(train._labels).tolist()) == list(range(10))
  # Workers receive only (path, split), not 47 MB of pixels.
  clone = pickle.loads(pickle.dumps(train))
  assert len(pickle.dumps(train)) < 10_000
  np.testing.assert_array_equal(clone[5]['image'], train[5]['image'])


def test_fashion_mnist_missing_says_how_to_install(tmp_path, cfg_factory):
  with pytest.raises(sources.DataError, match='apt-get install dataset-fashion-mnist'):
    sources.FashionMnistSource(str(tmp_path), 'train')
  with pytest.raises(sources.DataError, match='config.data.path'):
    sources.make_source(cfg_factory(path=str(tmp_path)), 'train')


def test_fashion_mnist_bad_split(fmnist_cfg):
  with pytest.raises(sources.DataError, match="'train' and 'test'"):
    sources.FashionMnistSource(FMNIST_DIR, 'validation')


# ---------------------------------------------------------------------------------------------
# Image folder
# ---------------------------------------------------------------------------------------------


def test_image_folder_decodes_every_mode(image_folder, caplog):
  root, files = image_folder
  source = sources.ImageFolderSource(root)
  assert source.classes == ('animals', 'things') and source.num_classes == 2
  assert len(source) == 10  # notes.txt is not an image
  by_rel = {os.path.relpath(source.path(i), root): i for i in range(len(source))}
  for name, (rel, size) in files.items():
    index = by_rel[rel]
    record = source[index]
    image = record['image']
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3, name
    if name == 'broken':  # another record's image and label stand in
      continue
    expected_label = 0 if rel.startswith('animals') else 1
    assert int(record['label']) == expected_label, name
    assert int(record['skipped']) == 0, name
    assert tuple(record['image_size']) == tuple(size) == image.shape[:2], name
  camera = source[by_rel['things/camera.png']]['image']
  np.testing.assert_array_equal(camera[..., 0], skdata.camera())
  np.testing.assert_array_equal(camera[..., 1], camera[..., 2])
  rgba = source[by_rel['animals/rgba.png']]['image']
  assert rgba[0, 0].tolist() == [200, 0, 0]  # opaque part keeps its colour
  assert rgba[0, -1].tolist() == [255, 255, 255]  # transparent part composited over white
  sixteen = source[by_rel['things/sixteen.png']]['image']
  assert sixteen.max() > 200 and sixteen[0, 0, 0] == 0  # rescaled, not clipped at 255
  cmyk = source[by_rel['animals/cmyk.jpg']]['image']
  assert abs(cmyk.astype(float).mean() - skdata.chelsea()[:120, :160].mean()) < 10


def test_canvas_records_fit_the_canvas_like_the_plain_records(image_folder, fmnist_cfg):
  """set_canvas: PIL images are shrunk without numpy in between, to the same pixels as from
  arrays, every mode included; the setting survives pickling (worker processes)."""
  from sslx.data import crops  # pylint: disable=g-import-not-at-top

  root, _ = image_folder
  plain, fitted = sources.ImageFolderSource(root), sources.ImageFolderSource(root)
  fitted.set_canvas(256, 'bicubic')
  shrunk = 0
  for i in range(len(plain)):
    want, scale = crops.fit_image(plain[i]['image'], 256, 'bicubic')
    got = fitted[i]
    assert max(got['image'].shape[:2]) <= 256 and got['image'].dtype == np.uint8
    np.testing.assert_array_equal(got['image'], want, err_msg=plain.path(i))
    assert tuple(got['canvas_scale']) == scale
    shrunk += scale != (1.0, 1.0)
  assert shrunk >= 2  # the astronaut and the coffee photos
  fmnist = sources.FashionMnistSource(FMNIST_DIR, 'train')
  fmnist.set_canvas(20)
  clone = pickle.loads(pickle.dumps(fmnist))
  assert (
    clone[3]['image'].shape == (20, 20, 3) and tuple(clone[3]['canvas_scale']) == (20 / 28,) * 2
  )
  np.testing.assert_array_equal(clone[3]['image'], fmnist[3]['image'])


def test_corrupt_file_is_substituted_and_logged(image_folder, caplog):
  root, _ = image_folder
  source = sources.ImageFolderSource(root)
  broken = next(i for i in range(len(source)) if source.path(i).endswith('broken.jpg'))
  record = source[broken]
  assert int(record['skipped']) == 1
  assert int(record['index']) == broken
  assert record['bad_indices'].dtype == np.int64
  assert record['bad_indices'].tolist() == [broken] + [-1] * (sources.MAX_ATTEMPTS - 1)
  substitute = source.substitute(broken, 0)
  assert substitute != broken
  np.testing.assert_array_equal(record['image'], source[substitute]['image'])
  assert int(record['label']) == int(source[substitute]['label'])
  assert source[substitute]['bad_indices'].tolist() == [-1] * sources.MAX_ATTEMPTS
  assert source.describe(broken) == source.path(broken)
  # One warning per bad file and process, however often the file is met.
  sources._WARNED.clear()
  caplog.clear()
  for _ in range(3):
    source[broken]
  assert caplog.text.count('broken.jpg') == 1


def test_flat_folder_has_unknown_labels(tmp_path):
  for i in range(3):
    Image.fromarray(np.full((12, 14, 3), 40 * i, np.uint8)).save(tmp_path / f'{i}.png')
  source = sources.ImageFolderSource(str(tmp_path))
  assert source.classes is None and source.num_classes is None
  assert [int(source[i]['label']) for i in range(3)] == [-1, -1, -1]
  assert [int(source[i]['image'][0, 0, 0]) for i in range(3)] == [0, 40, 80]  # sorted paths


def test_missing_or_empty_folder_errors(tmp_path, cfg_factory):
  with pytest.raises(sources.DataError, match='does not exist'):
    sources.ImageFolderSource(str(tmp_path / 'nope'))
  (tmp_path / 'empty_class').mkdir()
  with pytest.raises(sources.DataError, match='holds no images'):
    sources.ImageFolderSource(str(tmp_path))
  cfg = cfg_factory(source='image_folder', path=str(tmp_path))
  with pytest.raises(sources.DataError, match='needs <path>/<split>'):
    sources.make_source(cfg, 'val')


def test_draft_decode_keeps_original_coordinates(tmp_path):
  big = np.asarray(Image.fromarray(skdata.astronaut()).resize((1600, 1200)))
  path = tmp_path / 'big.jpg'
  Image.fromarray(big).save(path, quality=95)
  full, size, scale = sources.decode_image(str(path))
  drafted, size_d, scale_d = sources.decode_image(str(path), min_side=250)
  assert size.tolist() == size_d.tolist() == [1200, 1600] and scale == 1.0
  assert scale_d == 0.25 and drafted.shape == (300, 400, 3)
  assert min(drafted.shape[:2]) >= 250
  # Same region seen through the draft decode: a box in original pixels maps by x * scale.
  from sslx.data import crops  # pylint: disable=g-import-not-at-top

  box = (400, 300, 640, 480)
  a = crops.resize_box(Image.fromarray(full), box, 64, 'bicubic', 1.0).astype(float)
  b = crops.resize_box(Image.fromarray(drafted), box, 64, 'bicubic', scale_d).astype(float)
  assert np.abs(a - b).mean() < 6.0
  shifted = crops.resize_box(
    Image.fromarray(drafted), (440, 300, 640, 480), 64, 'bicubic', scale_d
  ).astype(float)
  assert np.abs(a - shifted).mean() > 2 * np.abs(a - b).mean()  # the test can tell a misplacement


# ---------------------------------------------------------------------------------------------
# EXIF orientation, empty class folders, bad files
# ---------------------------------------------------------------------------------------------


def _exif(orientation):
  exif = Image.Exif()
  exif[0x0112] = orientation  # Orientation
  return exif


# What a viewer shows for the stored pixels of each EXIF orientation.
UPRIGHT = {3: lambda a: a[::-1, ::-1], 6: lambda a: np.rot90(a, -1), 8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize('orientation', [3, 6, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
  stored = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
  path = tmp_path / 'photo.png'  # lossless: the upright pixels can be compared exactly
  Image.fromarray(stored).save(path, exif=_exif(orientation))
  image, size, scale = sources.decode_image(str(path))
  want = UPRIGHT[orientation](stored)
  np.testing.assert_array_equal(image, want)
  assert size.tolist() == list(want.shape[:2]) and scale == 1.0
  with open(path, 'rb') as f:  # from bytes too (TFDS)
    np.testing.assert_array_equal(sources.decode_image(f.read())[0], want)


def test_exif_orientation_with_draft_decode(tmp_path):
  """A big 'rotate 90' JPEG drafted at 1/4: the record is upright, 'image_size' is the upright
  original size, and a crop box in upright original pixels lands on the same content."""
  stored = np.asarray(Image.fromarray(skdata.astronaut()).resize((1600, 1200)))  # H 1200, W 1600
  (tmp_path / 'cls').mkdir()
  path = tmp_path / 'cls' / 'phone.jpg'
  Image.fromarray(stored).save(path, quality=95, exif=_exif(6))
  full, size, scale = sources.decode_image(str(path))
  assert size.tolist() == [1600, 1200] and full.shape == (1600, 1200, 3) and scale == 1.0
  upright = UPRIGHT[6](stored).astype(float)
  assert np.abs(full - upright).mean() < 4  # JPEG loss only
  assert np.abs(full - upright[::-1, ::-1]).mean() > 20  # the test can tell a wrong rotation
  record = sources.ImageFolderSource(str(tmp_path), min_side=250)[0]
  assert record['image'].shape == (400, 300, 3) and record['image_size'].tolist() == [1600, 1200]
  assert float(record['decode_scale']) == 0.25
  from sslx.data import crops  # pylint: disable=g-import-not-at-top

  box = (300, 500, 240, 320)  # x0, y0, w, h in upright original pixels
  a = crops.resize_box(Image.fromarray(full), box, 64, 'bicubic', 1.0).astype(float)
  b = crops.resize_box(Image.fromarray(record['image']), box, 64, 'bicubic', 0.25).astype(float)
  assert np.abs(a - b).mean() < 6.0


def test_attention_images_are_upright(tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top

  from sslx.train import attention_workdir  # pylint: disable=g-import-not-at-top

  stored = np.zeros((32, 64, 3), np.uint8)
  stored[:8] = 255  # a white band on the stored top edge: the right once turned 90 CW
  Image.fromarray(stored).save(tmp_path / 'phone.png', exif=_exif(6))
  config = ml_collections.ConfigDict(
    dict(data=dict(eval_resize=32, eval_size=32, interpolation='bicubic'))
  )
  views, _ = attention_workdir.load_images(config, 1, [str(tmp_path)])
  assert views.shape == (1, 32, 32, 3)
  assert views[0, :, -2:].mean() > 200 and views[0, :, :8].mean() < 30
  assert views[0, :4].mean() < 100  # as stored, the top rows would be white


def _png(path, value, size=(8, 8)):
  Image.fromarray(np.full(size + (3,), value, np.uint8)).save(path)


def test_empty_class_folder_is_not_a_class(tmp_path, caplog):
  for name, values in (('a', (10, 20)), ('b', ()), ('c', (30,))):
    (tmp_path / name).mkdir()
    for v in values:
      _png(tmp_path / name / f'{v}.png', v)
  (tmp_path / 'b' / 'readme.txt').write_text('no images here')
  source = sources.ImageFolderSource(str(tmp_path))
  assert source.classes == ('a', 'c') and source.num_classes == 2
  by_value = {int(source[i]['image'][0, 0, 0]): int(source[i]['label']) for i in range(len(source))}
  assert by_value == {10: 0, 20: 0, 30: 1}
  assert caplog.text.count('hold no images') == 1 and 'are ignored: b' in caplog.text
  assert sources.class_folders(str(tmp_path)) == ('a', 'c')


def test_splits_with_different_classes_share_labels(tmp_path, cfg_factory, caplog):
  from sslx.data import pipeline  # pylint: disable=g-import-not-at-top

  for split, classes in (('train', 'abc'), ('test', 'ac')):
    for name in 'abc':
      (tmp_path / split / name).mkdir(parents=True)
      if name in classes:
        _png(tmp_path / split / name / '0.png', ord(name))
  cfg = cfg_factory(source='image_folder', path=str(tmp_path))
  train, test = sources.make_source(cfg, 'train'), sources.make_source(cfg, 'test')
  assert train.num_classes == test.num_classes == 3 == pipeline.eval_num_classes(cfg)
  labels = {int(r['image'][0, 0, 0]): int(r['label']) for r in (test[0], test[1])}
  assert labels == {ord('a'): 0, ord('c'): 2}  # c keeps train's label, not the position 1
  assert 'test lacks b' in caplog.text


@pytest.fixture
def bad_folder(tmp_path):
  """40 flat 8x8 PNGs whose pixel value is 5 * index, with indices BAD corrupt (a run of 4)."""
  bad = {3, 10, 11, 12, 13, 25, 39}
  for i in range(40):
    path = tmp_path / f'{i:02d}.png'
    if i in bad:
      path.write_bytes(b'\x89PNG not really' if i % 2 else b'\xff\xd8\xff\xe0 truncated')
    else:
      _png(path, 5 * i)
  return str(tmp_path), bad


def test_bad_files_are_reported_and_substitutes_spread(bad_folder, caplog):
  root, bad = bad_folder
  source = sources.ImageFolderSource(root)
  clone = pickle.loads(pickle.dumps(source))
  other = sources.ImageFolderSource(root)
  reported, used = set(), []
  for i in range(len(source)):
    record = source[i]
    got = record['bad_indices']
    assert got.shape == (sources.MAX_ATTEMPTS,) and got.dtype == np.int64
    failed = got[got >= 0].tolist()
    assert int(record['skipped']) == len(failed) and (got[len(failed) :] == -1).all()
    assert set(failed) <= bad and (failed[:1] == [i]) == (i in bad)
    reported.update(failed)
    value = int(record['image'][0, 0, 0])
    assert value % 5 == 0 and value // 5 not in bad  # always a good file's pixels
    if i in bad:
      used.append(value // 5)
    for twin in (clone, other):  # the same record in every process / worker
      np.testing.assert_array_equal(twin[i]['image'], record['image'])
      np.testing.assert_array_equal(twin[i]['bad_indices'], got)
  assert reported == bad  # every bad file reported, each once per pass over the data
  neighbours = sum(u == (b + 1) % 40 for b, u in zip(sorted(bad), used))
  assert neighbours <= 1 and len(set(used)) >= 5
  assert all(source.path(b) in caplog.text for b in bad)


def test_substitutes_are_uniform_over_the_other_records(bad_folder):
  source = sources.ImageFolderSource(bad_folder[0])
  draws = np.array([source.substitute(i, a) for i in range(40) for a in range(25)])
  assert (draws != np.repeat(np.arange(40), 25)).all()  # never the failed record itself
  counts = np.bincount(draws, minlength=40)
  assert counts.min() > 0.4 * counts.mean() and counts.max() < 1.8 * counts.mean()
  assert source.substitute(7, 0) == pickle.loads(pickle.dumps(source)).substitute(7, 0)


def test_all_bad_folder_is_a_data_error(tmp_path):
  for i in range(3):
    (tmp_path / f'{i}.jpg').write_bytes(b'garbage')
  source = sources.ImageFolderSource(str(tmp_path))
  with pytest.raises(sources.DataError, match='looks broken') as info:
    source[1]
  message = str(info.value)
  assert '\n' not in message and '1.jpg' in message and str(sources.MAX_ATTEMPTS) in message


# ---------------------------------------------------------------------------------------------
# TFDS
# ---------------------------------------------------------------------------------------------


def test_tfds_source_reads_prepared_dataset(tfds_dir, cfg_factory):
  cfg = cfg_factory(source='tfds', tfds_name='sslx_tiny_images', tfds_data_dir=tfds_dir)
  source = sources.make_source(cfg, 'train')
  assert len(source) == 7 and source.num_classes == 3
  seen = {}
  for i in range(len(source)):
    record = source[i]
    assert record['image'].dtype == np.uint8 and record['image'].shape[1:] == (30, 3)
    assert tuple(record['image_size']) == record['image'].shape[:2]
    seen[int(record['image'][0, 0, 0]) // 10] = int(record['label'])
  assert seen == {i: i % 3 for i in range(7)}
  clone = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(clone[2]['image'], source[2]['image'])
  assert len(sources.make_source(cfg, 'test')) == 3
  with pytest.raises(sources.DataError, match='not .validation'):
    sources.make_source(cfg, 'validation')


def test_tfds_not_prepared_says_how(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  with pytest.raises(sources.DataError, match='downloads/manual') as info:
    sources.TfdsSource('imagenet2012', 'train', str(tmp_path))
  assert 'tfds build imagenet2012' in str(info.value)
  assert 'array_record' in str(info.value)
  assert not (tmp_path / 'imagenet2012').exists()  # nothing was built or downloaded


def test_importing_sslx_data_needs_no_tensorflow():
  code = (
    'import sys; import sslx.data.pipeline, sslx.data.augment, sslx.data.sources, '
    'sslx.data.crops; bad = [m for m in ("tensorflow", "tensorflow_datasets") '
    'if m in sys.modules]; assert not bad, bad'
  )
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  subprocess.run([sys.executable, '-c', code], check=True, cwd=root, timeout=120)
