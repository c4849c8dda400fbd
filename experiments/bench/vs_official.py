r"""sslx's DINO train step against the official PyTorch one, on the same CPU threads, alternated.

  # Once: torch in its own environment (a bench-only requirement), and the official code
  # fetched to a folder outside this repository:
  python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install -r experiments/bench/requirements-torch.txt
  git clone https://github.com/facebookresearch/dino /tmp/dino
  # Then, from the repository root, with sslx's environment:
  python experiments/bench/vs_official.py --official=/tmp/dino --torch_python=/tmp/tvenv/bin/python \
      --cases=demo,vits16 --rounds=3

Each case starts two (three) worker processes, each built and warmed up (compile, first step)
before timing: the official `train_one_epoch` (experiments/bench/official_dino_step.py, under the
torch Python), sslx's jitted step from `trainer.build` (`sslx`), and the same step with the
photometric augmentation replaced by plain normalisation (`sslx_noaug`; the official code augments
on the host, outside its step). Then `--rounds` rounds, each running `--steps_per_round` steps on every
side in turn (the order rotates from round to round), so that load from other jobs on a shared
machine falls on all sides alike. Every worker is pinned to the same `--threads` cores (torch:
set_num_threads; XLA sizes its thread pool from the CPU affinity) and inputs are random tensors
already in memory. Printed: seconds per step of every side in every round, the medians, the
ratios sslx / official, the same for CPU seconds per step (all threads of the worker; steadier
than wall time when other jobs load the machine), and the augmentation alone (jitted `augment_multicrop` on the same crops).

Results are recorded in experiments/bench/RESULTS.md with the machine named.
"""

import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("official", "", "Folder of the fetched facebookresearch/dino code.")
flags.DEFINE_string("torch_python", "", "A Python with torch (requirements-torch.txt).")
flags.DEFINE_list("cases", ["demo", "vits16"], "Cases to run (CASES).")
flags.DEFINE_list("sides", ["official", "sslx", "sslx_noaug"], "What to time.")
flags.DEFINE_integer("rounds", 3, "Timed rounds per case.")
flags.DEFINE_integer("steps_per_round", 0, "Steps per side per round (0: the case's default).")
flags.DEFINE_integer("threads", 2, "CPU threads (and cores pinned) for every side.")
flags.DEFINE_integer("batch", 0, "Batch size (0: the case's).")
flags.DEFINE_list("override", [], "Extra sslx config overrides key=value, for experiments.")
# Worker mode (internal): this file started as the sslx side.
flags.DEFINE_string("worker", "", "Internal: 'sslx' or 'sslx_noaug'.")
flags.DEFINE_string("spec", "", "Internal: the case's JSON.")

# The two cases of issue 22: the ImageNet recipe's network at a CPU-sized batch, float32 and crops
# made on the host (no canvas resampling in the step), and the Fashion-MNIST demo's network.
CASES = {
  "vits16": dict(
    config="configs/dino.py",
    overrides={
      "model.dtype": "float32",
      "data.crops_on": "host",
      "batch_size": 8,
      "data.local_crops.number": 10,
      "optim.freeze_last_layer_epochs": 0.0,
    },
    steps=2,
  ),
  "demo": dict(
    config="configs/dino.py:fashion_mnist",
    overrides={"batch_size": 64, "optim.freeze_last_layer_epochs": 0.0},
    steps=10,
  ),
}


def _set(config, key: str, value) -> None:
  *path, last = key.split(".")
  node = config
  for part in path:
    node = node[part]
  node[last] = _parse(node[last], value) if isinstance(value, str) else value


def _parse(old, text: str):
  if isinstance(old, bool):
    return text.lower() in ("1", "true", "yes")
  if isinstance(old, (int, float, str)):
    return type(old)(text)
  return json.loads(text)


def sslx_config(case: dict, batch: int, extra: list[str]):
  path, _, preset = case["config"].partition(":")
  import importlib.util

  spec = importlib.util.spec_from_file_location("bench_config", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(preset or None)
  for key, value in case["overrides"].items():
    _set(config, key, value)
  if batch:
    config.batch_size = batch
  for item in extra:
    key, _, value = item.partition("=")
    _set(config, key, value)
  return config


def official_spec(config) -> dict:
  """What the official worker builds: the sslx config's model, head, crops, batch and optimiser."""
  from sslx import schedules
  from sslx.models import vit

  mc = config.model
  dims = vit.vit_kwargs(mc.variant)
  for key in ("embed_dim", "depth", "num_heads", "mlp_ratio"):
    if mc.get(key):
      dims[key] = mc[key]
  g, l = config.data.global_crops, config.data.local_crops
  return {
    "model": dict(
      img_size=g.size,
      patch_size=mc.patch_size,
      embed_dim=dims["embed_dim"],
      depth=dims["depth"],
      num_heads=dims["num_heads"],
      mlp_ratio=float(dims.get("mlp_ratio", 4.0)),
      drop_path_rate=mc.drop_path_rate,
    ),
    "head": dict(
      out_dim=config.head.out_dim,
      hidden_dim=config.head.hidden_dim,
      bottleneck_dim=config.head.bottleneck_dim,
      norm_last_layer=config.head.norm_last_layer,
    ),
    "optim": dict(
      lr=schedules.base_learning_rate(config.optim.lr_per_256, config.batch_size),
      weight_decay=config.optim.weight_decay,
      clip_grad=config.optim.clip_grad,
      momentum=config.teacher.momentum,
      teacher_temp=config.loss.teacher_temp,
      warmup_teacher_temp=config.loss.warmup_teacher_temp,
    ),
    "global_number": g.number,
    "global_size": g.size,
    "local_number": l.number,
    "local_size": l.size,
    "batch": config.batch_size,
    "dtype": mc.dtype,
  }


# --------------------------------------------------------------------------- sslx worker


def _plain_normalise(rng, global_crops, local_crops, cfg=None):
  """augment_multicrop without the photometric part: what the step needs from uint8 crops."""
  from sslx.data import augment

  del rng
  mean, std = tuple(cfg.mean), tuple(cfg.std)
  return tuple(
    augment.normalize(augment.to_float(c), mean, std) for c in (global_crops, local_crops)
  )


def sslx_worker(side: str, spec: dict) -> None:
  proto = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)
  import importlib.util

  import jax

  from sslx.data import augment
  from sslx.train import sharding, trainer

  config = sslx_config(CASES[spec["case"]], spec["batch"], spec["override"])
  bench_file = os.path.join(ROOT, "experiments", "bench.py")
  bspec = importlib.util.spec_from_file_location("sslx_bench", bench_file)
  bench = importlib.util.module_from_spec(bspec)
  bspec.loader.exec_module(bench)

  if side == "sslx_noaug":
    augment.augment_multicrop = _plain_normalise  # the step looks it up when traced
  mesh = sharding.make_mesh(config.mesh)
  built = trainer.build(config, mesh, steps_per_epoch=1000, total_steps=100_000)
  state = built.init(config.seed)
  batch = sharding.to_global(
    bench.synthetic_batch(config, config.batch_size), sharding.batch_sharding(mesh)
  )
  t0 = time.perf_counter()
  step = built.train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  state, m = step(state, batch)  # first step: not timed
  jax.block_until_ready(m)

  aug = None
  if side == "sslx":  # the augmentation alone, on the same crops
    aug = jax.jit(lambda r, g, l: augment.augment_multicrop(r, g, l, config.augment))
    key = jax.random.PRNGKey(1)
    jax.block_until_ready(aug(key, batch["global_crops"], batch["local_crops"]))

  proto.write(
    json.dumps({"ready": {"jax": jax.__version__, "compile_s": round(compile_s, 1)}}) + "\n"
  )
  for line in sys.stdin:
    cmd = line.split()
    if not cmd or cmd[0] == "quit":
      break
    n = int(cmd[1])
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
      state, m = step(state, batch)
    jax.block_until_ready((state, m))
    out = {
      "s_per_step": (time.perf_counter() - t0) / n,
      "cpu_s_per_step": (time.process_time() - c0) / n,
      "steps": n,
      "loss": float(m["loss"]),
    }
    if aug is not None:
      t0 = time.perf_counter()
      for i in range(n):
        jax.block_until_ready(
          aug(jax.random.PRNGKey(i), batch["global_crops"], batch["local_crops"])
        )
      out["augment_s"] = (time.perf_counter() - t0) / n
    proto.write(json.dumps(out) + "\n")


# --------------------------------------------------------------------------- parent


class Worker:
  def __init__(self, name: str, argv: list[str], threads: int):
    cores = sorted(os.sched_getaffinity(0))[:threads]
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    self.name = name
    self.proc = subprocess.Popen(
      argv,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
      env=env,
      cwd=ROOT,
      preexec_fn=lambda: os.sched_setaffinity(0, cores),
    )

  def read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"{self.name} worker ended (exit {self.proc.wait()}); see its stderr")
    return json.loads(line)

  def run(self, n: int) -> dict:
    self.proc.stdin.write(f"run {n}\n")
    self.proc.stdin.flush()
    return self.read()

  def close(self) -> None:
    try:
      self.proc.stdin.write("quit\n")
      self.proc.stdin.flush()
      self.proc.wait(timeout=60)
    except (BrokenPipeError, subprocess.TimeoutExpired):
      self.proc.kill()


def run_case(name: str) -> dict:
  case = CASES[name]
  config = sslx_config(case, FLAGS.batch, FLAGS.override)
  spec = official_spec(config)
  steps = FLAGS.steps_per_round or case["steps"]
  print(f"== {name}: {json.dumps(spec)}", flush=True)
  if spec["dtype"] != "float32":
    print(f"   note: sslx computes in {spec['dtype']}, the official side in float32", flush=True)
  workers = {}
  try:
    for side in FLAGS.sides:  # built one after another: compiles do not overlap the timing
      if side == "official":
        argv = [
          FLAGS.torch_python,
          os.path.join(HERE, "official_dino_step.py"),
          f"--official={FLAGS.official}",
          f"--spec={json.dumps(spec)}",
          f"--threads={FLAGS.threads}",
        ]
      else:
        wspec = dict(case=name, batch=config.batch_size, override=FLAGS.override)
        argv = [
          sys.executable,
          os.path.abspath(__file__),
          f"--worker={side}",
          f"--spec={json.dumps(wspec)}",
        ]
      w = Worker(side, argv, FLAGS.threads)
      print(f"   {side} ready: {w.read()['ready']}", flush=True)
      workers[side] = w
    times = {side: [] for side in workers}
    cpu = {side: [] for side in workers}
    augment = []
    sides = list(workers)
    for r in range(FLAGS.rounds):
      order = sides[r % len(sides) :] + sides[: r % len(sides)]
      row = {}
      for side in order:
        out = workers[side].run(steps)
        times[side].append(out["s_per_step"])
        cpu[side].append(out["cpu_s_per_step"])
        row[side] = out["s_per_step"]
        if "augment_s" in out:
          augment.append(out["augment_s"])
      print(
        f"   round {r + 1} ({' '.join(order)}): "
        + "  ".join(f"{s} {row[s]:.4f}" for s in sides)
        + " s/step (CPU s/step: "
        + "  ".join(f"{s} {cpu[s][-1]:.4f}" for s in sides)
        + ")",
        flush=True,
      )
  finally:
    for w in workers.values():
      w.close()
  med = {side: round(statistics.median(t), 4) for side, t in times.items()}
  med_cpu = {side: round(statistics.median(t), 4) for side, t in cpu.items()}
  result = {
    "case": name,
    "steps_per_round": steps,
    "median_s_per_step": med,
    "median_cpu_s_per_step": med_cpu,
  }
  if "official" in med:
    for side in med:
      if side != "official":
        result[f"ratio_{side}"] = round(med[side] / med["official"], 3)
        result[f"cpu_ratio_{side}"] = round(med_cpu[side] / med_cpu["official"], 3)
  if augment:
    result["augment_alone_s"] = round(statistics.median(augment), 4)
  print(f"   medians: {json.dumps(result)}", flush=True)
  return result


def main(argv):
  del argv
  if FLAGS.worker:
    sslx_worker(FLAGS.worker, json.loads(FLAGS.spec))
    return
  if "official" in FLAGS.sides and not (FLAGS.official and FLAGS.torch_python):
    raise app.UsageError("--official=FOLDER and --torch_python=PYTHON are needed (see --help).")
  print(
    f"{time.strftime('%Y-%m-%d %H:%M')} {os.cpu_count()} CPUs, {FLAGS.threads} threads per side,"
    f" {FLAGS.rounds} rounds",
    flush=True,
  )
  for name in FLAGS.cases:
    run_case(name)


if __name__ == "__main__":
  app.run(main)
