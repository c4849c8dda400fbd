r"""Where a traced train step spends its accelerator time, from a jax.profiler Perfetto trace.

  python experiments/bench.py --config=configs/dino.py --steps=10 --profile_dir=/tmp/prof ...
  python experiments/bench/trace_summary.py /tmp/prof --steps=3

  # With the optimised HLO (XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text" on the bench
  # run), each of the top kernels is also shown with its fusion's shape, ops and source op names:
  python experiments/bench/trace_summary.py /tmp/prof --steps=3 --hlo_dir=/tmp/hlo

  # The MFU the step would reach if only its matmul/attention/convolution kernels ran (as fast as
  # they run now), and the call durations of the attention kernels, grouped:
  python experiments/bench/trace_summary.py /tmp/prof --steps=3 --model_tflop_per_step=33.74 \
      --durations=sdpa

Prints the device's busy time per step, and the kernels grouped three ways: by kind (matmul,
attention, convolution, copy, reduction/elementwise fusion), by the HLO op they came from (when the
trace names it) and by kernel name, each with milliseconds per step and share of busy time.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re


def load_events(path: str) -> tuple[list[dict], dict[int, str]]:
  """Complete ('X') events and process names of a Perfetto JSON trace (file or profile folder)."""
  if os.path.isdir(path):
    found = sorted(glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True))
    if not found:
      raise SystemExit(
        f"No perfetto_trace.json.gz under {path}; trace with "
        "jax.profiler.trace(..., create_perfetto_trace=True)."
      )
    path = found[-1]
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  names = {
    e["pid"]: e.get("args", {}).get("name", "")
    for e in events
    if e.get("ph") == "M" and e.get("name") == "process_name"
  }
  return [e for e in events if e.get("ph") == "X"], names


def kind_of(name: str) -> str:
  """A kernel's kind, from its name (XLA fusion names, cuBLAS 'nvjet'/'xmma', cuDNN names)."""
  n = name.lower()
  if any(k in n for k in ("sdpa", "flash", "fmha", "cudnn::fusion")):
    return "attention (cuDNN)"
  if any(k in n for k in ("convolve", "implicit_gemm", "cudnn-conv")):
    return "convolution"
  if any(k in n for k in ("gemm", "nvjet", "cutlass", "xmma", "wgmma", "cublas", "matmul")):
    return "matmul"
  if any(k in n for k in ("memcpy", "memset", "copy")):
    return "copy"
  if "reduce" in n:
    return "reduction fusion"
  if "fusion" in n:
    return "elementwise fusion"
  return "other"


COMPUTE_KINDS = ("matmul", "attention (cuDNN)", "convolution")


def summarize(
  path: str,
  steps: int,
  top: int,
  model_tflop_per_step: float = 0.0,
  peak_tflops: float = 989.4,
  durations: str = "",
) -> None:
  events, names = load_events(path)
  device_pids = {
    pid
    for pid, n in names.items()
    if re.search(r"gpu|tpu|device", n, re.I) and "host" not in n.lower()
  }
  kernels = [e for e in events if e["pid"] in device_pids]
  if not kernels:
    print("No device events; processes:", sorted(set(names.values())))
    return
  # Busy time = the union of kernel intervals over all device streams.
  spans = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in kernels)
  busy, end = 0.0, -1.0
  for start, stop in spans:
    if stop > end:
      busy += stop - max(start, end)
      end = stop
  wall = spans[-1][1] - spans[0][0]
  print(f"device processes: {[names[p] for p in sorted(device_pids)]}")
  print(
    f"{len(kernels)} kernels over {steps} steps; busy {busy / 1e3 / steps:.2f} ms/step, "
    f"trace span {wall / 1e3 / steps:.2f} ms/step ({100 * busy / max(wall, 1e-9):.1f}% busy)"
  )
  total = sum(e.get("dur", 0) for e in kernels)

  def table(title, key):
    acc = collections.Counter()
    count = collections.Counter()
    for e in kernels:
      k = key(e)
      acc[k] += e.get("dur", 0)
      count[k] += 1
    print(f"\n== by {title} (ms/step, % of kernel time, calls/step)")
    for k, us in acc.most_common(top):
      print(
        f"{us / 1e3 / steps:9.3f}  {100 * us / total:5.1f}%  {count[k] / steps:6.0f}  {k[:110]}"
      )

  table("kind", lambda e: kind_of(e["name"]))
  hlo = lambda e: str(
    e.get("args", {}).get("hlo_op") or e.get("args", {}).get("long_name") or e["name"]
  )
  table("HLO op", hlo)
  table("kernel name", lambda e: e["name"])
  if model_tflop_per_step > 0:
    compute = sum(e.get("dur", 0) for e in kernels if kind_of(e["name"]) in COMPUTE_KINDS) / steps
    mfu = lambda us: 100 * model_tflop_per_step / (us * 1e-6) / peak_tflops  # noqa: E731
    print(
      f"\nMFU at the busy time: {mfu(busy / steps):.1f}%; matmul + attention + convolution "
      f"kernels alone take {compute / 1e3:.2f} ms/step, so with every other kernel gone the "
      f"step would reach at most {mfu(compute):.1f}% ({model_tflop_per_step} TFLOP/step, "
      f"{peak_tflops} TFLOP/s peak)"
    )
  if durations:
    print(f"\n== call durations of kernels matching {durations!r} (us, rounded to 50: calls/step)")
    groups = collections.defaultdict(collections.Counter)
    for e in kernels:
      if re.search(durations, e["name"]):
        groups[e["name"]][50 * round(e.get("dur", 0) / 50)] += 1
    for name, counter in sorted(groups.items()):
      print(
        f"  {name[:90]}\n    "
        + ", ".join(f"{us:.0f}: {n / steps:g}" for us, n in sorted(counter.items()))
      )
  sample = next((e for e in kernels if e.get("args")), None)
  if sample:
    print("\nexample event args:", {k: str(v)[:80] for k, v in sample["args"].items()})


def load_hlo(hlo_dir: str, module: str = "train_step") -> tuple[dict, dict]:
  """(instruction name -> its line, computation name -> its body lines) of the optimised module."""
  files = [
    f
    for f in glob.glob(os.path.join(hlo_dir, f"*{module}*after_optimizations.txt"))
    if "buffer" not in f and "memory" not in f and "live-range" not in f
  ]
  if not files:
    raise SystemExit(f"No *{module}*after_optimizations.txt under {hlo_dir}.")
  instructions, computations, current = {}, {}, None
  with open(max(files, key=os.path.getsize)) as f:
    for line in f:
      head = re.match(r"^(?:ENTRY )?%([\w.\-]+) \(", line)
      if head and line.rstrip().endswith("{"):
        current = computations.setdefault(head.group(1), [])
        continue
      inst = re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = ", line)
      if inst:
        instructions[inst.group(1)] = line.strip()
        if current is not None:
          current.append(line.strip())
  return instructions, computations


def describe_kernel(kernel: str, instructions: dict, computations: dict) -> str:
  """Shape, op counts and commonest source op names of the fusion a GPU kernel was made from."""
  for name in (re.sub(r"_(\d+)$", r".\1", kernel), kernel):
    line = instructions.get(name)
    if line:
      break
  else:
    return "(not found in the HLO)"
  shape = line.split(" = ", 1)[1].split(" ", 1)[0]
  called = re.search(r"calls=%([\w.\-]+)", line)
  body = computations.get(called.group(1), []) if called else []
  ops = collections.Counter(
    re.search(r"= \S+ ([\w\-]+)\(", b).group(1) for b in body if re.search(r"= \S+ ([\w\-]+)\(", b)
  )
  names = collections.Counter(
    m.group(1).split("/")[-1] for b in body for m in [re.search(r'op_name="([^"]+)"', b)] if m
  )
  sources = collections.Counter(
    m.group(1) for b in body for m in [re.search(r'op_name="([^"]+)"', b)] if m
  )
  top_source = sources.most_common(1)[0][0][:140] if sources else ""
  return (
    f"{shape} | ops {dict(ops.most_common(6))} | {dict(names.most_common(4))} | e.g. {top_source}"
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("path", help="profile folder or perfetto_trace.json.gz")
  parser.add_argument("--steps", type=int, default=3, help="steps in the trace")
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--hlo_dir", default="", help="XLA dump folder of the traced run")
  parser.add_argument(
    "--model_tflop_per_step",
    type=float,
    default=0.0,
    help="model TFLOP of one traced step (bench.py's GFLOP/img x batch / 1000): "
    "adds the MFU bound of the compute kernels alone",
  )
  parser.add_argument(
    "--peak_tflops",
    type=float,
    default=989.4,
    help="dense bf16 peak of the device (H100 SXM: 989.4)",
  )
  parser.add_argument(
    "--durations",
    default="",
    help="regex of kernel names whose call durations are printed, grouped",
  )
  args = parser.parse_args()
  summarize(
    args.path, args.steps, args.top, args.model_tflop_per_step, args.peak_tflops, args.durations
  )
  if args.hlo_dir:
    instructions, computations = load_hlo(args.hlo_dir)
    events, names = load_events(args.path)
    device = {
      p
      for p, n in names.items()
      if re.search(r"gpu|tpu|device", n, re.I) and "host" not in n.lower()
    }
    per_kernel = collections.Counter()
    for e in events:
      if e["pid"] in device:
        per_kernel[e["name"]] += e.get("dur", 0)
    print(f"\n== top {args.top} kernels in the optimised HLO (ms/step | shape | ops | op names)")
    for kernel, us in per_kernel.most_common(args.top):
      print(
        f"{us / 1e3 / args.steps:8.3f}  {kernel[:60]}\n          "
        f"{describe_kernel(kernel, instructions, computations)}"
      )


if __name__ == "__main__":
  main()
