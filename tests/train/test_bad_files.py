"""Unreadable training images are counted once each (not once per substitution), the count is
carried across resume, and each file is named once in the log."""

import json
import os

import numpy as np
from PIL import Image

from sslx.config_check import load_config_file
from sslx.data import pipeline
from sslx.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _folder(root):
  rng = np.random.default_rng(0)
  for i in range(60):
    Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
  for i in range(4):
    (root / f"bad{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")


def test_skipped_images_are_distinct_files_across_resume(tmp_path, caplog):
  data = tmp_path / "images"
  data.mkdir()
  _folder(data)
  config = load_config_file(os.path.join(ROOT, "configs/dino.py:smoke"))
  with config.unlocked():
    config.data.update(source="image_folder", path=str(data))
    config.log_every_steps = 1
    config.total_steps = 4
    config.checkpoint.every_steps = 2
  # What the batches of steps 1..4 hold (64 records, batch 16: one epoch, each file met once at
  # most; the count must grow with them).
  it = iter(
    pipeline.train_dataset(
      config.data,
      seed=config.seed,
      batch_size=config.batch_size,
      patch_size=config.model.patch_size,
    )
  )
  seen, want = set(), {}
  for step in range(1, 5):
    bad = next(it)["bad_indices"]
    seen |= set(bad[bad >= 0].tolist())
    want[step] = len(seen)
  it.close()
  assert want[4] == 4 and want[1] < want[4]  # the test exercises growth over steps

  workdir = str(tmp_path / "run")
  trainer.run(config, workdir, stop_after=2)
  trainer.run(config, workdir)  # resumes from step 2 with the set of step 2
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "data/skipped_images" in row:
        rows[row["step"]] = row["data/skipped_images"]
  assert rows == {s: float(n) for s, n in want.items()}
  named = [
    r.getMessage() for r in caplog.records if "unreadable file(s) replaced" in r.getMessage()
  ]
  for i in range(4):  # every bad file met is named in exactly one summary line
    hits = sum(m.count(f"bad{i}.jpg") for m in named)
    assert hits == (1 if any(f"bad{i}.jpg" in m for m in named) else 0)
  assert sum(m.count(".jpg") for m in named) == want[4]
