"""Every evaluation mode on every method config, through the method interface: kNN (from the
checkpoint, at random init and from the exported file with --init_from), linear and attentive
probes, export and the attention picture (or its one-line refusal for ResNets)."""

import os

import jax
import numpy as np
import pytest
from PIL import Image

from sslx.config_check import load_config_file
from sslx.methods.base import UnsupportedMode, evaluated_params
from sslx.train import (
  attention_workdir,
  checkpoint,
  export_workdir,
  probe_workdir,
  sharding,
  trainer,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = ["dino", "ibot", "mocov3", "cae", "byol", "sage", "sere_dino", "dino_koleo"]
VITS = {"dino", "ibot", "mocov3", "cae", "sere_dino", "dino_koleo"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """root/{train,test}/{a,b}/*.png: 12 + 6 small labelled images (class = brightness)."""
  root = tmp_path_factory.mktemp("every_mode")
  rng = np.random.default_rng(0)
  for split, n in (("train", 6), ("test", 3)):
    for label, level in (("a", 40), ("b", 200)):
      os.makedirs(root / split / label)
      for i in range(n):
        pixels = np.clip(rng.normal(level, 20, (28, 28, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / split / label / f"{i}.png")
  return str(root)


def _config(name, folder):
  file = {"dino_koleo": "dino"}.get(name, name)
  c = load_config_file(os.path.join(ROOT, f"configs/{file}.py:smoke"))
  with c.unlocked():
    if name == "dino_koleo":
      c.koleo.enabled = True
    if name == "sage":
      c.sage.ablation = "random_evaluator"  # no BYOL checkpoint needed
    c.data.update(
      source="image_folder",
      path=folder,
      eval_train_split="train",
      eval_test_split="test",
      eval_resize=c.data.global_crops.size,
      eval_size=c.data.global_crops.size,
    )
    c.eval.update(batch_size=6, knn_k=3)
    c.probe = dict(
      linear=dict(epochs=1, batch_size=4),
      attentive=dict(epochs=1, batch_size=4),
      max_train=10,
      max_test=5,
      seed=0,
    )
  return c


@pytest.mark.parametrize("name", CONFIGS)
def test_every_mode(name, folder, tmp_path):
  c = _config(name, folder)
  workdir = str(tmp_path)
  # A step-1 checkpoint of the method's initial state, written the trainer's way (training itself
  # is covered in tests/train; this test is about reading any method's checkpoint).
  built = trainer.build(c, sharding.make_mesh(c.mesh), steps_per_epoch=10, total_steps=10)
  state = built.init(c.seed)
  assert (state.teacher_params is None) == (name == "cae")  # CAE keeps no teacher copy
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  ckpt.save(1, state.replace(step=state.step + 1), None)
  ckpt.close()

  knn = trainer.evaluate_workdir(c, workdir)
  assert knn["step"] == 1 and 0 <= knn["top1"] <= 100
  fresh = probe_workdir.evaluate(c, workdir, "knn", random_init=True)
  # The checkpoint holds the initial state, so --random_init gives the same kNN, from the very
  # weights the trainer starts from.
  assert fresh["top1"] == pytest.approx(knn["top1"])
  step, weights = probe_workdir.teacher_of(c, workdir, built.method, random_init=True)
  assert step == 0
  for a, b in zip(jax.tree.leaves(weights), jax.tree.leaves(evaluated_params(built.method, state))):
    np.testing.assert_array_equal(a, b)
  for mode in ("linear_probe", "attentive_probe"):
    res = probe_workdir.evaluate(c, workdir, mode)
    assert res["num_train"] == 10 and res["num_test"] == 5 and 0 <= res["top1"] <= 100, mode
  exported = export_workdir.export(c, workdir, "teacher")
  assert exported["tensors"] > 0 and os.path.exists(exported["path"])
  # --init_from of the export evaluates the same weights as the checkpoint, without it.
  again = probe_workdir.evaluate(c, str(tmp_path / "empty"), "knn", init_from=exported["path"])
  assert again["step"] == 0 and again["top1"] == pytest.approx(knn["top1"])
  if name in VITS:
    pic = attention_workdir.write_attention(c, workdir, num_images=2)
    assert os.path.exists(pic["png"]) and pic["heads"] >= 1
  else:
    with pytest.raises(UnsupportedMode, match="needs a ViT"):
      attention_workdir.write_attention(c, workdir, num_images=2)
