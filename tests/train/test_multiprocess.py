"""Several processes on 127.0.0.1, launched as the README says (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID), train exactly as one process holding the same devices; a
checkpoint written by 2 processes resumes in 1; a bad launch environment gets one line."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from sslx import distributed

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
STEPS = 4
# Every checkpoint is kept so that the 2-process run's step-2 checkpoint can be resumed in 1.
FLAGS = [
  "--config=configs/dino.py:smoke",
  f"--config.total_steps={STEPS}",
  "--config.log_every_steps=1",
  "--config.checkpoint.every_steps=2",
  "--config.checkpoint.max_to_keep=5",
]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
  keep = ("JAX_COMPILATION_CACHE_DIR",)  # the test session's cache (tests/conftest.py)
  env = {
    k: v
    for k, v in os.environ.items()
    if k in keep or not k.startswith(("JAX_", "SLURM_", "OMPI_"))
  }
  flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip(), **extra)
  return env


def _launch(workdir: str, processes: int, devices_each: int, extra_flags=()) -> list:
  """Runs main.py as `processes` processes of `devices_each` CPU devices; returns their results."""
  port = _free_port()
  procs = []
  for i in range(processes):
    extra = {}
    if processes > 1:
      extra = dict(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES=str(processes),
        JAX_PROCESS_ID=str(i),
        SSLX_INIT_TIMEOUT="120",
      )
    procs.append(
      subprocess.Popen(
        [sys.executable, "main.py", f"--workdir={workdir}", *FLAGS, *extra_flags],
        env=_env(devices_each, **extra),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
    )
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


def _losses(workdir: str) -> dict[int, float]:
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "loss" in row:
        out[row["step"]] = row["loss"]  # a resumed run's rows replace the earlier ones
  return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  one, two = str(root / "one"), str(root / "two")
  _launch(one, processes=1, devices_each=2)
  outs = _launch(two, processes=2, devices_each=1)
  return one, two, outs


def test_two_processes_train_as_one_process_with_two_devices(runs):
  one, two, outs = runs
  assert "process 1 of 2" in outs[1] and "2 in all" in outs[0]
  a, b = _losses(one), _losses(two)
  assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
  # Same records, crops and random draws in every step; only float reduction order differs.
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)
  # The data position in the checkpoint is one JSON file, not one per process.
  data = os.listdir(os.path.join(two, "checkpoints", str(STEPS), "data_order"))
  assert not any("process_" in name for name in data)


def test_checkpoint_of_two_processes_resumes_in_one(runs, tmp_path):
  one, two, _ = runs
  resumed = str(tmp_path / "resumed")
  shutil.copytree(two, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", str(STEPS)))  # continue from step 2
  out = _launch(resumed, processes=1, devices_each=2)[0]
  assert "resuming from" in out and "/2" in out
  a, r = _losses(one), _losses(resumed)
  np.testing.assert_allclose([r[s] for s in (3, 4)], [a[s] for s in (3, 4)], rtol=1e-5)


def _main_error(env_extra: dict, timeout=60) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "main.py", "--workdir=/nonexistent/never_written", *FLAGS],
    env=_env(1, **env_extra),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.mark.parametrize(
  "env,message",
  [
    (dict(JAX_COORDINATOR_ADDRESS="127.0.0.1:1"), "JAX_NUM_PROCESSES and JAX_PROCESS_ID missing"),
    (
      dict(JAX_COORDINATOR_ADDRESS="127.0.0.1:1", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="2"),
      r"JAX_PROCESS_ID=2 must be in \[0, JAX_NUM_PROCESSES=2\)",
    ),
    (
      dict(JAX_NUM_PROCESSES="two", JAX_PROCESS_ID="0", JAX_COORDINATOR_ADDRESS="h:1"),
      "JAX_NUM_PROCESSES='two' is not an integer",
    ),
  ],
)
def test_partial_or_contradictory_environment_is_one_line(env, message):
  r = _main_error(env)
  assert r.returncode == 1
  lines = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1 and "Traceback" not in r.stderr
  import re

  assert re.search(message, lines[0]), lines[0]


def test_unreachable_coordinator_is_one_line_after_the_timeout():
  port = _free_port()  # nothing listens there
  r = _main_error(
    dict(
      JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
      JAX_NUM_PROCESSES="2",
      JAX_PROCESS_ID="1",
      SSLX_INIT_TIMEOUT="2",
    )
  )
  assert r.returncode == 1
  assert (
    f"error: the coordinator JAX_COORDINATOR_ADDRESS=127.0.0.1:{port} was not reachable "
    "within 2 s" in r.stderr
  )


def test_launch_arguments_from_the_environment():
  explicit = dict(
    JAX_COORDINATOR_ADDRESS="10.0.0.1:1234",
    JAX_NUM_PROCESSES="4",
    JAX_PROCESS_ID="3",
    JAX_LOCAL_DEVICE_IDS="0,1",
  )
  assert distributed.launch_arguments(explicit) == dict(
    coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3, local_device_ids=[0, 1]
  )
  assert distributed.launch_arguments({}) is None
  # Launchers JAX detects by itself: initialise without arguments.
  assert distributed.launch_arguments(dict(SLURM_NTASKS="8", SLURM_JOB_ID="7")) == {}
  assert distributed.launch_arguments(dict(OMPI_COMM_WORLD_SIZE="2")) == {}
  assert distributed.launch_arguments(dict(TPU_WORKER_HOSTNAMES="a,b")) == {}
  assert distributed.launch_arguments(dict(SLURM_NTASKS="1", SLURM_JOB_ID="7")) is None
  assert distributed.launch_arguments(dict(SSLX_DISTRIBUTED="0", **explicit)) is None
  with pytest.raises(distributed.LaunchError, match="host:port"):
    distributed.launch_arguments(
      dict(JAX_COORDINATOR_ADDRESS="10.0.0.1", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="0")
    )
  with pytest.raises(distributed.LaunchError, match="JAX_LOCAL_DEVICE_IDS is set"):
    distributed.launch_arguments(dict(JAX_LOCAL_DEVICE_IDS="0"))
