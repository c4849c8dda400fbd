"""Training and evaluation pipelines: layout, determinism, epochs, sharding, resume, checkpoints."""

import itertools
import json

import grain
import numpy as np
import pytest

from sslx.data import pipeline, sources

KEYS = {
  'global_crops': np.uint8,
  'local_crops': np.uint8,
  'global_boxes': np.float32,
  'global_flips': np.bool_,
  'local_boxes': np.float32,
  'local_flips': np.bool_,
  'image_size': np.int32,
  'label': np.int32,
  'skipped': np.int32,
  'bad_indices': np.int64,
  'index': np.int64,
  'gg_rects': np.float32,
  'gg_valid': np.bool_,
  'lg_rects': np.float32,
  'lg_valid': np.bool_,
}


def _take(dataset_or_iter, n):
  it = iter(dataset_or_iter)
  return it, [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _close(it):
  if hasattr(it, 'close'):
    it.close()


def test_train_batch_layout(fmnist_cfg):
  it, (batch,) = _take(pipeline.train_dataset(fmnist_cfg, seed=0, batch_size=8), 1)
  _close(it)
  assert set(batch) == set(KEYS)
  for key, dtype in KEYS.items():
    assert batch[key].dtype == dtype, key
  assert batch['global_crops'].shape == (8, 2, 32, 32, 3)
  assert batch['local_crops'].shape == (8, 3, 16, 16, 3)
  assert batch['global_boxes'].shape == (8, 2, 4) and batch['local_boxes'].shape == (8, 3, 4)
  assert batch['global_flips'].shape == (8, 2) and batch['local_flips'].shape == (8, 3)
  assert batch['image_size'].tolist() == [[28, 28]] * 8
  labels = sources.FashionMnistSource(fmnist_cfg.path, 'train')._labels
  np.testing.assert_array_equal(batch['label'], labels[batch['index']])
  assert len(set(batch['index'].tolist())) == 8  # shuffled, no repeats within a batch
  assert batch['index'].tolist() != list(range(8))
  boxes = batch['local_boxes']
  assert np.all(boxes[..., 2] * boxes[..., 3] <= 0.45 * 28 * 28)  # local scale (0.05, 0.4)
  # SERE overlap rectangles of every (global, other) crop pair, from the recorded boxes.
  assert batch['gg_rects'].shape == (8, 2, 2, 2, 4) and batch['gg_valid'].shape == (8, 2, 2)
  assert batch['lg_rects'].shape == (8, 3, 2, 2, 4) and batch['lg_valid'].shape == (8, 3, 2)
  from sslx.data import overlap

  want = overlap.batch_overlaps(
    batch['global_boxes'], batch['global_flips'], batch['local_boxes'], batch['local_flips']
  )
  for key, value in want.items():
    np.testing.assert_array_equal(batch[key], value)


def test_zero_local_crops(fmnist_cfg):
  fmnist_cfg.local_crops.number = 0
  it, (batch,) = _take(pipeline.train_dataset(fmnist_cfg, seed=0, batch_size=4), 1)
  _close(it)
  assert batch['local_crops'].shape == (4, 0, 16, 16, 3)
  assert batch['local_boxes'].shape == (4, 0, 4) and batch['local_flips'].shape == (4, 0)


def test_same_seed_same_batches_other_seed_differs(fmnist_cfg):
  it_a, a = _take(pipeline.train_dataset(fmnist_cfg, seed=3, batch_size=8), 3)
  it_b, b = _take(pipeline.train_dataset(fmnist_cfg, seed=3, batch_size=8), 3)
  it_c, c = _take(pipeline.train_dataset(fmnist_cfg, seed=4, batch_size=8), 1)
  for it in (it_a, it_b, it_c):
    _close(it)
  _assert_same(a, b)
  assert not np.array_equal(a[0]['index'], c[0]['index'])


@pytest.fixture
def folder_cfg(image_folder, cfg_factory):
  root, _ = image_folder
  cfg = cfg_factory(source='image_folder', path=root, eval_resize=40, eval_size=32)
  return cfg


def test_epochs_reshuffle_and_recrop(folder_cfg):
  # 10 images, batch 5: batches 0-1 are epoch 0, batches 2-3 epoch 1.
  it, batches = _take(pipeline.train_dataset(folder_cfg, seed=0, batch_size=5), 4)
  _close(it)
  epoch0 = np.concatenate([b['index'] for b in batches[:2]])
  epoch1 = np.concatenate([b['index'] for b in batches[2:]])
  assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(10))
  assert epoch0.tolist() != epoch1.tolist()
  boxes = {}
  for b in batches:
    for index, box in zip(b['index'].tolist(), b['global_boxes']):
      boxes.setdefault(index, []).append(box)
  assert all(not np.array_equal(first, second) for first, second in boxes.values())
  # The corrupt file is replaced (by its successor) and counted once per epoch.
  skipped = np.concatenate([b['skipped'] for b in batches])
  assert skipped.sum() == 2 and set(skipped.tolist()) == {0, 1}
  sizes = np.concatenate([b['image_size'] for b in batches])
  assert [512, 512] in sizes.tolist() and [10, 10] in sizes.tolist()


def test_processes_take_their_rows_of_the_same_global_batch(folder_cfg):
  """The data order is the run's: 2 processes build exactly the rows of the 1-process batch."""
  it, whole = _take(pipeline.train_dataset(folder_cfg, seed=0, batch_size=4), 3)
  _close(it)
  parts = []
  for process in range(2):
    it, batches = _take(
      pipeline.train_dataset(
        folder_cfg, seed=0, batch_size=2, process_index=process, process_count=2
      ),
      3,
    )
    _close(it)
    parts.append(batches)
  for step in range(3):
    joined = {k: np.concatenate([parts[0][step][k], parts[1][step][k]]) for k in whole[step]}
    _assert_same([whole[step]], [joined])
  # 10 records, batch 4: two steps per epoch (the last 2 records of each epoch are dropped, as
  # DINO's loader does); step 2 starts a new permutation.
  first_epoch = np.concatenate([whole[0]['index'], whole[1]['index']])
  assert len(set(first_epoch.tolist())) == 8
  with pytest.raises(sources.DataError, match='lower the batch size'):
    pipeline.train_dataset(folder_cfg, seed=0, batch_size=6, process_index=0, process_count=2)


def test_resume_from_state_gives_the_same_batches(fmnist_cfg):
  dataset = pipeline.train_dataset(fmnist_cfg, seed=1, batch_size=8)
  it, _ = _take(dataset, 3)
  state = it.get_state()
  assert state['step'] == 3 and state['global_batch_size'] == 8
  expected = [next(it) for _ in range(3)]
  _close(it)
  resumed = iter(pipeline.train_dataset(fmnist_cfg, seed=1, batch_size=8))
  resumed.set_state(json.loads(json.dumps(state)))
  _assert_same(expected, [next(resumed) for _ in range(3)])
  _close(resumed)
  # Two processes of half the batch resume from the same state: the halves of the same batches.
  halves = []
  for process in range(2):
    it = iter(
      pipeline.train_dataset(
        fmnist_cfg, seed=1, batch_size=4, process_index=process, process_count=2
      )
    )
    it.set_state(state)
    halves.append(next(it))
    _close(it)
  np.testing.assert_array_equal(
    np.concatenate([h['global_crops'] for h in halves]), expected[0]['global_crops']
  )


def test_resume_refuses_another_data_order(fmnist_cfg):
  state = iter(pipeline.train_dataset(fmnist_cfg, seed=1, batch_size=8)).get_state()
  for other in (dict(seed=2, batch_size=8), dict(seed=1, batch_size=4)):
    it = iter(pipeline.train_dataset(fmnist_cfg, **other))
    with pytest.raises(sources.DataError, match='another data order.*new workdir'):
      it.set_state(state)


@pytest.mark.parametrize('workers,threads', [(2, 0), (0, 3), (3, 1)])
def test_workers_and_threads_never_change_the_batches(fmnist_cfg, workers, threads):
  fmnist_cfg.workers, fmnist_cfg.read_threads = 0, 0
  it, reference = _take(pipeline.train_dataset(fmnist_cfg, seed=2, batch_size=4), 5)
  _close(it)
  fmnist_cfg.workers, fmnist_cfg.read_threads = workers, threads
  it, batches = _take(pipeline.train_dataset(fmnist_cfg, seed=2, batch_size=4), 5)
  _close(it)
  _assert_same(reference, batches)
  # Resuming with yet another worker count continues exactly.
  fmnist_cfg.workers = 1 if workers != 1 else 0
  it = iter(pipeline.train_dataset(fmnist_cfg, seed=2, batch_size=4))
  it.set_state({**it.get_state(), 'step': 3})
  _assert_same(reference[3:], [next(it) for _ in range(2)])
  _close(it)


def test_eval_dataset_pads_and_keeps_order(fmnist_cfg):
  batches = list(pipeline.eval_dataset(fmnist_cfg, 'test', batch_size=4096))
  assert len(batches) == 3
  mask = np.concatenate([b['mask'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  assert mask.sum() == 10000 and not mask[10000:].any()
  source = sources.FashionMnistSource(fmnist_cfg.path, 'test')
  np.testing.assert_array_equal(labels[:10000], source._labels)
  assert np.all(labels[10000:] == -1)
  np.testing.assert_array_equal(batches[1]['image'][5], source[4096 + 5]['image'])
  assert batches[0]['image'].shape == (4096, 28, 28, 3) and batches[0]['image'].dtype == np.uint8


def test_eval_dataset_sharded_over_processes(fmnist_cfg):
  per_process = []
  for process in range(3):
    batches = list(
      pipeline.eval_dataset(
        fmnist_cfg, 'test', batch_size=1000, process_index=process, process_count=3
      )
    )
    per_process.append(batches)
  assert [len(b) for b in per_process] == [4, 4, 4]  # same count on every process
  total = sum(int(b['mask'].sum()) for batches in per_process for b in batches)
  assert total == 10000
  labels = sources.FashionMnistSource(fmnist_cfg.path, 'test')._labels
  got = np.concatenate([b['label'] for b in per_process[1]])[:3333]
  np.testing.assert_array_equal(got, labels[1::3])


def test_eval_dataset_image_folder(folder_cfg):
  dataset = pipeline.eval_dataset(folder_cfg, 'things', batch_size=4)
  batches = list(dataset)
  assert len(list(dataset)) == 2  # iterable twice
  assert [b['image'].shape for b in batches] == [(4, 32, 32, 3)] * 2
  assert np.concatenate([b['mask'] for b in batches]).sum() == 6
  assert np.concatenate([b['label'] for b in batches])[:6].tolist() == [-1] * 6  # flat folder


def test_steps_per_epoch_and_num_classes(fmnist_cfg, folder_cfg):
  assert pipeline.steps_per_epoch(fmnist_cfg, 256) == 60000 // 256
  assert pipeline.num_classes(fmnist_cfg) == 10
  assert pipeline.num_classes(folder_cfg) == 2
  with pytest.raises(sources.DataError, match='fewer than one global batch'):
    pipeline.steps_per_epoch(folder_cfg, 64)


def test_eval_num_classes_checks_the_evaluation_splits(fmnist_cfg, folder_cfg, tmp_path):
  assert pipeline.eval_num_classes(fmnist_cfg) == 10
  # The fixture folder's root has class sub-folders: labelled for the 'train' split.
  with folder_cfg.unlocked():
    folder_cfg.eval_train_split = folder_cfg.eval_test_split = 'train'
  assert pipeline.eval_num_classes(folder_cfg) == 2
  # 'things' has images but no class sub-folders: no labels, and the message names the way out.
  with folder_cfg.unlocked():
    folder_cfg.eval_test_split = 'things'
  with pytest.raises(sources.DataError, match="'things'.*no labels.*knn_every_steps=0"):
    pipeline.eval_num_classes(folder_cfg)
  with folder_cfg.unlocked():
    folder_cfg.eval_test_split = 'validation'
  with pytest.raises(sources.DataError, match="No folder.*'validation'.*knn_every_steps=0"):
    pipeline.eval_num_classes(folder_cfg)


def test_tfds_training_stream(tfds_dir, cfg_factory):
  cfg = cfg_factory(source='tfds', tfds_name='sslx_tiny_images', tfds_data_dir=tfds_dir)
  it = iter(pipeline.train_dataset(cfg, seed=0, batch_size=7))
  batch = next(it)
  _close(it)
  assert sorted(batch['index'].tolist()) == list(range(7))
  assert sorted(batch['image_size'][:, 0].tolist()) == list(range(20, 27))
  assert pipeline.num_classes(cfg) == 3
  assert list(itertools.islice(pipeline.eval_dataset(cfg, 'test', batch_size=2), 5))[1][
    'mask'
  ].tolist() == [True, False]


def test_block_masks_ride_in_the_batch_without_changing_the_crops(fmnist_cfg):
  it, (plain,) = _take(pipeline.train_dataset(fmnist_cfg, seed=5, batch_size=8), 1)
  _close(it)
  fmnist_cfg.masks = dict(
    scheme='beit',
    ratios=(0.0,),
    ratio_vars=(0.0,),
    num_masked=20,
    min_area=4,
    max_area=0,
    aspect=0.3,
    exact=True,
  )
  it, (masked, again) = _take(
    pipeline.train_dataset(fmnist_cfg, seed=5, batch_size=8, patch_size=4), 2
  )
  _close(it)
  assert masked['global_masks'].shape == (8, 2, 8, 8) and masked['global_masks'].dtype == bool
  assert (masked['global_masks'].sum(axis=(2, 3)) == 20).all()  # exact count, every crop
  assert 'global_masks' not in plain
  for key in ('global_crops', 'local_crops', 'global_boxes', 'index'):
    np.testing.assert_array_equal(plain[key], masked[key], err_msg=key)
  assert not np.array_equal(masked['global_masks'], again['global_masks'])
  fmnist_cfg.global_crops.size = 30
  with pytest.raises(pipeline.DataError, match='patches'):
    pipeline.train_dataset(fmnist_cfg, seed=5, batch_size=8, patch_size=4)


def test_batches_for_worker_processes_go_straight_into_shared_memory(fmnist_cfg):
  """grain asks the dataset it hands to worker processes for shared-memory output; the batch
  function then writes every array there, with the values of an ordinary batch."""
  fmnist_cfg.prefetch_buffer = 0
  plain = next(iter(pipeline.train_dataset(fmnist_cfg, seed=4, batch_size=4)))
  dataset = pipeline.train_dataset(fmnist_cfg, seed=4, batch_size=4)
  dataset.enable_shared_memory_output()  # what grain's mp_prefetch does
  shared = next(iter(dataset))
  assert plain.keys() == shared.keys()
  for key in plain:
    np.testing.assert_array_equal(shared[key], plain[key], err_msg=key)
  # The stacked arrays are in shared memory (the overlaps, made from them afterwards, are small).
  for key in ('global_crops', 'local_crops', 'global_boxes', 'label', 'index'):
    assert isinstance(shared[key], grain.multiprocessing.SharedMemoryArray), key
  for value in shared.values():  # free every segment this batch made
    if isinstance(value, grain.multiprocessing.SharedMemoryArray):
      value.unlink_on_del()


def test_canvas_batch_in_shared_memory_pads_with_zeros():
  """Device-crop batches: each image padded into a reused or shared buffer leaves zeros around it."""
  rng = np.random.default_rng(0)
  examples = []
  for i, (h, w) in enumerate([(5, 9), (16, 16), (12, 3)]):
    boxes = np.concatenate([rng.uniform(0, 4, (3, 2)), rng.uniform(1, 4, (3, 2))], axis=1)
    examples.append(
      {
        'canvas': rng.integers(1, 256, (h, w, 3), dtype=np.uint8),
        'canvas_extent': np.array([h, w], np.int32),
        'global_boxes': boxes[:2].astype(np.float32),
        'global_flips': np.array([0, 1], bool),
        'local_boxes': boxes[2:].astype(np.float32),
        'local_flips': np.array([1], bool),
        'label': np.int32(i),
      }
    )
  batch_fn = pipeline._Batch(16)  # pylint: disable=protected-access
  batch_fn.enable_shared_memory_output()
  batch = batch_fn(examples)
  assert isinstance(batch['canvas'], grain.multiprocessing.SharedMemoryArray)
  assert batch['canvas'].shape == (3, 16, 16, 3) and list(batch['label']) == [0, 1, 2]
  for i, e in enumerate(examples):
    h, w = e['canvas'].shape[:2]
    np.testing.assert_array_equal(batch['canvas'][i, :h, :w], e['canvas'])
    assert batch['canvas'][i].sum() == e['canvas'].sum()  # zeros everywhere else
  assert batch['gg_rects'].shape == (3, 2, 2, 2, 4) and batch['lg_valid'].shape == (3, 1, 2)
  for value in batch.values():
    if isinstance(value, grain.multiprocessing.SharedMemoryArray):
      value.unlink_on_del()
