"""grain input pipelines: the infinite multi-crop training stream and one-pass evaluation batches.

Training: global step -> this process's rows of the step's global batch (an epoch-wise shuffle of
all records, drop-last; multi-crop with a generator per (step, row); stacked, with the SERE
overlaps, straight into shared memory in a worker) -> worker processes (``workers`` > 0) -> a
thread buffer of ``prefetch_buffer`` ready batches. What a step holds depends on the seed and the
step only, never on the number of processes, workers or threads (``_TrainBatch``); the iterator's
state is the next step (``TrainIterator``), so resume works across any of those changes.

Config keys read (``config.data``): source, path, tfds_name, tfds_data_dir, train_split,
global_crops, local_crops, interpolation, eval_resize, eval_size, workers, prefetch_buffer, and with
defaults: read_threads (threads reading/cropping records per process, 4), crop_ratio ((3/4, 4/3)),
crops_on ('host': PIL resamples the crops; 'device': the host sends a canvas per image and the
train step resamples, sslx/data/device_crops.py), canvas_size (512).
grain is imported inside the functions, so this module imports on hosts without grain.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from sslx.data import crops as crops_lib
from sslx.data import device_crops, sources, worker_guard
from sslx.data import masks as masks_lib
from sslx.data import overlap as overlap_lib

if TYPE_CHECKING:
  import grain

DataError = sources.DataError


def _pair(values: Any, name: str) -> tuple[float, float]:
  """(low, high) from a config sequence; a wrong length is the user's to fix."""
  if len(values) != 2:
    raise DataError(f'{name} must hold two numbers (low, high), got {tuple(values)}.')
  return float(values[0]), float(values[1])


def _crop_spec(cfg: Any) -> crops_lib.CropSpec:
  return crops_lib.CropSpec(int(cfg.number), int(cfg.size), _pair(cfg.scale, 'crop scale'))


def _derive_seed(*values: int) -> int:
  return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0])


def _train_min_side(global_spec: crops_lib.CropSpec, local_spec: crops_lib.CropSpec) -> int:
  # A JPEG may be draft-decoded only so far that even the smallest box of each crop kind keeps
  # about one decoded pixel per output pixel.
  sides = [s.size / math.sqrt(s.scale[0]) for s in (global_spec, local_spec) if s.number > 0]
  return int(math.ceil(max(sides))) if sides else 1


class _MultiCrop:
  """Record -> multi-crop training example (picklable for worker processes)."""

  def __init__(
    self,
    global_spec: crops_lib.CropSpec,
    local_spec: crops_lib.CropSpec,
    interpolation: str,
    ratio: tuple[float, float],
    mask_spec: masks_lib.MaskSpec = masks_lib.MaskSpec(),
    patch_size: int = 16,
    canvas_size: int = 0,
    host_augment: Any = None,
  ):
    self.global_spec = global_spec
    self.local_spec = local_spec
    self.interpolation = interpolation
    self.ratio = ratio
    self.mask_spec = mask_spec
    self.patch_size = patch_size
    self.canvas_size = canvas_size  # > 0: crops are resampled on the device (device_crops.py)
    # (uint8 image, generator) -> uint8 image, applied to every global crop (fine-tuning's
    # RandAugment, sslx/data/randaugment.py); drawn after the crops and masks.
    self.host_augment = host_augment

  def __call__(
    self, element: dict[str, Any], rng: np.random.Generator, *, masks_on: bool = True
  ) -> dict[str, Any]:
    """One record's crops (and masks: all False when not `masks_on`, drawn after the crops)."""
    if self.canvas_size:
      out = crops_lib.multi_crop_boxes(
        rng, element['image_size'], self.global_spec, self.local_spec, ratio=self.ratio
      )
      # The source already fitted the image to the canvas (train_source); _Batch pads it.
      d = float(element['decode_scale'])
      out.update(
        canvas=element['image'],
        canvas_extent=np.asarray(element['image'].shape[:2], np.int32),
        canvas_scale=(element['canvas_scale'] * d).astype(np.float32),
      )
    else:
      out = crops_lib.multi_crop(
        rng,
        element['image'],
        element['image_size'],
        self.global_spec,
        self.local_spec,
        interpolation=self.interpolation,
        ratio=self.ratio,
        decode_scale=float(element['decode_scale']),
      )
    out['image_size'] = np.asarray(element['image_size'], np.int32)
    if self.mask_spec.scheme != 'none':
      # Drawn after all crops, from the same record generator: masks never change the crops.
      side = self.global_spec.size // self.patch_size
      if masks_on:
        out['global_masks'] = np.stack(
          [self.mask_spec.draw(rng, (side, side)) for _ in range(self.global_spec.number)]
        )
      else:
        out['global_masks'] = np.zeros((self.global_spec.number, side, side), bool)
    if self.host_augment is not None:
      out['global_crops'] = np.stack([self.host_augment(c, rng) for c in out['global_crops']])
    for key in ('label', 'skipped', 'bad_indices', 'index'):
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

  def __init__(self, canvas_size: int, overlaps: bool = True):
    self.canvas_size = canvas_size
    self.overlaps = overlaps
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
      batch[key] = np.stack(
        [e[key] for e in examples], out=self._empty((len(examples),) + first.shape, first.dtype)
      )
    if 'canvas' in examples[0]:
      size = self.canvas_size
      batch['canvas'] = crops_lib.stack_canvases(
        [e['canvas'] for e in examples],
        size,
        out=self._empty((len(examples), size, size, 3), np.uint8),
      )
    return _add_overlaps(batch) if self.overlaps else batch


def _add_overlaps(batch: dict[str, Any]) -> dict[str, Any]:
  """Adds the SERE overlap rectangles of every (global, other) crop pair (overlap.py)."""
  batch.update(
    overlap_lib.batch_overlaps(
      batch['global_boxes'], batch['global_flips'], batch['local_boxes'], batch['local_flips']
    )
  )
  return batch


def _read_options(
  data_cfg: Any,
  *,
  min_buffer: int = 16,
  per_thread: int = 4,
) -> grain.ReadOptions:
  import grain  # pylint: disable=g-import-not-at-top

  threads = int(data_cfg.get('read_threads', 4))
  return grain.ReadOptions(
    num_threads=threads, prefetch_buffer_size=max(min_buffer, per_thread * threads)
  )


def _add_prefetch(ds: grain.IterDataset, data_cfg: Any) -> grain.IterDataset:
  import grain  # pylint: disable=g-import-not-at-top

  workers = int(data_cfg.get('workers', 0))
  if workers > 0:
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2),
      worker_init_fn=worker_guard.init_worker,
    )  # exit with the parent
  buffer = int(data_cfg.get('prefetch_buffer', 0))
  if buffer > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=buffer)
  return ds


def _check_shard(process_index: int, process_count: int) -> None:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
      f'Need 0 <= process_index < process_count, got {process_index}, {process_count}.'
    )


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


class _TrainBatch:
  """Global step -> this process's slice of that step's global batch (picklable for workers).

  The data order is a property of the run, not of the hardware: step t's global batch holds the
  records at positions [i * B, (i + 1) * B) of epoch e's permutation (e, i = divmod(t, steps per
  epoch); B = the global batch; the last partial batch of an epoch is dropped, as DINO's
  DataLoader does), and the j-th record of it is cropped, flipped and masked by a generator seeded
  with (seed, t, j). Process p of P builds rows [p * B / P, (p + 1) * B / P) of it. So 1 process or
  N, any number of worker processes or reader threads, and any resume point give the same records
  with the same crops in every step.
  """

  def __init__(
    self,
    source: Any,
    multi_crop: _MultiCrop,
    batch_fn: _Batch,
    *,
    seed: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    masks_from_epoch: int = 0,
  ):
    import grain  # pylint: disable=g-import-not-at-top

    self.source = source
    self.multi_crop = multi_crop
    self.batch_fn = batch_fn
    self.seed = int(seed)
    self.global_batch_size = int(global_batch_size)
    self.batch_size = self.global_batch_size // process_count
    self.first = process_index * self.batch_size
    self.records = len(source)
    self.steps_per_epoch = self.records // self.global_batch_size
    self.masks_from_epoch = int(masks_from_epoch)
    # grain's random-access shuffle: a fresh permutation of all records every epoch (the index
    # past the first epoch selects the epoch's seed), computed per index, never materialised.
    self.order = (
      grain.MapDataset.range(self.records).shuffle(seed=_derive_seed(seed, 0) % 2**31).repeat(None)
    )

  def record_index(self, step: int, position: int) -> int:
    """The source index of row `position` of step `step`'s global batch."""
    epoch, i = divmod(int(step), self.steps_per_epoch)
    return int(self.order[epoch * self.records + i * self.global_batch_size + position])

  def __call__(self, step: int) -> dict[str, Any]:
    step = int(step)
    masks_on = step // self.steps_per_epoch >= self.masks_from_epoch
    examples = []
    for j in range(self.first, self.first + self.batch_size):
      rng = np.random.default_rng([self.seed, 1, step, j])
      examples.append(
        self.multi_crop(self.source[self.record_index(step, j)], rng, masks_on=masks_on)
      )
    return self.batch_fn(examples)


def _shared_memory_batches(ds: grain.IterDataset, batch_fn: _Batch) -> grain.IterDataset:
  """`ds` marked as able to write its batches into shared memory: grain's ``mp_prefetch`` calls
  ``enable_shared_memory_output`` on the dataset it hands to worker processes, and the batch
  function then stacks every array straight into a shared segment (no copy on the way back)."""
  import grain  # pylint: disable=g-import-not-at-top

  class SharedMemoryBatches(grain.IterDataset):
    def enable_shared_memory_output(self) -> None:
      batch_fn.enable_shared_memory_output()

    def __iter__(self):
      return self._parent.__iter__()

  return SharedMemoryBatches(ds)


# No end: the stream is infinite; grain wants a length.
_NO_END = 2**62


class TrainStream:
  """The training batches of one process, from any global step on (see ``_TrainBatch``).

  ``iter(stream)`` gives a ``TrainIterator`` starting at step 0; its ``get_state()`` /
  ``set_state()`` speak a small JSON dict (the next step plus what defines the order), so a run
  resumes exactly with another number of processes, workers or threads.
  """

  def __init__(self, make: _TrainBatch, data_cfg: Any):
    self.make = make
    self.data_cfg = data_cfg

  @property
  def identity(self) -> dict[str, int]:
    """What fixes the data order besides the step; a resume must match it."""
    return {
      'seed': self.make.seed,
      'global_batch_size': self.make.global_batch_size,
      'records': self.make.records,
    }

  def dataset(self, start_step: int) -> grain.IterDataset:
    """grain dataset of this process's batches for steps start_step, start_step + 1, ..."""
    import grain  # pylint: disable=g-import-not-at-top

    threads = int(self.data_cfg.get('read_threads', 4))
    # One element per batch: worker processes and reader threads then share out whole batches
    # and hand them back in order, so their number cannot change what a batch holds.
    ds = grain.MapDataset.range(int(start_step), _NO_END).map(self.make)
    ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(1, threads))
    )
    return _add_prefetch(_shared_memory_batches(ds, self.make.batch_fn), self.data_cfg)

  def enable_shared_memory_output(self) -> None:
    """What grain's worker processes ask of their dataset (exposed for tests)."""
    self.make.batch_fn.enable_shared_memory_output()

  def __iter__(self) -> TrainIterator:
    return TrainIterator(self)


class TrainIterator:
  """Iterator over a ``TrainStream`` whose state is the next global step (JSON-able)."""

  def __init__(self, stream: TrainStream, step: int = 0):
    self.stream = stream
    self.step = int(step)
    self._it: Iterator[dict[str, Any]] | None = None

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> dict[str, Any]:
    if self._it is None:
      self._it = iter(self.stream.dataset(self.step))
    batch = next(self._it)
    self.step += 1
    return batch

  def get_state(self) -> dict[str, int]:
    return {'step': self.step, **self.stream.identity}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues at ``state['step']``; refuses a state made for another data order.

    Raises:
      DataError: the state was written with another seed, global batch or training set.
    """
    want = self.stream.identity
    diff = {k: (state.get(k), v) for k, v in want.items() if state.get(k) != v}
    if diff:
      said = ', '.join(f'{k} {old} (checkpoint) vs {new} (now)' for k, (old, new) in diff.items())
      raise DataError(
        f'the checkpoint\'s data position belongs to another data order ({said}); '
        'resume with the config it was written with, or start a new workdir'
      )
    self.close()
    self.step = int(state['step'])

  def close(self) -> None:
    if self._it is not None:
      close = getattr(self._it, 'close', None)
      if close is not None:
        close()
      self._it = None


def train_dataset(
  data_cfg: Any,
  *,
  seed: int,
  batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  patch_size: int = 16,
  overlaps: bool = True,
) -> TrainStream:
  """The infinite, shuffled multi-crop training stream of this process.

  Args:
    data_cfg: ``config.data``.
    seed: run seed; the shuffle order and every crop derive from it and the global step only.
    batch_size: examples per batch on THIS process (the global batch is batch_size *
      process_count); process p gets rows [p * batch_size, (p + 1) * batch_size) of it.
    patch_size: the model's patch size; block masks live on the global crops' patch grid.
    overlaps: add the SERE overlap rectangles (no random draws: leaving them out changes nothing
      else in the batch).
  Returns:
    A ``TrainStream``; its iterator yields dicts: 'global_crops' uint8 [B, Ng, G, G, 3],
    'local_crops' uint8 [B, Nl, L, L, 3], 'global_boxes' float32 [B, Ng, 4] and 'local_boxes'
    float32 [B, Nl, 4] ((x0, y0, w, h) in original pixels), 'global_flips' bool [B, Ng],
    'local_flips' bool [B, Nl], 'image_size' int32 [B, 2] (original height, width), 'label' int32
    [B] (-1 unknown), 'skipped' int32 [B] (unreadable files passed over for the record),
    'bad_indices' int64 [B, sources.MAX_ATTEMPTS] (their source indices, -1 padded), 'index' int64
    [B] (requested record index in the source), and, with ``overlaps``, the overlap of every
    (global, other) crop pair for SERE (sslx/data/overlap.py): 'gg_rects' float32
    [B, Ng, Ng, 2, 4], 'gg_valid' bool [B, Ng, Ng], 'lg_rects' float32 [B, Nl, Ng, 2, 4],
    'lg_valid' bool [B, Nl, Ng]. With ``data_cfg.masks.scheme`` other than
    'none' (sslx/data/masks.py) also 'global_masks' bool [B, Ng, G/p, G/p] (True = masked patch;
    all False in epochs before ``data_cfg.masks.pred_start_epoch``, as iBOT's loader).
    With ``data_cfg.crops_on == 'device'`` there are no '*_crops' (``device_crops.canvas_crops``
    makes them in the train step) but 'canvas' uint8 [B, C, C, 3] (the decoded image, shrunk
    only if larger than C = ``data_cfg.canvas_size``, zero-padded), 'canvas_extent' int32 [B, 2]
    (its valid height, width) and 'canvas_scale' float32 [B, 2] (canvas pixels per original
    pixel along y, x).
  Raises:
    DataError: missing data, or fewer records than one global batch.
  """
  _check_shard(process_index, process_count)
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
  global_spec = _crop_spec(data_cfg.global_crops)
  local_spec = _crop_spec(data_cfg.local_crops)
  crops_lib.resample_filter(data_cfg.interpolation)  # fail early on a bad name
  canvas_size = canvas_size_of(data_cfg)
  if canvas_size and data_cfg.interpolation.lower() not in device_crops.FILTERS:
    raise DataError(
      f"config.data.interpolation={data_cfg.interpolation!r} is not available with "
      f"config.data.crops_on='device'; use one of {sorted(device_crops.FILTERS)} "
      "or crops_on='host'."
    )
  ratio = _pair(data_cfg.get('crop_ratio', crops_lib.DEFAULT_RATIO), 'config.data.crop_ratio')
  source = train_source(data_cfg)
  global_batch = batch_size * process_count
  if len(source) < global_batch:
    raise DataError(
      f'{source!r} has only {len(source)} records, fewer than one global batch of '
      f'{global_batch}; lower the batch size.'
    )
  mask_spec = masks_lib.MaskSpec.from_config(data_cfg.get('masks'))
  if mask_spec.scheme != 'none' and global_spec.size % patch_size:
    raise DataError(
      f'global crops of {global_spec.size} px do not tile into {patch_size}-px '
      'patches; masks need whole patches (change data.global_crops.size)'
    )
  multi_crop = _MultiCrop(
    global_spec,
    local_spec,
    data_cfg.interpolation,
    ratio,
    mask_spec,
    patch_size,
    canvas_size,
    host_augment=host_augment_of(data_cfg),
  )
  masks_cfg = data_cfg.get('masks')
  masks_from = int(masks_cfg.get('pred_start_epoch', 0)) if masks_cfg is not None else 0
  make = _TrainBatch(
    source,
    multi_crop,
    _Batch(canvas_size, overlaps),
    seed=seed,
    global_batch_size=global_batch,
    process_index=process_index,
    process_count=process_count,
    masks_from_epoch=masks_from,
  )
  return TrainStream(make, data_cfg)


def host_augment_of(data_cfg: Any) -> Any:
  """The host augmentation of the global crops that ``data_cfg`` asks for, or None.

  ``data_cfg.randaugment`` (optional): {'policy': timm's policy string such as
  'rand-m9-mstd0.5-inc1' ('' = off), 'fill': grey levels of uncovered pixels} (fine-tuning).

  Raises:
    DataError: a policy that cannot be parsed, or one with crops resampled on the device (the
      host never sees those crops).
  """
  from sslx.data import randaugment  # pylint: disable=g-import-not-at-top

  cfg = data_cfg.get('randaugment')
  policy = (cfg.get('policy', '') if cfg is not None else '') or ''
  if not policy:
    return None
  if canvas_size_of(data_cfg):
    raise DataError(
      f"config.data.randaugment.policy={policy!r} runs on the host's crops; set "
      "config.data.crops_on='host' (or policy='' to turn it off)."
    )
  try:
    return randaugment.RandAugment.from_policy(
      policy, fill=tuple(cfg.get('fill', (124, 116, 104))), interpolation=data_cfg.interpolation
    )
  except randaugment.RandAugmentError as e:
    raise DataError(f'config.data.randaugment: {e}') from e


def steps_per_epoch(data_cfg: Any, global_batch_size: int) -> int:
  """len(training source) // global_batch_size (>= 1).

  Raises:
    DataError: the training split has fewer records than one global batch.
  """
  n = len(train_source(data_cfg))
  if n < global_batch_size:
    raise DataError(
      f'The training split has {n} records, fewer than one global batch of '
      f'{global_batch_size}; lower the batch size.'
    )
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
  classes: dict[str, int] = {}
  for split in dict.fromkeys((data_cfg.eval_train_split, data_cfg.eval_test_split)):
    try:
      source = sources.make_source(data_cfg, split)
    except DataError as e:
      raise DataError(f'{e} ({off}).') from e
    count = sources.source_num_classes(source)
    if count is None:
      raise DataError(
        f'the evaluation split {split!r} ({source!r}) has no labels: the kNN and '
        'the probes need labelled images (for an image folder, '
        f'<path>/{split}/<class>/... sub-folders), {off}.'
      )
    classes[split] = count
  return max(classes.values())


class _EvalRecord:
  """Padded position -> evaluation example; positions past this process's records are padding."""

  def __init__(
    self,
    source: Any,
    process_index: int,
    process_count: int,
    resize: int,
    size: int,
    interpolation: str,
  ):
    self.source = source
    self.process_index = process_index
    self.process_count = process_count
    self.resize = resize
    self.size = size
    self.interpolation = interpolation

  def __call__(self, position: int) -> dict[str, np.ndarray | np.generic]:
    index = self.process_index + int(position) * self.process_count
    if index >= len(self.source):
      return {
        'image': np.zeros((self.size, self.size, 3), np.uint8),
        'label': np.int32(-1),
        'mask': np.bool_(False),
      }
    record = self.source[index]
    image = crops_lib.resize_center_crop(
      record['image'], self.resize, self.size, self.interpolation
    )
    return {'image': image, 'label': np.int32(record['label']), 'mask': np.bool_(True)}


class _EvalBatch:
  """Batch index -> the stacked evaluation examples of its `batch_size` padded positions."""

  def __init__(self, record: _EvalRecord, batch_size: int):
    self.record = record
    self.batch_size = batch_size

  def __call__(self, batch_index: int) -> dict[str, np.ndarray | np.generic]:
    start = int(batch_index) * self.batch_size
    examples = [self.record(position) for position in range(start, start + self.batch_size)]
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


def eval_dataset(
  data_cfg: Any, split: str, *, batch_size: int, process_index: int = 0, process_count: int = 1
) -> grain.IterDataset:
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
    raise DataError(
      f'config.data.eval_size {size} > eval_resize {resize}; eval_resize must be >= eval_size.'
    )
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
