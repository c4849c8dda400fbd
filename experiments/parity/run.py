r"""Learning parity: the official PyTorch DINO and sslx, same recipe, same steps, same kNN.

For each seed it trains the official code (experiments/parity/official_dino_fmnist.py, under a
torch Python) and sslx (`main.py --config=configs/dino.py:fashion_mnist`) for `--steps` steps,
one after the other so that both see the same machine, then scores both teachers' backbones with
the official weighted kNN (`eval_knn.knn_classifier`, k 20, T 0.07; sslx's export loaded strictly
into the official VisionTransformer). sslx's own kNN of the same run is printed beside it as a
check that the two evaluations agree. Results go to `--out`/runs.jsonl (one line per run) and a
summary (mean and sample sd per implementation) is printed.

  # Once: torch + torchvision in their own environment (bench-only), the official code outside
  # this repository:
  python3 -m venv /tmp/tv2venv && /tmp/tv2venv/bin/pip install -r experiments/parity/requirements-parity.txt
  git clone https://github.com/facebookresearch/dino /tmp/dino_full
  # Then (about 1 hour on 2 cores for 3 seeds):
  python experiments/parity/run.py --official=/tmp/dino_full --torch_python=/tmp/tv2venv/bin/python \
      --seeds=0,1,2 --steps=400 --out=/tmp/parity

Results, with the machine: experiments/parity/RESULTS.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(REPO, "experiments", "parity", "official_dino_fmnist.py")
BATCH = 64


def _last_json(stdout: str) -> dict:
  lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
  if not lines:
    raise RuntimeError(f"no result line in:\n{stdout[-2000:]}")
  return json.loads(lines[-1])


def _run(cmd: list[str], log: str) -> str:
  with open(log, "w") as f:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, cwd=REPO)
  if proc.returncode:
    sys.exit(f"error: {' '.join(cmd[:3])} ... failed (exit {proc.returncode}); see {log}")
  return proc.stdout


def official_run(a, seed: int) -> dict:
  out = os.path.join(a.out, f"official_seed{seed}")
  common = [a.torch_python, WORKER, f"--official={a.official}", f"--threads={a.threads}"]
  start = time.time()
  train = _last_json(
    _run(
      common
      + [
        "train",
        f"--seed={seed}",
        f"--steps={a.steps}",
        f"--out={out}",
        f"--workers={a.workers}",
      ],  # fmt: skip
      os.path.join(a.out, f"official_seed{seed}.log"),
    )
  )
  wall = time.time() - start
  score = _last_json(
    _run(common + ["knn", f"--weights={out}/teacher.pth"], os.path.join(a.out, "knn.log"))
  )
  return dict(
    impl="official", seed=seed, steps=a.steps, knn_top1=score["top1"], knn_top5=score["top5"],
    images_per_second=train["images_per_second"], run_seconds=wall,
  )  # fmt: skip


def sslx_run(a, seed: int) -> dict:
  workdir = os.path.join(a.out, f"sslx_seed{seed}")
  config = "--config=configs/dino.py:fashion_mnist"
  start = time.time()
  _run(
    [
      sys.executable,
      "main.py",
      config,
      f"--workdir={workdir}",
      f"--config.seed={seed}",
      f"--config.total_steps={a.steps}",
      "--config.eval.knn_at_start=False",
    ],  # fmt: skip
    os.path.join(a.out, f"sslx_seed{seed}.log"),
  )
  wall = time.time() - start
  rows = [json.loads(ln) for ln in open(os.path.join(workdir, "metrics.jsonl"))]
  step_times = [r["perf/step_time"] for r in rows if "perf/step_time" in r]
  own = [r for r in rows if "knn/top1" in r]
  _run(
    [sys.executable, "main.py", config, f"--workdir={workdir}", "--mode=export"],
    os.path.join(a.out, "export.log"),
  )
  (weights,) = glob.glob(os.path.join(workdir, "export", "teacher_backbone_step*.safetensors"))
  common = [a.torch_python, WORKER, f"--official={a.official}", f"--threads={a.threads}"]
  score = _last_json(_run(common + ["knn", f"--weights={weights}"], os.path.join(a.out, "knn.log")))
  return dict(
    impl="sslx", seed=seed, steps=a.steps, knn_top1=score["top1"], knn_top5=score["top5"],
    sslx_knn_top1=own[-1]["knn/top1"] if own else None,
    images_per_second=BATCH / statistics.mean(step_times), run_seconds=wall,
  )  # fmt: skip


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--official", required=True, help="folder with main_dino.py and eval_knn.py")
  p.add_argument("--torch_python", required=True, help="python with requirements-parity.txt")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--threads", type=int, default=2, help="torch threads (official run and kNN)")
  p.add_argument("--workers", type=int, default=1, help="the official DataLoader's processes")
  p.add_argument("--impls", default="official,sslx")
  p.add_argument("--out", default="/tmp/parity")
  a = p.parse_args()
  os.makedirs(a.out, exist_ok=True)
  results = os.path.join(a.out, "runs.jsonl")
  runs = {"official": official_run, "sslx": sslx_run}
  for seed in (int(s) for s in a.seeds.split(",")):
    for impl in a.impls.split(","):
      row = runs[impl](a, seed)
      print(json.dumps(row), flush=True)
      with open(results, "a") as f:
        f.write(json.dumps(row) + "\n")

  rows = [json.loads(ln) for ln in open(results)]
  print(f"\n{'impl':9} {'runs':>4} {'kNN top-1 per seed':32} {'mean':>6} {'sd':>5} {'img/s':>14}")
  for impl in runs:
    mine = [r for r in rows if r["impl"] == impl and r["steps"] == a.steps]
    if not mine:
      continue
    top1 = [r["knn_top1"] for r in mine]
    ips = [r["images_per_second"] for r in mine]
    sd = statistics.stdev(top1) if len(top1) > 1 else float("nan")
    per_seed = " ".join(f"{r['seed']}:{r['knn_top1']:.2f}" for r in mine)
    print(
      f"{impl:9} {len(mine):4d} {per_seed:32} {statistics.mean(top1):6.2f} {sd:5.2f} "
      f"{min(ips):6.1f}-{max(ips):<6.1f}"
    )


if __name__ == "__main__":
  main()
