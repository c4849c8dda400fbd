"""Worker of experiments/bench/vs_official.py: the official DINO train step on the CPU.

Runs under a Python with torch (experiments/bench/requirements-torch.txt), never sslx's. It
imports facebookresearch/dino's own modules from the folder given (fetched outside this
repository; see the README's benchmark section) and times their `train_one_epoch` unchanged: the
teacher on the global crops and the student on all crops (MultiCropWrapper), DINOLoss, backward,
per-tensor clipping, the last-layer gradient cancel, AdamW over their parameter groups and the EMA
teacher, in float32. The only stand-ins are for what a CPU lacks: `.cuda()` returns the tensor
itself, `torch.cuda.synchronize` does nothing, the DistributedDataParallel wrapper is a plain
module with the same `.module` attribute, a one-process gloo group serves DINOLoss's
all_reduce, and the metric logger's end-of-epoch sync across processes is skipped. torchvision (only their data loading uses it) is replaced by empty modules.

Protocol (stdout, one JSON object a line): {"ready": ...} once built and warmed up; then for each
line "run N" on stdin, N steps run as one call of `train_one_epoch` on N copies of one random
batch and {"s_per_step": mean seconds, "cpu_s_per_step": CPU seconds of all its threads,
"steps": N} comes back; "quit" ends it.
"""

import argparse
import contextlib
import json
import os
import sys
import time
import types


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--official", required=True, help="folder holding main_dino.py")
  p.add_argument("--spec", required=True, help="JSON: model, head, crops, batch (vs_official.py)")
  p.add_argument("--threads", type=int, default=2)
  a = p.parse_args()
  spec = json.loads(a.spec)
  proto = os.fdopen(os.dup(1), "w", buffering=1)  # their prints go to stderr, ours to stdout
  sys.stdout = sys.stderr

  import numpy as np
  import torch
  from official_on_cpu import NoDDP, import_official  # noqa: PLC0415  (this folder)
  from torch import nn

  torch.set_num_threads(a.threads)
  torch.manual_seed(0)
  official = import_official(a.official, stub_torchvision=True)
  main_dino, utils, vits = official.main_dino, official.utils, official.vits

  m, h = spec["model"], spec["head"]

  def vit(drop_path_rate):
    from functools import partial

    return vits.VisionTransformer(
      img_size=[m["img_size"]],
      patch_size=m["patch_size"],
      embed_dim=m["embed_dim"],
      depth=m["depth"],
      num_heads=m["num_heads"],
      mlp_ratio=m["mlp_ratio"],
      qkv_bias=True,
      norm_layer=partial(nn.LayerNorm, eps=1e-6),
      drop_path_rate=drop_path_rate,
    )

  def head(norm_last_layer=True):
    return main_dino.DINOHead(
      m["embed_dim"],
      h["out_dim"],
      use_bn=False,
      norm_last_layer=norm_last_layer,
      hidden_dim=h["hidden_dim"],
      bottleneck_dim=h["bottleneck_dim"],
    )

  student = NoDDP(utils.MultiCropWrapper(vit(m["drop_path_rate"]), head(h["norm_last_layer"])))
  teacher = utils.MultiCropWrapper(vit(0.0), head())
  teacher.load_state_dict(student.module.state_dict())
  for q in teacher.parameters():
    q.requires_grad = False
  o = spec["optim"]
  epochs = 100
  ncrops = spec["global_number"] + spec["local_number"]
  dino_loss = main_dino.DINOLoss(
    h["out_dim"], ncrops, o["warmup_teacher_temp"], o["teacher_temp"], 0, epochs
  )
  optimizer = torch.optim.AdamW(utils.get_params_groups(student))
  iters = 10**5  # schedules long enough for every step of the run, at epoch 0
  lr_schedule = np.full(iters, o["lr"])
  wd_schedule = np.full(iters, o["weight_decay"])
  momentum_schedule = np.full(iters, o["momentum"])
  args = types.SimpleNamespace(
    epochs=epochs, clip_grad=o["clip_grad"], freeze_last_layer=0, use_fp16=False
  )
  b = spec["batch"]
  g = torch.randn(b, 3, spec["global_size"], spec["global_size"])
  l = torch.randn(b, 3, spec["local_size"], spec["local_size"])
  images = [g.clone() for _ in range(spec["global_number"])] + [
    l.clone() for _ in range(spec["local_number"])
  ]

  def run(n: int) -> tuple[float, float]:
    loader = [(images, None)] * n
    t0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(sys.stderr):
      main_dino.train_one_epoch(
        student,
        teacher,
        teacher,
        dino_loss,
        loader,
        optimizer,
        lr_schedule,
        wd_schedule,
        momentum_schedule,
        0,
        None,
        args,
      )
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n

  run(1)  # warm-up, not reported
  n_params = sum(q.numel() for q in student.parameters())
  proto.write(
    json.dumps({"ready": {"torch": torch.__version__, "threads": a.threads, "params": n_params}})
    + "\n"
  )
  for line in sys.stdin:
    cmd = line.split()
    if not cmd or cmd[0] == "quit":
      break
    n = int(cmd[1])
    wall, cpu = run(n)
    proto.write(json.dumps({"s_per_step": wall, "cpu_s_per_step": cpu, "steps": n}) + "\n")


if __name__ == "__main__":
  main()
