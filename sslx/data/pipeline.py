"""grain input pipelines: the infinite multi-crop training stream and one-pass evaluation batches.

Training (per process): source[process_index::process_count] -> shuffle (reshuffled every epoch) ->
repeat forever -> multi-crop with a per-record generator -> batch (drop remainder; SERE overlaps;
written straight into shared memory in a worker) -> worker processes (``workers`` > 0) -> a thread
buffer of ``prefetch_buffer`` ready batches. The returned ``grain.IterDataset``'s iterator supports
``get_state()`` / ``set_state()`` and ``grain.checkpoint.CheckpointSave/Restore``.

Config keys read (``config.data``): source, path, tfds_name, tfds_data_dir, train_split,
global_crops, local_crops, interpolation, eval_resize, eval_size, workers, prefetch_buffer, and with
defaults: read_threads (threads reading/cropping records per process, 4), crop_ratio ((3/4, 4/3)),
crops_on ('host': PIL resamples the crops; 'device': the host sends a canvas per image and the
train step resamples, sslx/data/device_crops.py), canvas_size (512).
grain is imported inside the functions, so this module imports on hosts without grain.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from sslx.data import crops as crops_lib
from sslx.data import device_crops
from sslx.data import masks as masks_lib
from sslx.data import overlap as overlap_lib
from sslx.data import sources
from sslx.data import worker_guard

if TYPE_CHECKING:
  import grain

DataError = sources.DataError


def _crop_spec(cfg: Any) -> crops_lib.CropSpec:
  return crops_lib.CropSpec(int(cfg.number), int(cfg.size), tuple(float(s) for s in cfg.scale))


def _derive_seed(*values: int) -> int:
  return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0])


def _train_min_side(global_spec: crops_lib.CropSpec, local_spec: crops_lib.CropSpec) -> int:
  # A JPEG may be draft-decoded only so far that even the smallest box of each crop kind keeps
  # about one decoded pixel per output pixel.
  sides = [s.size / math.sqrt(s.scale[0]) for s in (global_spec, local_spec) if s.number > 0]
  return int(math.ceil(max(sides))) if sides else 1


class _MultiCrop:
  """Record -> multi-crop training example (picklable for worker processes)."""

  def __init__(self, global_spec: crops_lib.CropSpec, local_spec: crops_lib.CropSpec,
               interpolation: str, ratio: tuple[float, float],
               mask_spec: masks_lib.MaskSpec = masks_lib.MaskSpec(), patch_size: int = 16,
               canvas_size: int = 0):
    self.global_spec = global_spec
    self.local_spec = local_spec
    self.interpolation = interpolation
    self.ratio = ratio
    self.mask_spec = mask_spec
    self.patch_size = patch_size
    self.canvas_size = canvas_size  # > 0: crops are resampled on the device (device_crops.py)

  def __call__(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if self.canvas_size:
      out = crops_lib.multi_crop_boxes(rng, element['image_size'], self.global_spec,
                                       self.local_spec, ratio=self.ratio)
      # The source already fitted the image to the canvas (train_source); _Batch pads it.
      d = float(element['decode_scale'])
      out.update(canvas=element['image'],
                 canvas_extent=np.asarray(element['image'].shape[:2], np.int32),
                 canvas_scale=(element['canvas_scale'] * d).astype(np.float32))
    else:
      out = crops_lib.multi_crop(rng, element['image'], element['image_size'], self.global_spec,
                                 self.local_spec, interpolation=self.interpolation,
                                 ratio=self.ratio, decode_scale=float(element['decode_scale']))
    out['image_size'] = np.asarray(element['image_size'], np.int32)
    if self.mask_spec.scheme != 'none':
      # Drawn after all crops, from the same record generator: masks never change the crops.
      side = self.global_spec.size // self.patch_size
      out['global_masks'] = np.stack(
          [self.mask_spec.draw(rng, (side, side)) for _ in range(self.global_spec.number)])
    for key in ('label', 'skipped', 'index'):
      out[key] = element[key]
    return out


class _Batch:
  """grain's ``batch_fn``: stacks the examples, pads the variable-size 'canvas' images straight
  into one [B, C, C, 3] array, and adds the SERE overlaps.

  In worker processes grain calls ``enable_shared_memory_output`` (only on the dataset handed to
  ``mp_prefetch``, so the overlaps are made here rather than in a later map): the batch is then
  written straight into shared memory and reaches the main process without another copy.
  Picklable for worker processes.
  """

  def __init__(self, canvas_size: int):
    self.canvas_size = canvas_size
    self._shared_memory = False

  def enable_shared_memory_output(self) -> None:
    self._shared_memory = True

  def _empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    if self._shared_memory:
      import grain.multiprocessing  # pylint: disable=g-import-not-at-top
      return grain.multiprocessing.SharedMemoryArray(shape, dtype)
    return np.empty(shape, dtype)

  def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
    batch = {}
    for key in examples[0]:
      if key == 'canvas':
        continue
      first = np.asarray(examples[0][key])
      batch[key] = np.stack([e[key] for e in examples],
                            out=self._empty((len(examples),) + first.shape, first.dtype))
    if 'canvas' in examples[0]:
      size = self.canvas_size
      batch['canvas'] = crops_lib.stack_canvases(
          [e['canvas'] for e in examples], size,
          out=self._empty((len(examples), size, size, 3), np.uint8))
    return _add_overlaps(batch)


def _add_overlaps(batch: dict[str, Any]) -> dict[str, Any]:
  """Adds the SERE overlap rectangles of every (global, other) crop pair (overlap.py)."""
  batch.update(overlap_lib.batch_overlaps(batch['global_boxes'], batch['global_flips'],
                                          batch['local_boxes'], batch['local_flips']))
  return batch


def _read_options(data_cfg: Any, *, min_buffer: int = 16, per_thread: int = 4,
                  ) -> 'grain.ReadOptions':
  import grain  # pylint: disable=g-import-not-at-top
  threads = int(data_cfg.get('read_threads', 4))
  return grain.ReadOptions(num_threads=threads,
                           prefetch_buffer_size=max(min_buffer, per_thread * threads))


def _add_prefetch(ds: 'grain.IterDataset', data_cfg: Any) -> 'grain.IterDataset':
  import grain  # pylint: disable=g-import-not-at-top
  workers = int(data_cfg.get('workers', 0))
  if workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=2),
                        worker_init_fn=worker_guard.init_worker)  # exit with the parent
  buffer = int(data_cfg.get('prefetch_buffer', 0))
  if buffer > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=buffer)
  return ds


def _check_shard(process_index: int, process_count: int) -> None:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'Need 0 <= process_index < process_count, got {process_index}, '
                     f'{process_count}.')


def canvas_size_of(data_cfg: Any) -> int:
  """0 when crops are resampled on the host, else the device canvas side (crops_on='device')."""
  where = data_cfg.get('crops_on', 'host')
  if where not in ('host', 'device'):
    raise DataError(f"config.data.crops_on={where!r}; valid: 'host', 'device'")
  if where == 'host':
    return 0
  size = int(data_cfg.get('canvas_size', 512))
  if size < 1:
    raise DataError(f'config.data.canvas_size={size}; it must be >= 1 with crops_on=device')
  return size


def train_source(data_cfg: Any) -> Any:
  """The random-access source of the training split (draft decoding tuned to the crop sizes;
  images fitted to the canvas when the crops are resampled on the device)."""
  min_side = _train_min_side(_crop_spec(data_cfg.global_crops), _crop_spec(data_cfg.local_crops))
  source = sources.make_source(data_cfg, data_cfg.train_split, min_side=min_side)
  source.set_canvas(canvas_size_of(data_cfg), data_cfg.interpolation)
  return source


def train_dataset(data_cfg: Any, *, seed: int, batch_size: int, process_index: int = 0,
                  process_count: int = 1, patch_size: int = 16) -> 'grain.IterDataset':
  """The infinite, shuffled, host-sharded multi-crop training stream of this process.

  Args:
    data_cfg: ``config.data``.
    seed: run seed; shuffle order and crops derive from (seed, process_index).
    batch_size: examples per batch on THIS process.
    patch_size: the model's patch size; block masks live on the global crops' patch grid.
  Returns:
    A grain.IterDataset of dicts: 'global_crops' uint8 [B, Ng, G, G, 3], 'local_crops' uint8
    [B, Nl, L, L, 3], 'global_boxes' float32 [B, Ng, 4] and 'local_boxes' float32 [B, Nl, 4]
    ((x0, y0, w, h) in original pixels), 'global_flips' bool [B, Ng], 'local_flips' bool [B, Nl],
    'image_size' int32 [B, 2] (original height, width), 'label' int32 [B] (-1 unknown),
    'skipped' int32 [B], 'index' int64 [B] (requested record index in the source), and the
    overlap of every (global, other) crop pair for SERE (sslx/data/overlap.py): 'gg_rects' float32
    [B, Ng, Ng, 2, 4], 'gg_valid' bool [B, Ng, Ng], 'lg_rects' float32 [B, Nl, Ng, 2, 4],
    'lg_valid' bool [B, Nl, Ng]. With ``data_cfg.masks.scheme`` other than 'none' (sslx/data/masks.py)
    also 'global_masks' bool [B, Ng, G/p, G/p] (True = masked patch).
    With ``data_cfg.crops_on == 'device'`` there are no '*_crops' (``device_crops.canvas_crops``
    makes them in the train step) but 'canvas' uint8 [B, C, C, 3] (the decoded image, shrunk
    only if larger than C = ``data_cfg.canvas_size``, zero-padded), 'canvas_extent' int32 [B, 2]
    (its valid height, width) and 'canvas_scale' float32 [B, 2] (canvas pixels per original
    pixel along y, x).
  Raises:
    DataError: missing data, or fewer records on this process than one batch.
  """
  import grain  # pylint: disable=g-import-not-at-top
  _check_shard(process_index, process_count)
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
  global_spec = _crop_spec(data_cfg.global_crops)
  local_spec = _crop_spec(data_cfg.local_crops)
  crops_lib.resample_filter(data_cfg.interpolation)  # fail early on a bad name
  canvas_size = canvas_size_of(data_cfg)
  if canvas_size and data_cfg.interpolation.lower() not in device_crops.FILTERS:
    raise DataError(f"config.data.interpolation={data_cfg.interpolation!r} is not available with "
                    f"config.data.crops_on='device'; use one of {sorted(device_crops.FILTERS)} "
                    "or crops_on='host'.")
  ratio = tuple(float(r) for r in data_cfg.get('crop_ratio', crops_lib.DEFAULT_RATIO))
  source = train_source(data_cfg)
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if len(ds) < batch_size:
    raise DataError(f'{source!r} gives process {process_index} only {len(ds)} records, fewer than '
                    f'one batch of {batch_size}; lower the batch size.')
  ds = ds.shuffle(seed=_derive_seed(seed, process_index, 0))
  ds = ds.repeat(None)  # epoch-indexed reshuffle and fresh crops every epoch
  mask_spec = masks_lib.MaskSpec.from_config(data_cfg.get('masks'))
  if mask_spec.scheme != 'none' and global_spec.size % patch_size:
    raise DataError(f'global crops of {global_spec.size} px do not tile into {patch_size}-px '
                    'patches; masks need whole patches (change data.global_crops.size)')
  ds = ds.random_map(_MultiCrop(global_spec, local_spec, data_cfg.interpolation, ratio, mask_spec,
                                patch_size, canvas_size), seed=_derive_seed(seed, process_index, 1))
  ds = ds.to_iter_dataset(_read_options(data_cfg))
  ds = ds.batch(batch_size, drop_remainder=True, batch_fn=_Batch(canvas_size))
  return _add_prefetch(ds, data_cfg)


def steps_per_epoch(data_cfg: Any, global_batch_size: int) -> int:
  """len(training source) // global_batch_size (>= 1).

  Raises:
    DataError: the training split has fewer records than one global batch.
  """
  n = len(train_source(data_cfg))
  if n < global_batch_size:
    raise DataError(f'The training split has {n} records, fewer than one global batch of '
                    f'{global_batch_size}; lower the batch size.')
  return n // global_batch_size


def num_classes(data_cfg: Any) -> int | None:
  """Number of classes of the training split (None for an unlabelled image folder)."""
  return sources.source_num_classes(train_source(data_cfg))


def eval_num_classes(data_cfg: Any) -> int:
  """Number of classes of the labelled evaluation splits (kNN, probes), checked before any use.

  Trainers call it before compiling, so a run whose evaluation data is missing or unlabelled
  stops at once rather than at its first evaluation hours later.

  Raises:
    DataError: a split cannot be opened, or has no labels (an image folder without class
      sub-folders; a TFDS dataset without a 'label' feature).
  """
  off = 'or train without the kNN: --config.eval.knn_every_steps=0'
  classes = {}
  for split in dict.fromkeys((data_cfg.eval_train_split, data_cfg.eval_test_split)):
    try:
      source = sources.make_source(data_cfg, split)
    except DataError as e:
      raise DataError(f'{e} ({off}).') from e
    classes[split] = sources.source_num_classes(source)
    if classes[split] is None:
      raise DataError(f'the evaluation split {split!r} ({source!r}) has no labels: the kNN and '
                      'the probes need labelled images (for an image folder, '
                      f'<path>/{split}/<class>/... sub-folders), {off}.')
  return max(classes.values())


class _EvalRecord:
  """Padded position -> evaluation example; positions past this process's records are padding."""

  def __init__(self, source: Any, process_index: int, process_count: int, resize: int, size: int,
               interpolation: str):
    self.source = source
    self.process_index = process_index
    self.process_count = process_count
    self.resize = resize
    self.size = size
    self.interpolation = interpolation

  def __call__(self, position: int) -> dict[str, np.ndarray]:
    index = self.process_index + int(position) * self.process_count
    if index >= len(self.source):
      return {'image': np.zeros((self.size, self.size, 3), np.uint8), 'label': np.int32(-1),
              'mask': np.bool_(False)}
    record = self.source[index]
    image = crops_lib.resize_center_crop(record['image'], self.resize, self.size,
                                         self.interpolation)
    return {'image': image, 'label': np.int32(record['label']), 'mask': np.bool_(True)}


class _EvalBatch:
  """Batch index -> the stacked evaluation examples of its `batch_size` padded positions."""

  def __init__(self, record: _EvalRecord, batch_size: int):
    self.record = record
    self.batch_size = batch_size

  def __call__(self, batch_index: int) -> dict[str, np.ndarray]:
    start = int(batch_index) * self.batch_size
    examples = [self.record(position) for position in range(start, start + self.batch_size)]
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


def eval_dataset(data_cfg: Any, split: str, *, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> 'grain.IterDataset':
  """One ordered pass over a labelled split for k-NN, sharded over processes.

  Process p takes records p, p + P, p + 2P, ...; every process yields the same number of batches
  (ceil(ceil(N / P) / batch_size)) so collective ops line up, and the tail is padded.

  Returns:
    An iterable (iterate it again for another pass) of dicts 'image' uint8 [b, S, S, 3] (shorter
    side resized to eval_resize, centre crop eval_size), 'label' int32 [b], 'mask' bool [b]
    (False on padding), b = batch_size.
  """
  import grain  # pylint: disable=g-import-not-at-top
  _check_shard(process_index, process_count)
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
  resize, size = int(data_cfg.eval_resize), int(data_cfg.eval_size)
  if size > resize:
    raise DataError(f'config.data.eval_size {size} > eval_resize {resize}; eval_resize must be '
                    '>= eval_size.')
  crops_lib.resample_filter(data_cfg.interpolation)
  source = sources.make_source(data_cfg, split, min_side=resize)
  per_process = -(-len(source) // process_count)
  num_batches = -(-per_process // batch_size)
  record = _EvalRecord(source, process_index, process_count, resize, size, data_cfg.interpolation)
  # One grain element per batch, not per record: grain's per-record overhead (~120 us) was ten
  # times the cost of a Fashion-MNIST record; threads and workers still share out the batches.
  # One buffered batch per thread, not four as for records (500 images of 224 px: 1.2 GB).
  ds = grain.MapDataset.range(num_batches).map(_EvalBatch(record, batch_size))
  options = _read_options(data_cfg, min_buffer=1, per_thread=1)
  return _add_prefetch(ds.to_iter_dataset(options), data_cfg)
