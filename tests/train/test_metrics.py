"""Tests for metric writers, progress accounting and FLOPs helpers (sslx/train/metrics.py)."""

import glob
import json
import logging as py_logging
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx.train import metrics

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _read_jsonl(workdir):
  with open(os.path.join(workdir, metrics.METRICS_FILENAME)) as f:
    return [json.loads(line) for line in f]


def _write_some(writer):
  writer.write_hparams({"lr": 0.1, "batch_size": 8})
  writer.write_scalars(1, {"loss": np.float32(2.5), "lr": jnp.asarray(0.1)})
  writer.write_scalars(2, {"loss": 2.0, "knn/top1": 50})
  writer.write_texts(2, {"note": "hello"})
  writer.flush()
  writer.close()


def test_clu_writer_writes_jsonl_and_tensorboard_events(tmp_path):
  pytest.importorskip("tensorflow")
  workdir = str(tmp_path / "run")
  writer = metrics.create_writer(workdir, use_clu=True)
  _write_some(writer)
  rows = _read_jsonl(workdir)
  assert [r["step"] for r in rows] == [1, 2]
  assert rows[0]["loss"] == 2.5 and rows[0]["lr"] == pytest.approx(0.1)
  assert rows[1] == {"step": 2, "loss": 2.0, "knn/top1": 50}
  assert glob.glob(os.path.join(workdir, "events.out.tfevents*"))


def test_fallback_writer_writes_same_jsonl_and_logs(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(metrics, "_import_clu_writers", lambda: None)  # as on a TF-free image
  workdir = str(tmp_path / "run")
  writer = metrics.create_writer(workdir)
  assert isinstance(writer, metrics.FallbackWriter)
  with caplog.at_level(py_logging.INFO):
    _write_some(writer)
  rows = _read_jsonl(workdir)
  assert rows == [
    {"step": 1, "loss": 2.5, "lr": pytest.approx(0.1)},
    {"step": 2, "loss": 2.0, "knn/top1": 50},
  ]
  assert "loss=2.5" in caplog.text and "knn/top1=50" in caplog.text
  assert not glob.glob(os.path.join(workdir, "events.out.tfevents*"))


def test_jsonl_appends_across_writers(tmp_path):
  workdir = str(tmp_path)
  for step in (1, 2):  # e.g. a run restarted from a checkpoint
    writer = metrics.create_writer(workdir, use_clu=False)
    writer.write_scalars(step, {"loss": float(step)})
    writer.close()
  assert [r["step"] for r in _read_jsonl(workdir)] == [1, 2]


def test_resumed_writer_drops_rows_past_the_resumed_step_and_a_torn_line(tmp_path):
  path = tmp_path / metrics.METRICS_FILENAME
  w = metrics.JsonlWriter(str(path))
  for step in (1, 2, 3, 4):
    w.write_scalars(step, {"loss": float(step)})
  w.close()
  with open(path, "a") as f:
    f.write('{"step": 5, "lo')  # killed in mid-write
  w = metrics.JsonlWriter(str(path), resume_step=2)  # the run resumes from the step-2 checkpoint
  w.write_scalars(3, {"loss": 30.0})
  w.close()
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_non_main_process_writes_no_files(tmp_path):
  workdir = str(tmp_path / "run")
  writer = metrics.create_writer(workdir, is_main_process=False, use_clu=False)
  writer.write_scalars(1, {"loss": 1.0})
  writer.close()
  assert not os.path.exists(os.path.join(workdir, metrics.METRICS_FILENAME))


def test_modules_import_without_tensorflow_and_log_visibly(tmp_path):
  # Accelerator images have no TensorFlow: importing must not need it and the writer must fall back.
  code = (
    "import sys; sys.modules['tensorflow'] = None\n"
    "import sslx.eval.knn, sslx.train.metrics as m\n"
    f"w = m.create_writer({str(tmp_path)!r})\n"
    "assert isinstance(w, m.FallbackWriter), type(w)\n"
    "w.write_scalars(3, {'loss': 1.5}); w.close()\n"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code],
    check=True,
    cwd=REPO_ROOT,
    timeout=120,
    capture_output=True,
    text=True,
  )
  assert _read_jsonl(str(tmp_path)) == [{"step": 3, "loss": 1.5}]
  # absl logs nothing below WARNING by default: the writer must have made its metrics visible.
  assert "[3] loss=1.5" in proc.stderr


def test_throughput_rates_eta_and_mfu():
  tp = metrics.Throughput(
    global_batch_size=256, total_steps=5000, flops_per_step=1e12, peak_flops=10e12
  )
  first = tp.update(100, wall_time=50.0)
  assert first.seconds_per_step is None and first.eta_seconds is None and first.mfu is None
  p = tp.update(1200, wall_time=50.0 + 1100 * 0.25)
  assert p.seconds_per_step == pytest.approx(0.25)
  assert p.images_per_second == pytest.approx(1024.0)
  assert p.eta_seconds == pytest.approx(3800 * 0.25)
  assert p.mfu == pytest.approx(1e12 / 0.25 / 10e12)
  # Rates come from the latest interval only.
  p = tp.update(1300, wall_time=50.0 + 1100 * 0.25 + 100 * 0.5)
  assert p.seconds_per_step == pytest.approx(0.5)
  no_peak = metrics.Throughput(global_batch_size=8, total_steps=10, flops_per_step=1e9)
  no_peak.update(0, 0.0)
  assert no_peak.update(5, 1.0).mfu is None


def test_format_progress_and_duration():
  progress = metrics.Progress(
    step=1200,
    total_steps=5000,
    seconds_per_step=0.31,
    images_per_second=812.3,
    eta_seconds=1180.2,
    mfu=0.412,
  )
  line = metrics.format_progress(progress, {"loss": np.float32(5.12345)})
  assert line == (
    "step 1200/5000 (24.0%) | loss 5.123 | 812 img/s | 0.31 s/step | ETA 0:19:40 | MFU 41.2%"
  )
  assert metrics.format_progress(metrics.Progress(step=0, total_steps=10)) == "step 0/10 (0.0%)"
  assert metrics.format_duration(3725) == "1:02:05"
  assert metrics.format_duration(90000.4) == "25:00:00"
  assert metrics.format_duration(59.6) == "0:01:00"


def test_step_flops_of_matmul():
  m, k, n = 64, 32, 48
  compiled = jax.jit(jnp.matmul).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
  assert metrics.step_flops(compiled) == pytest.approx(2 * m * n * k, rel=0.05)


def test_step_flops_handles_odd_cost_analyses():
  def fake(result):
    return types.SimpleNamespace(cost_analysis=lambda: result)

  def broken():
    raise NotImplementedError("no cost model")

  assert metrics.step_flops(fake([{"flops": 10.0}])) == 10.0
  assert metrics.step_flops(fake([])) is None
  assert metrics.step_flops(fake({"bytes accessed": 3.0})) is None
  assert metrics.step_flops(fake({"flops": -1.0})) is None
  assert metrics.step_flops(fake(None)) is None
  assert metrics.step_flops(types.SimpleNamespace(cost_analysis=broken)) is None


@pytest.mark.parametrize(
  "kind,want",
  [
    ("NVIDIA H100 80GB HBM3", 989.4e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989.4e12),
    ("NVIDIA A100-SXM4-40GB", 312e12),
    ("Tesla V100-SXM2-16GB", 125e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", None),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("Some new chip", None),
  ],
)
def test_peak_flops_per_device(kind, want):
  device = types.SimpleNamespace(device_kind=kind, platform="gpu")
  assert metrics.peak_flops_per_device(device) == want


def test_peak_flops_of_cpu_is_unknown():
  assert metrics.peak_flops_per_device(jax.devices("cpu")[0]) is None


class _FakeDevice:
  def __init__(self, stats=None, error=None):
    self.stats, self.error = stats, error

  def memory_stats(self):
    if self.error:
      raise self.error
    return self.stats


def test_device_memory_reports_the_most_loaded_device_in_gib():
  gib = 2**30
  devices = [
    _FakeDevice({"bytes_in_use": 1 * gib, "peak_bytes_in_use": 3 * gib, "bytes_limit": 80 * gib}),
    _FakeDevice({"bytes_in_use": 2 * gib, "peak_bytes_in_use": 5 * gib, "bytes_limit": 80 * gib}),
    _FakeDevice(None),
    _FakeDevice(error=NotImplementedError("no stats")),
  ]
  assert metrics.device_memory(devices) == {
    "memory/in_use_gib": 2.0,
    "memory/peak_gib": 5.0,
    "memory/limit_gib": 80.0,
  }
  assert metrics.device_memory([_FakeDevice({"bytes_in_use": gib // 2})]) == {
    "memory/in_use_gib": 0.5,
    "memory/peak_gib": 0.5,
  }
  # CPUs report nothing: no memory scalars, no error.
  assert metrics.device_memory([_FakeDevice(None), _FakeDevice(error=RuntimeError("x"))]) == {}
