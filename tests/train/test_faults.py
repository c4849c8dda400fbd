"""Fault handling: preemption signals, non-finite state, config changes on resume, damaged
checkpoints, one-line errors and leftovers (sslx/train/faults.py, preemption.py, checkpoint.py)."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx import errors
from sslx.config_check import load_config_file
from sslx.methods import METHODS, dino
from sslx.train import checkpoint, faults, preemption, trainer
from sslx.train.state import TrainState

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def smoke_config(**updates):
  config = load_config_file(os.path.join(ROOT, "configs/dino.py:smoke"))
  with config.unlocked():
    config.log_every_steps = 1
    config.total_steps = 6
    config.checkpoint.every_steps = 3
    for k, v in updates.items():
      parent = config
      *path, leaf = k.split(".")
      for p in path:
        parent = parent[p]
      parent[leaf] = v
  return config


def metric_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def losses_by_step(workdir):
  return {r["step"]: r["loss"] for r in metric_rows(workdir) if "loss" in r}


def tiny_state(value: float, step: int) -> TrainState:
  w = jax.random.normal(jax.random.PRNGKey(step), (64, 64)) + value
  return TrainState(
    step=jnp.array(step, jnp.int32),
    params={"w": w},
    teacher_params={"w": w},
    opt_state=(),
    loss_state={},
    rng=jax.random.PRNGKey(0),
  )


# ---- Preemption: real signals to a training subprocess ------------------------------------------


def _wait_for_step(workdir, step, proc, timeout=240):
  path = os.path.join(workdir, "metrics.jsonl")
  end = time.time() + timeout
  while time.time() < end:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    if os.path.exists(path) and any(r["step"] >= step for r in metric_rows(workdir)):
      return
    time.sleep(0.05)
  raise TimeoutError(f"no step {step} in {timeout} s")


def _interrupt(workdir, sig, after_step, cache):
  """Starts main.py in `workdir`, sends `sig` once `after_step` is logged; returns (rc, stderr)."""
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=cache,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  proc = subprocess.Popen(
    [
      sys.executable,
      "main.py",
      "--config=configs/dino.py:smoke",
      f"--workdir={workdir}",
      "--config.log_every_steps=1",
      "--config.total_steps=400",
      "--config.checkpoint.every_steps=1000",
    ],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    _wait_for_step(workdir, after_step, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  return proc.returncode, err


def test_sigterm_and_sigint_save_the_step_reached_and_resume_exactly(tmp_path):
  """SIGTERM, then (on the resumed run) SIGINT: each saves the step it reached, exits with status
  75, and the stitched run's losses equal an uninterrupted run's, each step logged once."""
  workdir, cache = str(tmp_path / "w"), str(tmp_path / "jax_cache")
  saved = []
  for sig, after in ((signal.SIGTERM, 3), (signal.SIGINT, None)):
    after = after or saved[-1] + 3
    rc, err = _interrupt(workdir, sig, after, cache)
    assert rc == preemption.PREEMPTED_EXIT_CODE, err[-3000:]
    m = re.search(rf"stopped by {sig.name}: saved step (\d+) to", err)
    assert m, err[-3000:]
    step = int(m.group(1))
    assert step >= after and "Traceback" not in err
    assert max(r["step"] for r in metric_rows(workdir)) == step  # the step reached is the saved one
    assert checkpoint.Checkpointer(workdir).latest_step() == step
    saved.append(step)
  steps = [r["step"] for r in metric_rows(workdir)]
  assert steps == list(range(1, saved[-1] + 1))  # each step once
  reference = str(tmp_path / "ref")
  trainer.run(
    smoke_config(total_steps=400, **{"checkpoint.every_steps": 1000}),
    reference,
    stop_after=saved[-1],
  )
  want, got = losses_by_step(reference), losses_by_step(workdir)
  for step in range(1, saved[-1] + 1):
    assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step


def test_second_signal_is_ignored_and_the_first_is_restored_after(monkeypatch):
  before = signal.getsignal(signal.SIGINT)
  with preemption.StopOnSignal() as stop:
    assert not stop.should_stop(1)
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)  # while "saving": must not raise KeyboardInterrupt
    time.sleep(0.01)
    assert stop.requested == "SIGINT" and stop.should_stop(2)
  assert signal.getsignal(signal.SIGINT) is before


# ---- Non-finite updates ------------------------------------------------------------------------------


class PoisonFromStep3(dino.Dino):
  """DINO whose gradients are NaN from the 0-based step 3 on, while its loss stays finite: the
  state after step 4 is non-finite although every loss up to step 4 is finite."""

  def loss(self, params, teacher_params, loss_state, views, rng, sched):
    loss, aux = super().loss(params, teacher_params, loss_state, views, rng, sched)
    leaf = jax.tree.leaves(params)[0]
    # sqrt at 0 has an infinite slope: value 0, gradient NaN (inf * 0) from step 3 on.
    poison = jnp.sqrt(jnp.where(sched["step"] >= 3, 0.0, 1.0) + 0.0 * jnp.sum(leaf))
    return loss + poison - jax.lax.stop_gradient(poison), aux


def _all_finite(tree):
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))


def test_poisoned_update_is_never_checkpointed_and_a_rerun_falls_back_past_a_damaged_one(
  tmp_path, monkeypatch, caplog
):
  workdir = str(tmp_path)
  # Logged every 5 steps: the state check before each save, not the one at logging, must catch it.
  config = smoke_config(
    log_every_steps=5, **{"checkpoint.every_steps": 1, "checkpoint.max_to_keep": 3}
  )
  monkeypatch.setitem(METHODS, "dino", PoisonFromStep3)
  with pytest.raises(trainer.TrainingDiverged) as e:
    trainer.run(config, workdir)
  msg = str(e.value)
  assert "non-finite at step 4;" in msg and "the last checkpoint, step 3, is finite" in msg
  assert "float32" not in msg  # the smoke config already computes in float32
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  assert ckpt.all_steps() == [1, 2, 3]
  assert all(
    _all_finite(ckpt.restore_parts(s, ("params", "teacher_params", "opt_state")))
    for s in ckpt.all_steps()
  )
  ckpt.close()
  # Damage the latest checkpoint: the rerun must say so, set it aside and resume from step 2.
  data = max(
    (
      p
      for p in glob.glob(f"{workdir}/checkpoints/3/state/**/*", recursive=True)
      if os.path.isfile(p)
    ),
    key=os.path.getsize,
  )
  with open(data, "r+b") as f:
    f.truncate(os.path.getsize(data) // 2)
  monkeypatch.setitem(METHODS, "dino", dino.Dino)
  sane = smoke_config(**{"checkpoint.every_steps": 3, "checkpoint.max_to_keep": 3})  # allowed
  caplog.set_level("INFO")
  assert trainer.run(sane, workdir)["step"] == 6
  assert "checkpoint step 3 cannot be used" in caplog.text
  assert (
    "changed settings: checkpoint.every_steps (1 -> 3), log_every_steps (5 -> 1)" in caplog.text
  )
  assert os.path.isdir(f"{workdir}/checkpoints_damaged/3")
  assert [r["step"] for r in metric_rows(workdir)] == [3, 4, 5, 6]
  with open(f"{workdir}/config.json") as f:
    assert json.load(f)["log_every_steps"] == 1


def test_skipping_non_finite_updates_counts_them_and_keeps_the_state_finite(tmp_path, monkeypatch):
  monkeypatch.setitem(METHODS, "dino", PoisonFromStep3)
  config = smoke_config(total_steps=5, skip_nonfinite_updates=5)
  trainer.run(config, str(tmp_path))
  skipped = {r["step"]: r["optim/skipped_updates"] for r in metric_rows(str(tmp_path))}
  assert skipped == {1: 0, 2: 0, 3: 0, 4: 1, 5: 2}
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  assert ckpt.latest_step() == 5
  assert _all_finite(ckpt.restore_parts(5, ("params", "teacher_params")))
  ckpt.close()


def test_divergence_message_suggests_only_what_applies():
  c = smoke_config()
  with c.unlocked():
    c.optim.clip_grad = 0.3
    c.model.dtype = "bfloat16"
    c.skip_nonfinite_updates = 2
  msg = faults.divergence_message(c, what="x", window=(5, 8), last_finite=None)
  assert "steps [5, 8]" in msg and "rerun starts afresh" in msg
  assert "float32" in msg and "clip" not in msg and "skip_nonfinite" not in msg
  with c.unlocked():
    c.optim.clip_grad = 0.0
  assert "clip gradients" in faults.divergence_message(c, what="x", window=(5, 5), last_finite=4)


# ---- Config changes on resume -----------------------------------------------------------------------


def _workdir_with_checkpoint(path, config):
  """A workdir whose checkpoint holds `config` (the state is a stand-in: only the config is read
  before a refusal)."""
  ckpt = checkpoint.Checkpointer(str(path), async_save=False)
  ckpt.save(3, tiny_state(0.0, 3), None, faults.config_as_json(config))
  ckpt.close()
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  return str(path)


@pytest.mark.parametrize(
  "key, value",
  [
    ("head.out_dim", 128),
    ("model.depth", 3),
    ("model.embed_dim", 48),
    ("method", "ibot"),
    ("batch_size", 32),
    ("optim.lr_per_256", 1e-3),
    ("seed", 1),
    ("total_steps", 12),
    ("data.global_crops.size", 32),
    ("skip_nonfinite_updates", 3),
  ],
)
def test_a_change_of_shapes_method_or_schedules_is_refused_before_building(
  tmp_path, monkeypatch, key, value
):
  workdir = _workdir_with_checkpoint(tmp_path, smoke_config())
  with open(os.path.join(workdir, "config.json")) as f:
    before = f.read()
  monkeypatch.setattr(trainer, "build", lambda *a, **k: pytest.fail("built"))
  with pytest.raises(faults.ResumeConfigError) as e:
    trainer.run(smoke_config(**{key: value}), workdir)
  msg = str(e.value)
  assert f"{key} (" in msg and "at step 3" in msg and "\n" not in msg
  assert "checkpoints/3/config" in msg and "new --workdir" in msg
  with open(os.path.join(workdir, "config.json")) as f:
    assert f.read() == before  # the run's own record is kept


def test_harmless_changes_are_allowed_and_the_rule_is_data():
  old = smoke_config()
  new = smoke_config(
    log_every_steps=7,
    **{
      "checkpoint.every_steps": 9,
      "eval.knn_k": 5,
      "data.workers": 2,
      "device_prefetch": 3,
      "mesh.fsdp": 2,
      "data.path": "/elsewhere",
    },
  )
  refused, allowed, _ = faults.config_changes(faults.config_as_json(old), new)
  assert not refused
  assert set(allowed) == {
    "log_every_steps",
    "checkpoint.every_steps",
    "eval.knn_k",
    "data.workers",
    "device_prefetch",
    "mesh.fsdp",
    "data.path",
  }
  assert faults.is_resume_safe("eval.anything") and not faults.is_resume_safe("evaluation")


def test_checkpoint_without_stored_config_is_compared_with_config_json(tmp_path, monkeypatch):
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(2, tiny_state(0.0, 2), None)  # as written before configs were stored
  ckpt.close()
  with open(tmp_path / "config.json", "w") as f:
    f.write(smoke_config().to_json_best_effort())
  with pytest.raises(faults.ResumeConfigError, match=r"head.out_dim \(64 -> 32\).*config.json"):
    trainer.run(smoke_config(**{"head.out_dim": 32}), str(tmp_path))


# ---- Damaged checkpoints --------------------------------------------------------------------------------


def test_unreadable_latest_checkpoint_falls_back_and_is_set_aside(tmp_path, caplog):
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  for step in (1, 2):
    ckpt.save(step, tiny_state(float(step), step), None, {"a": 1})
  ckpt.close()
  data = max(
    (
      p
      for p in glob.glob(f"{tmp_path}/checkpoints/2/state/**/*", recursive=True)
      if os.path.isfile(p)
    ),
    key=os.path.getsize,
  )
  with open(data, "r+b") as f:
    f.truncate(os.path.getsize(data) // 2)
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  state, step = trainer._restore_latest(  # pylint: disable=protected-access
    ckpt, jax.eval_shape(lambda: tiny_state(0.0, 0)), None
  )
  assert step == 1 and int(state.step) == 1
  assert "checkpoint step 2 cannot be used" in caplog.text
  assert ckpt.all_steps() == [1] and os.listdir(tmp_path / "checkpoints_damaged") == ["2"]
  ckpt.save(2, tiny_state(2.0, 2), None)  # the step can be written again
  ckpt.close()


def test_no_usable_checkpoint_is_reported_not_silently_restarted(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  for step in (1, 2):
    ckpt.save(step, tiny_state(float(step), step), None)
  ckpt.close()
  for step in (1, 2):
    with open(tmp_path / "checkpoints" / str(step) / "state" / "_METADATA", "w") as f:
      f.write("{")
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  assert trainer._restore_latest(  # pylint: disable=protected-access
    ckpt, jax.eval_shape(lambda: tiny_state(0.0, 0)), None
  ) == (None, None)
  assert ckpt.set_aside_steps == [2, 1]  # run() turns this into a CheckpointError
  ckpt.close()


def test_non_finite_checkpoint_of_an_older_version_is_not_resumed(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, tiny_state(1.0, 1), None)
  ckpt.save(2, tiny_state(float("nan"), 2), None)
  ckpt.close()
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  _, step = trainer._restore_latest(  # pylint: disable=protected-access
    ckpt, jax.eval_shape(lambda: tiny_state(0.0, 0)), None
  )
  ckpt.close()
  assert step == 1


def test_stale_temporary_checkpoints_are_removed_at_start(tmp_path):
  stale = tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1700000000000000"
  (stale / "state").mkdir(parents=True)
  checkpoint.Checkpointer(str(tmp_path), async_save=False).close()  # e.g. an evaluation: kept
  assert os.path.isdir(stale)
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False, cleanup_tmp=True)  # training
  ckpt.save(1, tiny_state(1.0, 1), None)
  ckpt.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]


def test_a_run_that_fails_after_opening_its_checkpoints_closes_them(tmp_path, monkeypatch):
  # An open orbax manager keeps a cleanup thread that, left running at exit, prints a traceback
  # after the run's own one-line error.
  closed = []
  real_close = checkpoint.Checkpointer.close
  monkeypatch.setattr(
    checkpoint.Checkpointer, "close", lambda self: closed.append(1) or real_close(self)
  )
  config = smoke_config(**{"data.path": str(tmp_path / "nowhere")})
  with pytest.raises(errors.UserError, match="dataset-fashion-mnist"):
    trainer.run(config, str(tmp_path / "w"))
  assert closed == [1]


def test_disk_full_during_a_save_is_one_line_naming_the_last_checkpoint(tmp_path, monkeypatch):
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, tiny_state(1.0, 1), None)

  def full(*a, **k):
    raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device")

  monkeypatch.setattr(ckpt._manager, "save", full)  # pylint: disable=protected-access
  with pytest.raises(
    checkpoint.CheckpointError, match=r"disk full .* step 2 .*\(step 1\) is intact"
  ):
    ckpt.save(2, tiny_state(2.0, 2), None)
  ckpt.close()


# ---- One-line errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "updates, message",
  [
    ({"method": "dinno"}, "config.method='dinno' is not a method; valid: byol, cae, dino"),
    ({"checkpoint.every_steps": 0}, "config.checkpoint.every_steps=0"),
    ({"log_every_steps": 0}, "config.log_every_steps=0"),
    ({"total_steps": -5}, "config.total_steps=-5"),
    ({"total_steps": 0, "total_epochs": 0}, "trains nothing"),
    ({"checkpoint.max_to_keep": 0}, "config.checkpoint.max_to_keep=0"),
    ({"eval.knn_every_steps": -1}, "config.eval.knn_every_steps=-1"),
  ],
)
def test_bad_settings_stop_before_anything_is_written(tmp_path, updates, message):
  with pytest.raises(errors.UserError, match=re.escape(message)):
    trainer.run(smoke_config(**updates), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_unusable_workdirs_are_one_line(tmp_path, monkeypatch):
  (tmp_path / "file").write_text("x")
  with pytest.raises(faults.WorkdirError, match="exists and is not a directory"):
    faults.check_workdir(str(tmp_path / "file"))
  with pytest.raises(faults.WorkdirError, match="a parent of it is a file"):
    faults.check_workdir(str(tmp_path / "file" / "sub"))

  def denied(*a, **k):
    raise PermissionError(13, "Permission denied")

  monkeypatch.setattr(faults.tempfile, "NamedTemporaryFile", denied)  # root writes everywhere
  with pytest.raises(faults.WorkdirError, match="is not writable \\(Permission denied\\)"):
    faults.check_workdir(str(tmp_path / "ro"))


@pytest.mark.parametrize(
  "args, message",
  [
    (("--workdir={tmp}/file",), "exists and is not a directory"),
    (("--workdir={tmp}/w", "--config.total_steps=-5"), "config.total_steps=-5"),
  ],
)
def test_cli_errors_are_one_line_with_status_1(tmp_path, args, message):
  (tmp_path / "file").write_text("x")
  r = subprocess.run(
    [
      sys.executable,
      "main.py",
      "--config=configs/dino.py:smoke",
      *(a.format(tmp=tmp_path) for a in args),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert r.returncode == 1, r.stderr[-2000:]
  lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr


# ---- Leftovers ----------------------------------------------------------------------------------------------

_ORPHAN = """
import multiprocessing as mp, os, sys, time
sys.path.insert(0, {root!r})
from sslx.data import worker_guard

def work():
  worker_guard.init_worker(0, 1, poll_seconds=0.1)
  time.sleep(60)

if __name__ == "__main__":
  p = mp.get_context("spawn").Process(target=work)  # as grain starts its workers
  p.start()
  print(p.pid, flush=True)
  time.sleep(1.5)
  os.kill(p.pid, 2)  # SIGINT: ignored by the worker
  time.sleep(0.5)
  print(int(p.is_alive()), flush=True)
  os._exit(0)  # the parent dies without closing anything (as after SIGKILL)
"""


def test_worker_processes_ignore_ctrl_c_and_exit_with_their_parent(tmp_path):
  script = tmp_path / "orphan.py"
  script.write_text(_ORPHAN.format(root=ROOT))
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
  pid, alive_after_sigint = (int(x) for x in out.stdout.split())
  assert alive_after_sigint == 1
  for _ in range(50):
    try:
      with open(f"/proc/{pid}/stat") as f:
        if f.read().rsplit(")", 1)[1].split()[0] in "ZX":  # exited, not yet reaped
          return
    except FileNotFoundError:
      return
    time.sleep(0.1)
  os.kill(pid, signal.SIGKILL)
  pytest.fail("the worker outlived its parent")
