"""Metric writers, progress / throughput accounting and model-FLOPs-utilisation (MFU) helpers.

The writer is CLU's default writer (TensorBoard event files + absl logging) plus a JSONL file, when
TensorFlow and tensorboard are importable. Accelerator images ship without TensorFlow, so there the
writer falls back to logging + JSONL with the same interface. Nothing here imports TensorFlow at
module import time: the train step and the benchmark import this module on such images.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

METRICS_FILENAME = "metrics.jsonl"

# Dense (no structured sparsity) BF16 tensor throughput per jax device, from vendor datasheets:
# NVIDIA H100 / H200 / A100 / V100 / L4 product datasheets (the "with sparsity" figures halved) and
# Google Cloud TPU system-architecture pages (per chip; from v4 on one jax device is one chip).
# Ordered so that more specific device_kind substrings match first.
_PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
  ("h100 pcie", 756e12),
  ("h100 nvl", 835e12),
  ("h200 nvl", 835e12),
  ("h100", 989.4e12),  # SXM, e.g. 'NVIDIA H100 80GB HBM3'
  ("gh200", 989.4e12),
  ("h200", 989.4e12),
  ("a100", 312e12),
  ("v100", 125e12),  # SXM2 tensor-core FP16 (V100 has no BF16)
  ("l4", 121e12),
  ("tpu v4", 275e12),
  ("tpu v5 lite", 197e12),  # v5e
  ("tpu v5e", 197e12),
  ("tpu v5p", 459e12),
  ("tpu v5", 459e12),  # v5p reports device_kind 'TPU v5'
  ("tpu v6 lite", 918e12),  # v6e (Trillium)
  ("tpu v6e", 918e12),
)


# ----------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------


def _to_jsonable(value: Any) -> Any:
  """Turns numpy / jax scalars into plain Python numbers for json.dumps."""
  array = np.asarray(value)
  if array.ndim == 0:
    return array.item()
  return array.tolist()


class JsonlWriter:
  """Appends one JSON object {"step": step, **scalars} per write_scalars call to a file.

  Only scalars go to the file; the other write_* calls are accepted and ignored, so the writer can
  sit inside a CLU MultiWriter.

  Args:
    resume_step: the step a resumed run starts from. Rows of later steps (written by the run that
      was interrupted after its last checkpoint, and about to be written again) and a torn last
      line are dropped when the file opens, so each step appears once.
  """

  def __init__(self, path: str, resume_step: int | None = None):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._path = path
    if resume_step is not None and os.path.exists(path):
      _truncate_after(path, resume_step)
    self._file = open(path, "a", encoding="utf-8")

  @property
  def path(self) -> str:
    return self._path

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {"step": int(step)}
    record.update({str(k): _to_jsonable(v) for k, v in scalars.items()})
    # Line-buffered by hand: a crashed run keeps every row written so far.
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def write_summaries(self, step, values, metadata=None) -> None:
    del step, values, metadata

  def write_images(self, step, images) -> None:
    del step, images

  def write_videos(self, step, videos) -> None:
    del step, videos

  def write_audios(self, step, audios, *, sample_rate) -> None:
    del step, audios, sample_rate

  def write_texts(self, step, texts) -> None:
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None) -> None:
    del step, arrays, num_buckets

  def write_hparams(self, hparams) -> None:
    del hparams

  def flush(self) -> None:
    if not self._file.closed:
      self._file.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()


def _truncate_after(path: str, step: int) -> None:
  """Keeps the rows of `path` with row["step"] <= step; rewritten via a temporary file + rename,
  so a kill in between leaves the old file or the new one, never half of it."""
  kept, dropped = [], 0
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        dropped += 1  # torn by a kill in mid-write
        continue
      if isinstance(row, dict) and int(row.get("step", 0)) > step:
        dropped += 1
      else:
        kept.append(line if line.endswith("\n") else line + "\n")
  if not dropped:
    return
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(kept)
  os.replace(tmp, path)
  logging.info("%s: dropped %d row(s) past the resumed step %d", path, dropped, step)


class FallbackWriter:
  """Logging + optional JSONL writer used where TensorFlow / CLU writers are unavailable."""

  def __init__(self, jsonl: JsonlWriter | None = None):
    self._jsonl = jsonl

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    text = ", ".join(f"{k}={_format_value(_to_jsonable(v))}" for k, v in sorted(scalars.items()))
    logging.info("[%d] %s", step, text)
    if self._jsonl is not None:
      self._jsonl.write_scalars(step, scalars)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    logging.info("[%d] Got texts: %s", step, dict(texts))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    logging.info("[Hyperparameters] %s", dict(hparams))

  def write_summaries(self, step, values, metadata=None) -> None:
    del metadata
    logging.info("[%d] Got raw tensors: %s", step, {k: np.shape(v) for k, v in values.items()})

  def write_images(self, step, images) -> None:
    logging.info("[%d] Got images: %s", step, {k: np.shape(v) for k, v in images.items()})

  def write_videos(self, step, videos) -> None:
    logging.info("[%d] Got videos: %s", step, {k: np.shape(v) for k, v in videos.items()})

  def write_audios(self, step, audios, *, sample_rate) -> None:
    del sample_rate
    logging.info("[%d] Got audios: %s", step, {k: np.shape(v) for k, v in audios.items()})

  def write_histograms(self, step, arrays, num_buckets=None) -> None:
    del num_buckets
    logging.info("[%d] Got histograms: %s", step, {k: np.shape(v) for k, v in arrays.items()})

  def flush(self) -> None:
    if self._jsonl is not None:
      self._jsonl.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()


def _format_value(value: Any) -> str:
  return f"{value:.6g}" if isinstance(value, float) else str(value)


def _import_clu_writers():
  """Returns clu.metric_writers with TensorFlow kept off the GPUs, or None if TF is unavailable."""
  try:
    import tensorboard  # noqa: F401  # CLU's writer needs it; checked here, not at first write
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  # TF would otherwise grab all GPU memory that jax needs.
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    # Raised once TF has initialised its devices; hiding them then is impossible and was done
    # (or not needed) by whoever initialised them.
    pass
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return metric_writers


def create_writer(
  workdir: str,
  *,
  is_main_process: bool = True,
  use_clu: bool | None = None,
  resume_step: int | None = None,
):
  """Creates the metric writer of a run.

  Every process logs its metrics through absl logging (verbosity is raised to INFO if it was
  lower, so they are visible). The main process also writes TensorBoard event files (when
  TensorFlow + tensorboard are importable) and appends one JSON object per write_scalars call to
  `<workdir>/metrics.jsonl`.

  Args:
    workdir: run directory (created if missing on the main process).
    is_main_process: False on all but one process of a multi-host run: those only log.
    use_clu: True forces the CLU writers (error if unavailable), False forces the TF-free
      fallback, None (default) picks CLU when TensorFlow is importable.
    resume_step: the step a resumed run starts from: rows of later steps are dropped from
      metrics.jsonl (see JsonlWriter).

  Returns:
    An object with write_scalars(step, dict), write_texts(step, dict), write_hparams(dict),
    write_images(step, dict), flush() and close() (CLU's MetricWriter interface).
  """
  if logging.get_verbosity() < logging.INFO:
    logging.set_verbosity(logging.INFO)
  metric_writers = _import_clu_writers() if use_clu is not False else None
  if use_clu and metric_writers is None:
    raise ImportError(
      "create_writer(use_clu=True) needs tensorflow, tensorboard and clu; install "
      "them or pass use_clu=None to fall back to logging + JSONL."
    )

  jsonl = None
  if is_main_process:
    os.makedirs(workdir, exist_ok=True)
    jsonl = JsonlWriter(os.path.join(workdir, METRICS_FILENAME), resume_step=resume_step)

  if metric_writers is None:
    return FallbackWriter(jsonl)
  default = metric_writers.create_default_writer(workdir, just_logging=not is_main_process)
  if jsonl is None:
    return default
  return metric_writers.MultiWriter([default, jsonl])


# ----------------------------------------------------------------------------------------------
# Progress and throughput
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Progress:
  """Training progress at one logging point.

  Rates are measured over the interval since the previous update; they are None at the first
  update (no interval yet). `mfu` is a fraction in [0, 1] (None when FLOPs or peak are unknown).
  """

  step: int
  total_steps: int
  seconds_per_step: float | None = None
  images_per_second: float | None = None
  eta_seconds: float | None = None
  mfu: float | None = None

  @property
  def fraction_done(self) -> float:
    return self.step / self.total_steps if self.total_steps > 0 else 0.0


class Throughput:
  """Turns (step, wall time) samples taken each logging period into rates, ETA and MFU.

  Call `update(step)` at every logging point, right after the step's results were fetched (so
  device work is finished). The first call only sets the baseline: call it once before the timed
  loop (or after the first, compiling step) to keep compilation out of the rates.

  FLOPs and peak must be on the same basis: `step_flops` of an SPMD-compiled step returns the FLOPs
  of one device's program, so pair it with `peak_flops_per_device`.
  """

  def __init__(
    self,
    *,
    global_batch_size: int,
    total_steps: int,
    flops_per_step: float | None = None,
    peak_flops: float | None = None,
  ):
    if global_batch_size <= 0 or total_steps <= 0:
      raise ValueError(
        f"global_batch_size ({global_batch_size}) and total_steps ({total_steps}) must be positive."
      )
    self.global_batch_size = global_batch_size
    self.total_steps = total_steps
    self.flops_per_step = flops_per_step
    self.peak_flops = peak_flops
    self._last: tuple[int, float] | None = None

  def update(self, step: int, wall_time: float | None = None) -> Progress:
    """Records that `step` steps are done at `wall_time` (default: time.perf_counter())."""
    now = time.perf_counter() if wall_time is None else wall_time
    last, self._last = self._last, (step, now)
    if last is None or step <= last[0] or now <= last[1]:
      return Progress(step=step, total_steps=self.total_steps)
    seconds_per_step = (now - last[1]) / (step - last[0])
    mfu = None
    if self.flops_per_step and self.peak_flops:
      mfu = self.flops_per_step / seconds_per_step / self.peak_flops
    return Progress(
      step=step,
      total_steps=self.total_steps,
      seconds_per_step=seconds_per_step,
      images_per_second=self.global_batch_size / seconds_per_step,
      eta_seconds=max(self.total_steps - step, 0) * seconds_per_step,
      mfu=mfu,
    )


def format_duration(seconds: float) -> str:
  """Formats a duration as h:mm:ss (hours may exceed 24), rounding to whole seconds."""
  total = int(round(max(seconds, 0.0)))
  hours, rest = divmod(total, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}"


def format_progress(progress: Progress, metrics: Mapping[str, Any] | None = None) -> str:
  """One human-readable progress line.

  Example: 'step 1200/5000 (24.0%) | loss 5.123 | 812 img/s | 0.31 s/step | ETA 0:19:40 | MFU 41.2%'.
  Metric values are printed with 4 significant digits; unknown rates are left out.
  """
  parts = [f"step {progress.step}/{progress.total_steps} ({100 * progress.fraction_done:.1f}%)"]
  for name, value in (metrics or {}).items():
    value = _to_jsonable(value)
    parts.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
  if progress.images_per_second is not None:
    ips = progress.images_per_second
    parts.append(f"{ips:.0f} img/s" if ips >= 100 else f"{ips:.3g} img/s")
  if progress.seconds_per_step is not None:
    parts.append(f"{progress.seconds_per_step:.3g} s/step")
  if progress.eta_seconds is not None:
    parts.append(f"ETA {format_duration(progress.eta_seconds)}")
  if progress.mfu is not None:
    parts.append(f"MFU {100 * progress.mfu:.1f}%")
  return " | ".join(parts)


def device_memory(devices: Sequence[Any]) -> dict[str, float]:
  """Accelerator memory of the most loaded local device, in GiB, for the metrics and the log.

  Reads `device.memory_stats()` (GPUs and TPUs; CPUs give None). Returns {} when no device
  reports it, else 'memory/in_use_gib', 'memory/peak_gib' (the high-water mark since the process
  started) and, when known, 'memory/limit_gib' (what the allocator may use).
  """
  stats = []
  for device in devices:
    try:
      st = device.memory_stats()
    except Exception:  # pylint: disable=broad-except
      st = None  # backends without the query raise; memory is then simply not reported
    if st and "bytes_in_use" in st:
      stats.append(st)
  if not stats:
    return {}
  gib = float(2**30)
  top = max(stats, key=lambda st: st.get("peak_bytes_in_use", st["bytes_in_use"]))
  out = {
    "memory/in_use_gib": top["bytes_in_use"] / gib,
    "memory/peak_gib": top.get("peak_bytes_in_use", top["bytes_in_use"]) / gib,
  }
  if top.get("bytes_limit"):
    out["memory/limit_gib"] = top["bytes_limit"] / gib
  return out


# ----------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------


def step_flops(compiled: Any) -> float | None:
  """FLOPs of one call of a compiled jax function, from XLA's cost analysis.

  Args:
    compiled: `jax.jit(f).lower(*args).compile()` (a `Lowered` works too). For an SPMD program the
      count is that of one device's partitioned program.

  Returns:
    The 'flops' estimate as a float, or None when the backend gives no (positive) estimate.
  """
  try:
    analysis = compiled.cost_analysis()
  except Exception as e:  # pylint: disable=broad-except
    # Some backends raise NotImplementedError/XlaRuntimeError: report unknown, never crash a run.
    logging.warning("XLA cost analysis unavailable (%s); MFU will not be reported.", e)
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not isinstance(analysis, Mapping):
    return None
  flops = analysis.get("flops")
  if flops is None:
    return None
  flops = float(flops)
  return flops if math.isfinite(flops) and flops > 0 else None


def peak_flops_per_device(device: Any) -> float | None:
  """Dense BF16 peak FLOP/s of one jax device, by `device.device_kind`; None for CPU / unknown.

  Figures are vendor-datasheet dense (no sparsity) tensor throughput; see `_PEAK_BF16_FLOPS`.
  """
  kind = str(getattr(device, "device_kind", "")).lower()
  if getattr(device, "platform", "") == "cpu" or not kind:
    return None
  for needle, flops in _PEAK_BF16_FLOPS:
    # Whole-word match, so 'l4' does not claim an 'L40S'.
    if re.search(rf"\b{re.escape(needle)}\b", kind):
      return flops
  return None
