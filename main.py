r"""sslx entry point: flags -> config -> trainer.

  python main.py --config=configs/dino.py:fashion_mnist --workdir=/tmp/run \
      [--config.batch_size=256 ...] [--mode=train|knn|linear_probe|attentive_probe|export|attention]
  python main.py --mode=finetune --config=configs/finetune.py:fashion_mnist --workdir=/tmp/ft \
      --init_from=/tmp/run [--init_from_key=teacher|student]

A workdir that already holds a checkpoint resumes from it (a config that changes shapes, the
method or the schedules is refused: sslx/train/faults.py). SIGTERM or Ctrl-C stops training after
the current step with a checkpoint of it and exit status 75 (rerun the same command to resume).
Errors a user can fix end with one `error: ...` line and status 1. `--mode=knn` runs the
weighted kNN evaluation on the latest checkpoint of --workdir; `linear_probe` and
`attentive_probe` train a probe on its frozen features (sslx/eval/probe.py).
`--random_init` evaluates freshly initialised weights instead (the baselines).
`--init_from=FILE [--init_from_key=auto|teacher|student|ENTRY] [--init_from_head]` starts from
published weights: an official DINO / iBOT / SERE / MoCo v3 / CAE checkpoint (.pth, read without
torch), timm names or an sslx export (sslx/models/init_from.py). On a fresh workdir
`--mode=train` starts its student and teacher from that backbone (and with `--init_from_head`
DINO's projection head; a workdir with a checkpoint resumes and ignores it, so
the same command resumes); `--mode=knn|linear_probe|attentive_probe` evaluate the file's weights
without any checkpoint. `--config.probe.protocol=dino` makes `linear_probe` DINO's linear
protocol (sslx/eval/probe.py). `--init_from` may also name a workdir: its latest checkpoint's
backbone (the teacher unless --init_from_key=student).
`--mode=finetune` (configs/finetune.py) trains a classifier on a pretrained ViT whose backbone
starts from `--init_from` (a workdir or a file, also settable as config.finetune.pretrained), or
fresh with `--random_init` (the from-scratch baseline); it resumes, stops on SIGTERM and is
evaluated (top-1 / top-5) like any training run (sslx/methods/finetune.py). `--mode=train` with
that config does the same.
`--mode=export [--weights=teacher|student]` writes the latest checkpoint's backbone as PyTorch
weights (timm / torchvision names) to <workdir>/export/ (sslx/train/export_workdir.py).
`--mode=attention [--num_images=8] [--images=a.jpg,folder] [--keep_mass=0.6]` draws the ViT
teacher's last-layer [CLS] attention per head to <workdir>/attention/ (DINO's figure;
sslx/train/attention_workdir.py).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", None, "Config file, optionally ':preset'.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go.")
flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "finetune", "knn", "linear_probe", "attentive_probe", "export", "attention"],
  "What to do with the workdir.",
)
flags.DEFINE_enum(
  "weights",
  "teacher",
  ["teacher", "student"],
  "--mode=export: the EMA teacher (what the kNN evaluates) or the student.",
)
flags.DEFINE_bool(
  "random_init",
  False,
  "Evaluation modes: evaluate freshly initialised weights. --mode=finetune: train from "
  "scratch (the baseline).",
)
flags.DEFINE_string(
  "init_from",
  None,
  "A backbone file (official DINO / iBOT / SERE / MoCo v3 / CAE .pth, timm names, an sslx "
  "export) or a workdir (its latest checkpoint): the initial weights of a fresh "
  "--mode=train|finetune workdir (ignored when it has a checkpoint), or the weights "
  "--mode=knn|linear_probe|attentive_probe evaluate.",
)
flags.DEFINE_bool(
  "init_from_head",
  False,
  "--init_from with --mode=train: also load the projection head of a DINO checkpoint.",
)
flags.DEFINE_string(
  "init_from_key",
  "auto",
  "--init_from: 'auto' (what the official evaluations read), 'teacher', 'student', or the "
  "name of a top-level entry of the file.",
)
flags.DEFINE_integer("num_images", 8, "--mode=attention: how many images (rows).")
flags.DEFINE_list(
  "images",
  [],
  "--mode=attention: image files or folders (default: the first "
  "--num_images of the config's evaluation test split).",
)
flags.DEFINE_float(
  "keep_mass", 0.6, "--mode=attention: mass share of the thresholded mask (DINO's --threshold)."
)
flags.mark_flags_as_required(["config", "workdir"])


def _check_overrides(argv_all: list[str]) -> None:
  """Fails on --config.<key> overrides that name no key, listing the valid keys."""
  from sslx.config_check import unknown_override_message

  msg = unknown_override_message(argv_all)
  if msg:
    print(msg, file=sys.stderr)
    sys.exit(2)


def main(argv):
  del argv
  config = FLAGS.config
  logging.info("config:\n%s", config)
  # Imported after flag parsing so `python main.py --help` stays fast.
  from sslx import distributed
  from sslx.errors import UserError

  try:
    distributed.maybe_initialize()
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  from sslx.train import trainer

  try:
    if FLAGS.init_from and FLAGS.mode in ("export", "attention"):
      raise UserError(f"--init_from does not apply to --mode={FLAGS.mode}; drop it")
    if FLAGS.mode == "finetune" or (FLAGS.mode == "train" and config.method == "finetune"):
      from sslx.methods import finetune

      results = trainer.run(
        finetune.with_start(config, FLAGS.init_from, FLAGS.init_from_key, FLAGS.random_init),
        FLAGS.workdir,
      )
    elif FLAGS.mode == "train":
      results = trainer.run(
        config,
        FLAGS.workdir,
        init_from=FLAGS.init_from,
        init_from_key=FLAGS.init_from_key,
        init_from_head=FLAGS.init_from_head,
      )
    elif FLAGS.mode == "export":
      from sslx.train import export_workdir

      results = export_workdir.export(config, FLAGS.workdir, FLAGS.weights)
    elif FLAGS.mode == "attention":
      from sslx.train import attention_workdir

      results = attention_workdir.write_attention(
        config,
        FLAGS.workdir,
        num_images=FLAGS.num_images,
        images=FLAGS.images,
        keep=FLAGS.keep_mass,
        random_init=FLAGS.random_init,
      )
    elif FLAGS.mode == "knn" and not FLAGS.random_init and not FLAGS.init_from:
      results = trainer.evaluate_workdir(config, FLAGS.workdir)
    else:
      from sslx.train import probe_workdir

      results = probe_workdir.evaluate(
        config,
        FLAGS.workdir,
        FLAGS.mode,
        FLAGS.random_init,
        init_from=FLAGS.init_from,
        init_from_key=FLAGS.init_from_key,
      )
  except (UserError, trainer.TrainingDiverged, FileNotFoundError) as e:
    # Problems the user can fix: one clear message, not a traceback.
    logging.error("%s: %s", type(e).__name__, e)
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  except KeyboardInterrupt:
    # Outside training (which saves and exits on Ctrl-C by itself): nothing was half-written.
    print("error: interrupted", file=sys.stderr, flush=True)
    sys.exit(130)
  logging.info("results: %s", results)
  if isinstance(results, dict) and results.get("preempted"):
    # Stopped early by SIGTERM/SIGINT with a checkpoint: the same command resumes.
    from sslx.train import preemption

    sys.exit(preemption.PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  _check_overrides(sys.argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main)
