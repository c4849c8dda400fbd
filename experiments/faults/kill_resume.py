r"""Fault injection: SIGKILL a training run at random steps and during checkpoint saves, several
times in a row, resume each time, and compare with an uninterrupted run.

  python experiments/faults/kill_resume.py --workdir=/tmp/kill_resume [--rounds=8] [--seed=0]

Each round starts `main.py` on the same workdir (which resumes from the latest checkpoint) and
kills it with SIGKILL (no handler can run) either once a random step is logged ('step') or the
moment orbax's temporary checkpoint folder appears, i.e. in the middle of a save ('save'). After
each kill it records the latest checkpoint, whether an unfinished '*.orbax-checkpoint-tmp*' folder
was left, and whether the run's grain worker processes outlived it. A last round runs to the end.
Then the same config runs uninterrupted in another folder, and the per-step losses of the two
`metrics.jsonl` files are compared (each step must appear once). Prints a Markdown report.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rows(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except ValueError:
        pass  # a line torn by the kill; the next run drops it
  return rows


def _children(pid: int) -> list[int]:
  out = []
  for stat in glob.glob("/proc/[0-9]*/stat"):
    try:
      with open(stat) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[1]) == pid:
      out.append(int(stat.split("/")[2]))
  return out


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
  except OSError:
    return False


def _steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _tmp_dirs(workdir: str) -> list[str]:
  return glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*"))


def _command(args, workdir: str) -> list[str]:
  return [
    sys.executable,
    "main.py",
    f"--config={args.config}",
    f"--workdir={workdir}",
    "--config.log_every_steps=1",
    f"--config.total_steps={args.total_steps}",
    f"--config.checkpoint.every_steps={args.every}",
    "--config.checkpoint.async_save=True",
    f"--config.data.workers={args.workers}",
  ]


def _env(args) -> dict:
  return dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=args.cache,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )


def _last_step(log_path: str) -> int:
  """The last 'step N/T' progress line of this round's own output (metrics.jsonl still holds the
  previous round's rows until the resumed run drops them)."""
  with open(log_path, errors="replace") as f:
    steps = re.findall(r"\] step (\d+)/\d+ \(", f.read())
  return int(steps[-1]) if steps else 0


def one_round(args, workdir: str, mode: str, target: int, log_path: str) -> dict:
  """Runs main.py until `mode`'s moment, SIGKILLs it; returns what was found after."""
  before = (_steps(workdir) or [0])[-1]
  log = open(log_path, "w")
  proc = subprocess.Popen(
    _command(args, workdir), cwd=ROOT, env=_env(args), stdout=log, stderr=subprocess.STDOUT
  )
  killed_at, workers = None, []
  t0 = time.time()
  while proc.poll() is None and time.time() - t0 < args.round_timeout:
    last = _last_step(log_path)
    workers = _children(proc.pid) or workers
    if mode == "step" and last >= target:
      killed_at = f"after step {last} was logged"
    elif mode == "save" and last >= target and _tmp_dirs(workdir):
      killed_at = f"while saving ({os.path.basename(_tmp_dirs(workdir)[0])}), step {last} logged"
    if killed_at:
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.005 if mode == "save" else 0.02)
  rc = proc.wait()
  log.close()
  time.sleep(3.0)  # workers poll for their parent every second
  return {
    "mode": mode,
    "start": before,
    "target": target,
    "killed": killed_at or "not killed (run ended)",
    "rc": rc,
    "latest": (_steps(workdir) or [None])[-1],
    "tmp_left": len(_tmp_dirs(workdir)),
    "workers": len(workers),
    "workers_alive": sum(_alive(p) for p in workers),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--config", default="configs/dino.py:smoke")
  parser.add_argument("--rounds", type=int, default=8)
  parser.add_argument("--total_steps", type=int, default=80)
  parser.add_argument("--every", type=int, default=5, help="checkpoint every N steps")
  parser.add_argument("--workers", type=int, default=1, help="grain worker processes")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--round_timeout", type=float, default=300)
  args = parser.parse_args()
  rng = random.Random(args.seed)
  shutil.rmtree(args.workdir, ignore_errors=True)
  os.makedirs(args.workdir)
  args.cache = os.path.join(args.workdir, "jax_cache")
  run, ref = os.path.join(args.workdir, "killed"), os.path.join(args.workdir, "reference")
  rounds = []
  for i in range(args.rounds):
    mode = "save" if i % 2 else "step"
    # 'step': a random step up to three checkpoint periods past the one resumed from; 'save': the
    # first save after a random step.
    target = min(args.total_steps - 1, (_steps(run) or [0])[-1] + rng.randint(1, 3 * args.every))
    rounds.append(
      one_round(args, run, mode, target, os.path.join(args.workdir, f"round{i + 1}.log"))
    )
    print(f"round {i + 1}: {rounds[-1]}", flush=True)
  log = open(os.path.join(args.workdir, "final.log"), "w")
  t0 = time.time()
  final = subprocess.run(
    _command(args, run), cwd=ROOT, env=_env(args), stdout=log, stderr=subprocess.STDOUT
  )
  ref_run = subprocess.run(
    _command(args, ref), cwd=ROOT, env=_env(args), stdout=log, stderr=subprocess.STDOUT
  )
  got, want = _rows(run), _rows(ref)
  steps = [r["step"] for r in got if "loss" in r]
  a = {r["step"]: r["loss"] for r in got if "loss" in r}
  b = {r["step"]: r["loss"] for r in want if "loss" in r}
  diffs = [abs(a[s] - b[s]) / max(abs(b[s]), 1e-12) for s in b if s in a]
  print(
    "\n| round | kill | resumed from checkpoint | target step | killed | exit | latest checkpoint "
    "after | tmp folders left | worker processes alive after 3 s |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for i, r in enumerate(rounds):
    print(
      f"| {i + 1} | {r['mode']} | {r['start']} | {r['target']} | {r['killed']} | {r['rc']} | {r['latest']} | "
      f"{r['tmp_left']} | {r['workers_alive']} of {r['workers']} |"
    )
  print(
    f"\nfinal run: exit {final.returncode}; reference: exit {ref_run.returncode} "
    f"({time.time() - t0:.0f} s for both)"
  )
  print(
    f"steps logged in the killed run's metrics.jsonl: {len(steps)} rows, "
    f"{len(set(steps))} distinct, expected {args.total_steps}; duplicates: "
    f"{len(steps) - len(set(steps))}"
  )
  print(
    f"per-step loss vs the uninterrupted run: {len(diffs)} steps compared, max relative "
    f"difference {max(diffs) if diffs else float('nan'):.3g}"
  )
  print(
    f"damaged checkpoints set aside: {os.listdir(os.path.join(run, 'checkpoints_damaged')) if os.path.isdir(os.path.join(run, 'checkpoints_damaged')) else 'none'}"
  )
  ok = (
    final.returncode == 0
    and sorted(steps) == list(range(1, args.total_steps + 1))
    and len(diffs) == args.total_steps
    and max(diffs) < 1e-5
  )
  print("RESULT:", "PASS" if ok else "FAIL")
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
